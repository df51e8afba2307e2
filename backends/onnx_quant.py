"""ONNX translations of optc's quantize / dequantize ops (``ir/quant_ops.py``).

    optc::quantize_per_tensor(x, s, z, qmin, qmax, dt)     -> QuantizeLinear(x, s, z)
    optc::dequantize_per_tensor(q, s, z, qmin, qmax, dt)   -> DequantizeLinear(q, s, z)
    optc::quantize_per_channel(x, S, Z, axis, ...)         -> QuantizeLinear(x, S, Z, axis=axis)
    optc::dequantize_per_channel(q, S, Z, axis, ...)       -> DequantizeLinear(q, S, Z, axis=axis)
    optc::quantize_dequantize_dynamic(x, uint8)            -> DequantizeLinear(DynamicQuantizeLinear(x))
    optc::linear_dynamic(x, Wq, S, b)                      -> Mul(Cast(MatMulInteger(DynamicQuantizeLinear(x),
                                                              Wq^T)), x_scale * S) + b

This is the QDQ format: ONNX Runtime's QDQ transformers fuse ``DequantizeLinear -> Conv/MatMul
(-> QuantizeLinear)`` groups into integer kernels (QLinearConv, QLinearMatMul,
MatMulIntegerToFloat, QGemm...). Per-tensor scales and zero points become typed scalar constants
(the zero point's element type is the quantized type: uint8 or int8). QuantizeLinear saturates
to the full range of its type; a narrower ``[quant_min, quant_max]`` adds a ``Clip`` on the
integers (which ONNX Runtime does not fuse: insert-qdq uses narrower ranges only for weights,
which are quantized at compile time and stored as integers, so only DequantizeLinear sees them).
A DequantizeLinear of an int32 tensor is a bias quantized with scale ``s_x * s_w``.

Dynamic quantization has no QDQ form that ONNX Runtime fuses (``DynamicQuantizeLinear ->
DequantizeLinear -> MatMul`` stays a float MatMul on dequantized values; ORT turns the weight's DQ
into a weight-only MatMulNBits at best), so ``optc::linear_dynamic`` is translated to the form ORT's
own dynamic quantizer writes, which its fusions turn into DynamicQuantizeMatMul.
"""

from __future__ import annotations

import numpy as np
import torch

from optc.backends.registry import register_translations

import optc.ir.ops  # noqa: F401  (registers the optc:: ops)
from optc.ir.quant_ops import DEQUANT_DTYPES

_NP = {torch.uint8: np.uint8, torch.int8: np.int8, torch.int32: np.int32}


def _torch_dtype(dtype) -> torch.dtype:
    """The exporter hands ScalarType arguments over as torch dtypes or as ONNX/IR data types."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = getattr(dtype, "name", None)
    if name is None:
        from onnx import TensorProto
        name = TensorProto.DataType.Name(int(dtype))
    return {"UINT8": torch.uint8, "INT8": torch.int8, "INT32": torch.int32}[name.upper()]


def _constant(op, value, np_dtype):
    from onnxscript import ir
    return op.Constant(value=ir.tensor(np.array(value, dtype=np_dtype)))


def _clip(op, q, quant_min: int, quant_max: int, dtype: torch.dtype):
    lo, hi = DEQUANT_DTYPES[dtype]
    if (quant_min, quant_max) == (lo, hi):
        return q
    return op.Clip(q, _constant(op, quant_min, _NP[dtype]), _constant(op, quant_max, _NP[dtype]))


# ---- the translations (module-level functions: registering them twice is a no-op) ---------------
def _opset():
    from optc.backends.onnx import onnx_opset
    return onnx_opset()


def quantize_per_tensor(x, scale: float, zero_point: int, quant_min: int, quant_max: int, dtype):
    op = _opset()
    dt = _torch_dtype(dtype)
    q = op.QuantizeLinear(x, _constant(op, scale, np.float32), _constant(op, zero_point, _NP[dt]))
    return _clip(op, q, quant_min, quant_max, dt)


def dequantize_per_tensor(q, scale: float, zero_point: int, quant_min: int, quant_max: int, dtype):
    op = _opset()
    dt = _torch_dtype(dtype)
    return op.DequantizeLinear(q, _constant(op, scale, np.float32), _constant(op, zero_point, _NP[dt]))


def quantize_per_channel(x, scales, zero_points, axis: int, quant_min: int, quant_max: int, dtype):
    op = _opset()
    q = op.QuantizeLinear(x, scales, zero_points, axis=axis)
    return _clip(op, q, quant_min, quant_max, _torch_dtype(dtype))


def dequantize_per_channel(q, scales, zero_points, axis: int, quant_min: int, quant_max: int, dtype):
    return _opset().DequantizeLinear(q, scales, zero_points, axis=axis)


def quantize_dequantize_dynamic(x, dtype):
    op = _opset()
    q, scale, zero_point = op.DynamicQuantizeLinear(x)
    return op.DequantizeLinear(q, scale, zero_point)


def linear_dynamic(x, weight, scales, bias=None):
    """ONNX Runtime's dynamic-quantization form, which it fuses into DynamicQuantizeMatMul:
    DynamicQuantizeLinear -> MatMulInteger (int32) -> Cast -> Mul(x_scale * w_scales) [-> Add bias]."""
    from onnx import TensorProto
    op = _opset()
    q, x_scale, x_zero_point = op.DynamicQuantizeLinear(x)
    acc = op.MatMulInteger(q, op.Transpose(weight, perm=[1, 0]), x_zero_point)
    y = op.Mul(op.Cast(acc, to=TensorProto.FLOAT), op.Mul(x_scale, scales))
    return y if bias is None else op.Add(y, bias)


TRANSLATIONS = {
    torch.ops.optc.linear_dynamic.default: linear_dynamic,
    torch.ops.optc.quantize_dequantize_dynamic.default: quantize_dequantize_dynamic,
    torch.ops.optc.quantize_per_tensor.default: quantize_per_tensor,
    torch.ops.optc.dequantize_per_tensor.default: dequantize_per_tensor,
    torch.ops.optc.quantize_per_channel.default: quantize_per_channel,
    torch.ops.optc.dequantize_per_channel.default: dequantize_per_channel,
}


from optc.backends.onnx import register_onnx_translation  # noqa: E402  (imported once that module defines it)

register_translations(register_onnx_translation, TRANSLATIONS)
