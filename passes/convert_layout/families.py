"""The layout-sensitive ops convert-layout moves between layouts: each in its ATen (NCHW) and optc
(NHWC, ``ir/layout_ops.py``) form, how to read its arguments from either and build either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from optc.ir import layout_ops
from optc.ir.rewrite import arg, is_op
from optc.passes.convert_layout.perm import pair, shape_of, static_dim

aten = torch.ops.aten


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
    ws = shape_of(w)
    if ws is None or len(ws) != 4:
        return "not a 2-d convolution"
    if shape_of(x) is None or len(shape_of(x)) != 4:
        return "unbatched (3-d) input"
    stride, dilation = pair(stride), pair(dilation)
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
    return x, [w, b, stride, pair(padding), dilation, groups]


def _ceil_matters(sizes, kernel, stride, padding, dilation) -> bool:
    """Whether ``ceil_mode=True`` gives a longer output than floor mode on these spatial sizes
    (torch drops a last ceil window that would start in the right padding, so often it does not).
    Where it does not, the pass writes ``ceil_mode=False``: the same windows, and the form every
    backend computes alike (ONNX's shape inference counts that dropped window)."""
    stride = stride or kernel
    for n, k, s, p, d in zip(sizes, kernel, stride, padding, dilation):
        if not static_dim(n):
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
        args, sizes = list(node.args[1:6]), shape_of(x)[1:3]
    else:
        if shape_of(x) is None or len(shape_of(x)) != 4:
            return "unbatched (3-d) input"
        stride = arg(node, 2, "stride", [])
        args = [pair(arg(node, 1, "kernel_size")), pair(stride) if stride else [],
                pair(arg(node, 3, "padding", 0)), pair(arg(node, 4, "dilation", 1)),
                bool(arg(node, 5, "ceil_mode", False))]
        sizes = shape_of(x)[2:4]
    args[4] = bool(args[4]) and _ceil_matters(sizes, args[0], args[1], args[2], args[3])
    return x, args


def _parse_avg_pool(node: fx.Node):
    x = node.args[0]
    if is_op(node, layout_ops.NHWC_OPS["avg_pool2d_nhwc"]):
        args, sizes = list(node.args[1:7]), shape_of(x)[1:3]
    else:
        if shape_of(x) is None or len(shape_of(x)) != 4:
            return "unbatched (3-d) input"
        if arg(node, 6, "divisor_override") is not None:
            return "divisor_override has no NHWC lowering in every backend"
        stride = arg(node, 2, "stride", [])
        args = [pair(arg(node, 1, "kernel_size")), pair(stride) if stride else [],
                pair(arg(node, 3, "padding", 0)), bool(arg(node, 4, "ceil_mode", False)),
                bool(arg(node, 5, "count_include_pad", True)), None]
        sizes = shape_of(x)[2:4]
    args[3] = bool(args[3]) and _ceil_matters(sizes, args[0], args[1], args[2], [1, 1])
    return x, args


def _parse_adaptive(node: fx.Node):
    if is_op(node, layout_ops.NHWC_OPS["adaptive_avg_pool2d_nhwc"]):
        return node.args[0], [list(node.args[1])]
    x = node.args[0]
    if shape_of(x) is None or len(shape_of(x)) != 4:
        return "unbatched (3-d) input"
    return x, [pair(node.args[1])]


def _parse_nearest(node: fx.Node):
    if is_op(node, layout_ops.NHWC_OPS["upsample_nearest2d_nhwc"]):
        return node.args[0], list(node.args[1:3])
    x = node.args[0]
    if shape_of(x) is None or len(shape_of(x)) != 4:
        return "unbatched (3-d) input"
    return x, [arg(node, 1, "output_size"), arg(node, 2, "scale_factors")]


def _parse_bilinear(node: fx.Node):
    if is_op(node, layout_ops.NHWC_OPS["upsample_bilinear2d_nhwc"]):
        return node.args[0], list(node.args[1:4])
    x = node.args[0]
    if shape_of(x) is None or len(shape_of(x)) != 4:
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
#: the permutation that takes a value from one layout to the other
TO_LAYOUT = {("NCHW", "NHWC"): layout_ops.NHWC, ("NHWC", "NCHW"): layout_ops.NCHW}
