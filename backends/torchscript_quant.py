"""TorchScript lowering of optc's quantize / dequantize ops (``ir/quant_ops.py``) to torch's own
quantize / dequantize ops.

    optc::quantize_per_tensor(x, s, z, qmin, qmax, dt)    -> aten::quantize_per_tensor(x, s, z, quint8|qint8)
                                                              .int_repr()            (+ clamp if narrow)
    optc::dequantize_per_tensor(q, s, z, qmin, qmax, dt)  -> aten::_make_per_tensor_quantized_tensor(q, s, z)
                                                              .dequantize()
    optc::quantize_per_channel / dequantize_per_channel   -> the per-channel forms (scales as float64,
                                                              zero points as int64, as torch wants them)

The values between ops stay plain ``uint8`` / ``int8`` / ``int32`` tensors (optc's IR), so every
other op of the graph is untouched; a quantized tensor lives only inside one translation. The
dequantize of a constant (weights, biases) is written as ATen arithmetic instead, which
``torch.jit.freeze`` folds into a float32 constant (it does not fold ``aten::dequantize``).
``optc::quantize_dequantize_dynamic`` and ``optc::linear_dynamic`` are translated to their ATen
definitions, annotated so that ``torch.jit.script`` (dynamic shapes) can compile them
(``quantized::linear_dynamic`` runs an integer kernel, but on this machine's fbgemm/x86 engines the
legacy quantized kernels are slower than the float ones: docs/quantization.md).

Rounding: torch computes ``nearbyint(x * (1 / scale))`` where ONNX and optc's reference compute
``nearbyint(x / scale)``; the two differ by one step in about 5 of 10^6 random values.

What runs: the activations are quantized and dequantized by torch's kernels; conv / linear /
matmul run in float32 on the dequantized values (the MKLDNN float kernels after
``optimize_for_inference``). torch's integer kernels (``quantized::conv2d``, ``quantized::linear``
on quantized tensors with prepacked weights) exist but are deprecated and were measured not to
pay here (docs/quantization.md).
"""

from __future__ import annotations


import torch
import torch.fx as fx

import optc.ir.ops  # noqa: F401  (registers the optc:: ops)
from optc.ir.quant_ops import linear_dynamic_reference, quantize_dequantize_dynamic_reference

def quantize_per_tensor(x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int,
                        dtype: torch.dtype) -> torch.Tensor:
    qdtype = torch.quint8 if dtype == torch.uint8 else torch.qint8
    q = torch.quantize_per_tensor(x.to(torch.float32), scale, zero_point, qdtype).int_repr()
    if dtype == torch.uint8:
        full_min, full_max = 0, 255
    else:
        full_min, full_max = -128, 127
    if quant_min != full_min or quant_max != full_max:
        q = torch.clamp(q, quant_min, quant_max)
    return q


def dequantize_per_tensor(q: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int,
                          dtype: torch.dtype) -> torch.Tensor:
    return torch._make_per_tensor_quantized_tensor(q, scale, zero_point).dequantize()


def quantize_per_channel(x: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, axis: int,
                         quant_min: int, quant_max: int, dtype: torch.dtype) -> torch.Tensor:
    qdtype = torch.quint8 if dtype == torch.uint8 else torch.qint8
    d = axis % x.dim()
    q = torch.quantize_per_channel(x.to(torch.float32), scales.to(torch.float64), zero_points.to(torch.int64), d,
                                   qdtype).int_repr()
    if dtype == torch.uint8:
        full_min, full_max = 0, 255
    else:
        full_min, full_max = -128, 127
    if quant_min != full_min or quant_max != full_max:
        q = torch.clamp(q, quant_min, quant_max)
    return q


def dequantize_per_channel(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, axis: int,
                           quant_min: int, quant_max: int, dtype: torch.dtype) -> torch.Tensor:
    d = axis % q.dim()
    return torch._make_per_channel_quantized_tensor(q, scales.to(torch.float64), zero_points.to(torch.int64),
                                                    d).dequantize()


def dequantize_per_tensor_constant(q: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int,
                                   dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) - zero_point) * scale


def dequantize_per_channel_constant(q: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor, axis: int,
                                    quant_min: int, quant_max: int, dtype: torch.dtype) -> torch.Tensor:
    # no list mutation: TorchScript's constant propagation (freeze) folds only pure tensor ops
    d = axis % q.dim()
    t = q.to(torch.float32).transpose(d, q.dim() - 1)
    return ((t - zero_points.to(torch.float32)) * scales).transpose(d, q.dim() - 1).contiguous()


# the dynamic-quantization formula has one definition, the op's own (ir/quant_ops.py)
quantize_dequantize_dynamic = quantize_dequantize_dynamic_reference
linear_dynamic = linear_dynamic_reference


TRANSLATIONS = {
    torch.ops.optc.linear_dynamic.default: linear_dynamic,
    torch.ops.optc.quantize_per_tensor.default: quantize_per_tensor,
    torch.ops.optc.dequantize_per_tensor.default: dequantize_per_tensor,
    torch.ops.optc.quantize_per_channel.default: quantize_per_channel,
    torch.ops.optc.dequantize_per_channel.default: dequantize_per_channel,
    torch.ops.optc.quantize_dequantize_dynamic.default: quantize_dequantize_dynamic,
}


#: Dequantize of a constant (weights, biases): plain ATen arithmetic, which ``torch.jit.freeze``
#: folds into a float32 constant (it does not fold ``aten::dequantize``), so that
#: ``optimize_for_inference`` sees constant conv / linear weights and prepacks them.
CONSTANT_TRANSLATIONS = {
    torch.ops.optc.dequantize_per_tensor.default: dequantize_per_tensor_constant,
    torch.ops.optc.dequantize_per_channel.default: dequantize_per_channel_constant,
}


def lower_quant_ops(gm: fx.GraphModule) -> int:
    """Point every quantize/dequantize node of ``gm`` (a backend's private copy, its other optc ops
    already decomposed) at its TorchScript translation; returns how many use torch's ops."""
    n = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in TRANSLATIONS:
            continue
        src = node.args[0]
        if node.target in CONSTANT_TRANSLATIONS and isinstance(src, fx.Node) and src.op == "get_attr":
            node.target = CONSTANT_TRANSLATIONS[node.target]
            continue
        node.target = TRANSLATIONS[node.target]
        n += 1
    if n:
        gm.recompile()
    return n


__all__ = ["TRANSLATIONS", "lower_quant_ops"]
