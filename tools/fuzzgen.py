"""Random valid models for differential testing (``optc fuzz``, ``tests/fuzz``).

A model is described by a :class:`ModelSpec`: the input shapes, a list of :class:`Op` (a kind,
the values it reads, its parameters and the shape it produces) and the outputs. Value ``i`` is
input ``i`` for ``i < len(inputs)``, else the result of op ``i - len(inputs)``. Shapes are
tracked while a spec is drawn, so every spec is valid by construction: each op's parameters are
chosen from the ones its input shapes allow (a convolution's padding and stride give an output
of at least one pixel, heads divide the width, a concatenation's operands agree off its axis),
and no intermediate holds more than :data:`MAX_NUMEL` elements.

A spec prints itself as standalone Python source (:meth:`ModelSpec.source`: ``import torch``, a
``Model`` class, ``make_inputs``) and :func:`build_model` builds the model by executing that
source, so a reproducer holds exactly the model that was tested. Weights come from a
``torch.Generator`` seeded by ``spec.seed`` (scaled by fan-in so activations stay O(1);
BatchNorm statistics and LayerNorm affine parameters are random, not the identity); inputs are
standard normal from ``spec.seed + 1`` (and ``+ 2``, ... for more input sets): free of NaN and Inf.

Specs are drawn from any source of choices through a :class:`Chooser`: :func:`random_spec`
(a seed, ``random.Random``: the campaign) or :func:`model_specs` (a hypothesis strategy, which
hypothesis shrinks: every choice shrinks towards the simplest option, stopping early, fewer
ops, smaller shapes). ``repr(spec)`` is Python that rebuilds it (regression tests keep it).

Op kinds (:data:`KINDS`), each with forms that exercise optc's rewrites:

- elementwise: ``act`` (relu, gelu erf/tanh, silu, sigmoid, ...), ``gelu_manual`` (both
  hand-written forms, for fuse-gelu), ``clip``, ``scalar`` (x*c, x/c, c-x, ...),
  ``channel_const`` (per-channel constants, for fold-binary), ``dropout`` (eval mode),
  ``noop`` (clone, contiguous, no-op views: canonicalize), ``dup`` (a repeated subexpression:
  cse), ``const_expr`` (arithmetic on weights: constant-fold), ``residual`` (add/mul with an
  earlier value), ``center`` (reductions broadcast back), ``softmax``;
- shape: ``concat``, ``split``, ``permute``, ``reshape``, ``to2``/``to3``/``to4`` (flatten,
  unsqueeze, factorise a dim);
- image (N, C, H, W): ``conv2d`` (grouped, depthwise, strided, dilated, padded, padding
  modes), ``conv_transpose2d``, ``batchnorm2d``, ``pool2d`` (max, avg, adaptive);
- sequence (N, A, B) and vector (N, D): ``linear``, ``parallel_linear`` (for
  merge-parallel-linear), ``matmul_weight`` (x @ W + b: addmm), ``bmm_self``,
  ``layernorm``, ``layernorm_manual`` (for fuse-layer-norm), ``attention`` (hand-written
  attention, self or cross, masks, scales, heads: fuse-attention), ``batchnorm1d``,
  ``conv1d``, ``pool1d``;
- idioms of HF transformers models: ``rmsnorm`` (llama with its float32 upcast, gemma's
  ``1 + w``, t5 without upcast, and a near miss with eps outside the sqrt), ``rotary`` (cos/sin
  from an ``inv_freq`` buffer and ``arange`` in forward; rotate_half, interleaved, partial, and
  partial over the whole head: a zero-width pass-through slice), ``gqa_attention`` (fewer
  key/value heads repeated by ``repeat_kv`` or SDPA ``enable_gqa``; causal, sliding-window and
  padding masks built from ``arange`` comparisons and the input, applied by ``where``,
  ``masked_fill`` or an additive ``finfo.min`` mask; float32 softmax; ALiBi slopes),
  ``inplace`` (writes on a fresh tensor: ``copy_`` into a slice, ``fill_``, ``masked_fill_``,
  ``index_put_``, ``div_``/``mul_``/``add_``), ``embed`` (embedding gathers with indices
  computed in the model: argmax/topk of an lm-head projection, ``arange`` positions, ``cumsum``
  position ids, ``positions // 2``, negative list indices), ``moe`` (router softmax, topk,
  renormalise; experts combined by ``one_hot``/``scatter``/``idx == e`` masks, or sorted by
  expert with ``histc`` counts, ``cumsum`` offsets and an inverse permutation or ``index_add_``),
  ``dtype_roundtrip`` (``.float()``, ``.to(torch.float32)``, ``.type_as(y)``,
  ``softmax(dtype=torch.float32).to(x.dtype)``: real casts in the float64 reference, each undone
  before its value meets a float64 weight), ``empty`` (``torch.cat`` with a 1-d
  ``torch.tensor([])`` buffer, zero-width slices and caches, a sum over zero elements).
"""

from __future__ import annotations

import hashlib
import linecache
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

MAX_NUMEL = 4096        # largest intermediate, in elements
MAX_OPS = 10            # default cap on ops per model


# ---- the spec ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Op:
    """One layer: ``kind`` applied to values ``inputs`` with ``params``; produces ``shape``."""

    kind: str
    inputs: tuple[int, ...]
    params: tuple[tuple[str, Any], ...]
    shape: tuple[int, ...]

    @property
    def p(self) -> dict[str, Any]:
        return dict(self.params)

    def describe(self) -> str:
        args = ", ".join(f"v{i}" for i in self.inputs)
        ps = ", ".join(f"{k}={v!r}" for k, v in self.params)
        return f"{self.kind}({args}{', ' if ps else ''}{ps}) -> {list(self.shape)}"


@dataclass(frozen=True)
class ModelSpec:
    """A model: input shapes, ops (value ``len(inputs) + i`` is op ``i``), outputs, seed."""

    inputs: tuple[tuple[int, ...], ...]
    ops: tuple[Op, ...]
    outputs: tuple[int, ...]
    seed: int = 0

    def shape_of(self, vid: int) -> tuple[int, ...]:
        n = len(self.inputs)
        return self.inputs[vid] if vid < n else self.ops[vid - n].shape

    def kinds(self) -> set[str]:
        return {op.kind for op in self.ops}

    def forms(self) -> set[str]:
        """``kind`` and ``kind/form`` of every op (coverage accounting)."""
        out = set()
        for op in self.ops:
            out.add(op.kind)
            for key in ("form", "fn", "mask", "groups_mode", "var", "norm", "op", "pool", "qkv", "rot", "apply",
                        "alibi", "upcast", "restore", "sort"):
                if key in op.p:
                    out.add(f"{op.kind}/{key}={op.p[key]}")
        return out

    def describe(self) -> str:
        n = len(self.inputs)
        lines = [f"inputs: {', '.join(f'v{i}: {list(s)}' for i, s in enumerate(self.inputs))}  seed={self.seed}"]
        lines += [f"  v{n + i} = {op.describe()}" for i, op in enumerate(self.ops)]
        lines.append(f"outputs: {', '.join(f'v{o}' for o in self.outputs)}")
        return "\n".join(lines)

    def digest(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:12]

    def source(self) -> str:
        """Standalone Python source: imports, ``Model(seed)``, ``make_inputs(seed)``."""
        return _emit_source(self)


# ---- sources of choices --------------------------------------------------------------------------
class Chooser:
    """Where the generator's choices come from. Every choice is an integer in a range and
    shrinks towards its first option (offset 0). ``record`` keeps the offsets drawn (a choice
    sequence: replayed by :class:`ReplayChooser`, shrunk by :func:`shrink_choices`) and
    ``marks`` the positions where each op's choices begin."""

    def __init__(self):
        self.record: list[int] = []
        self.marks: list[int] = []

    def _draw(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def integer(self, lo: int, hi: int) -> int:
        v = self._draw(lo, hi)
        self.record.append(v - lo)
        return v

    def mark(self) -> None:
        self.marks.append(len(self.record))

    def more_ops(self, first: bool) -> bool:
        """Whether to draw another op (the first op is always drawn)."""
        more = self.flag(85)
        return first or more

    def pick(self, options: Sequence):
        return options[self.integer(0, len(options) - 1)]

    def flag(self, percent: int) -> bool:
        """True with about ``percent`` % probability; shrinks to False."""
        return self.integer(0, 99) >= 100 - percent

    def weighted(self, options: Sequence[tuple[Any, float]]):
        total = sum(w for _, w in options)
        scale = 1000 / total
        cum, r = 0, self.integer(0, 999)
        for value, w in options:
            cum += w * scale
            if r < cum:
                return value
        return options[-1][0]


class RandomChooser(Chooser):
    def __init__(self, seed: int | str):
        super().__init__()
        self.rng = random.Random(seed)

    def _draw(self, lo, hi):
        return self.rng.randint(lo, hi)


class ReplayChooser(Chooser):
    """Replays a recorded choice sequence (offsets, clamped to each range); past its end
    every choice is the simplest one."""

    def __init__(self, choices: Sequence[int]):
        super().__init__()
        self.choices = list(choices)

    def _draw(self, lo, hi):
        i = len(self.record)
        off = self.choices[i] if i < len(self.choices) else 0
        return lo + abs(off) % (hi - lo + 1)


class GeneChooser(Chooser):
    """Choices from a header, one *gene* (a list of ints) per op, and a tail: the shape of
    :func:`model_specs`. Each op reads only its own gene, so when hypothesis shrinks the list of
    genes it deletes whole ops, and shrinking a gene's ints towards 0 simplifies that op alone.
    A value ``v`` in a range of ``n`` options picks option ``v % n``; a gene that runs out reads 0."""

    def __init__(self, header: Sequence[int], genes: Sequence[Sequence[int]], tail: Sequence[int]):
        super().__init__()
        self.streams = [list(header)] + [list(g) for g in genes] + [list(tail)]
        self.stream, self.pos = 0, 0

    def mark(self) -> None:
        super().mark()
        self.stream, self.pos = min(self.stream + 1, len(self.streams) - 1), 0

    def more_ops(self, first: bool) -> bool:
        return self.stream < len(self.streams) - 1

    def _draw(self, lo, hi):
        stream = self.streams[self.stream]
        v = stream[self.pos] if self.pos < len(stream) else 0
        self.pos += 1
        return lo + v % (hi - lo + 1)


# ---- kinds ---------------------------------------------------------------------------------------
Gen = Callable[["_Builder", int], "tuple[tuple[int, ...], dict, tuple[int, ...]] | None"]
Emit = Callable[[Op, int, list, list, str], "tuple[list[str], list[str]]"]


@dataclass(frozen=True)
class Kind:
    name: str
    ranks: tuple[int, ...]
    weight: float
    gen: Gen
    emit: Emit
    doc: str = ""


KINDS: dict[str, Kind] = {}
ANY = (2, 3, 4)


def kind(name: str, ranks=ANY, weight: float = 1.0, doc: str = ""):
    def deco(pair):
        gen, emit = pair
        KINDS[name] = Kind(name, tuple(ranks), weight, gen, emit, doc)
        return pair
    return deco


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _numel(shape) -> int:
    return math.prod(shape)


def _ok(shape) -> bool:
    return all(d >= 1 for d in shape) and _numel(shape) <= MAX_NUMEL


def _f(x: float) -> str:
    return repr(float(x))


# Each kind is a pair (gen, emit). gen(b, x) reads b's chooser and shapes and returns
# (inputs, params, out_shape) or None (no valid parameters for this input); emit(op, i, a, shapes, out)
# returns (__init__ lines, forward lines) with a = input variable names, shapes = input shapes.

# -- elementwise ------------------------------------------------------------------------------------
_ACTS = {
    "relu": "torch.relu({x})", "gelu": "F.gelu({x})", "gelu_tanh": 'F.gelu({x}, approximate="tanh")',
    "silu": "F.silu({x})", "sigmoid": "torch.sigmoid({x})", "tanh": "torch.tanh({x})",
    "leaky_relu": "F.leaky_relu({x}, 0.1)", "hardswish": "F.hardswish({x})", "elu": "F.elu({x})",
    "softplus": "F.softplus({x})", "hardsigmoid": "F.hardsigmoid({x})", "silu_manual": "{x} * torch.sigmoid({x})",
    "quick_gelu": "{x} * torch.sigmoid(1.702 * {x})", "relu_module": "self.m{i}({x})",
}


def _gen_act(b, x):
    return (x,), {"fn": b.c.pick(list(_ACTS))}, b.shape(x)


def _emit_act(op, i, a, shapes, out):
    fn = op.p["fn"]
    init = [f"self.m{i} = nn.ReLU()"] if fn == "relu_module" else []
    return init, [f"{out} = " + _ACTS[fn].format(x=a[0], i=i)]


kind("act", weight=4, doc="relu, gelu (erf/tanh), silu, sigmoid, tanh, ...")((_gen_act, _emit_act))

_GELU_MANUAL = {
    "erf_div": "0.5 * {x} * (1.0 + torch.erf({x} / math.sqrt(2.0)))",
    "erf_mul": "{x} * 0.5 * (1.0 + torch.erf({x} * 0.7071067811865476))",
    "erf_half_first": "{x} * (torch.erf({x} / 1.4142135623730951) + 1.0) / 2.0",
    "tanh_pow": "0.5 * {x} * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * ({x} + 0.044715 * torch.pow({x}, 3.0))))",
    "tanh_cube": "0.5 * {x} * (1.0 + torch.tanh(0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})))",
    "tanh_factored": "0.5 * {x} * (1.0 + torch.tanh(0.7978845608 * {x} * (1.0 + 0.044715 * {x} * {x})))",
    "near_miss_sqrt2": "0.5 * {x} * (1.0 + torch.erf({x} / 1.4142))",   # truncated constant: not GELU
}


def _gen_gelu_manual(b, x):
    return (x,), {"form": b.c.pick(list(_GELU_MANUAL))}, b.shape(x)


def _emit_gelu_manual(op, i, a, shapes, out):
    return [], [f"{out} = " + _GELU_MANUAL[op.p["form"]].format(x=a[0])]


kind("gelu_manual", weight=1.5, doc="GELU written out (erf and tanh forms)")((_gen_gelu_manual, _emit_gelu_manual))

_CLIPS = ("clamp", "hardtanh", "relu6", "clamp_min", "clamp_max", "clip")


def _gen_clip(b, x):
    form = b.c.pick(_CLIPS)
    lo, hi = b.c.pick([-1.0, 0.0, -0.5, -2.0]), b.c.pick([1.0, 0.5, 6.0, 2.0])
    return (x,), {"form": form, "lo": lo, "hi": hi}, b.shape(x)


def _emit_clip(op, i, a, shapes, out):
    p, x = op.p, a[0]
    lo, hi = _f(p["lo"]), _f(p["hi"])
    expr = {"clamp": f"torch.clamp({x}, {lo}, {hi})", "hardtanh": f"F.hardtanh({x}, {lo}, {hi})",
            "relu6": f"F.relu6({x})", "clamp_min": f"{x}.clamp(min={lo})", "clamp_max": f"{x}.clamp(max={hi})",
            "clip": f"torch.clip({x}, {lo}, {hi})"}[p["form"]]
    return [], [f"{out} = {expr}"]


kind("clip", weight=1, doc="clamp, hardtanh, relu6")((_gen_clip, _emit_clip))

_SCALAR_OPS = ("mul", "div", "add", "sub", "rsub", "rmul", "radd", "mul_method")


def _gen_scalar(b, x):
    op = b.c.pick(_SCALAR_OPS)
    c = b.c.pick([2.0, 0.5, -1.5, 3.0, 0.125, 1.0, -0.25])
    return (x,), {"op": op, "c": c}, b.shape(x)


def _emit_scalar(op, i, a, shapes, out):
    x, c = a[0], _f(op.p["c"])
    expr = {"mul": f"{x} * {c}", "div": f"{x} / {c}", "add": f"{x} + {c}", "sub": f"{x} - {c}",
            "rsub": f"{c} - {x}", "rmul": f"{c} * {x}", "radd": f"{c} + {x}",
            "mul_method": f"{x}.mul({c})"}[op.p["op"]]
    return [], [f"{out} = {expr}"]


kind("scalar", weight=2, doc="x * c, x / c, x + c, c - x")((_gen_scalar, _emit_scalar))


def _channel_shapes(shape) -> dict[str, tuple[int, ...]]:
    r = len(shape)
    if r == 2:
        return {"last": (shape[1],), "full_row": (1, shape[1])}
    if r == 3:
        return {"last": (shape[2],), "dim1": (shape[1], 1), "dim2_of3": (1, 1, shape[2])}
    return {"channel": (shape[1], 1, 1), "channel4": (1, shape[1], 1, 1), "last": (shape[3],),
            "spatial": (shape[2], shape[3])}


def _gen_channel_const(b, x):
    shapes = _channel_shapes(b.shape(x))
    where = b.c.pick(list(shapes))
    return (x,), {"op": b.c.pick(["mul", "add", "sub", "div", "rmul"]), "where": where,
                  "cshape": shapes[where], "storage": b.c.pick(["buffer", "param"])}, b.shape(x)


def _emit_channel_const(op, i, a, shapes, out):
    p, x = op.p, a[0]
    cs = p["cshape"]
    value = f"_away_from_zero(g, {cs!r})" if p["op"] in ("mul", "div", "rmul") else f"_normal(g, {cs!r}, 0.5)"
    init = ([f"self.c{i} = nn.Parameter({value})"] if p["storage"] == "param"
            else [f'self.register_buffer("c{i}", {value})'])
    expr = {"mul": f"{x} * self.c{i}", "add": f"{x} + self.c{i}", "sub": f"{x} - self.c{i}",
            "div": f"{x} / self.c{i}", "rmul": f"self.c{i} * {x}"}[p["op"]]
    return init, [f"{out} = {expr}"]


kind("channel_const", weight=2, doc="per-channel constant scale/shift")((_gen_channel_const, _emit_channel_const))


def _gen_dropout(b, x):
    form = b.c.pick(["module", "functional_training", "functional_false", "feature"] if len(b.shape(x)) == 4
                    else ["module", "functional_training", "functional_false"])
    return (x,), {"form": form, "prob": b.c.pick([0.1, 0.5, 0.0])}, b.shape(x)


def _emit_dropout(op, i, a, shapes, out):
    p, x = op.p, a[0]
    pr = _f(p["prob"])
    if p["form"] == "module":
        return [f"self.m{i} = nn.Dropout({pr})"], [f"{out} = self.m{i}({x})"]
    if p["form"] == "feature":
        return [f"self.m{i} = nn.Dropout2d({pr})"], [f"{out} = self.m{i}({x})"]
    train = "self.training" if p["form"] == "functional_training" else "False"
    return [], [f"{out} = F.dropout({x}, {pr}, {train})"]


kind("dropout", weight=1, doc="dropout in eval mode")((_gen_dropout, _emit_dropout))

_NOOPS = ("contiguous", "clone", "detach", "to_dtype", "reshape_same", "view_roundtrip", "unsqueeze_squeeze",
          "double_transpose", "expand_same", "slice_full", "narrow_full", "flatten_unflatten", "mul_one")


def _gen_noop(b, x):
    return (x,), {"form": b.c.pick(_NOOPS)}, b.shape(x)


def _emit_noop(op, i, a, shapes, out):
    x, s = a[0], list(shapes[0])
    r = len(s)
    expr = {
        "contiguous": f"{x}.contiguous()", "clone": f"{x}.clone()", "detach": f"{x}.detach()",
        "to_dtype": f"{x}.to(torch.float32 if {x}.dtype == torch.float32 else {x}.dtype)",
        "reshape_same": f"{x}.reshape({s})", "view_roundtrip": f"{x}.reshape({s[0]}, -1).reshape({s})",
        "unsqueeze_squeeze": f"{x}.unsqueeze(1).squeeze(1)", "double_transpose": f"{x}.transpose(-1, -2).transpose(-1, -2)",
        "expand_same": f"{x}.expand({s})", "slice_full": f"{x}[:, :{s[1]}]", "narrow_full": f"{x}.narrow(-1, 0, {s[-1]})",
        "flatten_unflatten": f"{x}.flatten(1).unflatten(1, {tuple(s[1:])!r})" if r > 2 else f"{x}.flatten(1)",
        "mul_one": f"{x} * 1.0",
    }[op.p["form"]]
    return [], [f"{out} = {expr}"]


kind("noop", weight=1.5, doc="no-op copies and views (canonicalize)")((_gen_noop, _emit_noop))

_DUP_FNS = {"relu": "torch.relu({x})", "sigmoid": "torch.sigmoid({x})", "scale": "({x} * 2.0)",
            "tanh": "torch.tanh({x})", "square": "({x} * {x})"}


def _gen_dup(b, x):
    return (x,), {"fn": b.c.pick(list(_DUP_FNS)), "op": b.c.pick(["add", "mul", "sub_then_add"])}, b.shape(x)


def _emit_dup(op, i, a, shapes, out):
    f = _DUP_FNS[op.p["fn"]].format(x=a[0])
    if op.p["op"] == "add":
        return [], [f"{out} = {f} + {f}"]
    if op.p["op"] == "mul":
        return [], [f"{out} = {f} * {f}"]
    return [], [f"{out} = ({f} - {a[0]}) + ({f} - {a[0]})"]


kind("dup", weight=1, doc="a repeated subexpression (cse)")((_gen_dup, _emit_dup))


def _gen_const_expr(b, x):
    shapes = _channel_shapes(b.shape(x))
    where = b.c.pick(list(shapes))
    return (x,), {"form": b.c.pick(["sigmoid", "affine", "exp_neg", "softmax", "outer"]),
                  "where": where, "cshape": shapes[where]}, b.shape(x)


def _emit_const_expr(op, i, a, shapes, out):
    p, x = op.p, a[0]
    cs = p["cshape"]
    init = [f"self.c{i} = nn.Parameter(_normal(g, {cs!r}))"]
    expr = {"sigmoid": f"{x} * torch.sigmoid(self.c{i})", "affine": f"{x} + (self.c{i} * 2.0 + 1.0) * 0.5",
            "exp_neg": f"{x} * torch.exp(-self.c{i}.abs())", "softmax": f"{x} * torch.softmax(self.c{i}, dim=-1)",
            "outer": f"{x} + self.c{i}.reshape(-1).sum() * 0.1"}[p["form"]]
    return init, [f"{out} = {expr}"]


kind("const_expr", weight=1, doc="arithmetic on weights (constant-fold)")((_gen_const_expr, _emit_const_expr))


def _gen_residual(b, x):
    s = b.shape(x)
    others = [v for v in range(b.n_values) if b.shape(v) == s]
    other = b.c.pick(others[::-1])     # shrinks towards the most recent (x itself)
    # x - x is exactly zero: what follows it (a norm of a constant) is ill-conditioned, and any
    # reordered float32 sum then differs by more than the oracle allows without being wrong
    ops = ["add", "mul", "add_fn", "add_alpha"] if other == x else ["add", "mul", "sub", "add_fn", "add_alpha"]
    return (x, other), {"op": b.c.pick(ops)}, s


def _emit_residual(op, i, a, shapes, out):
    x, y = a
    expr = {"add": f"{x} + {y}", "mul": f"{x} * {y}", "sub": f"{x} - {y}", "add_fn": f"torch.add({x}, {y})",
            "add_alpha": f"torch.add({x}, {y}, alpha=0.5)"}[op.p["op"]]
    return [], [f"{out} = {expr}"]


kind("residual", weight=2.5, doc="residual add/mul with an earlier value")((_gen_residual, _emit_residual))


def _gen_center(b, x):
    r = len(b.shape(x))
    return (x,), {"form": b.c.pick(["center", "absmean", "sum_tanh", "amax"]),
                  "dim": b.c.pick(list(range(r - 1, 0, -1)))}, b.shape(x)


def _emit_center(op, i, a, shapes, out):
    x, d = a[0], op.p["dim"]
    expr = {"center": f"{x} - {x}.mean({d}, keepdim=True)",
            "absmean": f"{x} / ({x}.abs().mean({d}, keepdim=True) + 1.0)",
            # tanh, not sigmoid: sigmoid of a large negative sum is a vanishing output, where ONNX
            # Runtime's Sigmoid (absolute error 6e-8, zero below -18) differs by 100% of it
            "sum_tanh": f"{x} * torch.tanh({x}.sum({d}, keepdim=True))",
            "amax": f"{x} - {x}.amax({d}, keepdim=True)"}[op.p["form"]]
    return [], [f"{out} = {expr}"]


kind("center", weight=1, doc="reductions broadcast back (mean/amax/sum)")((_gen_center, _emit_center))


def _gen_softmax(b, x):
    r = len(b.shape(x))
    return (x,), {"dim": b.c.pick([-1] + list(range(1, r - 1)) + [0]),
                  "form": b.c.pick(["torch", "functional", "method", "log_softmax"])}, b.shape(x)


def _emit_softmax(op, i, a, shapes, out):
    x, d = a[0], op.p["dim"]
    expr = {"torch": f"torch.softmax({x}, dim={d})", "functional": f"F.softmax({x}, dim={d})",
            "method": f"{x}.softmax({d})", "log_softmax": f"F.log_softmax({x}, dim={d})"}[op.p["form"]]
    return [], [f"{out} = {expr}"]


kind("softmax", weight=1.5, doc="softmax / log_softmax on any dim")((_gen_softmax, _emit_softmax))


# -- shape ops -------------------------------------------------------------------------------------
def _gen_concat(b, x):
    s = b.shape(x)
    r = len(s)
    d = b.c.pick([1, r - 1] + list(range(r)))
    others = [v for v in range(b.n_values)
              if len(b.shape(v)) == r and all(b.shape(v)[k] == s[k] for k in range(r) if k != d)]
    y = b.c.pick(others[::-1])
    shape = list(s)
    shape[d] += b.shape(y)[d]
    shape = tuple(shape)
    if not _ok(shape):
        return None
    return (x, y), {"dim": d, "order": b.c.pick(["xy", "yx"]), "form": b.c.pick(["cat", "concat"])}, shape


def _emit_concat(op, i, a, shapes, out):
    x, y = a if op.p["order"] == "xy" else a[::-1]
    fn = "torch.cat" if op.p["form"] == "cat" else "torch.concat"
    return [], [f"{out} = {fn}([{x}, {y}], dim={op.p['dim']})"]


kind("concat", weight=1.5, doc="concatenate with an earlier value")((_gen_concat, _emit_concat))


def _gen_split(b, x):
    s = b.shape(x)
    r = len(s)
    dims = [d for d in range(1, r) if s[d] >= 2]
    if not dims:
        return None
    d = b.c.pick(dims[::-1])
    n = s[d]
    forms = ["rotate", "pick_first", "unbind_sum"] + (["glu", "add_halves", "chunk_mul"] if n % 2 == 0 else [])
    form = b.c.pick(forms)
    first = b.c.integer(1, n - 1)
    shape = list(s)
    if form in ("glu", "add_halves", "chunk_mul"):
        shape[d] = n // 2
    elif form == "pick_first":
        shape[d] = first
    elif form == "unbind_sum":
        del shape[d]
        if len(shape) < 2:
            return None
    return (x,), {"dim": d, "form": form, "first": first}, tuple(shape)


def _emit_split(op, i, a, shapes, out):
    p, x = op.p, a[0]
    d, n = p["dim"], shapes[0][p["dim"]]
    f = p["form"]
    if f == "rotate":
        return [], [f"t{i}a, t{i}b = torch.split({x}, [{p['first']}, {n - p['first']}], dim={d})",
                    f"{out} = torch.cat([t{i}b, t{i}a], dim={d})"]
    if f == "pick_first":
        return [], [f"{out} = {x}.split({p['first']}, dim={d})[0]"]
    if f == "unbind_sum":
        return [], [f"t{i} = torch.unbind({x}, dim={d})", f"{out} = t{i}[0] + t{i}[-1]"]
    if f == "glu":
        return [], [f"t{i}a, t{i}b = {x}.chunk(2, dim={d})", f"{out} = t{i}a * torch.sigmoid(t{i}b)"]
    if f == "add_halves":
        return [], [f"t{i}a, t{i}b = torch.split({x}, {n // 2}, dim={d})", f"{out} = t{i}a + t{i}b"]
    return [], [f"{out} = F.glu({x}, dim={d})"]


kind("split", weight=1.5, doc="split/chunk/unbind and recombine")((_gen_split, _emit_split))


def _gen_permute(b, x):
    s = b.shape(x)
    r = len(s)
    perm = list(range(r))
    for k in range(r - 1, 0, -1):          # Fisher-Yates; all-zero choices keep the identity
        j = b.c.integer(0, k)
        perm[k], perm[j] = perm[j], perm[k]
    if perm == list(range(r)):
        perm[-1], perm[-2] = perm[-2], perm[-1]
    form = b.c.pick(["permute", "permute_contiguous"] + (["transpose"] if sorted(
        k for k in range(r) if perm[k] != k).__len__() == 2 else []))
    return (x,), {"perm": tuple(perm), "form": form}, tuple(s[k] for k in perm)


def _emit_permute(op, i, a, shapes, out):
    x, perm = a[0], op.p["perm"]
    if op.p["form"] == "transpose":
        d0, d1 = [k for k in range(len(perm)) if perm[k] != k]
        return [], [f"{out} = {x}.transpose({d0}, {d1})"]
    suffix = ".contiguous()" if op.p["form"] == "permute_contiguous" else ""
    return [], [f"{out} = {x}.permute{tuple(perm)!r}{suffix}"]


kind("permute", weight=1, doc="permute / transpose")((_gen_permute, _emit_permute))


def _factor(b, n: int, parts: int) -> list[int]:
    """``parts`` positive ints whose product is ``n`` (chosen by ``b``'s chooser)."""
    out = []
    for _ in range(parts - 1):
        d = b.c.pick(_divisors(n))
        out.append(d)
        n //= d
    return out + [n]


def _gen_reshape(b, x):
    s = b.shape(x)
    rest = _factor(b, _numel(s[1:]), len(s) - 1)
    return (x,), {"to": (s[0], *rest), "form": b.c.pick(["reshape", "contiguous_view", "neg_one"])}, (s[0], *rest)


def _emit_reshape(op, i, a, shapes, out):
    x, to = a[0], list(op.p["to"])
    if op.p["form"] == "contiguous_view":
        return [], [f"{out} = {x}.contiguous().view({to})"]
    if op.p["form"] == "neg_one":
        return [], [f"{out} = {x}.reshape({[to[0], -1] + to[2:]})"]
    return [], [f"{out} = {x}.reshape({to})"]


kind("reshape", weight=0.7, doc="reshape to another factorisation")((_gen_reshape, _emit_reshape))


def _gen_to2(b, x):
    s = b.shape(x)
    form = b.c.pick(["flatten", "view", "mean"] + (["amax_spatial"] if len(s) == 4 else []))
    if form in ("mean", "amax_spatial"):
        shape = (s[0], s[1]) if len(s) == 4 else (s[0], s[2])
    else:
        shape = (s[0], _numel(s[1:]))
    return (x,), {"form": form}, shape


def _emit_to2(op, i, a, shapes, out):
    x, s, f = a[0], shapes[0], op.p["form"]
    if f == "flatten":
        return [], [f"{out} = torch.flatten({x}, 1)"]
    if f == "view":
        return [], [f"{out} = {x}.reshape({x}.size(0), -1)"]
    if f == "mean":
        return [], [f"{out} = {x}.mean(({2}, {3}))" if len(s) == 4 else f"{out} = {x}.mean(1)"]
    return [], [f"{out} = torch.amax({x}, dim=(2, 3))"]


kind("to2", ranks=(3, 4), weight=1, doc="flatten / pool to (N, D)")((_gen_to2, _emit_to2))


def _gen_to3(b, x):
    s = b.shape(x)
    if len(s) == 4:
        form = b.c.pick(["flatten_transpose", "flatten", "permute_reshape"])
        shape = (s[0], s[2] * s[3], s[1]) if form != "flatten" else (s[0], s[1], s[2] * s[3])
        return (x,), {"form": form}, shape
    form = b.c.pick(["unsqueeze", "reshape", "unsqueeze_last"])
    if form == "unsqueeze":
        return (x,), {"form": form}, (s[0], 1, s[1])
    if form == "unsqueeze_last":
        return (x,), {"form": form}, (s[0], s[1], 1)
    a0 = b.c.pick(_divisors(s[1]))
    return (x,), {"form": form}, (s[0], a0, s[1] // a0)


def _emit_to3(op, i, a, shapes, out):
    x, f, sh = a[0], op.p["form"], list(op.shape)
    expr = {"flatten_transpose": f"{x}.flatten(2).transpose(1, 2)", "flatten": f"{x}.flatten(2)",
            "permute_reshape": f"{x}.permute(0, 2, 3, 1).reshape({sh})", "unsqueeze": f"{x}.unsqueeze(1)",
            "unsqueeze_last": f"{x}[:, :, None]", "reshape": f"{x}.reshape({sh})"}[f]
    return [], [f"{out} = {expr}"]


kind("to3", ranks=(2, 4), weight=1, doc="to a sequence (N, A, B)")((_gen_to3, _emit_to3))


def _gen_to4(b, x):
    s = b.shape(x)
    if len(s) == 2:
        form = b.c.pick(["none_none", "reshape"])
        if form == "none_none":
            return (x,), {"form": form}, (s[0], s[1], 1, 1)
        c, h, w = _factor(b, s[1], 3)
        return (x,), {"form": form}, (s[0], c, h, w)
    form = b.c.pick(["unsqueeze", "split_last", "seq_to_image"])
    if form == "unsqueeze":
        return (x,), {"form": form}, (s[0], 1, s[1], s[2])
    if form == "split_last":
        h = b.c.pick(_divisors(s[2]))
        return (x,), {"form": form}, (s[0], s[1], h, s[2] // h)
    h = b.c.pick(_divisors(s[1]))
    return (x,), {"form": form}, (s[0], s[2], h, s[1] // h)


def _emit_to4(op, i, a, shapes, out):
    x, f, sh = a[0], op.p["form"], list(op.shape)
    expr = {"none_none": f"{x}[:, :, None, None]", "reshape": f"{x}.reshape({sh})", "unsqueeze": f"{x}.unsqueeze(1)",
            "split_last": f"{x}.reshape({sh})",
            "seq_to_image": f"{x}.transpose(1, 2).reshape({sh})"}[f]
    return [], [f"{out} = {expr}"]


kind("to4", ranks=(2, 3), weight=0.8, doc="to an image (N, C, H, W)")((_gen_to4, _emit_to4))


# -- image ops -------------------------------------------------------------------------------------
def _conv_out(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _gen_conv2d(b, x):
    N, C, H, W = b.shape(x)
    mode = b.c.pick(["plain", "depthwise", "grouped", "pointwise"])
    if mode == "depthwise":
        groups, out = C, C * b.c.pick([1, 2])
    elif mode == "grouped" and len(_divisors(C)) > 1:
        groups = b.c.pick(_divisors(C)[1:])
        out = groups * b.c.integer(1, max(1, 12 // groups))
    else:
        groups, out = 1, b.c.integer(1, 12)
        mode = "plain" if mode == "grouped" else mode
    k = 1 if mode == "pointwise" else b.c.pick([3, 1, 2, 5])
    kw = k if not b.c.flag(15) else b.c.pick([1, 3])
    s = b.c.pick([1, 2])
    d = b.c.pick([1, 2]) if max(k, kw) > 1 else 1
    p = b.c.pick([d * (k - 1) // 2, 0, 1, 2])
    pw = p if kw == k else d * (kw - 1) // 2
    pm = b.c.pick(["zeros", "zeros", "reflect", "replicate", "circular"])
    if pm != "zeros" and (p >= H or pw >= W or (p == 0 and pw == 0)):
        pm = "zeros"
    if pm == "circular" and (p > H or pw > W):
        pm = "zeros"
    Ho, Wo = _conv_out(H, k, s, p, d), _conv_out(W, kw, s, pw, d)
    if Ho < 1 or Wo < 1:
        k = kw = 1
        p = pw = 0
        d = 1
        pm = "zeros"
        Ho, Wo = _conv_out(H, 1, s, 0, 1), _conv_out(W, 1, s, 0, 1)
    shape = (N, out, Ho, Wo)
    if not _ok(shape):
        return None
    return (x,), {"groups_mode": mode, "out": out, "k": (k, kw), "stride": s, "padding": (p, pw), "dilation": d,
                  "groups": groups, "bias": not b.c.flag(30), "padding_mode": pm}, shape


def _emit_conv2d(op, i, a, shapes, out):
    p, C = op.p, shapes[0][1]
    k, pad = tuple(p["k"]), tuple(p["padding"])
    extra = "" if p["padding_mode"] == "zeros" else f', padding_mode="{p["padding_mode"]}"'
    return ([f"self.m{i} = nn.Conv2d({C}, {p['out']}, {k!r}, stride={p['stride']}, padding={pad!r}, "
             f"dilation={p['dilation']}, groups={p['groups']}, bias={p['bias']}{extra})"],
            [f"{out} = self.m{i}({a[0]})"])


kind("conv2d", ranks=(4,), weight=4, doc="conv2d: grouped, depthwise, strided, dilated, padded")((_gen_conv2d, _emit_conv2d))


def _gen_conv_transpose2d(b, x):
    N, C, H, W = b.shape(x)
    groups = b.c.pick([1] + _divisors(C)[1:])
    out = groups * b.c.integer(1, max(1, 8 // groups))
    k, s = b.c.pick([2, 3, 1]), b.c.pick([2, 1])
    p = b.c.pick([0, 1]) if k > 1 else 0
    op_ = b.c.pick([0, 1]) if s > 1 else 0
    Ho, Wo = (H - 1) * s - 2 * p + (k - 1) + op_ + 1, (W - 1) * s - 2 * p + (k - 1) + op_ + 1
    shape = (N, out, Ho, Wo)
    if not _ok(shape):
        return None
    return (x,), {"out": out, "k": k, "stride": s, "padding": p, "output_padding": op_, "groups": groups,
                  "bias": not b.c.flag(30)}, shape


def _emit_conv_transpose2d(op, i, a, shapes, out):
    p, C = op.p, shapes[0][1]
    return ([f"self.m{i} = nn.ConvTranspose2d({C}, {p['out']}, {p['k']}, stride={p['stride']}, padding={p['padding']}, "
             f"output_padding={p['output_padding']}, groups={p['groups']}, bias={p['bias']})"],
            [f"{out} = self.m{i}({a[0]})"])


kind("conv_transpose2d", ranks=(4,), weight=0.8, doc="transposed conv2d")((_gen_conv_transpose2d, _emit_conv_transpose2d))


def _gen_bn(b, x):
    return (x,), {"affine": not b.c.flag(20), "eps": b.c.pick([1e-5, 1e-3, 0.1])}, b.shape(x)


def _emit_bn2d(op, i, a, shapes, out):
    p = op.p
    return ([f"self.m{i} = nn.BatchNorm2d({shapes[0][1]}, eps={p['eps']!r}, affine={p['affine']})"],
            [f"{out} = self.m{i}({a[0]})"])


kind("batchnorm2d", ranks=(4,), weight=2.5, doc="eval-mode BatchNorm2d")((_gen_bn, _emit_bn2d))


def _pool_out(n, k, s, p, ceil):
    if ceil:
        o = -(-(n + 2 * p - k) // s) + 1
        if (o - 1) * s >= n + p:
            o -= 1
        return o
    return (n + 2 * p - k) // s + 1


def _gen_pool2d(b, x):
    N, C, H, W = b.shape(x)
    kind_ = b.c.pick(["max", "avg", "adaptive_avg", "adaptive_max"])
    if kind_.startswith("adaptive"):
        o = b.c.pick([1, 2, 3])
        return (x,), {"pool": kind_, "out": o}, (N, C, o, o)
    k = b.c.pick([2, 3, 1])
    s = b.c.pick([k, 1, 2])
    p = b.c.pick([0, 1]) if k >= 2 else 0
    ceil = b.c.flag(25)
    Ho, Wo = _pool_out(H, k, s, p, ceil), _pool_out(W, k, s, p, ceil)
    if Ho < 1 or Wo < 1 or k > H + 2 * p or k > W + 2 * p:
        return None
    return (x,), {"pool": kind_, "k": k, "stride": s, "padding": p, "ceil": ceil,
                  "count_include_pad": not b.c.flag(30)}, (N, C, Ho, Wo)


def _emit_pool2d(op, i, a, shapes, out):
    p, x = op.p, a[0]
    if p["pool"] == "adaptive_avg":
        return [], [f"{out} = F.adaptive_avg_pool2d({x}, {p['out']})"]
    if p["pool"] == "adaptive_max":
        return [], [f"{out} = F.adaptive_max_pool2d({x}, {p['out']})"]
    if p["pool"] == "max":
        return ([f"self.m{i} = nn.MaxPool2d({p['k']}, stride={p['stride']}, padding={p['padding']}, "
                 f"ceil_mode={p['ceil']})"], [f"{out} = self.m{i}({x})"])
    return [], [f"{out} = F.avg_pool2d({x}, {p['k']}, stride={p['stride']}, padding={p['padding']}, "
                f"ceil_mode={p['ceil']}, count_include_pad={p['count_include_pad']})"]


kind("pool2d", ranks=(4,), weight=1.5, doc="max/avg/adaptive pooling")((_gen_pool2d, _emit_pool2d))


# -- sequence and vector ops ------------------------------------------------------------------------
def _gen_linear(b, x):
    s = b.shape(x)
    out = b.c.integer(1, 24)
    shape = (*s[:-1], out)
    if not _ok(shape):
        return None
    return (x,), {"out": out, "bias": not b.c.flag(25), "form": b.c.pick(["module", "functional"])}, shape


def _emit_linear(op, i, a, shapes, out):
    p = op.p
    init = [f"self.m{i} = nn.Linear({shapes[0][-1]}, {p['out']}, bias={p['bias']})"]
    if p["form"] == "functional":
        return init, [f"{out} = F.linear({a[0]}, self.m{i}.weight, self.m{i}.bias)"]
    return init, [f"{out} = self.m{i}({a[0]})"]


kind("linear", ranks=(2, 3, 4), weight=4, doc="nn.Linear on the last dim")((_gen_linear, _emit_linear))


def _gen_parallel_linear(b, x):
    s = b.shape(x)
    n = b.c.pick([2, 3])
    combine = b.c.pick(["add", "cat", "gate", "mul"])
    outs = [b.c.integer(1, 16)] * n if combine != "cat" else [b.c.integer(1, 12) for _ in range(n)]
    shape = (*s[:-1], sum(outs) if combine == "cat" else outs[0])
    if not _ok(shape) or not _ok((*s[:-1], sum(outs))):
        return None
    return (x,), {"n": n, "combine": combine, "outs": tuple(outs), "bias": tuple(not b.c.flag(25) for _ in range(n))}, shape


def _emit_parallel_linear(op, i, a, shapes, out):
    p, x = op.p, a[0]
    init = [f"self.m{i}_{j} = nn.Linear({shapes[0][-1]}, {o}, bias={bias})"
            for j, (o, bias) in enumerate(zip(p["outs"], p["bias"]))]
    fwd = [f"t{i}_{j} = self.m{i}_{j}({x})" for j in range(p["n"])]
    ts = [f"t{i}_{j}" for j in range(p["n"])]
    if p["combine"] == "add":
        fwd.append(f"{out} = {' + '.join(ts)}")
    elif p["combine"] == "cat":
        fwd.append(f"{out} = torch.cat([{', '.join(ts)}], dim=-1)")
    elif p["combine"] == "gate":
        fwd.append(f"{out} = F.silu({ts[0]}) * {' * '.join(ts[1:])}")
    else:
        fwd.append(f"{out} = {' * '.join(ts)}")
    return init, fwd


kind("parallel_linear", ranks=(2, 3), weight=1.5, doc="linears reading the same input")(
    (_gen_parallel_linear, _emit_parallel_linear))


def _gen_matmul_weight(b, x):
    s = b.shape(x)
    out = b.c.integer(1, 16)
    shape = (*s[:-1], out)
    if not _ok(shape):
        return None
    forms = ["matmul", "matmul_t", "mm"] if len(s) == 2 else ["matmul", "matmul_t", "einsum"]
    return (x,), {"out": out, "form": b.c.pick(forms), "bias": not b.c.flag(40)}, shape


def _emit_matmul_weight(op, i, a, shapes, out):
    p, x, K = op.p, a[0], shapes[0][-1]
    f = p["form"]
    wshape = (p["out"], K) if f == "matmul_t" else (K, p["out"])
    init = [f"self.w{i} = nn.Parameter(_normal(g, {wshape!r}, {1 / math.sqrt(K)!r}))"]
    if p["bias"]:
        init.append(f"self.b{i} = nn.Parameter(_normal(g, ({p['out']},), 0.2))")
    expr = {"matmul": f"{x} @ self.w{i}", "matmul_t": f"torch.matmul({x}, self.w{i}.t())",
            "mm": f"torch.mm({x}, self.w{i})", "einsum": f'torch.einsum("...k,kn->...n", {x}, self.w{i})'}[f]
    if p["bias"]:
        expr += f" + self.b{i}"
    return init, [f"{out} = {expr}"]


kind("matmul_weight", ranks=(2, 3), weight=1.5, doc="x @ W (+ b): matmul, mm, addmm")((_gen_matmul_weight, _emit_matmul_weight))


def _gen_bmm_self(b, x):
    N, A, B = b.shape(x)
    shape = (N, A, A)
    if not _ok(shape):
        return None
    return (x,), {"form": b.c.pick(["matmul", "bmm", "at"])}, shape


def _emit_bmm_self(op, i, a, shapes, out):
    x, B = a[0], shapes[0][2]
    expr = {"matmul": f"torch.matmul({x}, {x}.transpose(1, 2))", "bmm": f"torch.bmm({x}, {x}.transpose(1, 2))",
            "at": f"{x} @ {x}.transpose(-1, -2)"}[op.p["form"]]
    return [], [f"{out} = {expr} * {_f(1.0 / B)}"]


kind("bmm_self", ranks=(3,), weight=0.8, doc="x @ x^T (matmul / bmm)")((_gen_bmm_self, _emit_bmm_self))


def _gen_layernorm(b, x):
    s = b.shape(x)
    k = b.c.pick([1, 2]) if len(s) >= 3 else 1
    return (x,), {"dims": k, "affine": not b.c.flag(20), "bias": not b.c.flag(20),
                  "eps": b.c.pick([1e-5, 1e-6, 1e-3]), "form": b.c.pick(["module", "functional"])}, s


def _emit_layernorm(op, i, a, shapes, out):
    p = op.p
    ns = tuple(shapes[0][-p["dims"]:])
    init = [f"self.m{i} = nn.LayerNorm({ns!r}, eps={p['eps']!r}, elementwise_affine={p['affine']}, bias={p['bias']})"]
    if p["form"] == "functional":
        return init, [f"{out} = F.layer_norm({a[0]}, {ns!r}, self.m{i}.weight, self.m{i}.bias, {p['eps']!r})"]
    return init, [f"{out} = self.m{i}({a[0]})"]


kind("layernorm", ranks=(2, 3, 4), weight=2, doc="nn.LayerNorm")((_gen_layernorm, _emit_layernorm))


def _gen_layernorm_manual(b, x):
    s = b.shape(x)
    return (x,), {"var": b.c.pick(["pow_mean", "mul_mean", "var", "var_mean"]),
                  "norm": b.c.pick(["rsqrt", "div_sqrt", "pow_neg_half", "eps_outside"]),
                  "affine": b.c.pick(["both", "none", "scale"]), "eps": b.c.pick([1e-5, 1e-6, 1e-12])}, s


def _emit_layernorm_manual(op, i, a, shapes, out):
    p, x, D = op.p, a[0], shapes[0][-1]
    fwd, init = [], []
    if p["var"] == "var_mean":
        fwd.append(f"t{i}v, t{i}u = torch.var_mean({x}, -1, correction=0, keepdim=True)")
        fwd.append(f"t{i}d = {x} - t{i}u")
    else:
        fwd.append(f"t{i}u = {x}.mean(-1, keepdim=True)")
        fwd.append(f"t{i}d = {x} - t{i}u")
        fwd.append({"pow_mean": f"t{i}v = t{i}d.pow(2).mean(-1, keepdim=True)",
                    "mul_mean": f"t{i}v = (t{i}d * t{i}d).mean(-1, keepdim=True)",
                    "var": f"t{i}v = {x}.var(-1, keepdim=True, unbiased=False)"}[p["var"]])
    eps = repr(p["eps"])
    fwd.append({"rsqrt": f"t{i}y = t{i}d * torch.rsqrt(t{i}v + {eps})",
                "div_sqrt": f"t{i}y = t{i}d / torch.sqrt(t{i}v + {eps})",
                "pow_neg_half": f"t{i}y = t{i}d * (t{i}v + {eps}).pow(-0.5)",
                "eps_outside": f"t{i}y = t{i}d / (torch.sqrt(t{i}v) + {eps})"}[p["norm"]])
    if p["affine"] == "none":
        fwd.append(f"{out} = t{i}y")
    else:
        init.append(f"self.g{i} = nn.Parameter(_normal(g, ({D},), 0.2, 1.0))")
        if p["affine"] == "both":
            init.append(f"self.b{i} = nn.Parameter(_normal(g, ({D},), 0.2))")
            fwd.append(f"{out} = t{i}y * self.g{i} + self.b{i}")
        else:
            fwd.append(f"{out} = self.g{i} * t{i}y")
    return init, fwd


kind("layernorm_manual", ranks=(2, 3, 4), weight=1.5, doc="layer norm written out")(
    (_gen_layernorm_manual, _emit_layernorm_manual))

_MASKS = ("none", "causal_inf", "causal_finfo", "causal_where", "causal_1e9", "additive", "additive4d")


def _gen_attention(b, x):
    N, L, D = b.shape(x)
    kv_candidates = [v for v in range(b.n_values) if len(b.shape(v)) == 3 and b.shape(v)[0] == N
                     and b.shape(v)[2] == D]
    y = b.c.pick(kv_candidates[::-1]) if b.c.flag(25) else x
    S = b.shape(y)[1]
    heads = b.c.pick(_divisors(D))
    qkv = b.c.pick(["separate", "fused", "noproj"])
    if qkv == "fused" and y != x:
        qkv = "separate"
    mask = b.c.pick(_MASKS)
    if mask.startswith("causal") and S != L:
        mask = "additive"
    if mask == "additive4d" and heads == 1 and not b.c.flag(50):
        mask = "additive"
    if N * heads * L * S > MAX_NUMEL:
        return None
    return ((x, y), {"heads": heads, "qkv": qkv, "mask": mask,
                     "scale": b.c.pick(["div_sqrt", "mul", "prescale_q", "none"]),
                     "k_form": b.c.pick(["transpose", "permute"]),
                     "dropout": b.c.pick(["none", "functional", "module"]),
                     "softmax": b.c.pick(["torch", "functional", "method"]),
                     "merge": b.c.pick(["reshape", "contiguous_view"]),
                     "out_proj": not b.c.flag(30), "bias": not b.c.flag(30)}, (N, L, D))


def _emit_attention(op, i, a, shapes, out):
    p = op.p
    x, y = a
    N, L, D = shapes[0]
    S = shapes[1][1]
    h = p["heads"]
    d = D // h
    init, fwd = [], []
    bias = p["bias"]
    if p["qkv"] == "separate":
        init += [f"self.m{i}_{n} = nn.Linear({D}, {D}, bias={bias})" for n in "qkv"]
        fwd += [f"t{i}q = self.m{i}_q({x})", f"t{i}k = self.m{i}_k({y})", f"t{i}v = self.m{i}_v({y})"]
    elif p["qkv"] == "fused":
        init.append(f"self.m{i}_qkv = nn.Linear({D}, {3 * D}, bias={bias})")
        fwd.append(f"t{i}q, t{i}k, t{i}v = self.m{i}_qkv({x}).split({D}, dim=-1)")
    else:
        fwd += [f"t{i}q = {x}", f"t{i}k = {y}", f"t{i}v = {y}"]
    scale = 1.0 / math.sqrt(d)
    if h > 1 or p["k_form"] == "permute":
        fwd.append(f"t{i}q = t{i}q.reshape({N}, {L}, {h}, {d}).transpose(1, 2)")
        if p["k_form"] == "permute":
            fwd.append(f"t{i}kt = t{i}k.reshape({N}, {S}, {h}, {d}).permute(0, 2, 3, 1)")
        else:
            fwd.append(f"t{i}kt = t{i}k.reshape({N}, {S}, {h}, {d}).transpose(1, 2).transpose(-2, -1)")
        fwd.append(f"t{i}v = t{i}v.reshape({N}, {S}, {h}, {d}).transpose(1, 2)")
        multi = True
    else:
        fwd.append(f"t{i}kt = t{i}k.transpose(-2, -1)")
        multi = False
    if p["scale"] == "prescale_q":
        fwd.append(f"t{i}q = t{i}q * {_f(scale)}")
    fwd.append(f"t{i}s = torch.matmul(t{i}q, t{i}kt)")
    if p["scale"] == "div_sqrt":
        fwd.append(f"t{i}s = t{i}s / math.sqrt({d})")
    elif p["scale"] == "mul":
        fwd.append(f"t{i}s = t{i}s * {_f(scale)}")
    m = p["mask"]
    if m.startswith("causal"):
        init.append(f'self.register_buffer("mask{i}", torch.tril(torch.ones({L}, {L}, dtype=torch.bool)))')
        fill = {"causal_inf": 'float("-inf")', "causal_finfo": f"torch.finfo(t{i}s.dtype).min",
                "causal_where": 'float("-inf")', "causal_1e9": "-1e9"}[m]
        if m == "causal_where":
            fwd.append(f"t{i}s = torch.where(self.mask{i}, t{i}s, {fill})")
        else:
            fwd.append(f"t{i}s = t{i}s.masked_fill(~self.mask{i}, {fill})")
    elif m.startswith("additive"):
        ms = (1, 1, L, S) if m == "additive4d" and multi else (L, S)
        init.append(f'self.register_buffer("mask{i}", _normal(g, {ms!r}, 0.5))')
        fwd.append(f"t{i}s = t{i}s + self.mask{i}")
    sm = {"torch": f"torch.softmax(t{i}s, dim=-1)", "functional": f"F.softmax(t{i}s, dim=-1)",
          "method": f"t{i}s.softmax(dim=-1)"}[p["softmax"]]
    fwd.append(f"t{i}p = {sm}")
    if p["dropout"] == "functional":
        fwd.append(f"t{i}p = F.dropout(t{i}p, 0.1, self.training)")
    elif p["dropout"] == "module":
        init.append(f"self.m{i}_drop = nn.Dropout(0.1)")
        fwd.append(f"t{i}p = self.m{i}_drop(t{i}p)")
    fwd.append(f"t{i}o = torch.matmul(t{i}p, t{i}v)")
    if multi:
        if p["merge"] == "reshape":
            fwd.append(f"t{i}o = t{i}o.transpose(1, 2).reshape({N}, {L}, {D})")
        else:
            fwd.append(f"t{i}o = t{i}o.transpose(1, 2).contiguous().view({N}, {L}, {D})")
    if p["out_proj"]:
        init.append(f"self.m{i}_o = nn.Linear({D}, {D}, bias={bias})")
        fwd.append(f"{out} = self.m{i}_o(t{i}o)")
    else:
        fwd.append(f"{out} = t{i}o")
    return init, fwd


kind("attention", ranks=(3,), weight=2.5, doc="hand-written (multi-head) attention")((_gen_attention, _emit_attention))


def _gen_bn1d(b, x):
    return _gen_bn(b, x)


def _emit_bn1d(op, i, a, shapes, out):
    p = op.p
    return ([f"self.m{i} = nn.BatchNorm1d({shapes[0][1]}, eps={p['eps']!r}, affine={p['affine']})"],
            [f"{out} = self.m{i}({a[0]})"])


kind("batchnorm1d", ranks=(2, 3), weight=2, doc="eval-mode BatchNorm1d on (N, C) or (N, C, L)")((_gen_bn1d, _emit_bn1d))


def _gen_conv1d(b, x):
    N, C, L = b.shape(x)
    groups = b.c.pick([1, C] + _divisors(C)[1:])
    out = groups * b.c.integer(1, max(1, 12 // groups))
    k, s = b.c.pick([3, 1, 2]), b.c.pick([1, 2])
    p = b.c.pick([k // 2, 0, 1])
    Lo = _conv_out(L, k, s, p, 1)
    if Lo < 1:
        k, p = 1, 0
        Lo = _conv_out(L, 1, s, 0, 1)
    shape = (N, out, Lo)
    if not _ok(shape):
        return None
    return (x,), {"out": out, "k": k, "stride": s, "padding": p, "groups": groups, "bias": not b.c.flag(30)}, shape


def _emit_conv1d(op, i, a, shapes, out):
    p = op.p
    return ([f"self.m{i} = nn.Conv1d({shapes[0][1]}, {p['out']}, {p['k']}, stride={p['stride']}, "
             f"padding={p['padding']}, groups={p['groups']}, bias={p['bias']})"], [f"{out} = self.m{i}({a[0]})"])


kind("conv1d", ranks=(3,), weight=1, doc="conv1d on (N, C, L)")((_gen_conv1d, _emit_conv1d))


def _gen_pool1d(b, x):
    N, C, L = b.shape(x)
    k = b.c.pick([2, 3])
    s = b.c.pick([k, 1])
    if L < k:
        return None
    return (x,), {"pool": b.c.pick(["avg", "max"]), "k": k, "stride": s}, (N, C, (L - k) // s + 1)


def _emit_pool1d(op, i, a, shapes, out):
    p = op.p
    fn = "F.avg_pool1d" if p["pool"] == "avg" else "F.max_pool1d"
    return [], [f"{out} = {fn}({a[0]}, {p['k']}, stride={p['stride']})"]


kind("pool1d", ranks=(3,), weight=0.7, doc="avg/max pool over the last dim")((_gen_pool1d, _emit_pool1d))


# -- idioms of HF transformers models ---------------------------------------------------------------
# Written the way transformers writes them (RMSNorm with a float32 upcast, rotary embeddings from
# an inv_freq buffer, grouped-query attention with run-time masks, in-place writes on fresh
# tensors, MoE routing, dtype round trips, empty cache tensors). The oracle's reference runs the
# model in float64 (``.double()``): every ``.float()`` / ``.to(torch.float32)`` below is undone by
# a ``.to(x.dtype)`` / ``.type_as(x)`` before its value meets a float64 weight, and integer
# indices are computed so that float32 and float64 agree on them (an arange, a cumsum of a
# comparison with an input-scale threshold, the argmax of a biased projection), never by
# rounding a float (``(x * 10).long()``).
_RMS_FORMS = ("llama", "gemma", "t5", "near_miss")


def _gen_rmsnorm(b, x):
    form = b.c.pick(_RMS_FORMS)
    # the near miss (eps outside the sqrt) differs from RMSNorm by about eps / rms: a large eps
    # makes a wrong fusion an error of order 1e-2, far above the oracle's floor
    eps = b.c.pick([1e-6, 1e-5, 1e-2]) if form != "near_miss" else b.c.pick([0.1, 1e-2])
    return (x,), {"form": form, "eps": eps}, b.shape(x)


def _emit_rmsnorm(op, i, a, shapes, out):
    p, x, D = op.p, a[0], shapes[0][-1]
    eps, f = repr(p["eps"]), p["form"]
    if f == "llama":      # LlamaRMSNorm (also Mistral, Qwen2, Phi-3, ...)
        return ([f"self.w{i} = nn.Parameter(_normal(g, ({D},), 0.2, 1.0))"],
                [f"t{i}h = {x}.to(torch.float32)",
                 f"t{i}v = t{i}h.pow(2).mean(-1, keepdim=True)",
                 f"t{i}h = t{i}h * torch.rsqrt(t{i}v + {eps})",
                 f"{out} = self.w{i} * t{i}h.to({x}.dtype)"])
    if f == "gemma":      # GemmaRMSNorm: zero-centred weight, (1 + w), computed in float32
        return ([f"self.w{i} = nn.Parameter(_normal(g, ({D},), 0.2))"],
                [f"t{i}h = {x}.float()",
                 f"t{i}h = t{i}h * torch.rsqrt(t{i}h.pow(2).mean(-1, keepdim=True) + {eps})",
                 f"t{i}h = t{i}h * (1.0 + self.w{i}.float())",
                 f"{out} = t{i}h.type_as({x})"])
    if f == "t5":         # T5LayerNorm without the upcast
        return ([f"self.w{i} = nn.Parameter(_normal(g, ({D},), 0.2, 1.0))"],
                [f"{out} = self.w{i} * {x} * torch.rsqrt({x}.pow(2).mean(-1, keepdim=True) + {eps})"])
    return ([f"self.w{i} = nn.Parameter(_normal(g, ({D},), 0.2, 1.0))"],       # NOT RMSNorm: eps outside
            [f"t{i}v = {x}.pow(2).mean(-1, keepdim=True)",
             f"{out} = self.w{i} * ({x} / (torch.sqrt(t{i}v) + {eps}))"])


kind("rmsnorm", ranks=(2, 3, 4), weight=1.0, doc="RMSNorm as HF writes it (llama, gemma, t5) and a near miss")(
    (_gen_rmsnorm, _emit_rmsnorm))


def _gen_rotary(b, x):
    s = b.shape(x)
    if len(s) == 3:          # (N, L, D) viewed as heads (N, h, L, d)
        N, L, D = s
        heads = [h for h in _divisors(D) if (D // h) % 2 == 0]
        if not heads:
            return None
        h = b.c.pick(heads)
        d = D // h
    else:                    # (N, h, L, d): already split into heads
        N, h, L, d = s
        if d % 2:
            return None
    form = b.c.pick(["rotate_half", "interleaved"])
    rot = b.c.pick(["full", "partial", "partial_all"])
    partial = list(range(2, d, 2))
    if rot == "partial" and not partial:
        rot = "partial_all"
    r = b.c.pick(partial) if rot == "partial" else d     # partial_all: r == d, x[..., d:] is zero-width (Phi-3)
    return (x,), {"heads": h, "form": form, "rot": rot, "r": r,
                  "freqs": b.c.pick(["matmul", "einsum"])}, s


def _emit_rotary(op, i, a, shapes, out):
    p, x, s = op.p, a[0], shapes[0]
    h, r = p["heads"], p["r"]
    if len(s) == 3:
        N, L, D = s
        d = D // h
    else:
        N, _, L, d = s
    init = [f'self.register_buffer("inv_freq{i}", 1.0 / (10000 ** (torch.arange(0, {r}, 2, dtype=torch.int64)'
            f'.float() / {r})), persistent=False)']
    fwd = [f"t{i}q = {x}.reshape({N}, {L}, {h}, {d}).transpose(1, 2)" if len(s) == 3 else f"t{i}q = {x}",
           f"t{i}pos = torch.arange({L}, device={x}.device)[None, :]"]
    if p["freqs"] == "matmul":   # LlamaRotaryEmbedding.forward
        fwd += [f"t{i}if = self.inv_freq{i}[None, :, None].float().expand(t{i}pos.shape[0], -1, 1)",
                f"t{i}f = (t{i}if.float() @ t{i}pos[:, None, :].float()).transpose(1, 2)"]
    else:                        # the older einsum form
        fwd += [f't{i}f = torch.einsum("i,j->ij", t{i}pos[0].float(), self.inv_freq{i}.float())[None]']
    if p["form"] == "rotate_half":
        fwd += [f"t{i}e = torch.cat((t{i}f, t{i}f), dim=-1)",
                f"t{i}cos = t{i}e.cos().to(dtype={x}.dtype).unsqueeze(1)",
                f"t{i}sin = t{i}e.sin().to(dtype={x}.dtype).unsqueeze(1)"]
    else:                        # GPT-J / GLM: every two channels rotate together
        fwd += [f"t{i}cos = t{i}f.cos().repeat_interleave(2, dim=-1).to({x}.dtype).unsqueeze(1)",
                f"t{i}sin = t{i}f.sin().repeat_interleave(2, dim=-1).to({x}.dtype).unsqueeze(1)"]
    if p["rot"] == "full":
        fwd.append(f"t{i}r = t{i}q")
    else:
        fwd.append(f"t{i}r, t{i}p = t{i}q[..., :{r}], t{i}q[..., {r}:]")
    if p["form"] == "rotate_half":
        fwd += [f"t{i}x1 = t{i}r[..., : t{i}r.shape[-1] // 2]", f"t{i}x2 = t{i}r[..., t{i}r.shape[-1] // 2 :]",
                f"t{i}h = torch.cat((-t{i}x2, t{i}x1), dim=-1)"]
    else:
        fwd.append(f"t{i}h = torch.stack((-t{i}r[..., 1::2], t{i}r[..., ::2]), dim=-1).flatten(-2)")
    fwd.append(f"t{i}y = (t{i}r * t{i}cos) + (t{i}h * t{i}sin)")
    if p["rot"] != "full":
        fwd.append(f"t{i}y = torch.cat((t{i}y, t{i}p), dim=-1)")
    fwd.append(f"{out} = t{i}y.transpose(1, 2).reshape({N}, {L}, {h * d})" if len(s) == 3 else f"{out} = t{i}y")
    return init, fwd


kind("rotary", ranks=(3, 4), weight=1.5, doc="rotary position embeddings (rotate_half, interleaved, partial)")(
    (_gen_rotary, _emit_rotary))

_GQA_MASKS = ("causal", "none", "sliding", "padding", "causal_padding")


def _gen_gqa_attention(b, x):
    N, L, D = b.shape(x)
    heads = [h for h in _divisors(D) if h >= 2]
    if not heads:
        return None
    h = b.c.pick(heads)
    kv = b.c.pick([k for k in _divisors(h) if k < h][::-1])     # fewer key/value heads (1: multi-query)
    form = b.c.pick(["eager", "sdpa"])
    mask = b.c.pick(_GQA_MASKS)
    window = b.c.pick([2, 3, 1])
    alibi = b.c.flag(25)
    if mask == "none":
        apply = "none"
    elif form == "eager":
        apply = b.c.pick(["where", "additive", "masked_fill"])
    else:
        apply = b.c.pick(["bool", "additive"] + (["is_causal"] if mask == "causal" else []))
        if alibi and apply != "additive":
            apply = "additive"             # a float bias and a bool mask: SDPA takes one float mask
    if N * h * L * L > MAX_NUMEL:
        return None
    return (x,), {"heads": h, "kv": kv, "form": form, "mask": mask, "window": window, "apply": apply,
                  "alibi": alibi, "upcast": not b.c.flag(30), "scale": b.c.pick(["mul", "div"]),
                  "bias": not b.c.flag(40)}, (N, L, D)


def _emit_gqa_attention(op, i, a, shapes, out):
    p, x = op.p, a[0]
    N, L, D = shapes[0]
    h, kv = p["heads"], p["kv"]
    d, n_rep = D // h, h // kv
    init = [f"self.m{i}_q = nn.Linear({D}, {h * d}, bias={p['bias']})",
            f"self.m{i}_k = nn.Linear({D}, {kv * d}, bias={p['bias']})",
            f"self.m{i}_v = nn.Linear({D}, {kv * d}, bias={p['bias']})",
            f"self.m{i}_o = nn.Linear({h * d}, {D}, bias=False)"]
    fwd = [f"t{i}q = self.m{i}_q({x}).view({N}, {L}, -1, {d}).transpose(1, 2)",
           f"t{i}k = self.m{i}_k({x}).view({N}, {L}, -1, {d}).transpose(1, 2)",
           f"t{i}v = self.m{i}_v({x}).view({N}, {L}, -1, {d}).transpose(1, 2)",
           f"t{i}ar = torch.arange({L}, device={x}.device)"]
    scaling = d ** -0.5
    m = p["mask"]
    if m in ("causal", "causal_padding"):
        fwd.append(f"t{i}m = t{i}ar[None, :] <= t{i}ar[:, None]")
    elif m == "sliding":
        fwd.append(f"t{i}m = (t{i}ar[None, :] <= t{i}ar[:, None]) & (t{i}ar[:, None] - t{i}ar[None, :] < {p['window']})")
    if m in ("padding", "causal_padding"):
        # padding derived in the model; key 0 always attends, so no row is fully masked (a float32
        # softmax of a float64 finfo.min row is NaN in the float64 reference)
        fwd.append(f"t{i}pad = ({x}[..., 0] > -1.5) | (t{i}ar == 0)[None, :]")
        fwd.append(f"t{i}m = t{i}pad[:, None, None, :]" if m == "padding"
                   else f"t{i}m = t{i}m[None, None, :, :] & t{i}pad[:, None, None, :]")
    if p["alibi"]:
        slopes = [2.0 ** (-8.0 * (j + 1) / h) for j in range(h)]
        init.append(f'self.register_buffer("slopes{i}", torch.tensor({slopes!r}))')
        fwd.append(f"t{i}al = self.slopes{i}[:, None, None] * (t{i}ar[None, :] - t{i}ar[:, None]).to(t{i}q.dtype)")
    if p["form"] == "eager":
        fwd += [f"t{i}k = t{i}k[:, :, None, :, :].expand({N}, {kv}, {n_rep}, {L}, {d}).reshape({N}, {kv * n_rep}, {L}, {d})",
                f"t{i}v = t{i}v[:, :, None, :, :].expand({N}, {kv}, {n_rep}, {L}, {d}).reshape({N}, {kv * n_rep}, {L}, {d})"]
        fwd.append(f"t{i}s = torch.matmul(t{i}q, t{i}k.transpose(2, 3)) * {_f(scaling)}" if p["scale"] == "mul"
                   else f"t{i}s = torch.matmul(t{i}q, t{i}k.transpose(2, 3)) / math.sqrt({d})")
        if p["alibi"]:
            fwd.append(f"t{i}s = t{i}s + t{i}al")
        if p["apply"] == "where":
            fwd.append(f"t{i}s = torch.where(t{i}m, t{i}s, torch.finfo(t{i}s.dtype).min)")
        elif p["apply"] == "masked_fill":
            fwd.append(f"t{i}s = t{i}s.masked_fill(~t{i}m, torch.finfo(t{i}s.dtype).min)")
        elif p["apply"] == "additive":
            fwd += [f"t{i}am = t{i}s.new_zeros(t{i}m.shape).masked_fill(~t{i}m, torch.finfo(t{i}s.dtype).min)",
                    f"t{i}s = t{i}s + t{i}am"]
        fwd.append(f"t{i}p = torch.softmax(t{i}s, dim=-1, dtype=torch.float32).to(t{i}q.dtype)" if p["upcast"]
                   else f"t{i}p = torch.softmax(t{i}s, dim=-1)")
        fwd.append(f"t{i}o = torch.matmul(t{i}p, t{i}v)")
    else:
        extra = ""
        if p["apply"] == "bool":
            extra = f", attn_mask=t{i}m"
        elif p["apply"] == "is_causal":
            extra = ", is_causal=True"
        elif p["apply"] == "additive":
            fwd.append(f"t{i}am = t{i}q.new_zeros(t{i}m.shape).masked_fill(~t{i}m, torch.finfo(t{i}q.dtype).min)")
            if p["alibi"]:
                fwd.append(f"t{i}am = t{i}am + t{i}al")
            extra = f", attn_mask=t{i}am"
        elif p["alibi"]:
            extra = f", attn_mask=t{i}al"
        scale = "" if p["scale"] == "div" else f", scale={_f(scaling)}"
        fwd.append(f"t{i}o = F.scaled_dot_product_attention(t{i}q, t{i}k, t{i}v{extra}{scale}, enable_gqa=True)")
    fwd += [f"t{i}o = t{i}o.transpose(1, 2).contiguous()",
            f"{out} = self.m{i}_o(t{i}o.reshape({N}, {L}, -1))"]
    return init, fwd


kind("gqa_attention", ranks=(3,), weight=1.8,
     doc="grouped-query attention: repeat_kv or SDPA enable_gqa, run-time masks, float32 softmax, ALiBi")(
    (_gen_gqa_attention, _emit_gqa_attention))

_INPLACE_FORMS = ("shift", "fill", "masked_fill", "index_put", "index_put_method", "div_", "mul_", "add_")


def _gen_inplace(b, x):
    s = b.shape(x)
    form = b.c.pick(_INPLACE_FORMS)
    if form == "shift" and s[1] < 2:
        form = "fill"
    return (x,), {"form": form, "c": b.c.pick([2.0, -1.0, 0.5, 3.0]), "t": b.c.pick([0.5, 1.0, -0.5]),
                  "step": b.c.pick([2, 1, 3])}, s


def _emit_inplace(op, i, a, shapes, out):
    p, x, s = op.p, a[0], shapes[0]
    f, c, t, step = p["form"], _f(p["c"]), _f(p["t"]), p["step"]
    if f == "shift":          # BART's shift_tokens_right: copy_ into a slice, fill_ of an element
        return [], [f"t{i}y = {x}.new_zeros({x}.shape)", f"t{i}y[:, 1:] = {x}[:, :-1].clone()",
                    f"t{i}y[:, 0] = {c}", f"{out} = t{i}y"]
    if f == "fill":
        return [], [f"t{i}y = {x}.clone()", f"t{i}y[:, -1] = {c}", f"{out} = t{i}y"]
    if f == "masked_fill":    # filled with the threshold itself: continuous (a value at the threshold
        # rounded differently in float32 and float64 moves the output by a rounding error only)
        return [], [f"t{i}y = {x}.clone()", f"t{i}y.masked_fill_(t{i}y > {t}, {t})", f"{out} = t{i}y"]
    if f == "index_put":      # y[:, idx] = vals, idx built in the model
        return [], [f"t{i}idx = torch.arange(0, {s[1]}, {step}, device={x}.device)", f"t{i}y = {x}.clone()",
                    f"t{i}y[:, t{i}idx] = torch.tanh({x}[:, t{i}idx]) * {c}", f"{out} = t{i}y"]
    if f == "index_put_method":
        n = _numel(s)
        return [], [f"t{i}y = {x}.reshape(-1).clone()",
                    f"t{i}idx = torch.arange({n - 1}, -1, -{step}, device={x}.device)",
                    f"t{i}y.index_put_((t{i}idx,), t{i}y[t{i}idx] * {c} + 1.0)",
                    f"{out} = t{i}y.reshape({list(s)})"]
    if f == "div_":
        return [], [f"{out} = {x}.clone().div_({c})"]
    if f == "mul_":
        return ([f'self.register_buffer("c{i}", _away_from_zero(g, ({s[-1]},)))'],
                [f"t{i}y = {x}.clone()", f"t{i}y.mul_(self.c{i})", f"{out} = t{i}y"])
    return [], [f"t{i}y = {x}.clone()", f"t{i}y.add_(torch.tanh({x}), alpha={c})", f"{out} = t{i}y"]


kind("inplace", ranks=(2, 3, 4), weight=1.0,
     doc="in-place writes on a fresh tensor: copy_ into a slice, fill_, masked_fill_, index_put_, div_/mul_/add_")(
    (_gen_inplace, _emit_inplace))


def _gen_embed(b, x):
    s = b.shape(x)
    r = len(s)
    # positions along dim -2 (tokens) of a rank 3 or 4 value, features on dim -1
    forms = [("argmax", 1), ("topk", 1), ("neg_index", 1)] + (
        [("positions", 1.5), ("positions_offset", 1.5), ("floordiv", 1.5), ("cumsum", 2)] if r >= 3 else [])
    form = b.c.weighted(forms)
    V, E = b.c.integer(2, 16), b.c.integer(1, 12)
    fn = b.c.pick(["module", "functional"])
    if form == "argmax":
        return (x,), {"form": form, "vocab": V, "dim": E, "fn": fn}, (*s[:-1], E)
    if form == "topk":
        k = b.c.integer(1, min(V, 3))
        return (x,), {"form": form, "vocab": V, "dim": E, "k": k, "fn": fn}, (*s[:-1], k * E)
    if form == "neg_index":
        dim = b.c.pick([1, r - 1])
        n = s[dim]
        index = b.c.pick([[-1, 0], [-1], [0, -1, -n], [-n, n - 1]])
        shape = list(s)
        shape[dim] = len(index)
        return (x,), {"form": form, "dim": dim, "index": tuple(index)}, tuple(shape)
    return (x,), {"form": form, "fn": fn}, s


def _embedding(i, V, E, fn, std=1.0):
    if fn == "module":
        return [f"self.e{i} = nn.Embedding({V}, {E}, _weight=_normal(g, ({V}, {E}), {std!r}))"], f"self.e{i}({{}})"
    return [f"self.e{i} = nn.Parameter(_normal(g, ({V}, {E}), {std!r}))"], f"F.embedding({{}}, self.e{i})"


def _emit_embed(op, i, a, shapes, out):
    p, x, s = op.p, a[0], shapes[0]
    f = p["form"]
    if f in ("argmax", "topk"):
        # an lm_head, then the next token's embedding: ids from a biased projection, so a row of
        # equal values (relu of a negative row) has no ties
        init, call = _embedding(i, p["vocab"], p["dim"], p["fn"])
        init.append(f"self.m{i} = nn.Linear({s[-1]}, {p['vocab']})")
        if f == "argmax":
            return init, [f"t{i}ids = torch.argmax(self.m{i}({x}), dim=-1)", f"{out} = {call.format(f't{i}ids')}"]
        return init, [f"t{i}ids = torch.topk(self.m{i}({x}), {p['k']}, dim=-1).indices",
                      f"{out} = {call.format(f't{i}ids')}.flatten(-2)"]
    if f == "neg_index":      # Falcon's multi-query split: qkv[..., [-2], :]
        index = list(p["index"])
        return [], [f"{out} = {x}[:, {index}]" if p["dim"] == 1 else f"{out} = {x}[..., {index}]"]
    L, D = s[-2:]
    if f == "positions":      # GPT-2: wpe(arange(L))
        init, call = _embedding(i, L, D, p["fn"], 0.5)
        return init, [f"t{i}pos = torch.arange(0, {L}, dtype=torch.long, device={x}.device).unsqueeze(0)",
                      f"{out} = {x} + {call.format(f't{i}pos')}"]
    if f == "positions_offset":   # OPT's learned positions: offset 2
        init, call = _embedding(i, L + 2, D, p["fn"], 0.5)
        return init, [f"t{i}pos = torch.arange({L}, device={x}.device)[None, :]",
                      f"{out} = {x} + {call.format(f't{i}pos + 2')}"]
    if f == "floordiv":       # int64 // int: positions shared by pairs
        init, call = _embedding(i, (L - 1) // 2 + 1, D, p["fn"], 0.5)
        return init, [f"t{i}pos = torch.arange({L}, device={x}.device) // 2",
                      f"{out} = {x} + {call.format(f't{i}pos')}[None]"]
    init, call = _embedding(i, L + 1, D, p["fn"], 0.5)       # cumsum position ids of the valid tokens
    return init, [f"t{i}m = ({x}[..., 0] > -0.5).long()", f"t{i}pos = t{i}m.cumsum(-1) * t{i}m",
                  f"{out} = {x} + {call.format(f't{i}pos')}"]


kind("embed", ranks=(2, 3, 4), weight=1.0,
     doc="embedding gathers with indices computed in the model (argmax/topk, positions, cumsum, //, negative lists)")(
    (_gen_embed, _emit_embed))


def _gen_moe(b, x):
    s = b.shape(x)
    D = s[-1]
    T = _numel(s) // D
    E = b.c.pick([2, 3, 4])
    k = b.c.pick([2, 1])
    form = b.c.pick(["one_hot", "eq", "scatter", "sorted"])
    hidden = b.c.integer(1, 8)
    if T * k * max(D, hidden, E) > MAX_NUMEL:
        return None
    params = {"form": form, "experts": E, "k": k, "hidden": hidden, "renorm": not b.c.flag(30),
              "expert_form": b.c.pick(["fused", "modules"]), "gated": b.c.flag(50)}
    if form == "sorted":
        params.update(restore=b.c.pick(["inv_perm", "index_add"]), sort=b.c.pick(["sort", "argsort", "sort_stable"]))
    return (x,), params, s


def _emit_moe(op, i, a, shapes, out):
    p, x, s = op.p, a[0], shapes[0]
    D = s[-1]
    T = _numel(s) // D
    E, k, H = p["experts"], p["k"], p["hidden"]
    # the router has a bias (as GPT-OSS's): Mixtral's has none, but then a row of zeros (relu of a
    # negative row) gives equal logits, and which experts topk picks among ties is up to the backend
    init = [f"self.m{i}_r = nn.Linear({D}, {E})"]
    if p["expert_form"] == "fused":      # transformers' fused experts: one weight per projection
        init += [f"self.w{i}_up = nn.Parameter(_normal(g, ({E}, {D}, {H}), {1 / math.sqrt(D)!r}))",
                 f"self.w{i}_down = nn.Parameter(_normal(g, ({E}, {H}, {D}), {1 / math.sqrt(H)!r}))"]
        if p["gated"]:
            init.append(f"self.w{i}_gate = nn.Parameter(_normal(g, ({E}, {D}, {H}), {1 / math.sqrt(D)!r}))")
    else:                                # Mixtral's ModuleList of experts
        init += [f"self.m{i}_up = nn.ModuleList([nn.Linear({D}, {H}, bias=False) for _ in range({E})])",
                 f"self.m{i}_down = nn.ModuleList([nn.Linear({H}, {D}, bias=False) for _ in range({E})])"]
        if p["gated"]:
            init.append(f"self.m{i}_gate = nn.ModuleList([nn.Linear({D}, {H}, bias=False) for _ in range({E})])")

    def expert(e, v):
        if p["expert_form"] == "fused":
            up, down = f"{v} @ self.w{i}_up[{e}]", f"self.w{i}_down[{e}]"
            hid = f"F.silu({v} @ self.w{i}_gate[{e}]) * ({up})" if p["gated"] else f"F.silu({up})"
            return f"({hid}) @ {down}"
        up = f"self.m{i}_up[{e}]({v})"
        hid = f"F.silu(self.m{i}_gate[{e}]({v})) * {up}" if p["gated"] else f"F.silu({up})"
        return f"self.m{i}_down[{e}]({hid})"

    fwd = [f"t{i}h = {x}.reshape(-1, {D})",
           f"t{i}l = self.m{i}_r(t{i}h)",
           f"t{i}p = F.softmax(t{i}l, dim=1, dtype=torch.float)",
           f"t{i}w, t{i}e = torch.topk(t{i}p, {k}, dim=-1)"]
    if p["renorm"]:
        fwd.append(f"t{i}w = t{i}w / t{i}w.sum(dim=-1, keepdim=True)")
    fwd.append(f"t{i}w = t{i}w.to(t{i}h.dtype)")
    f = p["form"]
    if f != "sorted":
        fwd.append(f"t{i}o = torch.zeros_like(t{i}h)")
        if f == "one_hot":
            fwd.append(f"t{i}oh = F.one_hot(t{i}e, num_classes={E})")
        elif f == "scatter":
            fwd.append(f"t{i}gates = torch.zeros({T}, {E}, dtype=t{i}w.dtype, device={x}.device).scatter(1, t{i}e, t{i}w)")
        for e in range(E):
            gate = {"one_hot": f"(t{i}w * t{i}oh[:, :, {e}]).sum(-1, keepdim=True)",
                    "eq": f"(t{i}w * (t{i}e == {e})).sum(-1, keepdim=True)",
                    "scatter": f"t{i}gates[:, {e}:{e + 1}]"}[f]
            fwd.append(f"t{i}o = t{i}o + {gate} * {expert(e, f't{i}h')}")
    else:   # transformers' grouped experts: pairs sorted by expert, counted, offsets, order restored
        n = T * k
        fwd.append(f"t{i}fe = t{i}e.reshape(-1)")
        # any order of the pairs of one expert gives the same result: a sort need not be stable
        fwd.append({"sort": f"t{i}se, t{i}perm = torch.sort(t{i}fe)", "argsort": f"t{i}perm = torch.argsort(t{i}fe)",
                    "sort_stable": f"t{i}se, t{i}perm = torch.sort(t{i}fe, stable=True)"}[p["sort"]])
        fwd += [f"t{i}tok = t{i}perm // {k}",
                f"t{i}cnt = torch.histc(t{i}fe.float(), bins={E}, min=0, max={E - 1})",
                f"t{i}off = torch.cumsum(t{i}cnt, dim=0).long()",
                f"t{i}row = torch.arange({n}, device={x}.device)",
                f"t{i}seg = (t{i}row[:, None] >= t{i}off[None, :]).sum(-1)",
                f"t{i}xs = t{i}h[t{i}tok]",
                f"t{i}ys = torch.zeros_like(t{i}xs)"]
        for e in range(E):
            fwd.append(f"t{i}ys = torch.where((t{i}seg == {e})[:, None], {expert(e, f't{i}xs')}, t{i}ys)")
        fwd.append(f"t{i}ys = t{i}ys * t{i}w.reshape(-1)[t{i}perm][:, None]")
        if p["restore"] == "inv_perm":
            fwd += [f"t{i}inv = torch.empty_like(t{i}perm)",
                    f"t{i}inv[t{i}perm] = torch.arange({n}, device={x}.device)",
                    f"t{i}o = t{i}ys[t{i}inv].reshape({T}, {k}, {D}).sum(1)"]
        else:
            fwd.append(f"t{i}o = torch.zeros_like(t{i}h).index_add_(0, t{i}tok, t{i}ys)")
    fwd.append(f"{out} = t{i}o.reshape({list(s)})")
    return init, fwd


kind("moe", ranks=(2, 3), weight=1.0,
     doc="MoE routing: softmax, topk, renormalise, experts combined by one_hot/eq/scatter, or sorted (histc, cumsum)")(
    (_gen_moe, _emit_moe))

_ROUNDTRIPS = ("float_type_as", "to_float32", "type_as_other", "softmax_fp32", "float_to_dtype")
_ROUNDTRIP_FNS = {"none": "{x}", "silu": "F.silu({x})", "tanh": "torch.tanh({x})", "square": "{x} * {x}"}


def _gen_dtype_roundtrip(b, x):
    form = b.c.pick(_ROUNDTRIPS)
    other = b.c.pick(list(range(b.n_values))[::-1]) if form == "type_as_other" else x
    return (x, other), {"form": form, "fn": b.c.pick(list(_ROUNDTRIP_FNS))}, b.shape(x)


def _emit_dtype_roundtrip(op, i, a, shapes, out):
    # no-ops in float32; in the float64 reference real casts, each undone before the value meets
    # a float64 weight (the computation between them runs in float32 there, as it does here)
    p, (x, y) = op.p, a
    fn = _ROUNDTRIP_FNS[p["fn"]].format(x=f"t{i}h")
    f = p["form"]
    if f == "float_type_as":
        return [], [f"t{i}h = {x}.float()", f"{out} = ({fn}).type_as({x})"]
    if f == "to_float32":
        return [], [f"t{i}dt = {x}.dtype", f"t{i}h = {x}.to(torch.float32)", f"{out} = ({fn}).to(t{i}dt)"]
    if f == "type_as_other":
        return [], [f"t{i}h = {x}.float()", f"{out} = ({fn}).type_as({y})"]
    if f == "softmax_fp32":
        return [], [f"{out} = F.softmax({x}, dim=-1, dtype=torch.float32).to({x}.dtype)"]
    return [], [f"t{i}h = {x}.float()", f"{out} = ({fn}).to(dtype={x}.dtype)"]


kind("dtype_roundtrip", ranks=(2, 3, 4), weight=0.8,
     doc=".float(), .to(torch.float32), .type_as(y), softmax(dtype=float32).to(x.dtype)")(
    (_gen_dtype_roundtrip, _emit_dtype_roundtrip))

_EMPTY_FORMS = ("legacy_cache", "zero_slice_end", "zero_slice_front", "new_zeros", "empty_sum")


def _gen_empty(b, x):
    return (x,), {"form": b.c.pick(_EMPTY_FORMS)}, b.shape(x)


def _emit_empty(op, i, a, shapes, out):
    x, s, f = a[0], shapes[0], op.p["form"]
    if f == "legacy_cache":     # transformers' first cache update: a 1-d empty tensor concatenated
        return ([f'self.register_buffer("cache{i}", torch.tensor([]), persistent=False)'],
                [f"{out} = torch.cat([self.cache{i}, {x}], dim=-2)"])
    if f == "zero_slice_end":   # Phi-3's rotary over the whole head: x[..., d:] has width 0
        D = s[-1]
        return [], [f"t{i}a, t{i}b = {x}[..., :{D}], {x}[..., {D}:]",
                    f"{out} = torch.cat([torch.tanh(t{i}a), t{i}b * 2.0], dim=-1)"]
    if f == "zero_slice_front":
        return [], [f"{out} = torch.cat([{x}[:, :0], {x}], dim=1)"]
    if f == "new_zeros":        # an empty cache of the right rank
        return [], [f"t{i}c = {x}.new_zeros(({s[0]}, 0{''.join(f', {d}' for d in s[2:])}))",
                    f"{out} = torch.cat([t{i}c, {x}], dim=1)"]
    return [], [f"{out} = {x} + {x}[..., {s[-1]}:].sum(-1, keepdim=True)"]    # a sum over zero elements


kind("empty", ranks=(2, 3, 4), weight=0.8,
     doc="empty tensors as caches produce them: cat with torch.tensor([]), zero-width slices")(
    (_gen_empty, _emit_empty))


# ---- drawing a spec ------------------------------------------------------------------------------
# After a layer, the ops that fold into it are more likely (so fold-* passes see their patterns).
_FOLLOW = {
    "conv2d": {"batchnorm2d": 8, "channel_const": 3, "scalar": 2, "act": 1.5},
    "conv_transpose2d": {"batchnorm2d": 6, "channel_const": 3, "scalar": 2},
    "conv1d": {"batchnorm1d": 6, "channel_const": 3, "scalar": 2},
    "linear": {"batchnorm1d": 6, "channel_const": 3, "scalar": 2, "act": 1.5},
    "matmul_weight": {"channel_const": 2, "scalar": 2},
    "attention": {"residual": 3, "layernorm": 2, "layernorm_manual": 2},
    "to2": {"linear": 2, "batchnorm1d": 2},
    # a decoder block: norm, attention (or experts), residual
    "embed": {"rmsnorm": 2, "layernorm": 1.5},
    "rmsnorm": {"gqa_attention": 2, "moe": 2, "rotary": 1.5},
    "gqa_attention": {"residual": 3, "rmsnorm": 2},
    "moe": {"residual": 3, "rmsnorm": 1.5},
}


class _Builder:
    def __init__(self, c: Chooser, inputs: list[tuple[int, ...]]):
        self.c = c
        self.shapes: list[tuple[int, ...]] = list(inputs)
        self.ops: list[Op] = []

    @property
    def n_values(self) -> int:
        return len(self.shapes)

    def shape(self, vid: int) -> tuple[int, ...]:
        return self.shapes[vid]

    def add(self, kind_: str, inputs, params: dict, shape) -> int:
        self.ops.append(Op(kind_, tuple(inputs), tuple(params.items()), tuple(int(d) for d in shape)))
        self.shapes.append(tuple(shape))
        return self.n_values - 1


def _input_shape(c: Chooser, rank: int) -> tuple[int, ...]:
    n = c.pick([1, 2])
    if rank == 2:
        return (n, c.integer(1, 32))
    if rank == 3:
        return (n, c.integer(1, 8), c.integer(1, 24))
    return (n, c.integer(1, 8), c.integer(1, 10), c.integer(1, 10))


def draw_spec(c: Chooser, max_ops: int = MAX_OPS, kinds: Sequence[str] | None = None) -> ModelSpec:
    """Draw one valid spec from ``c``. ``kinds`` restricts the op kinds (shape changes to
    reach a rank they need are still drawn from all kinds only if the set has none)."""
    allowed = [k for k in KINDS if kinds is None or k in kinds]
    if not allowed:
        raise ValueError(f"no known kinds among {kinds} (valid: {', '.join(KINDS)})")
    seed = c.integer(0, 2 ** 16 - 1)
    ranks_needed = sorted({r for k in allowed for r in KINDS[k].ranks})
    rank = c.weighted([(r, w) for r, w in ((2, 1.0), (3, 1.5), (4, 2.0)) if r in ranks_needed] or [(2, 1.0)])
    shape = _input_shape(c, rank)
    n_inputs = 2 if c.flag(15) else 1
    b = _Builder(c, [shape] * n_inputs)
    cur = 0
    last_kind = None
    refused = 0
    while len(b.ops) < max_ops:
        c.mark()                                  # one block of choices per op, its flag first
        if not c.more_ops(first=not b.ops):       # (drawn for the first op too: blocks align)
            break
        x = cur
        if len(b.ops) >= 2 and c.flag(15):        # branch from an earlier value
            x = c.pick(list(range(b.n_values - 1, -1, -1)))
        r = len(b.shape(x))
        options = []
        for name in allowed:
            k = KINDS[name]
            if r in k.ranks:
                options.append((name, k.weight * _FOLLOW.get(last_kind, {}).get(name, 1.0)))
        if not options:
            break
        name = c.weighted(options)
        res = KINDS[name].gen(b, x)
        if res is None or not _ok(res[2]):
            # the first op is drawn whatever more_ops says: with kinds that all refuse this input
            # (rotary on an odd width) the loop must stop
            refused += 1
            if refused >= 100:
                break
            continue
        inputs, params, out_shape = res
        refused = 0
        cur = b.add(name, inputs, params, out_shape)
        last_kind = name
    if not b.ops:       # every draw refused: a relu keeps the spec valid
        cur = b.add("act", (0,), {"fn": "relu"}, b.shape(0))
    c.mark()            # the outputs' choices (a GeneChooser reads them from its tail)
    outputs = [cur]
    extra = [v for v in range(n_inputs, b.n_values - 1)]
    if extra and c.flag(15):
        outputs.append(c.pick(extra[::-1]))
    return ModelSpec(tuple(b.shapes[:n_inputs]), tuple(b.ops), tuple(outputs), seed)


def random_spec(seed: int | str, max_ops: int = MAX_OPS, kinds: Sequence[str] | None = None) -> ModelSpec:
    """The spec drawn from ``random.Random(seed)`` (deterministic)."""
    return draw_spec(RandomChooser(seed), max_ops, kinds)


def random_spec_choices(seed: int | str, max_ops: int = MAX_OPS,
                        kinds: Sequence[str] | None = None) -> tuple[ModelSpec, list[int]]:
    """:func:`random_spec` and its choice sequence (for :func:`shrink_choices`)."""
    c = RandomChooser(seed)
    return draw_spec(c, max_ops, kinds), c.record


def spec_from_choices(choices: Sequence[int], max_ops: int = MAX_OPS,
                      kinds: Sequence[str] | None = None) -> tuple[ModelSpec, list[int], list[int]]:
    """Replay ``choices``: the spec, the choices actually used and the op marks."""
    c = ReplayChooser(choices)
    spec = draw_spec(c, max_ops, kinds)
    return spec, c.record, c.marks


def _size(spec: ModelSpec) -> tuple:
    return (len(spec.ops), sum(_numel(s) for s in spec.inputs), sum(_numel(op.shape) for op in spec.ops))


def shrink_choices(choices: Sequence[int], fails: Callable[[ModelSpec], bool], *, deadline: float | None = None,
                   max_ops: int = MAX_OPS, kinds: Sequence[str] | None = None) -> ModelSpec:
    """The smallest spec found whose replayed choices still make ``fails`` true.

    Hypothesis's shrinking idea on this generator's choice sequence: delete one op's choices,
    truncate, zero a block, then lower single choices (to 0, halved, minus one), greedily,
    until nothing smaller fails or ``deadline`` (``time.monotonic()``) passes. A candidate is
    accepted when its spec is smaller (ops, input elements, intermediate elements, then the
    choice sequence, shortlex) and still fails."""
    import time
    best, best_choices, marks = spec_from_choices(choices, max_ops, kinds)
    tried: set[tuple[int, ...]] = set()
    seen_specs: set[str] = {best.digest()}

    def better(cand: list[int]) -> bool:
        nonlocal best, best_choices, marks
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError
        spec, used, mk = spec_from_choices(cand, max_ops, kinds)
        key = tuple(used)
        if key in tried or (_size(spec), len(used), used) >= (_size(best), len(best_choices), best_choices):
            return False
        tried.add(key)
        if spec.digest() in seen_specs:       # another choice sequence for a model already tried
            if spec == best:
                best_choices, marks = used, mk
                return True
            return False
        seen_specs.add(spec.digest())
        if not fails(spec):
            return False
        best, best_choices, marks = spec, used, mk
        return True

    try:
        improved = True
        while improved:
            improved = False
            # whole ops, last first (later values may read earlier ones)
            for k in range(len(marks) - 1, -1, -1):
                if k >= len(marks):
                    continue
                end = marks[k + 1] if k + 1 < len(marks) else len(best_choices)
                if k == len(marks) - 1 and end - marks[k] <= 1:
                    continue                       # the final stop flag
                if better(best_choices[:marks[k]] + best_choices[end:]):
                    improved = True
            for size in (8, 4, 2, 1):
                i = 0
                while i < len(best_choices):
                    block = best_choices[i:i + size]
                    if any(block) and better(best_choices[:i] + [0] * len(block) + best_choices[i + size:]):
                        improved = True
                    i += size
            for i in range(len(best_choices)):
                for v in (0, best_choices[i] // 2, best_choices[i] - 1) if i < len(best_choices) else ():
                    if 0 <= v < best_choices[i] and better(best_choices[:i] + [v] + best_choices[i + 1:]):
                        improved = True
                        break
    except TimeoutError:
        pass
    return best


GENE = 24      # ints per op in model_specs (the largest op, attention, reads about 20)


def model_specs(max_ops: int = MAX_OPS, kinds: Sequence[str] | None = None):
    """A hypothesis strategy of :class:`ModelSpec` (hypothesis is imported here, lazily).

    Drawn as a header, a list of genes (one per op) and a tail (:class:`GeneChooser`), so
    hypothesis shrinks a failing model by deleting ops, then simplifying each op and the shapes."""
    from hypothesis import strategies as st

    ints = st.integers(0, 2 ** 16 - 1)
    return st.builds(lambda h, g, t: draw_spec(GeneChooser(h, g, t), max_ops, kinds),
                     st.lists(ints, min_size=8, max_size=8),
                     st.lists(st.lists(ints, min_size=GENE, max_size=GENE), min_size=1, max_size=max_ops),
                     st.lists(ints, min_size=2, max_size=2))


# ---- source and model ----------------------------------------------------------------------------
_HEADER = '''\
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _normal(g, shape, std=1.0, mean=0.0):
    return torch.randn(shape, generator=g) * std + mean


def _away_from_zero(g, shape):
    """Values in +-[0.5, 1.5): safe divisors and scales."""
    return (torch.rand(shape, generator=g) + 0.5) * (torch.randint(0, 2, shape, generator=g) * 2 - 1)


def _init_weights(model, g):
    """Fan-in scaled weights, random BatchNorm statistics and norm affines (not the identity)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
                fan_in = m.weight[0].numel() if not isinstance(m, nn.ConvTranspose2d) else \\
                    m.weight.numel() // max(m.out_channels, 1)
                m.weight.copy_(_normal(g, m.weight.shape, 1.0 / math.sqrt(max(fan_in, 1))))
                if m.bias is not None:
                    m.bias.copy_(_normal(g, m.bias.shape, 0.2))
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(_normal(g, m.running_mean.shape, 0.3))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(_normal(g, m.bias.shape, 0.2))
            elif isinstance(m, nn.LayerNorm):
                if m.weight is not None:
                    m.weight.copy_(_normal(g, m.weight.shape, 0.2, 1.0))
                if m.bias is not None:
                    m.bias.copy_(_normal(g, m.bias.shape, 0.2))
'''


def _emit_source(spec: ModelSpec) -> str:
    n = len(spec.inputs)
    init: list[str] = []
    fwd: list[str] = []
    for i, op in enumerate(spec.ops):
        a = [f"v{v}" for v in op.inputs]
        shapes = [spec.shape_of(v) for v in op.inputs]
        fwd.append(f"# {op.describe()}")
        ini, lines = KINDS[op.kind].emit(op, i, a, shapes, f"v{n + i}")
        init += ini
        fwd += lines
    outs = ", ".join(f"v{o}" for o in spec.outputs)
    ret = outs if len(spec.outputs) == 1 else f"({outs})"
    args = ", ".join(f"v{k}" for k in range(n))
    body = ["class Model(nn.Module):", f"    def __init__(self, seed={spec.seed}):", "        super().__init__()",
            "        g = torch.Generator().manual_seed(seed)"]
    body += [f"        {line}" for line in init]
    body += ["        _init_weights(self, g)", "", f"    def forward(self, {args}):"]
    body += [f"        {line}" for line in fwd]
    body += [f"        return {ret}", "", ""]
    shapes = ", ".join(repr(tuple(s)) for s in spec.inputs)
    body += [f"INPUT_SHAPES = [{shapes}]", "", "",
             f"def make_inputs(seed={spec.seed + 1}):",
             '    """Standard normal inputs (no NaN, no Inf)."""',
             "    g = torch.Generator().manual_seed(seed)",
             "    return tuple(torch.randn(s, generator=g) for s in INPUT_SHAPES)", ""]
    return _HEADER + "\n\n" + "\n".join(body)


def load_source(source: str, name: str) -> dict:
    """Execute model source; the namespace (``Model``, ``make_inputs``). The source is put in
    ``linecache`` so tracebacks and torch.export's stack traces show its lines."""
    filename = f"<optc-fuzz-{name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    ns: dict[str, Any] = {"__name__": f"optc_fuzz_{name}"}
    exec(compile(source, filename, "exec"), ns)
    return ns


_NS_CACHE: dict[str, dict] = {}


def build_model(spec: ModelSpec):
    """The model of ``spec`` in eval mode, built by executing :meth:`ModelSpec.source`."""
    key = spec.digest()
    ns = _NS_CACHE.get(key)
    if ns is None:
        ns = load_source(spec.source(), key)
        if len(_NS_CACHE) > 64:
            _NS_CACHE.clear()
        _NS_CACHE[key] = ns
    return ns["Model"]().eval()


def make_inputs(spec: ModelSpec, index: int = 0) -> tuple:
    """Input set ``index`` of ``spec``: standard normal from seed ``spec.seed + 1 + index``."""
    import torch
    g = torch.Generator().manual_seed(spec.seed + 1 + index)
    return tuple(torch.randn(s, generator=g) for s in spec.inputs)
