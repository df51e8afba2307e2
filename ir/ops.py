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
# --- optc::rotary_embedding ------------------------------------------------------------------
def _rotate(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if interleaved:        # GPT-J's rotate_every_two: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    h = x.shape[-1] // 2   # Llama's rotate_half: (x1, x2) -> (-x2, x1)
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _rotary_embedding_decomp(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             interleaved: bool = False) -> torch.Tensor:
    return x * cos + _rotate(x, interleaved) * sin


@torch.library.custom_op("optc::rotary_embedding", mutates_args=())
def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Reference kernel: rotary position embedding ``x * cos + rotate(x) * sin`` over the last dim
    (even width ``d``), ``cos``/``sin`` broadcast to ``x`` and holding each angle twice (as
    transformers computes them: ``cat((freqs, freqs))``, or repeated element-wise for
    ``interleaved``). ``rotate`` is ``rotate_half`` -- ``cat(-x[d/2:], x[:d/2])`` -- or, with
    ``interleaved``, the pairwise ``(-x1, x0, -x3, x2, ...)``."""
    if x.shape[-1] % 2:
        raise ValueError(f"optc::rotary_embedding: the last dim of x ({x.shape[-1]}) is odd")
    return _rotary_embedding_decomp(x, cos, sin, interleaved)


@rotary_embedding.register_fake
def _(x, cos, sin, interleaved=False):
    shape = torch.broadcast_shapes(x.shape, cos.shape, sin.shape)
    return x.new_empty(shape)


register("rotary_embedding", _rotary_embedding_decomp)
from optc.ir import quant_ops as _quant_ops  # noqa: E402,F401  (registers optc::quantize_* / dequantize_*)
from optc.ir import layout_ops as _layout_ops  # noqa: E402,F401  (registers optc::conv2d_nhwc and the other NHWC ops)
