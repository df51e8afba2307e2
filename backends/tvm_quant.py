"""TVM Relax translations of optc's quantize / dequantize ops (``ir/quant_ops.py``).

    optc::quantize_per_tensor(x, s, z, qmin, qmax, dt)     -> R.quantize(x, s, z, axis=-1, dt)
    optc::dequantize_per_tensor(q, s, z, qmin, qmax, dt)   -> R.dequantize(q, s, z, axis=-1, "float32")
    optc::quantize_per_channel(x, S, Z, axis, ...)         -> R.quantize(x, S, Z, axis, dt)
    optc::dequantize_per_channel(q, S, Z, axis, ...)       -> R.dequantize(q, S, Z, axis, "float32")

``R.quantize`` computes ``clip(round(x / s) + z, dtype min, dtype max)``, with TIR's ``round``
lowered to LLVM's ``nearbyint`` (ties to even, as ONNX and optc's reference); a narrower
``[quant_min, quant_max]`` adds an ``R.clip`` on the integers. Scales and zero points that are
Python numbers become scalar constants; per-channel ones are the Program's constant tensors.
``optc::quantize_dequantize_dynamic`` has no Relax op and is lowered through its ATen
decomposition (min, max, round, clamp), which is its definition.

What runs: TVM 0.27's Relax pipeline has no pass that fuses ``dequantize -> conv2d/matmul ->
quantize`` into integer kernels (Relay's QNN canonicalisation has no Relax counterpart): the
dequantize legalises to an elementwise kernel and the conv / matmul runs in float32 on the
dequantized values. The quantized program is computed correctly, in float -- docs/quantization.md
has the measurement.
"""

from __future__ import annotations

import torch

from optc.backends.registry import register_translations

import optc.ir.ops  # noqa: F401  (registers the optc:: ops)
from optc.ir.quant_ops import DEQUANT_DTYPES

_DT = {torch.uint8: "uint8", torch.int8: "int8", torch.int32: "int32"}


def _dtype(node, i: int) -> torch.dtype:
    dt = node.args[i]
    if not isinstance(dt, torch.dtype) or dt not in _DT:
        raise ValueError(f"optc quantize op {node.name}: unsupported dtype argument {dt!r}")
    return dt


def _scalar(value, dtype: str):
    from tvm import relax
    return relax.const(value, dtype)


def _clip(bb, q, quant_min: int, quant_max: int, dtype: torch.dtype):
    from tvm import relax
    lo, hi = DEQUANT_DTYPES[dtype]
    if (quant_min, quant_max) == (lo, hi):
        return q
    return bb.emit(relax.op.clip(q, quant_min, quant_max))


def quantize_per_tensor(node, importer):
    from tvm import relax
    bb = importer.block_builder
    x = importer.env[node.args[0]]
    scale, zero_point, quant_min, quant_max = node.args[1:5]
    dt = _dtype(node, 5)
    q = bb.emit(relax.op.quantize(x, _scalar(float(scale), "float32"), _scalar(int(zero_point), _DT[dt]),
                                  axis=-1, out_dtype=_DT[dt]))
    return _clip(bb, q, quant_min, quant_max, dt)


def dequantize_per_tensor(node, importer):
    from tvm import relax
    bb = importer.block_builder
    q = importer.env[node.args[0]]
    scale, zero_point = node.args[1:3]
    dt = _dtype(node, 5)
    return bb.emit(relax.op.dequantize(q, _scalar(float(scale), "float32"), _scalar(int(zero_point), _DT[dt]),
                                       axis=-1, out_dtype="float32"))


def _axis(node, x) -> int:
    rank = len(node.args[0].meta["val"].shape)
    return int(x) % rank


def quantize_per_channel(node, importer):
    from tvm import relax
    bb = importer.block_builder
    x, scales, zero_points = (importer.env[a] for a in node.args[:3])
    axis, quant_min, quant_max = node.args[3:6]
    dt = _dtype(node, 6)
    q = bb.emit(relax.op.quantize(x, scales, zero_points, axis=_axis(node, axis), out_dtype=_DT[dt]))
    return _clip(bb, q, quant_min, quant_max, dt)


def dequantize_per_channel(node, importer):
    from tvm import relax
    bb = importer.block_builder
    q, scales, zero_points = (importer.env[a] for a in node.args[:3])
    return bb.emit(relax.op.dequantize(q, scales, zero_points, axis=_axis(node, node.args[3]), out_dtype="float32"))


TRANSLATIONS = {
    torch.ops.optc.quantize_per_tensor.default: quantize_per_tensor,
    torch.ops.optc.dequantize_per_tensor.default: dequantize_per_tensor,
    torch.ops.optc.quantize_per_channel.default: quantize_per_channel,
    torch.ops.optc.dequantize_per_channel.default: dequantize_per_channel,
}


from optc.backends.tvm import register_tvm_translation  # noqa: E402  (imported once that module defines it)

register_translations(register_tvm_translation, TRANSLATIONS)
