"""convert-layout{layout=NHWC|NCHW}: run convolutions, pooling and resampling in the target layout,
with permutes only where the layout cannot be carried further.

Every value keeps its *logical* meaning (the shape the original graph gives it); the pass decides
its *physical* layout, a permutation ``P`` with ``physical = logical.permute(P)``. Layout-sensitive
ops take their input in the target layout and produce it; every other op either works in whatever
layout its input has (the layout propagates) or needs the logical layout back (the layout stops).
Permutes are inserted only where a value is needed in a layout it does not have, so inverse pairs
never appear; the model's own permutes and transposes are absorbed into the layout and cancel::

    %x : f32[1,3,8,8]                              %x : f32[1,3,8,8]
    %c = aten.conv2d(%x, %w, %b)                   %permute = aten.permute(%x, [0, 2, 3, 1])
    %r = aten.relu(%c)                   ==>       %c = optc.conv2d_nhwc(%permute, %w_ohwi, %b)   [1,8,8,C]
    %m = aten.max_pool2d(%r, [2, 2])               %r = aten.relu(%c)                             [1,8,8,C]
    %y = aten.flatten(%m, 1)   (H = W = 1 here)    %m = optc.max_pool2d_nhwc(%r, [2, 2])          [1,1,1,C]
                                                   %y = aten.flatten(%m, 1)                       [1,C]

Layout-sensitive ops (``ir/layout_ops.py`` has their NHWC forms; with ``layout=NCHW`` the pass
maps them back to ATen):

- ``aten.conv2d`` / ``aten.convolution`` (2-d, not transposed) <-> ``optc.conv2d_nhwc``; the
  weight OIHW <-> OHWI is permuted at compile time (the weight must be a constant, or a constant
  subgraph such as ``dequantize_per_channel`` of one: that subgraph is re-emitted permuted);
- ``aten.max_pool2d``, ``aten.avg_pool2d``, ``aten.adaptive_avg_pool2d`` (output other than 1x1),
  ``aten.upsample_nearest2d.vec``, ``aten.upsample_bilinear2d.vec`` <-> ``optc.*_nhwc``.

Propagation rules (the op runs on the physical tensor; axis arguments are renumbered):

- pointwise ops (``torch.Tag.pointwise``: activations, arithmetic, ``where``, clones, casts,
  eval dropout, per-tensor Q/DQ): other operands are brought to the first permuted operand's
  layout; a lower-rank operand is broadcast first (a constant is permuted at compile time);
- axis ops: ``cat``, ``split``/``chunk``/``unbind`` (+ ``getitem``), ``softmax``/``log_softmax``,
  ``sum``/``mean``/``amax``/``amin``/``var``/``std`` (with or without ``keepdim``), ``select``,
  ``slice``, ``narrow``, ``squeeze``/``unsqueeze``, ``glu``, ``cumsum``, ``sym_size``,
  ``optc.channel_affine``, per-channel ``optc.quantize``/``dequantize``;
- ``aten.adaptive_avg_pool2d`` to 1x1 -> ``aten.mean`` over the spatial axes;
- eval-mode ``aten.batch_norm`` with constant statistics -> ``optc.channel_affine`` on the
  channel axis (scale and shift computed at compile time in float64);
- constant ``aten.pad`` / ``constant_pad_nd``: the pad list is rewritten for the physical axes;
- ``aten.permute`` / ``aten.transpose``: absorbed into the layout (no node);
- ``view`` / ``reshape`` / ``flatten``: when the permutation only moves size-1 axes (e.g. after a
  global pool) the element order is the same, and the result is logical again.

What stops propagation: any other op (linear, matmul, layer norm, unknown custom ops, in-place ops
with other readers...), a reshape that mixes permuted axes, a padding mode other than constant,
graph outputs. There the value gets a permute back to its logical layout and the op is left
alone; each stop is recorded as a refusal (``propagate``). Sensitive ops that cannot be converted
stay in their layout with permutes around them, with the reason (weight not a constant, unbatched
input, transposed or 1-d/3-d convolution, ``divisor_override``...).

Preconditions: none for correctness; run after BatchNorm/binary folding and pruning (``after=``),
which look for ``aten.conv2d``. A graph without a convertible layout-sensitive op is left
unchanged. The rewrite is exact: it moves data, never changes arithmetic, except that a
BatchNorm becomes a per-channel affine map (rounding only). New values are checked against the
logical shape permuted; a mismatch is a :class:`~optc.errors.PassError` (and the PassManager
restores the previous Program).
"""

from __future__ import annotations

import logging
import operator
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from optc.errors import PassError
from optc.ir import layout_ops
from optc.ir.rewrite import MatchResult, RewriteRule, add_attr, arg, attr_node, attr_value, call, infer_val, is_op
from optc.passes.base import Option, PassContext, PassResult, register_pass

log = logging.getLogger(__name__)
aten = torch.ops.aten
optc_ops = torch.ops.optc
PASS = "convert-layout"
LAYOUTS = ("NHWC", "NCHW")

Perm = tuple  # of ints: physical = logical.permute(perm)


# ---- permutations ----------------------------------------------------------------------------------
def identity(n: int) -> Perm:
    return tuple(range(n))


def is_identity(p) -> bool:
    return p is None or (isinstance(p, tuple) and p == tuple(range(len(p))))


def inverse(p: Perm) -> Perm:
    inv = [0] * len(p)
    for i, d in enumerate(p):
        inv[d] = i
    return tuple(inv)


def then(p: Perm, q: Perm) -> Perm:
    """The permutation of ``x.permute(p).permute(q)``."""
    return tuple(p[i] for i in q)


def drop_dims(p: Perm, dims) -> Perm:
    """The layout of a result that drops logical axes ``dims`` (a reduction without keepdim,
    ``select``, ``squeeze``) from a value in layout ``p``."""
    dims = set(dims)
    kept = [d for d in p if d not in dims]
    return tuple(d - sum(1 for x in dims if x < d) for d in kept)


def _shape(node) -> list:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return list(v.shape) if isinstance(v, torch.Tensor) else None


def _static(d) -> bool:
    return isinstance(d, int) or (isinstance(d, torch.SymInt) and d.node.maybe_as_int() is not None)


def _is_one(d) -> bool:
    return _static(d) and int(d) == 1


def _pair(v) -> list:
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    return v * 2 if len(v) == 1 else v


def _name(target: str, p: Perm) -> str:
    """``conv.weight`` in layout ``p`` -> ``conv_weight_nhwc`` (a suffix of an earlier conversion replaced)."""
    base = re.sub(r"_(nhwc|nchw|p\d+)$", "", str(target).replace(".", "_"))
    return base + "_" + {(0, 2, 3, 1): "nhwc", (0, 3, 1, 2): "nchw"}.get(tuple(p), "p" + "".join(map(str, p)))


def _target_name(t) -> str:
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}" + ("" if t._overloadname == "default" else f".{t._overloadname}")
    return getattr(t, "__name__", str(t))


# ---- the rewriter: values in a requested layout ------------------------------------------------------
@dataclass
class Built:
    """What a rule turns a node into: target, arguments and the layout of its result (a perm, a
    list of perms for ops returning a list, or None for non-tensor results)."""

    target: Callable
    args: tuple
    kwargs: dict
    out: Any


class Rewriter:
    """The state of one run: the layout of every value and how to get it in another layout.

    ``env[n] = (node, perm)``: ``node`` (in the rewritten graph) holds ``logical(n).permute(perm)``.
    """

    def __init__(self, gm: fx.GraphModule, ctx: PassContext, target: str):
        self.gm = gm
        self.graph = gm.graph
        self.ctx = ctx
        self.layout = target
        self.env: dict[fx.Node, tuple] = {}
        self.logical: dict[fx.Node, Any] = {n: n.meta.get("val") for n in gm.graph.nodes}
        self.const: set[fx.Node] = set()
        self.cache: dict[tuple, fx.Node] = {}
        self.cursor: fx.Node | None = None
        self.created: list[fx.Node] = []
        self.dead: list[fx.Node] = []
        self.stats = {"converted": 0, "permutes": 0, "absorbed": 0, "reshapes": 0, "constants": 0}

    # -- layouts --
    def perm(self, v) -> Any:
        return self.env[v][1] if isinstance(v, fx.Node) and v in self.env else None

    def lshape(self, v) -> list | None:
        val = self.logical.get(v) if isinstance(v, fx.Node) else None
        return list(val.shape) if isinstance(val, torch.Tensor) else None

    def rank(self, v) -> int | None:
        s = self.lshape(v)
        return None if s is None else len(s)

    def moving(self, v) -> bool:
        """A non-constant tensor whose layout is permuted: what decides an op's layout."""
        return isinstance(v, fx.Node) and v not in self.const and not is_identity(self.perm(v)) \
            and isinstance(self.perm(v), tuple)

    # -- new nodes --
    def _call(self, target, args, like: fx.Node | None, name: str, kwargs: dict | None = None) -> fx.Node:
        with self.graph.inserting_before(self.cursor):
            node = call(self.graph, target, args, kwargs, like=like, pass_name=PASS, name=name)
        self.created.append(node)
        return node

    def request(self, v, q: Perm) -> Any:
        """``v`` (a node of the original graph) as ``logical(v).permute(q)`` in the new graph."""
        if not isinstance(v, fx.Node):
            return v
        x, p = self.env[v]
        if p is None or not isinstance(p, tuple):
            if not is_identity(q):
                raise PassError(f"%{v.name} has no tensor layout to permute", pass_name=PASS, node=v.name)
            return x
        if len(q) != len(p):
            raise PassError(f"layout of rank {len(q)} requested for %{v.name} of rank {len(p)}", pass_name=PASS,
                            node=v.name)
        r = tuple(inverse(p)[d] for d in q)          # x.permute(r) == logical.permute(q)
        if is_identity(r):
            return x
        key = (v, tuple(q))
        if key in self.cache:
            return self.cache[key]
        if v in self.const:
            out = self._constant(v, tuple(q))
        else:
            out = self._permute(x, r, like=v)
        self.cache[key] = out
        return out

    def plain(self, a) -> Any:
        """An argument (a node, or a list/tuple/dict of them) with every tensor in its logical layout."""
        if isinstance(a, fx.Node):
            p = self.perm(a)
            if isinstance(p, tuple):
                return self.request(a, identity(len(p)))
            return self.env[a][0] if a in self.env else a
        if isinstance(a, (list, tuple)):
            return type(a)(self.plain(x) for x in a)
        if isinstance(a, dict):
            return {k: self.plain(v) for k, v in a.items()}
        return a

    def request_broadcast(self, v, p: Perm) -> Any:
        """``v`` as an operand of a pointwise op whose result is in layout ``p`` (rank ``len(p)``):
        a lower-rank operand is broadcast (leading size-1 axes) before it is permuted."""
        r = self.rank(v)
        if r is None:
            return self.plain(v)
        if r == len(p):
            return self.request(v, p)
        if r == 0:
            return self.request(v, ())
        shape = [1] * (len(p) - r) + self.lshape(v)
        if v in self.const and attr_value(v) is not None:
            key = (v, "broadcast", tuple(p))
            if key not in self.cache:
                t = attr_value(v).reshape(shape).permute(p).contiguous()
                self.cache[key] = self._new_attr(v, t, _name(v.target, p))
            return self.cache[key]
        if not all(_static(d) for d in shape):
            return None
        # a reshape to the permuted broadcast shape is exact when the non-unit axes keep their order
        order = [d for d in p if not _is_one(shape[d])]
        if order == sorted(order):
            key = (v, "broadcast", tuple(p))
            if key not in self.cache:
                base = self.request(v, identity(r))
                self.cache[key] = self._reshape(base, [int(shape[d]) for d in p], like=v)
            return self.cache[key]
        return None

    def _permute(self, x: fx.Node, r: Perm, like: fx.Node) -> fx.Node:
        # cancel: permute(permute(b, a), r) == permute(b, a then r)
        while is_op(x, aten.permute.default) and isinstance(x.args[0], fx.Node):
            r = then(tuple(x.args[1]), r)
            x = x.args[0]
            if is_identity(r):
                return x
        shape = _shape(x)
        if shape is not None and all(_static(d) for d in shape):
            order = [d for d in r if not _is_one(shape[d])]
            if order == sorted(order):         # only unit axes move: a reshape keeps the element order
                return self._reshape(x, [int(shape[d]) for d in r], like=like)
        return self._call(aten.permute.default, (x, list(r)), like, "permute")

    def _reshape(self, x: fx.Node, shape: list, like: fx.Node) -> fx.Node:
        self.stats["reshapes"] += 1
        return self._call(aten.reshape.default, (x, shape), like, "reshape")

    def _new_attr(self, like: fx.Node, value: torch.Tensor, hint: str) -> fx.Node:
        orig = attr_value(like)
        target = add_attr(self.gm, hint, value, parameter=isinstance(orig, nn.Parameter))
        with self.graph.inserting_before(self.cursor):
            node = attr_node(self.gm, target, like=like, pass_name=PASS)
        self.created.append(node)
        self.stats["constants"] += 1
        return node

    def _constant(self, v: fx.Node, q: Perm) -> fx.Node:
        """A constant in layout ``q``: a permuted copy of the tensor (compile time), or the constant
        subgraph that computes it re-emitted on permuted inputs."""
        t = attr_value(v)
        if t is not None:
            return self._new_attr(v, t.permute(q).contiguous(), _name(v.target, q))
        for rule in SAME_RANK_RULES:
            built = rule.reemit(v, q, self)
            if built is not None:
                with self.graph.inserting_before(self.cursor):
                    node = self.graph.create_node("call_function", built.target, built.args, built.kwargs,
                                                  name=v.name)
                node.meta.update({k: val for k, val in v.meta.items() if k != "val"})
                node.meta["optc_pass"] = PASS
                self._check(node, v, q, infer=True)
                self.created.append(node)
                return node
        x, p = self.env[v]
        return self._permute(x, tuple(inverse(p)[d] for d in q), like=v)

    # -- checks --
    def _check(self, node: fx.Node, orig: fx.Node, out, *, infer: bool = True) -> None:
        """The new value has the logical shape of ``orig`` permuted by ``out``."""
        if infer:
            infer_val(node)
        want, got = self.logical.get(orig), node.meta.get("val")

        def expect(val, p):
            if not isinstance(val, torch.Tensor):
                return None
            s = list(val.shape)
            return [str(s[d]) for d in p] if isinstance(p, tuple) else [str(d) for d in s]

        def seen(val):
            return [str(d) for d in val.shape] if isinstance(val, torch.Tensor) else None

        if isinstance(want, (list, tuple)):
            outs = out if isinstance(out, list) else [out] * len(want)
            ok = isinstance(got, (list, tuple)) and len(got) == len(want) and all(
                expect(w, o) == seen(g) for w, o, g in zip(want, outs, got))
        else:
            ok = expect(want, out) == seen(got)
        if not ok:
            raise PassError(f"rewriting %{orig.name} gave {_describe(got)}, expected the logical "
                            f"{_describe(want)} in layout {out}", pass_name=PASS, node=orig.name)


def _describe(val) -> str:
    if isinstance(val, torch.Tensor):
        return f"{list(val.shape)}"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(_describe(v) for v in val) + ")"
    return repr(val)


# ---- rules ---------------------------------------------------------------------------------------
class LayoutRule(RewriteRule):
    """A rule of this pass: ``match`` (pure: the node and the layouts of its inputs) says whether
    and how the node can work on permuted values; ``build`` (which may add input permutes through
    the rewriter) gives the new target, arguments and result layout."""

    name = "layout"
    same_rank = False      # result in the layout of the input (may re-emit constant subgraphs)

    def match(self, node: fx.Node, rw: Rewriter) -> MatchResult | None:   # noqa: D401
        raise NotImplementedError

    def build(self, node: fx.Node, m: MatchResult, rw: Rewriter) -> Built:
        raise NotImplementedError

    def reemit(self, node: fx.Node, q: Perm, rw: Rewriter) -> Built | None:
        """``node`` computed in layout ``q`` from inputs in layout ``q`` (constant subgraphs)."""
        if not self.same_rank:
            return None
        m = self.match_in(node, q, rw)
        return None if m is None or not m.ok else self.build(node, m, rw)

    def match_in(self, node: fx.Node, p: Perm, rw: Rewriter) -> MatchResult | None:
        return None


# -- layout-sensitive ops ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """One layout-sensitive op in both layouts: how to read its arguments from either form and
    build either form. ``weight``: the index (in the normalised arguments) of an OIHW/OHWI weight."""

    name: str
    nchw: tuple               # ATen overloads (NCHW)
    nhwc: Any                 # the optc overload (NHWC)
    parse: Callable           # node -> (x, [normalised args]) or a refusal string
    build_nchw: Callable      # (x, args) -> (target, args)
    weight: int | None = None


def _parse_conv(node: fx.Node):
    if is_op(node, layout_ops.NHWC_OPS["conv2d_nhwc"]):
        return node.args[0], list(node.args[1:7])
    x, w, b = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")
    if is_op(node, aten.convolution.default):
        transposed = arg(node, 6, "transposed")
        if transposed is not False:
            return "transposed convolution has no NHWC form in optc"
        stride, padding, dilation, groups = (arg(node, 3, "stride"), arg(node, 4, "padding"),
                                             arg(node, 5, "dilation"), arg(node, 8, "groups"))
    else:
        stride, padding = arg(node, 3, "stride", [1, 1]), arg(node, 4, "padding", [0, 0])
        dilation, groups = arg(node, 5, "dilation", [1, 1]), arg(node, 6, "groups", 1)
    ws = _shape(w)
    if ws is None or len(ws) != 4:
        return "not a 2-d convolution"
    if _shape(x) is None or len(_shape(x)) != 4:
        return "unbatched (3-d) input"
    stride, dilation = _pair(stride), _pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0, 0]
        elif padding == "same" and all(s == 1 for s in stride):
            total = [dl * (int(k) - 1) for dl, k in zip(dilation, ws[2:])]
            if any(t % 2 for t in total):
                return "padding='same' with an even kernel pads asymmetrically"
            padding = [t // 2 for t in total]
        else:
            return f"padding={padding!r}"
    return x, [w, b, stride, _pair(padding), dilation, groups]


def _ceil_matters(sizes, kernel, stride, padding, dilation) -> bool:
    """Whether ``ceil_mode=True`` gives a longer output than floor mode on these spatial sizes
    (torch drops a last ceil window that would start in the right padding, so often it does not).
    Where it does not, the pass writes ``ceil_mode=False``: the same windows, and the form every
    backend computes alike (ONNX's shape inference counts that dropped window)."""
    stride = stride or kernel
    for n, k, s, p, d in zip(sizes, kernel, stride, padding, dilation):
        if not _static(n):
            return True
        span = int(n) + 2 * p - d * (k - 1) - 1
        floor, ceil = span // s + 1, -(-span // s) + 1
        if (ceil - 1) * s >= int(n) + p:
            ceil -= 1
        if ceil != floor:
            return True
    return False


def _parse_max_pool(node: fx.Node):
    x = node.args[0]
    if is_op(node, layout_ops.NHWC_OPS["max_pool2d_nhwc"]):
        args, sizes = list(node.args[1:6]), _shape(x)[1:3]
    else:
        if _shape(x) is None or len(_shape(x)) != 4:
            return "unbatched (3-d) input"
        stride = arg(node, 2, "stride", [])
        args = [_pair(arg(node, 1, "kernel_size")), _pair(stride) if stride else [],
                _pair(arg(node, 3, "padding", 0)), _pair(arg(node, 4, "dilation", 1)),
                bool(arg(node, 5, "ceil_mode", False))]
        sizes = _shape(x)[2:4]
    args[4] = bool(args[4]) and _ceil_matters(sizes, args[0], args[1], args[2], args[3])
    return x, args


def _parse_avg_pool(node: fx.Node):
    x = node.args[0]
    if is_op(node, layout_ops.NHWC_OPS["avg_pool2d_nhwc"]):
        args, sizes = list(node.args[1:7]), _shape(x)[1:3]
    else:
        if _shape(x) is None or len(_shape(x)) != 4:
            return "unbatched (3-d) input"
        if arg(node, 6, "divisor_override") is not None:
            return "divisor_override has no NHWC lowering in every backend"
        stride = arg(node, 2, "stride", [])
        args = [_pair(arg(node, 1, "kernel_size")), _pair(stride) if stride else [],
                _pair(arg(node, 3, "padding", 0)), bool(arg(node, 4, "ceil_mode", False)),
                bool(arg(node, 5, "count_include_pad", True)), None]
        sizes = _shape(x)[2:4]
    args[3] = bool(args[3]) and _ceil_matters(sizes, args[0], args[1], args[2], [1, 1])
    return x, args


def _parse_adaptive(node: fx.Node):
    if is_op(node, layout_ops.NHWC_OPS["adaptive_avg_pool2d_nhwc"]):
        return node.args[0], [list(node.args[1])]
    x = node.args[0]
    if _shape(x) is None or len(_shape(x)) != 4:
        return "unbatched (3-d) input"
    return x, [_pair(node.args[1])]


def _parse_nearest(node: fx.Node):
    if is_op(node, layout_ops.NHWC_OPS["upsample_nearest2d_nhwc"]):
        return node.args[0], list(node.args[1:3])
    x = node.args[0]
    if _shape(x) is None or len(_shape(x)) != 4:
        return "unbatched (3-d) input"
    return x, [arg(node, 1, "output_size"), arg(node, 2, "scale_factors")]


def _parse_bilinear(node: fx.Node):
    if is_op(node, layout_ops.NHWC_OPS["upsample_bilinear2d_nhwc"]):
        return node.args[0], list(node.args[1:4])
    x = node.args[0]
    if _shape(x) is None or len(_shape(x)) != 4:
        return "unbatched (3-d) input"
    return x, [arg(node, 1, "output_size"), arg(node, 2, "align_corners"), arg(node, 3, "scale_factors")]


FAMILIES = (
    Family("conv2d", (aten.conv2d.default, aten.conv2d.padding, aten.convolution.default),
           layout_ops.NHWC_OPS["conv2d_nhwc"], _parse_conv, lambda x, a: (aten.conv2d.default, (x, *a)), weight=0),
    Family("max_pool2d", (aten.max_pool2d.default,), layout_ops.NHWC_OPS["max_pool2d_nhwc"], _parse_max_pool,
           lambda x, a: (aten.max_pool2d.default, (x, *a))),
    Family("avg_pool2d", (aten.avg_pool2d.default,), layout_ops.NHWC_OPS["avg_pool2d_nhwc"], _parse_avg_pool,
           lambda x, a: (aten.avg_pool2d.default, (x, *a))),
    Family("adaptive_avg_pool2d", (aten.adaptive_avg_pool2d.default,),
           layout_ops.NHWC_OPS["adaptive_avg_pool2d_nhwc"], _parse_adaptive,
           lambda x, a: (aten.adaptive_avg_pool2d.default, (x, *a))),
    Family("upsample_nearest2d", (aten.upsample_nearest2d.vec,), layout_ops.NHWC_OPS["upsample_nearest2d_nhwc"],
           _parse_nearest, lambda x, a: (aten.upsample_nearest2d.vec, (x, *a))),
    Family("upsample_bilinear2d", (aten.upsample_bilinear2d.vec,), layout_ops.NHWC_OPS["upsample_bilinear2d_nhwc"],
           _parse_bilinear, lambda x, a: (aten.upsample_bilinear2d.vec, (x, *a))),
)
_TO = {("NCHW", "NHWC"): layout_ops.NHWC, ("NHWC", "NCHW"): layout_ops.NCHW}


class Sensitive(LayoutRule):
    """A layout-sensitive op: converted to the target layout, its input (and weight) requested in
    it; an op already in the target layout takes its input in its own (logical) layout."""

    def __init__(self, family: Family):
        self.family = family
        self.name = family.name

    def form(self, node: fx.Node) -> str | None:
        if is_op(node, self.family.nhwc):
            return "NHWC"
        if is_op(node, *self.family.nchw):
            return "NCHW"
        return None

    def match(self, node, rw):
        src = self.form(node)
        if src is None:
            return None
        if self.family.name == "adaptive_avg_pool2d" and src == "NCHW" and _pair(node.args[1]) == [1, 1]:
            return None                      # a global pool: a mean over the spatial axes (GlobalPool)
        parsed = self.family.parse(node)
        if isinstance(parsed, str):
            return MatchResult.fail(parsed)
        x, args = parsed
        if src != rw.layout and self.family.weight is not None:
            w = args[self.family.weight]
            if not (isinstance(w, fx.Node) and w in rw.const):
                return MatchResult.fail(f"weight %{getattr(w, 'name', w)} is not a constant (permuting it would "
                                        "run on every call)")
        return MatchResult.success(src=src, x=x, args=args)

    def build(self, node, m, rw):
        src, args = m["src"], list(m["args"])
        to = _TO[(src, rw.layout)]
        x = rw.request(m["x"], to)
        w = self.family.weight
        args = [rw.request(a, to) if i == w else rw.plain(a) for i, a in enumerate(args)]
        if rw.layout == "NHWC":
            return Built(self.family.nhwc, (x, *args), {}, to)
        target, new_args = self.family.build_nchw(x, args)
        return Built(target, new_args, {}, to)


# -- permutes ----------------------------------------------------------------------------------------
class AbsorbPermute(LayoutRule):
    """``permute``/``transpose`` of a permuted value: no node, the layout changes (an inverse pair
    cancels). The node itself stays available as the logical value if something needs that."""

    name = "permute"

    def match(self, node, rw):
        if not (is_op(node, aten.permute.default, aten.transpose.int) and rw.moving(node.args[0])):
            return None
        r = rw.rank(node.args[0])
        if is_op(node, aten.transpose.int):
            a, b = node.args[1] % r, node.args[2] % r
            q = list(range(r))
            q[a], q[b] = q[b], q[a]
        else:
            q = [d % r for d in node.args[1]]
        return MatchResult.success(q=tuple(q))


class Pointwise(LayoutRule):
    """Pointwise ops: computed in the layout of their first permuted operand."""

    name = "pointwise"
    same_rank = True
    EXTRA = (aten._to_copy.default, aten.alias.default, aten.detach.default, aten.contiguous.default,
             aten.hardswish.default, aten.hardswish_.default, aten.zeros_like.default, aten.ones_like.default,
             aten.full_like.default, aten.empty_like.default)

    def _pointwise(self, node) -> bool:
        t = node.target
        if not isinstance(t, torch._ops.OpOverload):
            return False
        if t in (aten.dropout.default, aten.dropout_.default, aten.feature_dropout.default):
            return arg(node, 2, "train") is False
        if t.namespace == "optc":
            return t in (optc_ops.quantize_per_tensor.default, optc_ops.dequantize_per_tensor.default,
                         optc_ops.quantize_dequantize_dynamic.default)
        if t in self.EXTRA:
            return not ({"memory_format", "layout", "device"} & set(node.kwargs)) or t is aten.contiguous.default
        return torch.Tag.pointwise in t.tags and torch.Tag.nondeterministic_seeded not in t.tags

    def _tensors(self, node):
        return [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]

    def match(self, node, rw):
        if not self._pointwise(node):
            return None
        out_rank = rw.rank(node)
        lead = next((a for a in self._tensors(node) if rw.moving(a) and rw.rank(a) == out_rank), None)
        if lead is None:
            return None
        return self.match_in(node, rw.perm(lead), rw)

    def match_in(self, node, p, rw):
        if not self._pointwise(node) or rw.rank(node) != len(p):
            return None
        if node.target._schema.is_mutable:
            written = node.args[0]
            if len(written.users) != 1:
                return MatchResult.fail("in-place op on a value that other ops read")
            if not rw.moving(written) or rw.perm(written) != p:
                return MatchResult.fail("in-place op on a value in another layout")
        return MatchResult.success(p=p)

    def build(self, node, m, rw):
        p = m["p"]

        def operand(a):
            if not isinstance(a, fx.Node) or rw.rank(a) is None:
                return a
            got = rw.request_broadcast(a, p)
            if got is None:
                raise _Stop(f"operand %{a.name} {rw.lshape(a)} cannot be broadcast in layout {p}")
            return got

        return Built(node.target, tuple(operand(a) for a in node.args),
                     {k: operand(v) for k, v in node.kwargs.items()}, p)


class _Stop(Exception):
    """A rule found, while building, that it cannot apply: the node falls back to the logical layout."""


# -- axis ops --------------------------------------------------------------------------------------------
_SAME_RANK_AXIS = {   # op -> (index of the axis argument, its keyword, default)
    aten.softmax.int: (1, "dim", None), aten._softmax.default: (1, "dim", None),
    aten.log_softmax.int: (1, "dim", None), aten._log_softmax.default: (1, "dim", None),
    aten.glu.default: (1, "dim", -1), aten.cumsum.default: (1, "dim", None),
    aten.slice.Tensor: (1, "dim", 0), aten.narrow.default: (1, "dim", None),
    optc_ops.channel_affine.default: (3, "dim", None),
    optc_ops.quantize_per_channel.default: (3, "axis", None),
    optc_ops.dequantize_per_channel.default: (3, "axis", None),
}


class Axis(LayoutRule):
    """Ops along one axis that keep the rank: the axis is renumbered."""

    name = "axis"
    same_rank = True

    def match(self, node, rw):
        if node.target not in _SAME_RANK_AXIS or not rw.moving(node.args[0]):
            return None
        return self.match_in(node, rw.perm(node.args[0]), rw)

    def match_in(self, node, p, rw):
        if node.target not in _SAME_RANK_AXIS or rw.rank(node.args[0]) != len(p):
            return None
        i, key, default = _SAME_RANK_AXIS[node.target]
        d = arg(node, i, key, default)
        if not isinstance(d, int):
            return MatchResult.fail("axis is not a constant int")
        return MatchResult.success(p=p, i=i, key=key, d=inverse(p)[d % len(p)])

    def build(self, node, m, rw):
        p = m["p"]
        args = [rw.plain(a) for a in node.args]
        kwargs = rw.plain(dict(node.kwargs))
        args[0] = rw.request(node.args[0], p)
        if len(args) > m["i"]:
            args[m["i"]] = m["d"]
        else:
            kwargs[m["key"]] = m["d"]
        return Built(node.target, tuple(args), kwargs, p)


class Concat(LayoutRule):
    name = "cat"

    def match(self, node, rw):
        if not is_op(node, aten.cat.default):
            return None
        ins = node.args[0]
        lead = next((a for a in ins if rw.moving(a)), None)
        if lead is None:
            return None
        p = rw.perm(lead)
        if any(rw.rank(a) != len(p) for a in ins):
            return MatchResult.fail("operands of different ranks")
        return MatchResult.success(p=p, d=inverse(p)[arg(node, 1, "dim", 0) % len(p)])

    def build(self, node, m, rw):
        p = m["p"]
        return Built(node.target, ([rw.request(a, p) for a in node.args[0]], m["d"]), {}, p)


class Split(LayoutRule):
    """``split``/``split_with_sizes``/``chunk`` (each piece in the input's layout) and ``unbind``."""

    name = "split"
    OPS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int)

    def match(self, node, rw):
        if not (is_op(node, *self.OPS) and rw.moving(node.args[0])):
            return None
        p = rw.perm(node.args[0])
        idx = 1 if is_op(node, aten.unbind.int) else 2
        d = arg(node, idx, "dim", 0) % len(p)
        return MatchResult.success(p=p, idx=idx, d=d)

    def build(self, node, m, rw):
        p, d = m["p"], m["d"]
        args = list(node.args)
        args[0] = rw.request(node.args[0], p)
        while len(args) <= m["idx"]:
            args.append(node.kwargs.get("dim", 0))
        args[m["idx"]] = inverse(p)[d]
        kwargs = {k: v for k, v in node.kwargs.items() if k != "dim"}
        n = len(rw.logical[node])
        piece = drop_dims(p, [d]) if is_op(node, aten.unbind.int) else p
        return Built(node.target, tuple(args), kwargs, [piece] * n)


class GetItem(LayoutRule):
    name = "getitem"

    def match(self, node, rw):
        if node.target is not operator.getitem or not isinstance(node.args[0], fx.Node):
            return None
        perms = rw.perm(node.args[0])
        if not isinstance(perms, list) or is_identity(perms[node.args[1]]):
            return None
        return MatchResult.success(p=perms[node.args[1]])

    def build(self, node, m, rw):
        return Built(node.target, (rw.env[node.args[0]][0], node.args[1]), {}, m["p"])


_REDUCTIONS = {   # op -> (index of the dims argument, index of keepdim)
    aten.sum.dim_IntList: (1, 2), aten.mean.dim: (1, 2), aten.amax.default: (1, 2), aten.amin.default: (1, 2),
    aten.var.correction: (1, 3), aten.std.correction: (1, 3), aten.prod.dim_int: (1, 2),
    aten.logsumexp.default: (1, 2), aten.any.dim: (1, 2), aten.all.dim: (1, 2),
}


class Reduce(LayoutRule):
    """Reductions over axes: renumbered; without ``keepdim`` the result drops them."""

    name = "reduce"

    def match(self, node, rw):
        if node.target not in _REDUCTIONS or not rw.moving(node.args[0]):
            return None
        p = rw.perm(node.args[0])
        i, k = _REDUCTIONS[node.target]
        key = "dim"
        dims = arg(node, i, key)
        if isinstance(dims, int):
            dims = [dims]
        if not dims:   # None or []: every axis (a scalar result unless keepdim)
            dims = list(range(len(p)))
        keep = bool(arg(node, k, "keepdim", False))
        dims = sorted(d % len(p) for d in dims)
        return MatchResult.success(p=p, i=i, dims=dims, keep=keep)

    def build(self, node, m, rw):
        p = m["p"]
        args = list(node.args)
        kwargs = dict(node.kwargs)
        args[0] = rw.request(node.args[0], p)
        new = sorted(inverse(p)[d] for d in m["dims"])
        if len(args) > m["i"]:
            args[m["i"]] = new
        else:
            kwargs["dim"] = new
        if is_op(node, aten.prod.dim_int) or (len(new) == 1 and isinstance(arg(node, m["i"], "dim"), int)):
            new = new[0]
            if len(args) > m["i"]:
                args[m["i"]] = new
            else:
                kwargs["dim"] = new
        return Built(node.target, tuple(args), kwargs, p if m["keep"] else drop_dims(p, m["dims"]))


class GlobalPool(LayoutRule):
    """``adaptive_avg_pool2d(x, [1, 1])`` of a permuted value: a mean over its spatial axes."""

    name = "global_pool"

    def match(self, node, rw):
        if not (is_op(node, aten.adaptive_avg_pool2d.default) and _pair(node.args[1]) == [1, 1]
                and rw.moving(node.args[0]) and rw.rank(node.args[0]) == 4):
            return None
        return MatchResult.success(p=rw.perm(node.args[0]))

    def build(self, node, m, rw):
        p = m["p"]
        dims = sorted(inverse(p)[d] for d in (2, 3))
        return Built(aten.mean.dim, (rw.request(node.args[0], p), dims, True), {}, p)


class Select(LayoutRule):
    """``select``, ``squeeze``, ``unsqueeze``: renumbered; the result loses or gains one axis."""

    name = "select"

    def match(self, node, rw):
        if not is_op(node, aten.select.int, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
                     aten.unsqueeze.default) or not rw.moving(node.args[0]):
            return None
        p = rw.perm(node.args[0])
        r = len(p)
        shape = rw.lshape(node.args[0])
        if is_op(node, aten.unsqueeze.default):
            d = node.args[1] % (r + 1)
            k = inverse(p)[d - 1] + 1 if d > 0 else 0      # next to the axis it follows
            out = [x + (1 if x >= d else 0) for x in p]
            out.insert(k, d)
            return MatchResult.success(p=p, args=(k,), out=tuple(out))
        if is_op(node, aten.select.int):
            d = node.args[1] % r
            return MatchResult.success(p=p, args=(inverse(p)[d], node.args[2]), out=drop_dims(p, [d]))
        if is_op(node, aten.squeeze.default):
            dims = list(range(r))
        else:
            dims = node.args[1] if is_op(node, aten.squeeze.dims) else [node.args[1]]
        dims = sorted(d % r for d in dims)
        if not all(_static(shape[d]) for d in dims):
            return MatchResult.fail("squeeze of an axis of symbolic size")
        gone = [d for d in dims if _is_one(shape[d])]
        phys = sorted(inverse(p)[d] for d in gone)
        return MatchResult.success(p=p, args=(phys,), target=aten.squeeze.dims, out=drop_dims(p, gone))

    def build(self, node, m, rw):
        x = rw.request(node.args[0], m["p"])
        return Built(m.values.get("target", node.target), (x, *m["args"]), {}, m["out"])


class SymSize(LayoutRule):
    """``sym_size(x, d)`` reads axis ``d`` of the logical value: renumbered."""

    name = "sym_size"

    def match(self, node, rw):
        if not (is_op(node, aten.sym_size.int) and rw.moving(node.args[0])):
            return None
        p = rw.perm(node.args[0])
        return MatchResult.success(d=inverse(p)[node.args[1] % len(p)])

    def build(self, node, m, rw):
        return Built(node.target, (rw.env[node.args[0]][0], m["d"]), {}, None)


class AssertMetadata(LayoutRule):
    """``_assert_tensor_metadata`` without size/stride checks: dtype and device do not change."""

    name = "assert_metadata"

    def match(self, node, rw):
        if not (is_op(node, aten._assert_tensor_metadata.default) and rw.moving(node.args[0])):
            return None
        if node.kwargs.get("size") is not None or node.kwargs.get("stride") is not None or len(node.args) > 1:
            return MatchResult.fail("asserts sizes or strides")
        return MatchResult.success()

    def build(self, node, m, rw):
        return Built(node.target, (rw.env[node.args[0]][0],), dict(node.kwargs), None)


class BatchNorm(LayoutRule):
    """Eval-mode ``batch_norm`` of a permuted value: ``channel_affine`` on the channel axis, with
    ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale`` computed in float64."""

    name = "batch_norm"

    def match(self, node, rw):
        if not (is_op(node, aten.batch_norm.default) and rw.moving(node.args[0])):
            return None
        if arg(node, 5, "training") is not False:
            return MatchResult.fail("batch norm in training mode")
        w, b, mean, var = (arg(node, i, k) for i, k in ((1, "weight"), (2, "bias"), (3, "running_mean"),
                                                         (4, "running_var")))
        tensors = {}
        for key, v in (("weight", w), ("bias", b), ("mean", mean), ("var", var)):
            if v is None and key in ("weight", "bias"):
                continue
            t = attr_value(v)
            if t is None:
                return MatchResult.fail(f"batch norm {key} is not a constant")
            tensors[key] = t
        return MatchResult.success(p=rw.perm(node.args[0]), eps=float(arg(node, 7, "eps")), **tensors)

    def build(self, node, m, rw):
        p = m["p"]
        var = m["var"].double()
        scale = 1.0 / torch.sqrt(var + m["eps"])
        if "weight" in m.values:
            scale = scale * m["weight"].double()
        shift = -m["mean"].double() * scale
        if "bias" in m.values:
            shift = shift + m["bias"].double()
        dtype = rw.logical[node].dtype
        like = node.args[3]
        s = rw._new_attr(like, scale.to(dtype), f"{node.name}_scale")
        t = rw._new_attr(like, shift.to(dtype), f"{node.name}_shift")
        x = rw.request(node.args[0], p)
        return Built(optc_ops.channel_affine.default, (x, s, t, inverse(p)[1]), {}, p)


class Pad(LayoutRule):
    """Constant padding: the pad list (last axis first, two entries per axis) is rewritten for the
    physical axes."""

    name = "pad"

    def match(self, node, rw):
        if not (is_op(node, aten.pad.default, aten.constant_pad_nd.default) and rw.moving(node.args[0])):
            return None
        if is_op(node, aten.pad.default) and arg(node, 2, "mode", "constant") != "constant":
            return MatchResult.fail(f"padding mode {arg(node, 2, 'mode')!r} pads only the trailing axes")
        p = rw.perm(node.args[0])
        r = len(p)
        pad = list(node.args[1])
        per_axis = {r - 1 - i: (pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)}
        inv = inverse(p)
        phys = {inv[d]: v for d, v in per_axis.items() if tuple(v) != (0, 0)}
        low = min(phys, default=r - 1)
        new = []
        for j in range(r - 1, low - 1, -1):
            new += list(phys.get(j, (0, 0)))
        return MatchResult.success(p=p, pad=new)

    def build(self, node, m, rw):
        args = list(node.args)
        args[0] = rw.request(node.args[0], m["p"])
        args[1] = m["pad"]
        return Built(node.target, tuple(args), dict(node.kwargs), m["p"])


class Reshape(LayoutRule):
    """``view``/``reshape``/``flatten`` of a permuted value.

    - When the permutation only moves size-1 axes (after a global pool), the element order is the
      logical one: the op applies to the physical value as it is and the result is logical.
    - ``flatten(x, s, e)`` whose axes ``s..e`` are adjacent and in order in the physical layout
      flattens those physical axes; the result keeps the permutation of the other axes
      (NHWC ``[N, H, W, C]`` flattened over H, W is ``[N, HW, C]``: logical ``flatten(2)``
      transposed, so a following ``transpose(1, 2)`` is absorbed).
    """

    name = "reshape"
    OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints)

    def match(self, node, rw):
        if not (is_op(node, *self.OPS) and rw.moving(node.args[0])):
            return None
        p = rw.perm(node.args[0])
        shape = rw.lshape(node.args[0])
        r = len(p)
        order = [d for d in p if not _is_one(shape[d])]
        flatten = is_op(node, aten.flatten.using_ints)
        s, e = (arg(node, 1, "start_dim", 0) % r, arg(node, 2, "end_dim", -1) % r) if flatten else (0, r - 1)
        if order == sorted(order) and (not flatten or all(
                str(shape[p[j]]) == str(shape[j]) for j in range(r) if j < s or j > e)):
            return MatchResult.success(p=p, out=identity(rw.rank(node)), args=None)
        if not flatten:
            return MatchResult.fail("reshape mixes permuted axes")
        pos = [inverse(p)[d] for d in range(s, e + 1)]
        if pos != list(range(pos[0], pos[0] + len(pos))):
            return MatchResult.fail("flatten of axes that are not adjacent in the physical layout")
        merged = lambda d: d if d < s else (s if d <= e else d - (e - s))   # noqa: E731
        out = tuple(merged(p[j]) for j in range(r) if not pos[0] < j <= pos[-1])
        return MatchResult.success(p=p, out=out, args=(pos[0], pos[-1]))

    def build(self, node, m, rw):
        x = rw.env[node.args[0]][0]
        if m["args"] is not None:
            return Built(node.target, (x, *m["args"]), {}, m["out"])
        args = [x, *[rw.plain(a) for a in node.args[1:]]]
        target = aten.reshape.default if is_op(node, aten.view.default) else node.target
        return Built(target, tuple(args), rw.plain(dict(node.kwargs)), m["out"])


RULES: tuple[LayoutRule, ...] = (*(Sensitive(f) for f in FAMILIES), GlobalPool(), AbsorbPermute(), Pointwise(),
                                 Axis(), Concat(), Split(), GetItem(), Reduce(), Select(), SymSize(),
                                 AssertMetadata(), BatchNorm(), Pad(), Reshape())
SAME_RANK_RULES = tuple(r for r in RULES if r.same_rank)


# ---- the driver ----------------------------------------------------------------------------------------
def _constants(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes computed from constants only (weights and what is computed from them)."""
    const: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            const.add(n)
        elif n.op == "call_function" and not n.is_impure() and n.all_input_nodes and \
                all(a in const for a in n.all_input_nodes) and not (
                    isinstance(n.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in n.target.tags):
            const.add(n)
    return const


def _sensitive_candidates(gm: fx.GraphModule, rw: Rewriter) -> list[tuple[fx.Node, LayoutRule]]:
    """Layout-sensitive nodes not in the target layout that can be converted (refusals recorded)."""
    out = []
    for node in gm.graph.nodes:
        for rule in RULES:
            if not isinstance(rule, Sensitive):
                continue
            m = rule.match(node, rw)
            if m is None:
                continue
            if not m.ok:
                rw.ctx.reject(rule.name, node, m.reason)
            elif m["src"] != rw.layout:
                out.append((node, rule))
            break
    return out


def _logical_outputs(node: fx.Node, rw: Rewriter) -> Any:
    val = rw.logical.get(node)
    if isinstance(val, torch.Tensor):
        return identity(val.dim())
    if isinstance(val, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in val):
        return [identity(v.dim()) for v in val]
    return None


def _fallback(node: fx.Node, rw: Rewriter) -> None:
    """An op without a layout rule (or one that refused): its inputs in their logical layout."""
    stopped = any(rw.moving(a) for a in node.all_input_nodes)
    args, kwargs = rw.plain(node.args), rw.plain(dict(node.kwargs))
    if stopped and node.op == "call_function":
        rw.ctx.reject("propagate", node, f"{_target_name(node.target)} has no layout rule: its inputs are "
                      "permuted back to the logical layout")
    # a permute back is a view with other strides: graph outputs and ops that read strides get a
    # contiguous copy where the original value was contiguous (an Identity in ONNX and TVM)
    if node.op == "output":
        args = (type(args[0])(_contiguous_like(a, o, rw) for a, o in zip(args[0], node.args[0])),)
    elif is_op(node, *_READS_STRIDES):
        args = tuple(_contiguous_like(a, o, rw) for a, o in zip(args, node.args))
    if args != node.args or kwargs != node.kwargs:
        rw.dead.extend(node.all_input_nodes)
        node.args, node.kwargs = args, kwargs
        if is_op(node, aten.view.default, aten._unsafe_view.default):
            node.target = aten.reshape.default      # its input may now be a permuted view
    rw.env[node] = (node, _logical_outputs(node, rw))


_READS_STRIDES = (aten.as_strided.default, aten.sym_stride.int, aten.sym_storage_offset.default)


def _contiguous_like(new, orig, rw: Rewriter):
    if not (isinstance(new, fx.Node) and isinstance(orig, fx.Node)) or new is orig:
        return new
    want, got = rw.logical.get(orig), new.meta.get("val")
    if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and want.is_contiguous() \
            and not got.is_contiguous():
        key = (orig, "contiguous")
        if key not in rw.cache:
            rw.cache[key] = rw._call(aten.clone.default, (new,), orig, "clone",
                                     kwargs={"memory_format": torch.contiguous_format})
        return rw.cache[key]
    return new


def _apply(node: fx.Node, rule: LayoutRule, m: MatchResult, rw: Rewriter) -> bool:
    """Rewrite ``node`` in place with ``rule``; False (nothing changed) if the rule stopped."""
    try:
        built = rule.build(node, m, rw)
    except _Stop as e:      # permutes it made for its inputs stay (valid, cached) or are erased unused
        rw.ctx.reject(rule.name, node, str(e))
        return False
    rw.dead.extend(node.all_input_nodes)
    changed_target = built.target is not node.target
    node.target, node.args, node.kwargs = built.target, built.args, built.kwargs
    if changed_target:
        node.meta["optc_pass"] = PASS
    rw._check(node, node, built.out)
    rw.env[node] = (node, built.out)
    return True


@register_pass(PASS, exact=True, options={
    "layout": Option(LAYOUTS, "NHWC", "activation layout of convolutions, pooling and resampling"),
}, after=("fold-conv-bn", "fold-binary", "prune-channels", "prune-heads", "prune-magnitude"),
    description="run convolutions/pooling in NHWC or NCHW, propagating the layout and cancelling permutes")
def convert_layout(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    rw = Rewriter(gm, ctx, ctx.options["layout"])
    rw.const = _constants(gm)
    todo = _sensitive_candidates(gm, rw)
    if not todo:
        log.debug("%s: no layout-sensitive op to convert to %s", PASS, rw.layout)
        return PassResult(gm, False, {"converted": 0})
    convert = {n for n, _ in todo}
    for node in list(gm.graph.nodes):
        rw.cursor = node
        if node.op in ("placeholder", "get_attr") or node in rw.const:
            rw.env[node] = (node, _logical_outputs(node, rw))
            continue
        if node.op == "output":
            _fallback(node, rw)
            continue
        done = False
        for rule in RULES:
            m = rule.match(node, rw)
            if m is None:
                continue
            if not m.ok:
                ctx.reject(rule.name, node, m.reason)
                break
            if isinstance(rule, AbsorbPermute):
                _absorb(node, m["q"], rw)
                done = True
                break
            if isinstance(rule, Sensitive) and (node not in convert or not ctx.allow_rewrite(rule.name, node)):
                break                              # stays in its layout: logical inputs
            ctx.current_node = node.name
            done = _apply(node, rule, m, rw)
            ctx.current_node = None
            if done and isinstance(rule, Sensitive):
                rw.stats["converted"] += 1
                rw.stats[rule.name] = rw.stats.get(rule.name, 0) + 1
            break
        if not done:
            _fallback(node, rw)
    _erase_dead(rw)
    gm.graph.lint()
    rw.stats["permutes"] = sum(1 for n in gm.graph.nodes if is_op(n, aten.permute.default, aten.transpose.int))
    stats = {k: v for k, v in rw.stats.items() if v or k in ("converted", "permutes")}
    return PassResult(gm, rw.stats["converted"] > 0, stats)


def _absorb(node: fx.Node, q: Perm, rw: Rewriter) -> None:
    """``node = permute(x, q)`` with ``x`` permuted: the result is ``x``'s physical value in layout
    ``q^-1 . P``; ``node`` itself is kept (re-pointed) as the logical value in case a user needs it."""
    x, p = rw.env[node.args[0]]
    out = tuple(inverse(q)[d] for d in p)
    rw.env[node] = (x, out)
    rw.stats["absorbed"] += 1
    rw.dead.append(node)
    if is_identity(out):
        return
    # the logical value, should something need it: the node itself, reading the physical input
    r = tuple(inverse(p)[d] for d in q)
    node.target, node.args, node.kwargs = aten.permute.default, (x, list(r)), {}
    infer_val(node)
    rw.cache[(node, identity(len(p)))] = node


def _erase_dead(rw: Rewriter) -> None:
    """Remove what the rewrite left unused: absorbed permutes, replaced weights, inputs it no longer
    reads, permutes made for a rule that then stopped. Nodes that were dead before stay."""
    candidates = set(rw.dead) | set(rw.created)
    changed = True
    while changed:
        changed = False
        for n in reversed(list(rw.graph.nodes)):
            if n not in candidates or n.users or n.op not in ("get_attr", "call_function"):
                continue
            if n.op == "call_function" and n.is_impure():
                continue
            candidates.update(n.all_input_nodes)
            candidates.discard(n)
            rw.graph.erase_node(n)
            changed = True


__all__ = ["convert_layout", "RULES", "FAMILIES", "LAYOUTS", "identity", "inverse", "then", "drop_dims"]
