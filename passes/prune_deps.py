"""Channel dependency analysis for structured pruning (Torch-Pruning's DepGraph, on the ATen graph).

Removing output channel ``c`` of a convolution is only correct if every tensor dim that
carries channel ``c`` shrinks with it: the BatchNorm after it, the input channels of the
layers that read it, the other branch of a residual add, the offset of ``c`` in a
concatenation, the ``H`` of a ``view(B, L, H, D)``... This module finds those ties.

Vocabulary
----------
space    the output channels of one prunable *producer*: a convolution with ``groups=1`` or
         a linear layer with constant weights.
group    spaces that must be pruned together (their channels meet position-wise: residual
         adds and multiplies, attention's q/k/v heads). Union-find over spaces; the unit
         that a pruning pass keeps or removes channels of.
layout   how the *channel axis* of one tensor maps onto spaces: the axis and a sequence of
         pieces, each a channel range of one space (or an opaque range that no producer
         owns: an input, an embedding). ``per`` channels per position describe heads
         (``view(B, L, C) -> (B, L, H, D)``: a position of the ``H`` axis is ``D``
         channels, and ``sub_axis`` is the ``D`` axis); ``rep`` positions per channel
         describe a flatten (``(B, C, H, W) -> (B, C*H*W)``: ``rep = H*W``).
member   a place the surgery must touch: a constant indexed along one dim (a producer's
         weight along its out-dim, a consumer's weight along its in-dim, BatchNorm and
         LayerNorm parameters, depthwise weights, constant operands of elementwise ops)
         or a shape argument (view/reshape/expand sizes, split sizes, slice bounds, the
         ``groups`` of a depthwise convolution).

The analysis is one forward walk in topological order: every producer starts a layout;
channel-preserving ops carry it (activations, dropout, BatchNorm, pooling, elementwise ops
with broadcasting, transpose/permute, view/reshape/flatten, depthwise convolutions); ops
joining two layouts position-wise (add, mul, matmul/attention batch dims) merge their
groups; ``cat`` concatenates pieces; split/slice take sub-ranges; a convolution or linear
layer reading a layout is a *consumer* (its input channels are indexed) and starts a new
space of its own.

Refusals (a group that is refused keeps all its channels; the reason is recorded):
- a layout reaching the graph output (output shapes never change) or meeting, position-wise,
  channels no producer owns (a graph input, an embedding, a non-constant tensor);
- an op not known to preserve channels (the default for anything not listed), a reduction,
  softmax, LayerNorm (unless allowed: pruning changes its statistics) or a pooling window
  over the channel axis, a matmul contracting the channels of two activations;
- a grouped convolution (``1 < groups < channels``) reading or producing the channels;
- a view/reshape that splits or merges the channel axis other than C -> (H, D), (H, D) -> C,
  C x spatial -> flattened and back; a slice with a step or a cut inside a head;
- two different channel ranges tied together (e.g. q/k/v split out of one fused linear).

Exactness: the surgery keeps a subset of each group's channels. Since every removed
position only ever flows, position-wise, into consumers (convolution/linear input channels,
matmul contractions with a constant), the pruned model computes exactly what the original
computes with the consumers' weights for the removed channels set to zero -- the
statement :func:`optc.passes.prune_channels.zero_removed_channels` builds and the tests
check. LayerNorm over pruned channels breaks that statement, which is why it is refused
unless asked for (``inexact`` notes).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from optc.errors import PipelineError
from optc.ir.printer import op_name
from optc.ir.rewrite import arg, attr_value
from optc.passes.base import Option
from optc.passes.fold_conv_bn import as_batch_norm, as_layer

log = logging.getLogger(__name__)
aten = torch.ops.aten


# ---- options and layer names shared by the pruning passes ------------------------------------
@dataclass(frozen=True)
class RatioOption(Option):
    """A float option that must lie in ``[0, 1)``: checked when the pipeline is parsed."""

    def parse(self, pass_name: str, key: str, raw: str) -> Any:
        v = super().parse(pass_name, key, raw)
        if not (0.0 <= v < 1.0):
            raise PipelineError(f"pass '{pass_name}': option {key}={raw} is out of range: the ratio of weights "
                                f"to remove must be in [0, 1)")
        return v


@dataclass(frozen=True)
class PositiveIntOption(Option):
    def parse(self, pass_name: str, key: str, raw: str) -> Any:
        v = super().parse(pass_name, key, raw)
        if v < 1:
            raise PipelineError(f"pass '{pass_name}': option {key}={raw} must be >= 1")
        return v


def layer_name(node: fx.Node) -> str:
    """The module path of the innermost ``nn.Module`` that called ``node`` (``layer1.0.conv1``)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if isinstance(path, str) and path:
            return path
    w = arg(node, 1, "weight")
    if isinstance(w, fx.Node) and w.op == "get_attr":
        return re.sub(r"\.weight$", "", str(w.target))
    return node.name


class LayerFilter:
    """``exclude``: glob patterns separated by ``|`` (``fc|layer4.*``), or ``re:REGEX``; full match."""

    def __init__(self, pattern: str):
        self.pattern = pattern.strip()
        if not self.pattern:
            self.alternatives: list[str] = []
        elif self.pattern.startswith("re:"):
            try:
                rx = re.compile(self.pattern[3:])
            except re.error as e:
                raise PipelineError(f"exclude pattern '{self.pattern}' is not a valid regular expression: "
                                    f"{e}") from None
            self.alternatives = [self.pattern]
            self._rx = {self.pattern: rx}
        else:
            self.alternatives = [p.strip() for p in self.pattern.split("|") if p.strip()]
            self._rx = {p: re.compile(fnmatch.translate(p)) for p in self.alternatives}

    def excluded(self, name: str) -> bool:
        return any(rx.fullmatch(name) for rx in self._rx.values()) if self.alternatives else False

    def check(self, names: Iterable[str]) -> None:
        """Raise if an alternative matches no layer name: a typo must not silently prune everything."""
        names = list(dict.fromkeys(names))
        for alt in self.alternatives:
            if not any(self._rx[alt].fullmatch(n) for n in names):
                shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise PipelineError(f"exclude pattern '{alt}' matches no layer (layers: {shown or 'none'})")


# ---- layouts --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """Channels ``[start, stop)`` of space ``space`` laid out along an axis.

    ``space is None``: ``stop`` positions that belong to no prunable space (kept whole).
    ``per`` channels per position (heads), ``rep`` positions per channel (flatten); one is 1.
    """

    space: int | None
    start: int
    stop: int
    per: int = 1
    rep: int = 1

    @property
    def positions(self) -> int:
        n = self.stop - self.start
        if self.space is None:
            return n
        return n * self.rep if self.per == 1 else n // self.per


@dataclass(frozen=True)
class Layout:
    axis: int
    pieces: tuple[Piece, ...]
    sub_axis: int | None = None       # the within-head axis when pieces have per > 1

    @property
    def size(self) -> int:
        return sum(p.positions for p in self.pieces)

    def moved(self, axis: int, sub_axis: int | None) -> "Layout":
        return Layout(axis, self.pieces, sub_axis)


def _merge_pieces(pieces: Iterable[Piece]) -> tuple[Piece, ...]:
    out: list[Piece] = []
    for p in pieces:
        if p.positions == 0:
            continue
        if out:
            q = out[-1]
            if p.space is None and q.space is None:
                out[-1] = Piece(None, 0, q.stop + p.stop)
                continue
            if p.space is not None and p.space == q.space and q.stop == p.start and (p.per, p.rep) == (q.per, q.rep):
                out[-1] = Piece(p.space, q.start, p.stop, p.per, p.rep)
                continue
        out.append(p)
    return tuple(out)


# ---- members ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamUse:
    """Constant argument ``key`` (an index into ``node.args`` or a kwarg name) of ``node``,
    whose dim ``dim`` follows ``layout``. ``role``: producer, consumer, bn, ln, depthwise, operand."""

    node: fx.Node
    key: int | str
    dim: int
    layout: Layout
    role: str


@dataclass(frozen=True)
class ShapeUse:
    """A shape argument of ``node`` that encodes a pruned size (see :func:`apply_shape_use`).

    ``kind``: ``sizes`` (view/reshape/expand sizes, entry ``index``), ``groups`` (depthwise
    conv), ``split`` (split sizes, position ranges ``ranges``), ``slice`` (bounds),
    ``normalized_shape`` (LayerNorm)."""

    node: fx.Node
    kind: str
    layout: Layout            # the layout whose kept positions define the new value
    key: int | str = 1
    index: int = 0
    ranges: tuple = ()


@dataclass
class Space:
    id: int
    size: int
    producer: fx.Node
    name: str
    parent: int
    block: int = 1
    heads: bool = False
    cuts: set = field(default_factory=set)
    reasons: list = field(default_factory=list)
    inexact: list = field(default_factory=list)


@dataclass
class Group:
    """Spaces pruned together. ``prunable`` unless ``reasons``; ``inexact`` notes (LayerNorm
    statistics) make it prunable only when the pass allows it."""

    leader: str                      # the first producer's node name: the group's key in a plan
    size: int
    block: int
    producers: list                  # producer nodes, in graph order
    layers: list                     # their layer names
    heads: bool
    cuts: tuple
    reasons: list
    inexact: list
    root: int = -1

    @property
    def prunable(self) -> bool:
        return not self.reasons


# ---- op tables --------------------------------------------------------------------------------
def _packets(*names: str) -> frozenset:
    out = set()
    for n in names:
        p = getattr(aten, n, None)
        if p is not None:
            out.add(p)
    return frozenset(out)


_UNARY = _packets(
    "relu", "relu_", "hardtanh", "hardtanh_", "relu6", "gelu", "silu", "silu_", "sigmoid", "tanh", "hardswish",
    "hardsigmoid", "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "dropout", "feature_dropout",
    "alpha_dropout", "native_dropout", "clone", "contiguous", "alias", "detach", "lift_fresh_copy", "abs", "neg",
    "exp", "log", "log1p", "sqrt", "rsqrt", "reciprocal", "square", "sin", "cos", "erf", "sign", "floor", "ceil",
    "round", "clamp_min", "clamp_max", "to", "_to_copy", "type_as", "zeros_like", "ones_like", "empty_like",
    "full_like", "rand_like", "randn_like", "bitwise_not", "logical_not", "isnan", "nan_to_num", "sgn",
    "_assert_tensor_metadata", "frac", "trunc", "expm1", "log2", "log10", "sinh", "cosh", "asin", "acos", "atan",
    "tan", "logit", "threshold", "gelu_", "hardswish_", "relu6_",
)
_ELEMENTWISE = _packets(
    "add", "sub", "mul", "div", "rsub", "pow", "maximum", "minimum", "fmax", "fmin", "eq", "ne", "lt", "le", "gt",
    "ge", "where", "masked_fill", "logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or",
    "bitwise_xor", "clamp", "remainder", "fmod", "atan2", "hypot", "copysign", "lerp", "addcmul", "addcdiv",
    "floor_divide", "true_divide", "xlogy", "mul_", "add_", "div_", "sub_",
)
_RESHAPES = _packets("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze",
                     "squeeze_copy", "unsqueeze_copy", "view_copy")
_SIZED_RESHAPES = _packets("view", "reshape", "_unsafe_view", "view_copy")
_REDUCTIONS = _packets("mean", "sum", "amax", "amin", "max", "min", "var", "std", "prod", "logsumexp", "norm",
                       "argmax", "argmin", "any", "all", "var_mean", "std_mean", "nansum")
_SOFTMAX = _packets("softmax", "log_softmax", "_softmax", "_log_softmax", "cumsum", "cumprod")
_SPATIAL = {  # op -> number of trailing (spatial) dims it works on; None: from the op name
    **{p: None for p in _packets(
        "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
        "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
        "adaptive_max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices", "upsample_nearest1d",
        "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d", "upsample_bicubic2d",
        "upsample_linear1d", "upsample_trilinear3d", "_upsample_nearest_exact2d", "_adaptive_avg_pool2d",
        "reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d", "replication_pad2d",
        "replication_pad3d", "lp_pool2d")},
}
_PADS = _packets("constant_pad_nd", "pad")
_MATMULS = _packets("matmul", "bmm", "mm")


def _packet(node: fx.Node):
    t = node.target
    return t.overloadpacket if isinstance(t, torch._ops.OpOverload) else t


def _spatial_dims(node: fx.Node) -> int:
    m = re.search(r"(\d)d", op_name(node))
    return int(m.group(1)) if m else 2


def _is_tensor_node(a: Any) -> bool:
    return isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)


def _rank(n: fx.Node) -> int:
    return n.meta["val"].dim()


def _shape(n: fx.Node) -> tuple:
    return tuple(n.meta["val"].shape)


def _static(d) -> int | None:
    if isinstance(d, int):
        return d
    if isinstance(d, torch.SymInt):
        v = d.node.maybe_as_int()
        return int(v) if v is not None else None
    return None


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _conv_groups(node: fx.Node) -> Any:
    if node.target in (aten.convolution.default, aten._convolution.default):
        return arg(node, 8, "groups", 1)
    return arg(node, 6, "groups", 1)


def _arg_key(node: fx.Node, index: int, name: str) -> int | str | None:
    if len(node.args) > index:
        return index
    if name in node.kwargs:
        return name
    return None


def get_arg(node: fx.Node, key: int | str) -> Any:
    return node.args[key] if isinstance(key, int) else node.kwargs[key]


def set_arg(node: fx.Node, key: int | str, value: Any) -> None:
    if isinstance(key, int):
        node.update_arg(key, value)
    else:
        node.update_kwarg(key, value)


def _const(n: Any) -> bool:
    return isinstance(n, fx.Node) and n.op == "get_attr" and attr_value(n) is not None


def _reshape_groups(ins: tuple, outs: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Pair dims of a row-major reshape ``ins -> outs`` into groups of equal products."""
    i = j = 0
    groups = []
    n, m = len(ins), len(outs)
    while i < n or j < m:
        gi, gj = [], []
        si = _static(ins[i]) if i < n else None
        sj = _static(outs[j]) if j < m else None
        if (i < n and si is None) or (j < m and sj is None):   # symbolic dims must map 1:1
            if i < n and j < m and si is None and sj is None and str(ins[i]) == str(outs[j]):
                groups.append(([i], [j]))
                i += 1
                j += 1
                continue
            return None
        pi = pj = 1
        if i < n:
            gi.append(i)
            pi = si
            i += 1
        if j < m:
            gj.append(j)
            pj = sj
            j += 1
        while pi != pj:
            if pi < pj and i < n and _static(ins[i]) is not None:
                gi.append(i)
                pi *= _static(ins[i])
                i += 1
            elif pj < pi and j < m and _static(outs[j]) is not None:
                gj.append(j)
                pj *= _static(outs[j])
                j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups


# ---- the analysis ------------------------------------------------------------------------------
class ChannelGraph:
    """The result of :func:`analyze`: spaces, groups, per-node layouts and the members."""

    def __init__(self, gm: fx.GraphModule, *, log_refusals: bool = True):
        self.gm = gm
        self.spaces: list[Space] = []
        self.layouts: dict[fx.Node, Any] = {}
        self.params: list[ParamUse] = []
        self.shapes: list[ShapeUse] = []
        self.producers: dict[fx.Node, int] = {}   # producer node -> its space
        self._log = log_refusals
        self._run()
        self.groups = self._groups()

    # -- union-find --
    def find(self, s: int) -> int:
        while self.spaces[s].parent != s:
            self.spaces[s].parent = self.spaces[self.spaces[s].parent].parent
            s = self.spaces[s].parent
        return s

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb < ra:
            ra, rb = rb, ra
        A, B = self.spaces[ra], self.spaces[rb]
        B.parent = ra
        A.block = A.block * B.block // math.gcd(A.block, B.block)
        A.heads = A.heads or B.heads
        A.cuts |= B.cuts
        A.reasons += B.reasons
        A.inexact += B.inexact

    def root(self, s: int) -> Space:
        return self.spaces[self.find(s)]

    # -- refusals --
    def _refuse(self, layouts: Iterable[Layout | None], node: fx.Node | None, why: str) -> None:
        where = f"%{node.name} ({op_name(node)})" if node is not None and node.op == "call_function" else \
            (f"%{node.name}" if node is not None else "")
        reason = f"{why} at {where}" if where else why
        for lay in layouts:
            if lay is None:
                continue
            for p in lay.pieces:
                if p.space is not None:
                    r = self.root(p.space)
                    if reason not in r.reasons:
                        r.reasons.append(reason)
                        if self._log:
                            log.debug("group of %s: unprunable: %s", r.producer.name, reason)

    def _new_space(self, producer: fx.Node, size: int) -> int:
        sid = len(self.spaces)
        self.spaces.append(Space(sid, size, producer, layer_name(producer), sid))
        self.producers[producer] = sid
        return sid

    def _unify(self, a: Layout, b: Layout, node: fx.Node) -> Layout:
        """Tie two layouts position-wise (same output axis); returns the merged layout."""
        if a.size != b.size:
            self._refuse([a, b], node, "channel axes of different sizes meet")
            return a
        cuts_a, cuts_b, pos = [], [], 0
        for p in a.pieces:
            pos += p.positions
            cuts_a.append(pos)
        pos = 0
        for p in b.pieces:
            pos += p.positions
            cuts_b.append(pos)
        if cuts_a != cuts_b:
            self._refuse([a, b], node, "concatenations with different boundaries meet")
            return a
        for p, q in zip(a.pieces, b.pieces):
            if p.space is None and q.space is None:
                continue
            if p.space is None or q.space is None:
                own = q if p.space is None else p
                self._refuse([Layout(a.axis, (own,))], node, "channels meet channels no producer owns (an input, an "
                                                            "embedding or a non-constant tensor)")
                continue
            if (p.per, p.rep) != (q.per, q.rep):
                self._refuse([a, b], node, "channels meet with different head/flatten structure")
                continue
            fp = p.start == 0 and p.stop == self.spaces[p.space].size
            fq = q.start == 0 and q.stop == self.spaces[q.space].size
            if fp and fq:
                self._union(p.space, q.space)
            elif not (self.find(p.space) == self.find(q.space) and (p.start, p.stop) == (q.start, q.stop)):
                self._refuse([a, b], node, "different channel ranges are tied together (q/k/v split out of one "
                                           "fused projection? prune before merge-parallel-linear)")
        if a.sub_axis is not None and b.sub_axis is not None and a.sub_axis != b.sub_axis:
            self._refuse([a, b], node, "head axes do not line up")
        return Layout(a.axis, a.pieces, a.sub_axis if a.sub_axis is not None else b.sub_axis)

    def _cut(self, lay: Layout) -> None:
        for p in lay.pieces:
            if p.space is not None and (p.start != 0 or p.stop != self.spaces[p.space].size):
                self.spaces[p.space].cuts.update((p.start, p.stop))
                r = self.root(p.space)
                r.cuts.update((p.start, p.stop))

    def _slice(self, lay: Layout, p0: int, p1: int, node: fx.Node) -> Layout | None:
        out, pos = [], 0
        for p in lay.pieces:
            n = p.positions
            a, b = max(p0, pos), min(p1, pos + n)
            if a < b:
                lo, hi = a - pos, b - pos
                if p.space is None:
                    out.append(Piece(None, 0, hi - lo))
                elif p.per == 1:
                    if lo % p.rep or hi % p.rep:
                        self._refuse([lay], node, "a slice cuts inside a flattened channel")
                        return None
                    out.append(Piece(p.space, p.start + lo // p.rep, p.start + hi // p.rep, 1, p.rep))
                else:
                    out.append(Piece(p.space, p.start + lo * p.per, p.start + hi * p.per, p.per, 1))
            pos += n
        res = Layout(lay.axis, _merge_pieces(out), lay.sub_axis)
        self._cut(res)
        return res

    # -- the walk --
    def _run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "output":
                outs = [self.layouts.get(a) for a in tree_flatten(node.args)[0] if isinstance(a, fx.Node)]
                self._refuse(_flat_layouts(outs), node, "reaches the model output")
                continue
            if node.op != "call_function":
                continue
            try:
                self.layouts[node] = self._visit(node)
            except _Refused as r:
                self._refuse(self._input_layouts(node), node, str(r))
                self.layouts[node] = None

    def _input_layouts(self, node: fx.Node) -> list[Layout]:
        return _flat_layouts(self.layouts.get(a) for a in tree_flatten((node.args, node.kwargs))[0]
                             if isinstance(a, fx.Node))

    def _visit(self, node: fx.Node) -> Any:
        ins = self._input_layouts(node)
        layer = as_layer(node)
        if layer is not None:
            return self._layer(node, layer)
        if node.target is operator.getitem:
            src = self.layouts.get(node.args[0])
            if isinstance(src, tuple) and isinstance(node.args[1], int) and node.args[1] < len(src):
                return src[node.args[1]]
            if src is not None:
                raise _Refused("indexing into a channel tensor")
            return None
        if not ins:
            return None
        val = node.meta.get("val")
        if not isinstance(val, (torch.Tensor, tuple, list)):
            return None   # sym_size, asserts: no data flows on
        pk = _packet(node)
        bn = as_batch_norm(node)
        if bn is not None:
            return self._batch_norm(node, bn)
        if pk in _UNARY:
            lay = self.layouts.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
            if lay is None:
                raise _Refused("channels flow into an argument that is not the data input")
            return (lay, lay) if pk is aten.native_dropout else lay
        if pk in _ELEMENTWISE:
            return self._elementwise(node)
        if pk is aten.layer_norm:
            return self._layer_norm(node)
        if pk in _RESHAPES:
            return self._reshape(node)
        if pk in (aten.transpose, aten.t, aten.permute, aten.swapaxes, aten.movedim):
            return self._permute(node)
        if pk is aten.expand:
            return self._expand(node)
        if pk in (aten.cat, aten.concat):
            return self._cat(node)
        if pk is aten.stack:
            return self._stack(node)
        if pk in (aten.split, aten.split_with_sizes, aten.chunk, aten.unsafe_split, aten.unsafe_split_with_sizes):
            return self._split(node)
        if pk in (aten.slice, aten.narrow):
            return self._slice_op(node)
        if pk in (aten.select, aten.index_select, aten.unbind):
            return self._select(node)
        if pk in _REDUCTIONS:
            return self._reduction(node)
        if pk in _SOFTMAX:
            lay = self._only(node)
            if _norm_dim(node.args[1], _rank(node)) == lay.axis:
                raise _Refused("a softmax/cumulative op runs over the channels")
            return lay
        if pk in _SPATIAL or pk in _PADS:
            lay = self._only(node)
            rank = _rank(node.args[0])
            k = (len(node.args[1]) // 2) if pk in _PADS else _spatial_dims(node)
            if lay.axis >= rank - k or (lay.sub_axis is not None and lay.sub_axis >= rank - k):
                raise _Refused("a pooling/padding window covers the channel axis")
            return (lay, lay) if isinstance(node.meta["val"], (tuple, list)) else lay
        if pk in _MATMULS:
            return self._matmul(node)
        if pk is aten.scaled_dot_product_attention:
            return self._sdpa(node)
        raise _Refused(f"{op_name(node)} is not known to preserve channels")

    def _only(self, node: fx.Node) -> Layout:
        x = node.args[0]
        lay = self.layouts.get(x) if isinstance(x, fx.Node) else None
        others = [l for l in self._input_layouts(node) if l is not lay]
        if lay is None or others:
            raise _Refused("channels flow into an argument that is not the data input")
        return lay

    # producers and consumers
    def _layer(self, node: fx.Node, layer) -> Layout | None:
        x = node.args[0]
        lin = self.layouts.get(x) if isinstance(x, fx.Node) else None
        others = [l for l in self._input_layouts(node) if l is not lin]
        if others:
            self._refuse(others, node, "channels flow into a layer's weight or bias")
        w, b = layer.weight, layer.bias
        wkey, bkey = _arg_key(node, 1, "weight"), _arg_key(node, 2, "bias")
        consts = _const(w) and w.meta["val"].is_floating_point() and (b is None or _const(b))
        rank = _rank(node)
        if layer.kind == "linear":
            if lin is not None:
                if lin.axis == _rank(x) - 1 and consts:
                    self.params.append(ParamUse(node, wkey, 1, lin, "consumer"))
                else:
                    self._refuse([lin], node, "a linear layer with non-constant weights reads the channels"
                                 if lin.axis == _rank(x) - 1 else "a linear layer runs over another axis")
            if not consts:
                return None
            out = Layout(rank - 1, (Piece(self._new_space(node, layer.out_channels), 0, layer.out_channels),))
            self.params.append(ParamUse(node, wkey, 0, out, "producer"))
            if b is not None:
                self.params.append(ParamUse(node, bkey, 0, out, "producer"))
            return out
        groups = _conv_groups(node)
        ch = layer.channel_axis
        cin = _static(_shape(x)[ch]) if isinstance(x, fx.Node) else None
        if not isinstance(groups, int) or cin is None:
            self._refuse([lin], node, "convolution groups or channels are not constants")
            return None
        if layer.kind == "conv" and groups == cin and groups > 1:
            # depthwise (channel multiplier m): output channel c*m + j reads input channel c only
            if lin is None:
                return None
            if lin.axis != ch or lin.sub_axis is not None or any(p.per != 1 for p in lin.pieces) or not consts:
                raise _Refused("a depthwise convolution reads channels in an unsupported layout")
            mult = layer.out_channels // cin
            out = Layout(ch, tuple(Piece(p.space, p.start, p.stop, 1, p.rep * mult) if p.space is not None
                                   else Piece(None, 0, p.stop * mult) for p in lin.pieces))
            self.params.append(ParamUse(node, wkey, 0, out, "depthwise"))
            if b is not None:
                self.params.append(ParamUse(node, bkey, 0, out, "depthwise"))
            gkey = _arg_key(node, 8 if node.target in (aten.convolution.default, aten._convolution.default) else 6,
                            "groups")
            self.shapes.append(ShapeUse(node, "groups", lin, key=gkey))
            return out
        w_in, w_out = (0, 1) if layer.kind == "conv_transpose" else (1, 0)
        if lin is not None:
            if lin.axis != ch:
                self._refuse([lin], node, "a convolution runs over the channel axis")
            elif groups != 1:
                self._refuse([lin], node, f"a grouped convolution (groups={groups}) reads the channels")
            elif not consts:
                self._refuse([lin], node, "a convolution with non-constant weights reads the channels")
            else:
                self.params.append(ParamUse(node, wkey, w_in, lin, "consumer"))
        if groups != 1 or not consts:
            return None
        out = Layout(ch, (Piece(self._new_space(node, layer.out_channels), 0, layer.out_channels),))
        self.params.append(ParamUse(node, wkey, w_out, out, "producer"))
        if b is not None:
            self.params.append(ParamUse(node, bkey, 0, out, "producer"))
        return out

    def _batch_norm(self, node: fx.Node, bn) -> Any:
        lay = self.layouts.get(bn.input) if isinstance(bn.input, fx.Node) else None
        others = [l for l in self._input_layouts(node) if l is not lay]
        if lay is None or others:
            raise _Refused("channels flow into a BatchNorm's statistics or parameters")
        if lay.axis == 1:
            for i, name, n in ((1, "weight", bn.weight), (2, "bias", bn.bias), (3, "running_mean", bn.mean),
                               (4, "running_var", bn.var)):
                if n is None:
                    continue
                if not _const(n):
                    raise _Refused(f"BatchNorm {name} is not a constant")
                self.params.append(ParamUse(node, _arg_key(node, i, name), 0, lay, "bn"))
        if isinstance(node.meta["val"], (tuple, list)):
            return (lay,) + (None,) * (len(node.meta["val"]) - 1)
        return lay

    def _layer_norm(self, node: fx.Node) -> Layout:
        lay = self._only(node)
        rank = _rank(node)
        shape = list(node.args[1])
        if lay.axis < rank - len(shape) and (lay.sub_axis is None or lay.sub_axis < rank - len(shape)):
            return lay
        if len(shape) != 1 or lay.axis != rank - 1:
            raise _Refused("a LayerNorm normalises over the channels together with other dims")
        for i, name in ((2, "weight"), (3, "bias")):
            n = arg(node, i, name)
            if n is None:
                continue
            if not _const(n):
                raise _Refused(f"LayerNorm {name} is not a constant")
            self.params.append(ParamUse(node, _arg_key(node, i, name), 0, lay, "ln"))
        self.shapes.append(ShapeUse(node, "normalized_shape", lay, key=1))
        note = f"LayerNorm %{node.name} normalises over the channels: pruning changes its statistics"
        for p in lay.pieces:
            if p.space is not None and note not in self.root(p.space).inexact:
                self.root(p.space).inexact.append(note)
        return lay

    def _elementwise(self, node: fx.Node) -> Layout:
        out_rank = _rank(node)
        out_shape = _shape(node)
        tensors = [(k, a) for k, a in _indexed_args(node) if _is_tensor_node(a)]
        lays = []
        for k, a in tensors:
            lay = self.layouts.get(a)
            if lay is not None:
                off = out_rank - _rank(a)
                lays.append(lay.moved(lay.axis + off, None if lay.sub_axis is None else lay.sub_axis + off))
        axes = {l.axis for l in lays}
        if not lays:
            raise _Refused("channels flow into a non-tensor argument")
        if len(axes) > 1:
            raise _Refused("channels of different axes meet")
        merged = lays[0]
        for other in lays[1:]:
            merged = self._unify(merged, other, node)
        for k, a in tensors:
            if self.layouts.get(a) is not None:
                continue
            off = out_rank - _rank(a)
            d = merged.axis - off
            if d < 0 or _static(_shape(a)[d]) == 1:
                continue                                     # broadcast along the channels
            if _const(a) and _static(_shape(a)[d]) == _static(out_shape[merged.axis]):
                self.params.append(ParamUse(node, k, d, merged, "operand"))
                continue
            self._refuse([merged], node, f"channels meet %{a.name}, whose channels no producer owns")
        return merged

    def _reshape(self, node: fx.Node) -> Layout:
        lay = self._only(node)
        x = node.args[0]
        ins, outs = _shape(x), _shape(node)
        groups = _reshape_groups(ins, outs)
        if groups is None:
            raise _Refused("a reshape with symbolic sizes moves the channel axis")
        where = {d: g for g in groups for d in g[0]}
        gi, go = where[lay.axis]
        non1_in = [d for d in gi if _static(ins[d]) != 1]
        non1_out = [d for d in go if _static(outs[d]) != 1]
        sub = lay.sub_axis
        new_sub: int | None = None
        if sub is not None and sub not in gi:
            sgi, sgo = where[sub]
            s_out = [d for d in sgo if _static(outs[d]) != 1]
            if [d for d in sgi if _static(ins[d]) != 1] != [sub] or len(s_out) != 1:
                raise _Refused("a reshape splits or merges the head dim")
            new_sub = s_out[0]
        if non1_in == [lay.axis] and len(non1_out) == 1:
            res = Layout(non1_out[0], lay.pieces, new_sub)
        elif len(non1_out) == 1 and non1_in and non1_in[0] == lay.axis:
            inner = math.prod(_static(ins[d]) for d in non1_in[1:])
            if sub is None and all(p.per == 1 for p in lay.pieces):
                pieces = tuple(Piece(p.space, p.start, p.stop, 1, p.rep * inner) if p.space is not None
                               else Piece(None, 0, p.stop * inner) for p in lay.pieces)
                res = Layout(non1_out[0], pieces)
            elif sub is not None and non1_in == [lay.axis, sub] and \
                    all(p.space is None or p.per == _static(ins[sub]) for p in lay.pieces):
                pieces = tuple(Piece(p.space, p.start, p.stop) if p.space is not None
                               else Piece(None, 0, p.stop * inner) for p in lay.pieces)
                res = Layout(non1_out[0], pieces)
            else:
                raise _Refused("a reshape merges the channel axis with other dims")
        elif non1_in == [lay.axis] and len(non1_out) == 2 and sub is None and \
                all(p.per == 1 and p.rep == 1 for p in lay.pieces):
            h_axis, d_axis = non1_out
            dsz = _static(outs[d_axis])
            pieces, pos = [], 0
            for p in lay.pieces:
                n = p.positions
                if pos % dsz or n % dsz or (p.space is not None and p.start % dsz):
                    raise _Refused(f"a reshape into heads of {dsz} cuts a concatenated piece")
                pos += n
                if p.space is None:
                    pieces.append(Piece(None, 0, n // dsz))
                else:
                    sp = self.root(p.space)
                    sp.block = sp.block * dsz // math.gcd(sp.block, dsz)
                    sp.heads = True
                    pieces.append(Piece(p.space, p.start, p.stop, dsz, 1))
            res = Layout(h_axis, tuple(pieces), d_axis)
        elif non1_in == [lay.axis] and len(non1_out) >= 2 and sub is None and all(p.per == 1 for p in lay.pieces) \
                and all(p.rep == math.prod(_static(outs[d]) for d in non1_out[1:])
                        for p in lay.pieces if p.space is not None):
            r = math.prod(_static(outs[d]) for d in non1_out[1:])
            if any(p.space is None and p.stop % r for p in lay.pieces):
                raise _Refused("a reshape unflattens a concatenation unevenly")
            pieces = tuple(Piece(p.space, p.start, p.stop) if p.space is not None else Piece(None, 0, p.stop // r)
                           for p in lay.pieces)
            res = Layout(non1_out[0], pieces)
        else:
            raise _Refused("a reshape splits or merges the channel axis")
        pk = _packet(node)
        if pk in _SIZED_RESHAPES or pk is aten.unflatten:
            key, base = (2, _norm_dim(node.args[1], len(outs))) if pk is aten.unflatten else (1, 0)
            sizes = node.args[key]
            idx = res.axis - base
            if not isinstance(sizes, (list, tuple)) or not (0 <= idx < len(sizes)) or \
                    not isinstance(sizes[idx], int):
                raise _Refused("the channel size of a reshape is not a constant")
            self.shapes.append(ShapeUse(node, "sizes", res, key=key, index=idx))
        return res

    def _permute(self, node: fx.Node) -> Layout:
        lay = self._only(node)
        rank = _rank(node)
        pk = _packet(node)
        if pk is aten.permute:
            perm = [_norm_dim(d, rank) for d in node.args[1]]
        elif pk is aten.movedim:
            src, dst = node.args[1], node.args[2]
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            src = [_norm_dim(d, rank) for d in src]
            dst = [_norm_dim(d, rank) for d in dst]
            rest = [d for d in range(rank) if d not in src]
            perm = [None] * rank
            for s, d in zip(src, dst):
                perm[d] = s
            it = iter(rest)
            perm = [p if p is not None else next(it) for p in perm]
        else:
            d0, d1 = (0, 1) if pk is aten.t else (_norm_dim(node.args[1], rank), _norm_dim(node.args[2], rank))
            perm = list(range(rank))
            if rank >= 2 or pk is not aten.t:
                perm[d0], perm[d1] = perm[d1], perm[d0]
        sub = None if lay.sub_axis is None else perm.index(lay.sub_axis)
        return Layout(perm.index(lay.axis), lay.pieces, sub)

    def _expand(self, node: fx.Node) -> Layout:
        lay = self._only(node)
        off = _rank(node) - _rank(node.args[0])
        res = lay.moved(lay.axis + off, None if lay.sub_axis is None else lay.sub_axis + off)
        if _static(_shape(node)[res.axis]) != lay.size:
            raise _Refused("an expand broadcasts the channel axis")
        sizes = node.args[1]
        if isinstance(sizes[res.axis], int) and sizes[res.axis] != -1:
            self.shapes.append(ShapeUse(node, "sizes", res, key=1, index=res.axis))
        elif not isinstance(sizes[res.axis], int):
            raise _Refused("the channel size of an expand is not a constant")
        return res

    def _cat(self, node: fx.Node) -> Layout:
        tensors = node.args[0]
        rank = _rank(node)
        dim = _norm_dim(arg(node, 1, "dim", 0), rank)
        lays = [self.layouts.get(t) for t in tensors]
        present = [l for l in lays if l is not None]
        if any(l.axis == dim for l in present):
            if any(l.axis != dim for l in present):
                raise _Refused("a concatenation mixes channel axes")
            subs = {l.sub_axis for l in present}
            if len(subs) > 1:
                raise _Refused("a concatenation mixes head layouts")
            pieces = []
            for t, l in zip(tensors, lays):
                pieces.extend(l.pieces if l is not None else (Piece(None, 0, _static(_shape(t)[dim])),))
            if any(p.per > 1 for p in pieces) and any(p.space is None for p in pieces):
                raise _Refused("a concatenation mixes heads with other tensors")
            return Layout(dim, _merge_pieces(pieces), subs.pop())
        merged = present[0]
        for other in present[1:]:
            merged = self._unify(merged, other, node)
        for t, l in zip(tensors, lays):
            if l is None:
                self._refuse([merged], node, f"channels are concatenated with %{t.name}, whose channels no "
                                             "producer owns")
        return merged

    def _stack(self, node: fx.Node) -> Layout:
        tensors = node.args[0]
        rank = _rank(node)
        dim = _norm_dim(arg(node, 1, "dim", 0), rank)
        lays = [self.layouts.get(t) for t in tensors]
        if any(l is None for l in lays):
            raise _Refused("channels are stacked with a tensor whose channels no producer owns")
        merged = lays[0]
        for other in lays[1:]:
            merged = self._unify(merged, other, node)
        shift = lambda a: a if a is None or a < dim else a + 1  # noqa: E731
        return Layout(shift(merged.axis), merged.pieces, shift(merged.sub_axis))

    def _split(self, node: fx.Node) -> tuple:
        lay = self._only(node)
        rank = _rank(node.args[0])
        pk = _packet(node)
        dim = _norm_dim(arg(node, 2, "dim", 0), rank)        # split, split_with_sizes and chunk alike
        outs = node.meta["val"]
        if dim != lay.axis:
            if dim == lay.sub_axis:
                raise _Refused("a split cuts the head dim")
            return tuple(lay for _ in outs)
        res, pos, ranges = [], 0, []
        for o in outs:
            n = _static(o.shape[dim])
            sl = self._slice(lay, pos, pos + n, node)
            if sl is None:
                raise _Refused("a split cuts inside a flattened channel")
            res.append(sl)
            ranges.append((pos, pos + n))
            pos += n
        self.shapes.append(ShapeUse(node, "split", lay, ranges=tuple(ranges)))
        return tuple(res)

    def _slice_op(self, node: fx.Node) -> Layout:
        lay = self._only(node)
        rank = _rank(node.args[0])
        dim = _norm_dim(arg(node, 1, "dim", 0), rank)
        size = _static(_shape(node.args[0])[dim])
        if dim != lay.axis:
            if dim == lay.sub_axis:
                raise _Refused("a slice cuts the head dim")
            return lay
        if _packet(node) is aten.narrow:
            start, length = node.args[2], node.args[3]
            if not isinstance(start, int) or not isinstance(length, int):
                raise _Refused("a narrow of the channels has symbolic bounds")
            start = _norm_dim(start, size)
            end, step = start + length, 1
        else:
            start, end, step = arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)
            if not all(v is None or isinstance(v, int) for v in (start, end, step)):
                raise _Refused("a slice of the channels has symbolic bounds")
            start = 0 if start is None else min(max(_norm_dim(start, size), 0), size)
            end = size if end is None else min(max(_norm_dim(end, size), 0), size)
        if step != 1:
            raise _Refused("a strided slice of the channels")
        res = self._slice(lay, start, end, node)
        if res is None:
            raise _Refused("a slice cuts inside a flattened channel")
        self.shapes.append(ShapeUse(node, "slice", lay, ranges=((start, end),)))
        return res

    def _select(self, node: fx.Node) -> Any:
        lay = self._only(node)
        rank = _rank(node.args[0])
        dim = _norm_dim(node.args[1], rank)
        if dim in (lay.axis, lay.sub_axis):
            raise _Refused("an index/select picks channels")
        pk = _packet(node)
        if pk is aten.index_select:
            return lay
        down = lambda a: a if a is None or a < dim else a - 1  # noqa: E731
        res = Layout(down(lay.axis), lay.pieces, down(lay.sub_axis))
        return tuple(res for _ in node.meta["val"]) if pk is aten.unbind else res

    def _reduction(self, node: fx.Node) -> Any:
        lay = self._only(node)
        rank = _rank(node.args[0])
        dims = arg(node, 2, "dim", None) if _packet(node) is aten.norm else arg(node, 1, "dim", None)
        if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
            raise _Refused("a reduction over all dims includes the channels")
        dims = [dims] if isinstance(dims, int) else list(dims)
        if not all(isinstance(d, int) for d in dims):
            raise _Refused("a reduction over symbolic dims")
        dims = [_norm_dim(d, rank) for d in dims]
        if lay.axis in dims:
            raise _Refused("a reduction runs over the channels")
        val = node.meta["val"]
        keep = (val[0] if isinstance(val, (tuple, list)) else val).dim() == rank
        shift = lambda a: a if a is None or keep else a - sum(1 for d in dims if d < a)  # noqa: E731
        sub = None if lay.sub_axis in dims else shift(lay.sub_axis)
        res = Layout(shift(lay.axis), lay.pieces, sub)
        return tuple(res for _ in node.meta["val"]) if isinstance(node.meta["val"], (tuple, list)) else res

    def _matmul(self, node: fx.Node) -> Layout | None:
        a, b = node.args[0], node.args[1]
        la, lb = self.layouts.get(a), self.layouts.get(b)
        ra, rb, ro = _rank(a), _rank(b), _rank(node)
        if ra < 2 or rb < 2:
            raise _Refused("a matrix-vector product reads the channels")
        cands: list[Layout] = []
        sub = None
        if la is not None:
            if la.axis == ra - 1:
                if _const(b):
                    self.params.append(ParamUse(node, 1, rb - 2, la, "consumer"))
                else:
                    raise _Refused("a matmul contracts the channels of two activations")
            else:
                cands.append(la.moved(la.axis + ro - ra, None))
                if la.sub_axis is not None and la.sub_axis != ra - 1:
                    sub = la.sub_axis + ro - ra
        if lb is not None:
            if lb.axis == rb - 2:
                if _const(a):
                    self.params.append(ParamUse(node, 0, ra - 1, lb, "consumer"))
                else:
                    raise _Refused("a matmul contracts the channels of two activations")
            else:
                cands.append(lb.moved(lb.axis + ro - rb, None))
                if lb.sub_axis is not None and lb.sub_axis != rb - 2:
                    s = lb.sub_axis + ro - rb
                    if sub is not None and sub != s:
                        raise _Refused("head dims of a matmul do not line up")
                    sub = s
        if not cands:
            return None
        if len({c.axis for c in cands}) > 1:
            raise _Refused("a matmul combines channels on different axes")
        merged = cands[0]
        for c in cands[1:]:
            merged = self._unify(merged, c, node)
        if merged.axis < ro - 2:           # a batch dim: the other operand must broadcast or carry it
            for t, lt, rt in ((a, la, ra), (b, lb, rb)):
                if lt is None or lt.axis >= rt - 2:
                    d = merged.axis - (ro - rt)
                    if d >= 0 and _static(_shape(t)[d]) != 1:
                        raise _Refused(f"a matmul batches channels with %{t.name}, whose channels no producer owns")
        return Layout(merged.axis, merged.pieces, sub)

    def _sdpa(self, node: fx.Node) -> Layout:
        q, k, v = node.args[:3]
        mask = arg(node, 3, "attn_mask", None)
        lays = []
        for t in (q, k, v):
            lt = self.layouts.get(t)
            r = _rank(t)
            if lt is None:
                raise _Refused(f"attention mixes heads with %{t.name}, whose heads no producer owns")
            if lt.axis >= r - 2:
                raise _Refused("attention reads channels on its sequence or feature axis")
            lays.append(lt)
        merged = lays[0]
        for other in lays[1:]:
            merged = self._unify(merged, other, node)
        if isinstance(mask, fx.Node):
            if self.layouts.get(mask) is not None:
                raise _Refused("channels flow into an attention mask")
            d = merged.axis - (_rank(q) - _rank(mask))
            if d >= 0 and _static(_shape(mask)[d]) != 1:
                raise _Refused(f"an attention mask %{mask.name} is per head")
        sub = lays[2].sub_axis if lays[2].sub_axis == _rank(v) - 1 else None
        return Layout(merged.axis, merged.pieces, None if sub is None else _rank(node) - 1)

    # -- groups --
    def _groups(self) -> list[Group]:
        by_root: dict[int, Group] = {}
        for sp in self.spaces:
            r = self.find(sp.id)
            R = self.spaces[r]
            g = by_root.get(r)
            if g is None:
                g = by_root[r] = Group(sp.producer.name, R.size, R.block, [], [], R.heads, (), list(R.reasons),
                                       list(R.inexact), root=r)
            g.producers.append(sp.producer)
            g.layers.append(sp.name)
        for g in by_root.values():
            R = self.spaces[g.root]
            cuts = sorted(c for c in R.cuts if 0 < c < R.size)
            g.cuts = tuple(cuts)
            if R.size % R.block or any(c % R.block for c in cuts):
                g.reasons.append(f"heads of {R.block} channels do not tile the {R.size} channels")
        return list(by_root.values())

    # -- positions --
    def kept_positions(self, lay: Layout, kept: dict[int, list[int]]) -> list[int] | None:
        """Positions along ``lay``'s axis that survive when root space ``r`` keeps ``kept[r]``
        (absent: all); None when all survive."""
        out: list[int] = []
        pos, changed = 0, False
        for p in lay.pieces:
            n = p.positions
            keep = kept.get(self.find(p.space)) if p.space is not None else None
            if keep is None:
                out.extend(range(pos, pos + n))
            else:
                chans = [c for c in keep if p.start <= c < p.stop]
                if p.per == 1:
                    out.extend(pos + (c - p.start) * p.rep + j for c in chans for j in range(p.rep))
                else:
                    out.extend(pos + (c - p.start) // p.per for c in chans if (c - p.start) % p.per == 0)
                changed = changed or len(chans) != p.stop - p.start
            pos += n
        return out if changed else None

    def position_map(self, lay: Layout) -> list[tuple[int, torch.Tensor, torch.Tensor, float]]:
        """Where the positions of ``lay``'s axis live: per piece of a space, ``(root, positions,
        channels, share)`` -- position ``positions[i]`` holds channel ``channels[i]`` (a head
        position holds ``per`` channels, each with ``share = 1/per`` of it)."""
        out, pos = [], 0
        for p in lay.pieces:
            n = p.positions
            if p.space is not None:
                r = self.find(p.space)
                k = torch.arange(p.stop - p.start)
                if p.per == 1:
                    j = torch.arange(n)
                    out.append((r, pos + j, p.start + j // p.rep, 1.0))
                else:
                    out.append((r, pos + k // p.per, p.start + k, 1.0 / p.per))
            pos += n
        return out

    def describe(self) -> str:
        lines = []
        for g in self.groups:
            state = "prunable" if g.prunable else "refused: " + "; ".join(g.reasons[:2])
            if g.prunable and g.inexact:
                state = "prunable if LayerNorm statistics may change"
            lines.append(f"{g.leader}: {g.size} ch, block {g.block}, layers {', '.join(g.layers)}: {state}")
        return "\n".join(lines)


class _Refused(Exception):
    pass


def _flat_layouts(items: Iterable[Any]) -> list[Layout]:
    out = []
    for it in items:
        if isinstance(it, Layout):
            out.append(it)
        elif isinstance(it, (tuple, list)):
            out.extend(_flat_layouts(it))
    return out


def _indexed_args(node: fx.Node) -> list[tuple[int | str, Any]]:
    return [(i, a) for i, a in enumerate(node.args)] + list(node.kwargs.items())


def analyze(gm: fx.GraphModule, *, log_refusals: bool = True) -> ChannelGraph:
    """The channel groups of ``gm`` and every member the surgery must touch."""
    return ChannelGraph(gm, log_refusals=log_refusals)
