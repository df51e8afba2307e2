"""TVM Relax translations of optc's NHWC ops (``ir/layout_ops.py``), registered with
:func:`optc.backends.tvm.register_tvm_translation` when the TVM backend is imported.

    optc::conv2d_nhwc(x, w_ohwi, b, ...)   -> R.nn.conv2d(x, permute_dims(w, [1, 2, 3, 0]),
                                              data_layout="NHWC", kernel_layout="HWIO") + b
    optc::max_pool2d_nhwc / avg_pool2d_nhwc / adaptive_avg_pool2d_nhwc -> R.nn.*(layout="NHWC")
    optc::upsample_nearest2d_nhwc          -> R.image.resize2d(layout="NHWC", nearest_neighbor,
                                              asymmetric coordinates, floor: torch's ``nearest``)
    optc::upsample_bilinear2d_nhwc         -> R.image.resize2d(layout="NHWC", linear, half_pixel or
                                              align_corners)

The weight is permuted to HWIO inside Relax: the CPU schedule (``tvm_schedule.CPUGeneric``)
vectorises along the output channels, which HWIO keeps contiguous; the permute of a constant is
folded at compile time (``fold_constant_call_tir``), so it never runs. The bias broadcasts along
the last axis. Arithmetic is in the input's dtype (TVM's own ``conv2d`` importer hard-codes
float32 accumulation; these ops also serve float64 programs).
"""

from __future__ import annotations

import optc.ir.ops  # noqa: F401  (registers the optc:: ops)
from optc.ir.layout_ops import NHWC_OPS


def _dtype(x) -> str:
    return str(x.ty.dtype)   # TVM 0.27: struct info is ``.ty``


def _ints(v) -> list[int]:
    return [int(i) for i in v]


def conv2d_nhwc(node, importer):
    from tvm import relax
    bb, env = importer.block_builder, importer.env
    x, w = env[node.args[0]], env[node.args[1]]
    b = env[node.args[2]] if node.args[2] is not None else None
    stride, padding, dilation, groups = node.args[3:7]
    w_hwio = bb.emit(relax.op.permute_dims(w, [1, 2, 3, 0]))
    y = bb.emit(relax.op.nn.conv2d(x, w_hwio, strides=_ints(stride), padding=_ints(padding),
                                   dilation=_ints(dilation), groups=int(groups), data_layout="NHWC",
                                   kernel_layout="HWIO", out_dtype=_dtype(x)))
    return y if b is None else bb.emit(relax.op.add(y, b))


def max_pool2d_nhwc(node, importer):
    from tvm import relax
    x = importer.env[node.args[0]]
    kernel, stride, padding, dilation, ceil_mode = node.args[1:6]
    return importer.block_builder.emit(relax.op.nn.max_pool2d(
        x, pool_size=_ints(kernel), strides=_ints(stride or kernel), padding=_ints(padding),
        dilation=_ints(dilation), ceil_mode=bool(ceil_mode), layout="NHWC"))


def avg_pool2d_nhwc(node, importer):
    from tvm import relax
    x = importer.env[node.args[0]]
    kernel, stride, padding, ceil_mode, count_include_pad, divisor_override = node.args[1:7]
    if divisor_override is not None:
        raise ValueError("optc::avg_pool2d_nhwc: divisor_override has no TVM lowering")
    return importer.block_builder.emit(relax.op.nn.avg_pool2d(
        x, pool_size=_ints(kernel), strides=_ints(stride or kernel), padding=_ints(padding),
        ceil_mode=bool(ceil_mode), count_include_pad=bool(count_include_pad), layout="NHWC"))


def adaptive_avg_pool2d_nhwc(node, importer):
    from tvm import relax
    x = importer.env[node.args[0]]
    return importer.block_builder.emit(relax.op.nn.adaptive_avg_pool2d(x, _ints(node.args[1]), layout="NHWC"))


def _size(importer, x, output_size, scale_factors) -> list[int]:
    if output_size is not None:
        return _ints(output_size)
    shape = importer.shape_of(x)
    return [int(int(shape[i]) * float(s)) for i, s in zip((1, 2), scale_factors)]


def upsample_nearest2d_nhwc(node, importer):
    from tvm import relax
    x = importer.env[node.args[0]]
    size = _size(importer, x, node.args[1], node.args[2])
    return importer.block_builder.emit(relax.op.image.resize2d(
        x, size, layout="NHWC", method="nearest_neighbor", coordinate_transformation_mode="asymmetric",
        rounding_method="floor"))


def upsample_bilinear2d_nhwc(node, importer):
    from tvm import relax
    x = importer.env[node.args[0]]
    size = _size(importer, x, node.args[1], node.args[3])
    mode = "align_corners" if node.args[2] else "half_pixel"
    return importer.block_builder.emit(relax.op.image.resize2d(
        x, size, layout="NHWC", method="linear", coordinate_transformation_mode=mode))


TRANSLATIONS = {
    NHWC_OPS["conv2d_nhwc"]: conv2d_nhwc,
    NHWC_OPS["max_pool2d_nhwc"]: max_pool2d_nhwc,
    NHWC_OPS["avg_pool2d_nhwc"]: avg_pool2d_nhwc,
    NHWC_OPS["adaptive_avg_pool2d_nhwc"]: adaptive_avg_pool2d_nhwc,
    NHWC_OPS["upsample_nearest2d_nhwc"]: upsample_nearest2d_nhwc,
    NHWC_OPS["upsample_bilinear2d_nhwc"]: upsample_bilinear2d_nhwc,
}


from optc.backends.registry import register_translations  # noqa: E402
from optc.backends.tvm import register_tvm_translation  # noqa: E402  (imported once that module defines it)

register_translations(register_tvm_translation, TRANSLATIONS)
