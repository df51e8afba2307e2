"""Quantize / dequantize in the ``optc::`` namespace (affine integer quantization).

    q = clamp(round_half_even(x / scale) + zero_point, quant_min, quant_max)   as ``dtype``
    x' = (float(q) - zero_point) * scale                                       float32

Four ops, each with a reference kernel (below: the definition), a fake kernel and a
decomposition into ATen ops (registered in :data:`optc.ir.ops.OPS`)::

    optc::quantize_per_tensor(Tensor x, float scale, int zero_point, int quant_min, int quant_max,
                              ScalarType dtype) -> Tensor
    optc::dequantize_per_tensor(Tensor q, float scale, int zero_point, int quant_min, int quant_max,
                                ScalarType dtype) -> Tensor
    optc::quantize_per_channel(Tensor x, Tensor scales, Tensor zero_points, int axis, int quant_min,
                               int quant_max, ScalarType dtype) -> Tensor
    optc::dequantize_per_channel(Tensor q, Tensor scales, Tensor zero_points, int axis, int quant_min,
                                 int quant_max, ScalarType dtype) -> Tensor
    optc::quantize_dequantize_dynamic(Tensor x, ScalarType dtype) -> Tensor    (dynamic quantization:
                              uint8, scale and zero point from min(x, 0)..max(x, 0) at run time)
    optc::linear_dynamic(Tensor x, Tensor weight, Tensor scales, Tensor? bias) -> Tensor
                              (a linear whose input is quantized that way and whose int8 weight has
                              one scale per output feature: ONNX Runtime's DynamicQuantizeMatMul)

- ``dtype`` is ``torch.uint8`` or ``torch.int8`` (``torch.int32`` too for dequantize: biases
  quantized with scale ``s_x * s_w``); ``[quant_min, quant_max]`` lies within its range
  (``[-127, 127]`` for symmetric int8 weights, the full range for activations).
- Per tensor: ``scale`` and ``zero_point`` are Python numbers (fixed by calibration at compile
  time, so backends see them as constants). Per channel: 1-d float32 ``scales`` and
  ``zero_points`` of ``dtype`` with one entry per slice of ``x`` along ``axis``.
- Symmetric quantization is ``zero_point = 0`` (int8); asymmetric is any ``zero_point``.
- Rounding is half to even, as ONNX ``QuantizeLinear`` and ``torch.round`` do; saturation to
  ``[quant_min, quant_max]``. Dequantize returns float32.

Backends: ONNX translates them to ``QuantizeLinear``/``DequantizeLinear`` (``backends/onnx_quant.py``:
the QDQ format ONNX Runtime fuses into integer kernels); TorchScript runs the decomposition
(``backends/torchscript.py``); TVM Relax maps them to ``R.quantize``/``R.dequantize`` with
``axis`` (docs/quantization.md).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from optc.ir.ops import register

QUANT_DTYPES = {torch.uint8: (0, 255), torch.int8: (-128, 127)}
DEQUANT_DTYPES = {**QUANT_DTYPES, torch.int32: (-(2 ** 31), 2 ** 31 - 1)}

QUANTIZE_OPS = ("quantize_per_tensor", "quantize_per_channel")
DEQUANTIZE_OPS = ("dequantize_per_tensor", "dequantize_per_channel")


# ---- argument checks (reference kernels; the fake kernels check what shapes allow) ------------
def check_qparams(op: str, quant_min: int, quant_max: int, dtype: torch.dtype, *, dequant: bool = False) -> None:
    table = DEQUANT_DTYPES if dequant else QUANT_DTYPES
    if dtype not in table:
        valid = ", ".join(str(d).replace("torch.", "") for d in table)
        raise ValueError(f"optc::{op}: unsupported quantized dtype {dtype} (valid: {valid})")
    lo, hi = table[dtype]
    if not lo <= quant_min < quant_max <= hi:
        raise ValueError(f"optc::{op}: [quant_min, quant_max] = [{quant_min}, {quant_max}] must be a non-empty "
                         f"range within [{lo}, {hi}] of {str(dtype).replace('torch.', '')}")


def _check_scale(op: str, scale: float, zero_point: int, quant_min: int, quant_max: int) -> None:
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"optc::{op}: scale must be a positive finite number, got {scale!r}")
    if not quant_min <= zero_point <= quant_max:
        raise ValueError(f"optc::{op}: zero_point {zero_point} is outside [{quant_min}, {quant_max}]")


def _check_channel_params(op: str, x: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, axis: int,
                          quant_min: int, quant_max: int) -> int:
    if x.dim() == 0:
        raise ValueError(f"optc::{op}: per-channel quantization needs a tensor with at least one dim")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"optc::{op}: axis {axis} is out of range for a {x.dim()}-d tensor")
    d = axis % x.dim()
    if scales.dim() != 1 or zero_points.dim() != 1 or scales.numel() != x.shape[d] or zero_points.numel() != x.shape[d]:
        raise ValueError(f"optc::{op}: scales {list(scales.shape)} and zero_points {list(zero_points.shape)} must be "
                         f"1-d with {x.shape[d]} entries (axis {axis} of {list(x.shape)})")
    if scales.dtype != torch.float32:
        raise ValueError(f"optc::{op}: scales must be float32, got {scales.dtype}")
    if not bool(torch.isfinite(scales).all()) or not bool((scales > 0).all()):
        raise ValueError(f"optc::{op}: every scale must be positive and finite")
    if zero_points.numel() and (int(zero_points.min()) < quant_min or int(zero_points.max()) > quant_max):
        raise ValueError(f"optc::{op}: zero_points outside [{quant_min}, {quant_max}]")
    return d


def _channel_view(t: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return t.reshape(shape)


# ---- decompositions (ATen only; exactly the reference semantics) ------------------------------------
def _quantize_per_tensor_decomp(x, scale, zero_point, quant_min, quant_max, dtype):
    q = torch.round(x.to(torch.float32) / scale) + zero_point
    return torch.clamp(q, quant_min, quant_max).to(dtype)


def _dequantize_per_tensor_decomp(q, scale, zero_point, quant_min, quant_max, dtype):
    return (q.to(torch.float32) - zero_point) * scale


def _quantize_per_channel_decomp(x, scales, zero_points, axis, quant_min, quant_max, dtype):
    s = _channel_view(scales, x, axis)
    z = _channel_view(zero_points.to(torch.float32), x, axis)
    q = torch.round(x.to(torch.float32) / s) + z
    return torch.clamp(q, quant_min, quant_max).to(dtype)


def _dequantize_per_channel_decomp(q, scales, zero_points, axis, quant_min, quant_max, dtype):
    s = _channel_view(scales, q, axis)
    z = _channel_view(zero_points.to(torch.float32), q, axis)
    return (q.to(torch.float32) - z) * s


# ---- the ops ----------------------------------------------------------------------------------------
@torch.library.custom_op("optc::quantize_per_tensor", mutates_args=())
def quantize_per_tensor(x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int,
                        dtype: torch.dtype) -> torch.Tensor:
    """``clamp(round(x / scale) + zero_point, quant_min, quant_max)`` as ``dtype``."""
    check_qparams("quantize_per_tensor", quant_min, quant_max, dtype)
    _check_scale("quantize_per_tensor", scale, zero_point, quant_min, quant_max)
    if not x.is_floating_point():
        raise ValueError(f"optc::quantize_per_tensor: input must be floating point, got {x.dtype}")
    return _quantize_per_tensor_decomp(x, scale, zero_point, quant_min, quant_max, dtype)


@quantize_per_tensor.register_fake
def _(x, scale, zero_point, quant_min, quant_max, dtype):
    torch._check(dtype in QUANT_DTYPES, lambda: f"optc::quantize_per_tensor: unsupported dtype {dtype}")
    return torch.empty_like(x, dtype=dtype)


@torch.library.custom_op("optc::dequantize_per_tensor", mutates_args=())
def dequantize_per_tensor(q: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int,
                          dtype: torch.dtype) -> torch.Tensor:
    """``(float(q) - zero_point) * scale`` in float32; ``q`` must have dtype ``dtype``."""
    check_qparams("dequantize_per_tensor", quant_min, quant_max, dtype, dequant=True)
    _check_scale("dequantize_per_tensor", scale, zero_point, quant_min, quant_max)
    if q.dtype != dtype:
        raise ValueError(f"optc::dequantize_per_tensor: input has dtype {q.dtype}, expected {dtype}")
    return _dequantize_per_tensor_decomp(q, scale, zero_point, quant_min, quant_max, dtype)


@dequantize_per_tensor.register_fake
def _(q, scale, zero_point, quant_min, quant_max, dtype):
    torch._check(q.dtype == dtype, lambda: f"optc::dequantize_per_tensor: input is {q.dtype}, expected {dtype}")
    return torch.empty_like(q, dtype=torch.float32)


@torch.library.custom_op("optc::quantize_per_channel", mutates_args=())
def quantize_per_channel(x: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, axis: int,
                         quant_min: int, quant_max: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-slice ``clamp(round(x / scales[c]) + zero_points[c], quant_min, quant_max)`` along ``axis``."""
    check_qparams("quantize_per_channel", quant_min, quant_max, dtype)
    if not x.is_floating_point():
        raise ValueError(f"optc::quantize_per_channel: input must be floating point, got {x.dtype}")
    _check_channel_params("quantize_per_channel", x, scales, zero_points, axis, quant_min, quant_max)
    return _quantize_per_channel_decomp(x, scales, zero_points, axis, quant_min, quant_max, dtype)


@quantize_per_channel.register_fake
def _(x, scales, zero_points, axis, quant_min, quant_max, dtype):
    torch._check(dtype in QUANT_DTYPES, lambda: f"optc::quantize_per_channel: unsupported dtype {dtype}")
    torch._check(scales.dim() == 1, lambda: "optc::quantize_per_channel: scales must be 1-d")
    return torch.empty_like(x, dtype=dtype)


@torch.library.custom_op("optc::dequantize_per_channel", mutates_args=())
def dequantize_per_channel(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, axis: int,
                           quant_min: int, quant_max: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-slice ``(float(q) - zero_points[c]) * scales[c]`` along ``axis``, float32."""
    check_qparams("dequantize_per_channel", quant_min, quant_max, dtype, dequant=True)
    if q.dtype != dtype:
        raise ValueError(f"optc::dequantize_per_channel: input has dtype {q.dtype}, expected {dtype}")
    _check_channel_params("dequantize_per_channel", q, scales, zero_points, axis, quant_min, quant_max)
    return _dequantize_per_channel_decomp(q, scales, zero_points, axis, quant_min, quant_max, dtype)


@dequantize_per_channel.register_fake
def _(q, scales, zero_points, axis, quant_min, quant_max, dtype):
    torch._check(q.dtype == dtype, lambda: f"optc::dequantize_per_channel: input is {q.dtype}, expected {dtype}")
    torch._check(scales.dim() == 1, lambda: "optc::dequantize_per_channel: scales must be 1-d")
    return torch.empty_like(q, dtype=torch.float32)


# ---- dynamic: scale and zero point computed from each input at run time ---------------------------
def quantize_dequantize_dynamic_reference(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The formula of ``optc::quantize_dequantize_dynamic``: its decomposition, and the function
    TorchScript runs for it (``backends/torchscript_quant.py``) -- one definition."""
    xf = x.to(torch.float32)
    lo = torch.clamp(xf.min(), max=0.0)
    hi = torch.clamp(xf.max(), min=0.0)
    scale = (hi - lo) / 255.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.clamp(torch.round(-lo / scale), 0, 255)
    q = torch.clamp(torch.round(xf / scale) + zp, 0, 255)
    return (q - zp) * scale


@torch.library.custom_op("optc::quantize_dequantize_dynamic", mutates_args=())
def quantize_dequantize_dynamic(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Quantize to uint8 with ``scale = (max(x, 0) - min(x, 0)) / 255`` and the zero point that
    makes 0 exact (ONNX ``DynamicQuantizeLinear``), then dequantize; float32 result."""
    if dtype != torch.uint8:
        raise ValueError(f"optc::quantize_dequantize_dynamic: unsupported quantized dtype {dtype} (valid: uint8, "
                         "as ONNX DynamicQuantizeLinear)")
    if not x.is_floating_point():
        raise ValueError(f"optc::quantize_dequantize_dynamic: input must be floating point, got {x.dtype}")
    return quantize_dequantize_dynamic_reference(x, dtype)


@quantize_dequantize_dynamic.register_fake
def _(x, dtype):
    return torch.empty_like(x, dtype=torch.float32)


# ---- dynamic linear: the activation quantized at run time, the weight at compile time --------------
def linear_dynamic_reference(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                             bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The formula of ``optc::linear_dynamic`` (its decomposition; TorchScript's translation)."""
    xd = quantize_dequantize_dynamic_reference(x, torch.uint8)
    w = weight.to(torch.float32) * scales.reshape(-1, 1)
    return torch.nn.functional.linear(xd, w, bias)


@torch.library.custom_op("optc::linear_dynamic", mutates_args=())
def linear_dynamic(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``linear(quantize_dequantize_dynamic(x, uint8), weight * scales[:, None], bias)``: ``weight``
    int8 ``[N, K]``, ``scales`` float32 ``[N]`` (one per output feature), ``bias`` float32 ``[N]`` or
    None. What ONNX Runtime's DynamicQuantizeMatMul computes (the activation is quantized inside the
    op, so the integer matmul needs the weight and the activation together: one op, not Q/DQ)."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"optc::linear_dynamic: weight must be a 2-d int8 tensor, got {weight.dtype} {list(weight.shape)}")
    n, k = weight.shape
    if not x.is_floating_point() or x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"optc::linear_dynamic: input {x.dtype} {list(x.shape)} must be floating point with {k} "
                         "features in its last dim")
    if scales.dtype != torch.float32 or list(scales.shape) != [n] or not bool((scales > 0).all()):
        raise ValueError(f"optc::linear_dynamic: scales must be {n} positive float32 values, got {scales.dtype} "
                         f"{list(scales.shape)}")
    if bias is not None and list(bias.shape) != [n]:
        raise ValueError(f"optc::linear_dynamic: bias must have {n} entries, got {list(bias.shape)}")
    return linear_dynamic_reference(x, weight, scales, bias)


@linear_dynamic.register_fake
def _(x, weight, scales, bias):
    torch._check(weight.dim() == 2, lambda: "optc::linear_dynamic: weight must be 2-d")
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)


register("quantize_per_tensor", _quantize_per_tensor_decomp)
register("dequantize_per_tensor", _dequantize_per_tensor_decomp)
register("quantize_per_channel", _quantize_per_channel_decomp)
register("dequantize_per_channel", _dequantize_per_channel_decomp)
register("quantize_dequantize_dynamic", quantize_dequantize_dynamic_reference)
register("linear_dynamic", linear_dynamic_reference)


# ---- helpers for passes and backends ----------------------------------------------------------------
def is_quantize(target) -> bool:
    return target in (torch.ops.optc.quantize_per_tensor.default, torch.ops.optc.quantize_per_channel.default)


def is_dequantize(target) -> bool:
    return target in (torch.ops.optc.dequantize_per_tensor.default, torch.ops.optc.dequantize_per_channel.default)


_QUANT_OPS = ("quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel", "dequantize_per_channel",
              "quantize_dequantize_dynamic", "linear_dynamic")


def is_quant_op(target) -> bool:
    """Any of this module's ops (a graph holding one is a quantized program)."""
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "optc" and target._opname in _QUANT_OPS


def qrange(dtype: torch.dtype, *, symmetric: bool = False) -> tuple[int, int]:
    """``(quant_min, quant_max)`` for ``dtype``; symmetric int8 uses ``[-127, 127]`` (a zero point
    of 0 and the same step on both sides, as ONNX Runtime's quantizer does)."""
    lo, hi = QUANT_DTYPES[dtype]
    if symmetric and dtype == torch.int8:
        return -127, 127
    return lo, hi


def choose_qparams(lo: float, hi: float, dtype: torch.dtype, *, symmetric: bool) -> tuple[float, int]:
    """Scale and zero point that represent ``[lo, hi]`` (widened to include 0, so that 0 is exact:
    zero padding and ReLU outputs stay exact). Symmetric: zero point 0 for int8, 128 for uint8."""
    qmin, qmax = qrange(dtype, symmetric=symmetric)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        amax = max(-lo, hi)
        scale = amax / ((qmax - qmin) / 2) if amax > 0 else 1.0
        zp = 0 if dtype == torch.int8 else 128
        return _tiny_guard(scale), zp
    scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
    scale = _tiny_guard(scale)
    zp = int(round(qmin - lo / scale))
    return scale, max(qmin, min(qmax, zp))


def _tiny_guard(scale: float) -> float:
    # float32-representable and not denormal (ORT computes 1/scale in float32)
    return float(torch.tensor(max(scale, 1e-12), dtype=torch.float32))
