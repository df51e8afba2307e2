"""How the channel-dependency analysis reads nodes: the op families it knows (sets of ATen
packets), ranks, shapes and static sizes, axes, the row-major pairing of a reshape's dims, and
argument keys (``ParamUse.key``: an index into ``node.args`` or a keyword).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx

from optc.ir.printer import op_name
from optc.ir.rewrite import arg, attr_value

aten = torch.ops.aten


# ---- op families ------------------------------------------------------------------------------
def packets(*names: str) -> frozenset:
    """The ATen packets of these names that this torch has."""
    out = set()
    for n in names:
        p = getattr(aten, n, None)
        if p is not None:
            out.add(p)
    return frozenset(out)


UNARY = packets(
    "relu", "relu_", "hardtanh", "hardtanh_", "relu6", "gelu", "silu", "silu_", "sigmoid", "tanh", "hardswish",
    "hardsigmoid", "leaky_relu", "elu", "selu", "celu", "mish", "softplus", "dropout", "feature_dropout",
    "alpha_dropout", "native_dropout", "clone", "contiguous", "alias", "detach", "lift_fresh_copy", "abs", "neg",
    "exp", "log", "log1p", "sqrt", "rsqrt", "reciprocal", "square", "sin", "cos", "erf", "sign", "floor", "ceil",
    "round", "clamp_min", "clamp_max", "to", "_to_copy", "type_as", "zeros_like", "ones_like", "empty_like",
    "full_like", "rand_like", "randn_like", "bitwise_not", "logical_not", "isnan", "nan_to_num", "sgn",
    "_assert_tensor_metadata", "frac", "trunc", "expm1", "log2", "log10", "sinh", "cosh", "asin", "acos", "atan",
    "tan", "logit", "threshold", "gelu_", "hardswish_", "relu6_",
)
ELEMENTWISE = packets(
    "add", "sub", "mul", "div", "rsub", "pow", "maximum", "minimum", "fmax", "fmin", "eq", "ne", "lt", "le", "gt",
    "ge", "where", "masked_fill", "logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or",
    "bitwise_xor", "clamp", "remainder", "fmod", "atan2", "hypot", "copysign", "lerp", "addcmul", "addcdiv",
    "floor_divide", "true_divide", "xlogy", "mul_", "add_", "div_", "sub_",
)
RESHAPES = packets("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze",
                   "squeeze_copy", "unsqueeze_copy", "view_copy")
SIZED_RESHAPES = packets("view", "reshape", "_unsafe_view", "view_copy")
SPLITS = packets("split", "split_with_sizes", "chunk", "unsafe_split", "unsafe_split_with_sizes")
REDUCTIONS = packets("mean", "sum", "amax", "amin", "max", "min", "var", "std", "prod", "logsumexp", "norm",
                     "argmax", "argmin", "any", "all", "var_mean", "std_mean", "nansum")
SOFTMAX = packets("softmax", "log_softmax", "_softmax", "_log_softmax", "cumsum", "cumprod")
SPATIAL = {  # op -> number of trailing (spatial) dims it works on; None: from the op name
    **{p: None for p in packets(
        "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
        "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
        "adaptive_max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices", "upsample_nearest1d",
        "upsample_nearest2d", "upsample_nearest3d", "upsample_bilinear2d", "upsample_bicubic2d",
        "upsample_linear1d", "upsample_trilinear3d", "_upsample_nearest_exact2d", "_adaptive_avg_pool2d",
        "reflection_pad1d", "reflection_pad2d", "reflection_pad3d", "replication_pad1d", "replication_pad2d",
        "replication_pad3d", "lp_pool2d")},
}
PADS = packets("constant_pad_nd", "pad")
MATMULS = packets("matmul", "bmm", "mm")


# ---- reading nodes -------------------------------------------------------------------------
def packet(node: fx.Node):
    """The op packet of a call (``aten.add`` for ``aten.add.Tensor``), or its target."""
    t = node.target
    return t.overloadpacket if isinstance(t, torch._ops.OpOverload) else t


def spatial_dims(node: fx.Node) -> int:
    """How many trailing (spatial) dims a pooling/resampling op works on, from its name (2 by default)."""
    m = re.search(r"(\d)d", op_name(node))
    return int(m.group(1)) if m else 2


def is_tensor_node(a: Any) -> bool:
    """A node holding a tensor."""
    return isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)


def rank_of(n: fx.Node) -> int:
    """The rank of a tensor node."""
    return n.meta["val"].dim()


def shape_of(n: fx.Node) -> tuple:
    """The shape of a tensor node."""
    return tuple(n.meta["val"].shape)


def static(d) -> int | None:
    """A dim as an int, or None when it is symbolic."""
    if isinstance(d, int):
        return d
    if isinstance(d, torch.SymInt):
        v = d.node.maybe_as_int()
        return int(v) if v is not None else None
    return None


def norm_dim(d: int, rank: int) -> int:
    """An axis in ``[0, rank)``."""
    return d + rank if d < 0 else d


def conv_groups(node: fx.Node) -> Any:
    """The ``groups`` argument of a convolution call."""
    if node.target in (aten.convolution.default, aten._convolution.default):
        return arg(node, 8, "groups", 1)
    return arg(node, 6, "groups", 1)


def arg_key(node: fx.Node, index: int, name: str) -> int | str | None:
    """Where argument ``index``/``name`` of ``node`` is: its index if positional, its name if a keyword, else None."""
    if len(node.args) > index:
        return index
    if name in node.kwargs:
        return name
    return None


def get_arg(node: fx.Node, key: int | str) -> Any:
    """The argument of ``node`` at ``key`` (an index into ``args`` or a keyword)."""
    return node.args[key] if isinstance(key, int) else node.kwargs[key]


def set_arg(node: fx.Node, key: int | str, value: Any) -> None:
    """Set the argument of ``node`` at ``key`` (an index into ``args`` or a keyword)."""
    if isinstance(key, int):
        node.update_arg(key, value)
    else:
        node.update_kwarg(key, value)


def is_const(n: Any) -> bool:
    """A ``get_attr`` node of a tensor constant."""
    return isinstance(n, fx.Node) and n.op == "get_attr" and attr_value(n) is not None


def const_positions(n: Any, size: int) -> list[int] | None:
    """The positions a constant index tensor ``n`` (a ``get_attr`` of integers: an
    ``aten.index`` index) picks along a dim of ``size``, negative ones counted from the end, in
    order; None where ``n`` is not such a constant or a position is out of range."""
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    if not (is_const(n) and isinstance(val, torch.Tensor) and val.dtype in (torch.int64, torch.int32)):
        return None
    pos = [int(p) for p in attr_value(n).reshape(-1).tolist()]
    if any(not -size <= p < size for p in pos):
        return None
    return [p + size if p < 0 else p for p in pos]


def reshape_groups(ins: tuple, outs: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Pair dims of a row-major reshape ``ins -> outs`` into groups of equal products."""
    i = j = 0
    groups = []
    n, m = len(ins), len(outs)
    while i < n or j < m:
        gi, gj = [], []
        si = static(ins[i]) if i < n else None
        sj = static(outs[j]) if j < m else None
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
            if pi < pj and i < n and static(ins[i]) is not None:
                gi.append(i)
                pi *= static(ins[i])
                i += 1
            elif pj < pi and j < m and static(outs[j]) is not None:
                gj.append(j)
                pj *= static(outs[j])
                j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups


def indexed_args(node: fx.Node) -> list[tuple[int | str, Any]]:
    """``(key, value)`` of every argument: positional indices, then keywords."""
    return [(i, a) for i, a in enumerate(node.args)] + list(node.kwargs.items())
