"""The ``optc::`` custom-op namespace.

Ops that ATen lacks (quantize/dequantize, fused or layout-tagged ops) are defined here with
``torch.library.custom_op``. Each op has

- a **reference kernel** (eager, the definition of its semantics),
- a **fake kernel** (shape/dtype propagation, so torch.export and optc's passes can trace it),
- a **decomposition** into ATen ops, used by backends that have no native translation
  (it computes exactly the reference semantics: it is a lowering, not a fallback),
- optionally a native translation registered by each backend (e.g. ONNX, TVM).

Worked example: ``optc::channel_affine(x, scale, shift, dim) = x * scale[c] + shift[c]``
along axis ``dim`` -- what a BatchNorm in eval mode becomes when it cannot be folded into a
preceding convolution. Later ops follow this pattern: define the schema with
``@torch.library.custom_op``, register the fake with ``.register_fake``, and list the op in
``OPS`` with its decomposition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class OptcOp:
    name: str                       # "channel_affine"
    overload: torch._ops.OpOverload  # torch.ops.optc.channel_affine.default
    decomposition: Callable          # same signature, ATen ops only


OPS: dict[str, OptcOp] = {}


def register(name: str, decomposition: Callable) -> None:
    overload = getattr(torch.ops.optc, name).default
    OPS[name] = OptcOp(name, overload, decomposition)


def is_optc_op(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "optc"


def decomposition_table() -> dict:
    """``{OpOverload: decomposition}`` for every optc op (for make_fx / run_decompositions)."""
    return {op.overload: op.decomposition for op in OPS.values()}


# --- optc::channel_affine ---------------------------------------------------------------------
def _channel_affine_decomp(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dim: int) -> torch.Tensor:
    d = dim % x.dim()
    view = [1] * x.dim()
    view[d] = -1
    return x * scale.reshape(view) + shift.reshape(view)


@torch.library.custom_op("optc::channel_affine", mutates_args=())
def channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, dim: int) -> torch.Tensor:
    """Reference kernel: ``x * scale + shift`` broadcast along axis ``dim`` of ``x``."""
    if scale.dim() != 1 or shift.dim() != 1:
        raise ValueError("optc::channel_affine: scale and shift must be 1-d")
    d = dim % x.dim()
    if scale.numel() != x.shape[d] or shift.numel() != x.shape[d]:
        raise ValueError(f"optc::channel_affine: scale/shift have {scale.numel()}/{shift.numel()} "
                         f"elements, axis {dim} of x has {x.shape[d]}")
    return _channel_affine_decomp(x, scale, shift, dim)


@channel_affine.register_fake
def _(x, scale, shift, dim):
    torch._check(scale.dim() == 1 and shift.dim() == 1, lambda: "scale and shift must be 1-d")
    return torch.empty_like(x)


register("channel_affine", _channel_affine_decomp)
from optc.ir import quant_ops as _quant_ops  # noqa: E402,F401  (registers optc::quantize_* / dequantize_*)
from optc.ir import layout_ops as _layout_ops  # noqa: E402,F401  (registers optc::conv2d_nhwc and the other NHWC ops)
