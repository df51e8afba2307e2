"""insert-qdq's sites: the ops with an integer kernel it quantizes (conv, linear, matmul with a
constant float32 weight; activation x activation matmuls on request), and why a candidate is refused.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from optc.ir import layout_ops as _layout_ops  # noqa: F401  (registers optc::conv2d_nhwc and the other NHWC ops)
from optc.ir.queries import module_path
from optc.ir.rewrite import arg, attr_value, is_op

aten = torch.ops.aten

#: ``optc.conv2d_nhwc`` (convert-layout's, ir/layout_ops.py) takes the arguments of aten.conv2d; its
#: OHWI weight keeps the output channels on axis 0, so per-channel weights mean the same thing
_CONV_NHWC = torch.ops.optc.conv2d_nhwc.default
_CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, _CONV_NHWC)
_MATMULS = (aten.matmul.default, aten.mm.default, aten.bmm.default)


# ---- sites --------------------------------------------------------------------------------------
@dataclass
class Site:
    """A compute op with an integer kernel: activation operands, constant weight and bias."""

    node: fx.Node
    kind: str                      # "conv", "linear", "matmul"
    acts: tuple[fx.Node, ...]      # activation operands (quantized per tensor)
    weight: fx.Node | None         # constant weight operand (quantized at compile time)
    weight_index: int | None
    bias: fx.Node | None
    axis: int | None               # weight axis of the output channels (None: per tensor)


def is_f32(n: Any) -> bool:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dtype == torch.float32


def _const_f32(n: Any) -> bool:
    t = attr_value(n)
    return t is not None and t.dtype == torch.float32


def _float_tensor(n: Any) -> bool:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def match_site(node: fx.Node, opts: dict):
    """A :class:`Site`, a refusal (``MatchResult``-like: ``(None, reason)``) or None (not a candidate)."""
    if node.op != "call_function":
        return None
    if is_op(node, *_CONVS) or is_op(node, aten.linear.default):
        kind = "linear" if is_op(node, aten.linear.default) else "conv"
        x, w, b = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")
        if not _float_tensor(x):
            return None
        if not is_f32(x) or not is_f32(node):
            return (None, f"{kind} computes in {x.meta['val'].dtype}, not float32")
        if not _const_f32(w):
            return (None, f"{kind} weight %{getattr(w, 'name', w)} is not a float32 constant")
        if b is not None and not _const_f32(b):
            return (None, f"{kind} bias %{getattr(b, 'name', b)} is not a float32 constant")
        if opts["scheme"] == "dynamic" and kind == "conv":
            return (None, "dynamic quantization covers linear and matmul (conv needs calibrated activation scales)")
        groups = arg(node, 6, "groups", 1)
        wt = attr_value(w)
        cin = int(wt.shape[3] if is_op(node, _CONV_NHWC) else wt.shape[1]) * int(groups)
        if kind == "conv" and groups == 1 and cin < opts["min_channels"]:
            return (None, f"conv reads {cin} input channels (< min_channels={opts['min_channels']}): no fast "
                          "integer kernel for so short a reduction, kept float")
        axis = 0 if opts["per_channel"] else None
        return Site(node, kind, (x,), w, 1, b, axis)
    if is_op(node, aten.convolution.default, aten.conv_transpose1d.default, aten.conv_transpose2d.input,
             aten.conv_transpose3d.input):
        return (None, "transposed or generic convolution: no integer kernel is targeted")
    if is_op(node, *_MATMULS):
        a, b = node.args[0], node.args[1]
        if not (_float_tensor(a) and _float_tensor(b)):
            return None
        if not (is_f32(a) and is_f32(b)):
            return (None, f"matmul computes in {a.meta['val'].dtype}, not float32")
        if _const_f32(a):
            return (None, "matmul's left operand is the constant (only x @ W is targeted)")
        if _const_f32(b):
            if b.meta["val"].dim() != 2:
                return (None, "matmul's constant operand is not a 2-d weight")
            return Site(node, "matmul", (a,), b, 1, None, 1 if opts["per_channel"] else None)
        if opts["scheme"] == "dynamic" or not opts["activation_matmul"]:
            return (None, "both matmul operands are activations (activation_matmul=false)")
        return Site(node, "matmul", (a, b), None, None, None, None)
    return None


def layer_path(node: fx.Node) -> str:
    """The module path of the layer ``node`` belongs to (``""`` when unknown): the report's ``module``."""
    path = module_path(node)
    return "" if path is None else str(path)


def excluded(node: fx.Node, patterns: list[str]) -> str | None:
    path = layer_path(node)
    for p in patterns:
        if fnmatch.fnmatchcase(node.name, p) or (path and fnmatch.fnmatchcase(path, p)):
            return p
    return None
