"""Layout-tagged ops in the ``optc::`` namespace: channels-last (NHWC) forms of the ATen ops that
are NCHW by definition.

torch.export's ATen dialect has no layout attribute: ``aten.conv2d`` reads ``x[n, c, h, w]``. An
NHWC program (what ``convert-layout{layout=NHWC}`` produces) needs ops whose *logical* input is
``x[n, h, w, c]``; these are they. Each is the ATen op conjugated by permutes::

    optc::conv2d_nhwc(x, w, b, stride, padding, dilation, groups)
        = conv2d(x.permute(0, 3, 1, 2), w.permute(0, 3, 1, 2), b, ...).permute(0, 2, 3, 1)

    x: [N, H, W, C_in]   w: [C_out, KH, KW, C_in / groups]  (OHWI)   b: [C_out] or None
    result: [N, H', W', C_out]

    optc::max_pool2d_nhwc(x, kernel_size, stride, padding, dilation, ceil_mode)
    optc::avg_pool2d_nhwc(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    optc::adaptive_avg_pool2d_nhwc(x, output_size)
    optc::upsample_nearest2d_nhwc(x, output_size, scale_factors)          (aten.upsample_nearest2d.vec)
    optc::upsample_bilinear2d_nhwc(x, output_size, align_corners, scale_factors)

with the arguments of the ATen op of the same name (``stride=[]`` means ``kernel_size``, as in
ATen). Everything else a CNN does in NHWC is plain ATen on other axes (``cat(dim=3)``,
``mean([1, 2])``, ``channel_affine(dim=3)`` for an unfolded BatchNorm) and needs no new op.

**Weight layout OHWI.** It is the NHWC filter layout of cuDNN (KRSC), XNNPACK, TFLite and oneDNN's
channels-last path, ``w.permute(0, 3, 1, 2)`` of a contiguous OHWI tensor is exactly PyTorch's
channels-last OIHW weight, and the output channels stay on axis 0: per-channel weight
quantization (``dequantize_per_channel(axis=0)``) means the same thing before and after a layout
change. TVM's NHWC schedule wants HWIO; its translation permutes the constant at compile time.

Each op has a reference kernel (below; the definition), a fake kernel and a decomposition into
ATen ops (``ir/ops.py``'s ``OPS``). The decomposition is what the reference kernel runs and what
the TorchScript and ONNX backends lower: its permutes are views, and it asks for the
channels-last memory format explicitly (``.contiguous(memory_format=torch.channels_last)``, a
no-op when the input already is), so that PyTorch runs the channels-last (oneDNN NHWC) kernels
and returns a contiguous NHWC result. On ONNX the decomposition is ``Transpose -> Conv ->
Transpose`` (ONNX ``Conv`` is NCHW); TVM translates every op natively (``backends/tvm_layout.py``).
"""

from __future__ import annotations

from typing import List, Optional

import torch

from optc.ir.ops import register

CL = torch.channels_last
#: logical NCHW -> physical NHWC (``x_nhwc = x_nchw.permute(NHWC)``) and back.
NHWC = (0, 2, 3, 1)
NCHW = (0, 3, 1, 2)


def _to_nchw(x: torch.Tensor) -> torch.Tensor:
    """An NHWC tensor as the NCHW tensor ATen expects, in channels-last memory (a view when ``x``
    is contiguous NHWC)."""
    return x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)


def _check_4d(op: str, x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"optc::{op}: expects a 4-d NHWC input, got {x.dim()}-d {list(x.shape)}")


# ---- optc::conv2d_nhwc -----------------------------------------------------------------------------
def _conv2d_nhwc_decomp(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: List[int],
                        padding: List[int], dilation: List[int], groups: int) -> torch.Tensor:
    y = torch.conv2d(_to_nchw(x), _to_nchw(weight), bias, stride, padding, dilation, groups)
    return y.permute(0, 2, 3, 1)


@torch.library.custom_op("optc::conv2d_nhwc", mutates_args=())
def conv2d_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: List[int],
                padding: List[int], dilation: List[int], groups: int) -> torch.Tensor:
    """Reference kernel: 2-d convolution of an NHWC input with an OHWI weight; NHWC result."""
    _check_4d("conv2d_nhwc", x)
    if weight.dim() != 4:
        raise ValueError(f"optc::conv2d_nhwc: weight must be 4-d OHWI, got {list(weight.shape)}")
    if x.shape[3] != weight.shape[3] * groups:
        raise ValueError(f"optc::conv2d_nhwc: input has {x.shape[3]} channels (last axis), weight "
                         f"{list(weight.shape)} (OHWI) with groups={groups} expects {weight.shape[3] * groups}")
    return _conv2d_nhwc_decomp(x, weight, bias, stride, padding, dilation, groups)


@conv2d_nhwc.register_fake
def _(x, weight, bias, stride, padding, dilation, groups):
    torch._check(x.dim() == 4 and weight.dim() == 4, lambda: "conv2d_nhwc: 4-d NHWC input and OHWI weight")
    return _conv2d_nhwc_decomp(x, weight, bias, stride, padding, dilation, groups).contiguous()


# ---- optc::max_pool2d_nhwc -------------------------------------------------------------------------
def _max_pool2d_nhwc_decomp(x: torch.Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
                            dilation: List[int], ceil_mode: bool) -> torch.Tensor:
    return torch.max_pool2d(_to_nchw(x), kernel_size, stride, padding, dilation, ceil_mode).permute(0, 2, 3, 1)


@torch.library.custom_op("optc::max_pool2d_nhwc", mutates_args=())
def max_pool2d_nhwc(x: torch.Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
                    dilation: List[int], ceil_mode: bool) -> torch.Tensor:
    """Reference kernel: ``aten.max_pool2d`` over axes 1, 2 of an NHWC input."""
    _check_4d("max_pool2d_nhwc", x)
    return _max_pool2d_nhwc_decomp(x, kernel_size, stride, padding, dilation, ceil_mode)


@max_pool2d_nhwc.register_fake
def _(x, kernel_size, stride, padding, dilation, ceil_mode):
    return _max_pool2d_nhwc_decomp(x, kernel_size, stride, padding, dilation, ceil_mode).contiguous()


# ---- optc::avg_pool2d_nhwc -------------------------------------------------------------------------
def _avg_pool2d_nhwc_decomp(x: torch.Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
                            ceil_mode: bool, count_include_pad: bool, divisor_override: Optional[int]) -> torch.Tensor:
    y = torch.ops.aten.avg_pool2d(_to_nchw(x), kernel_size, stride, padding, ceil_mode, count_include_pad,
                                  divisor_override)
    return y.permute(0, 2, 3, 1)


@torch.library.custom_op("optc::avg_pool2d_nhwc", mutates_args=())
def avg_pool2d_nhwc(x: torch.Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
                    ceil_mode: bool, count_include_pad: bool, divisor_override: Optional[int]) -> torch.Tensor:
    """Reference kernel: ``aten.avg_pool2d`` over axes 1, 2 of an NHWC input."""
    _check_4d("avg_pool2d_nhwc", x)
    return _avg_pool2d_nhwc_decomp(x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                                   divisor_override)


@avg_pool2d_nhwc.register_fake
def _(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
    return _avg_pool2d_nhwc_decomp(x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                                   divisor_override).contiguous()


# ---- optc::adaptive_avg_pool2d_nhwc ----------------------------------------------------------------
def _adaptive_avg_pool2d_nhwc_decomp(x: torch.Tensor, output_size: List[int]) -> torch.Tensor:
    return torch.ops.aten.adaptive_avg_pool2d(_to_nchw(x), output_size).permute(0, 2, 3, 1)


@torch.library.custom_op("optc::adaptive_avg_pool2d_nhwc", mutates_args=())
def adaptive_avg_pool2d_nhwc(x: torch.Tensor, output_size: List[int]) -> torch.Tensor:
    """Reference kernel: ``aten.adaptive_avg_pool2d`` over axes 1, 2 of an NHWC input."""
    _check_4d("adaptive_avg_pool2d_nhwc", x)
    return _adaptive_avg_pool2d_nhwc_decomp(x, output_size)


@adaptive_avg_pool2d_nhwc.register_fake
def _(x, output_size):
    return _adaptive_avg_pool2d_nhwc_decomp(x, output_size).contiguous()


# ---- optc::upsample_nearest2d_nhwc / upsample_bilinear2d_nhwc -------------------------------------
def _upsample_nearest2d_nhwc_decomp(x: torch.Tensor, output_size: Optional[List[int]],
                                    scale_factors: Optional[List[float]]) -> torch.Tensor:
    y = torch.ops.aten.upsample_nearest2d(_to_nchw(x), output_size, scale_factors)
    return y.permute(0, 2, 3, 1)


@torch.library.custom_op("optc::upsample_nearest2d_nhwc", mutates_args=())
def upsample_nearest2d_nhwc(x: torch.Tensor, output_size: Optional[List[int]],
                            scale_factors: Optional[List[float]]) -> torch.Tensor:
    """Reference kernel: ``aten.upsample_nearest2d.vec`` over axes 1, 2 of an NHWC input."""
    _check_4d("upsample_nearest2d_nhwc", x)
    return _upsample_nearest2d_nhwc_decomp(x, output_size, scale_factors)


@upsample_nearest2d_nhwc.register_fake
def _(x, output_size, scale_factors):
    return _upsample_nearest2d_nhwc_decomp(x, output_size, scale_factors).contiguous()


def _upsample_bilinear2d_nhwc_decomp(x: torch.Tensor, output_size: Optional[List[int]], align_corners: bool,
                                     scale_factors: Optional[List[float]]) -> torch.Tensor:
    y = torch.ops.aten.upsample_bilinear2d(_to_nchw(x), output_size, align_corners, scale_factors)
    return y.permute(0, 2, 3, 1)


@torch.library.custom_op("optc::upsample_bilinear2d_nhwc", mutates_args=())
def upsample_bilinear2d_nhwc(x: torch.Tensor, output_size: Optional[List[int]], align_corners: bool,
                             scale_factors: Optional[List[float]]) -> torch.Tensor:
    """Reference kernel: ``aten.upsample_bilinear2d.vec`` over axes 1, 2 of an NHWC input."""
    _check_4d("upsample_bilinear2d_nhwc", x)
    return _upsample_bilinear2d_nhwc_decomp(x, output_size, align_corners, scale_factors)


@upsample_bilinear2d_nhwc.register_fake
def _(x, output_size, align_corners, scale_factors):
    return _upsample_bilinear2d_nhwc_decomp(x, output_size, align_corners, scale_factors).contiguous()


register("conv2d_nhwc", _conv2d_nhwc_decomp)
register("max_pool2d_nhwc", _max_pool2d_nhwc_decomp)
register("avg_pool2d_nhwc", _avg_pool2d_nhwc_decomp)
register("adaptive_avg_pool2d_nhwc", _adaptive_avg_pool2d_nhwc_decomp)
register("upsample_nearest2d_nhwc", _upsample_nearest2d_nhwc_decomp)
register("upsample_bilinear2d_nhwc", _upsample_bilinear2d_nhwc_decomp)

#: every NHWC op, by name (the ``optc::`` overloads)
NHWC_OPS = {name: getattr(torch.ops.optc, name).default for name in (
    "conv2d_nhwc", "max_pool2d_nhwc", "avg_pool2d_nhwc", "adaptive_avg_pool2d_nhwc", "upsample_nearest2d_nhwc",
    "upsample_bilinear2d_nhwc")}


def is_layout_op(target) -> bool:
    """Whether ``target`` is one of the NHWC ops (for passes that look for convolutions or pools)."""
    return target in NHWC_OPS.values()
