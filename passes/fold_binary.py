"""Fold a multiply, divide, add or subtract by a constant into the preceding conv/linear.

Rewrite, with ``y = layer(x; W, b)`` a convolution (incl. transposed) or ``aten.linear`` and
``c`` a constant that is a scalar or a per-output-channel vector::

    y * c,  c * y   ==>  layer(x; W * c, b * c)
    y / c           ==>  layer(x; W * (1/c), b * (1/c))
    y + a*c, c + y  ==>  layer(x; W, b + a*c)          (a: the op's alpha)
    y - a*c         ==>  layer(x; W, b - a*c)

per output channel (``W``'s out-channel slices as in ``fold-conv-bn``; a bias is added
when the layer has none and the op shifts). The new weight and bias are computed in float64
and rounded once to their dtype. Chains (``(conv(x) * 2 + 1) / 3``) fold one op at a
time, each fold leaving the conv in front of the next op.

Ops: ``aten.mul|div|add|sub .Tensor|.Scalar``; ``aten.rsub`` (``c - y``) is recognised only
to be refused.

Preconditions (else the op stays; the refusal and its reason are recorded):
- the other operand is a constant: a Python number or a ``get_attr`` tensor;
- the constant is finite and broadcasts along the layer's output-channel axis only (every
  other axis of it, right-aligned to the output, has size 1: nothing varies along batch,
  spatial or sequence axes) and the op's result has the layer's shape and dtype (no
  broadcast to a larger shape, no type promotion);
- the layer is the left operand of ``-`` and ``/`` (``c - y`` and ``c / y`` are not folded;
  ``c / y`` is not affine in ``y``), and for ``c + a*y`` the alpha is 1;
- a divisor contains no zero;
- the layer's output has no other user, and its weight and bias are constants no other
  node reads (as in ``fold-conv-bn``).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.fx as fx

from optc.ir.affine_fold import fold_affine
from optc.ir.rewrite import MatchResult, RewriteRule, apply_rules, arg, attr_value, erase_if_unused, is_op
from optc.ir.views import Layer, as_layer, layer_refusal
from optc.passes.base import PassContext, PassResult, register_pass

log = logging.getLogger(__name__)
aten = torch.ops.aten

_SYMBOL = {"mul": "*", "div": "/", "add": "+", "sub": "-"}


def _constant(operand: Any) -> tuple[torch.Tensor | None, str | None]:
    """The constant value of ``operand`` in float64, or why it is not a constant."""
    if isinstance(operand, bool) or not isinstance(operand, (int, float, fx.Node)):
        return None, f"operand {operand!r} is not a number or a tensor constant"
    if not isinstance(operand, fx.Node):
        return torch.tensor(float(operand), dtype=torch.float64), None
    value = attr_value(operand)
    if value is None:
        return None, f"operand %{operand.name} is not a constant"
    if value.is_complex() or value.dtype == torch.bool:
        return None, f"constant %{operand.name} has dtype {value.dtype}"
    return value.detach().to(torch.float64), None


def _per_channel(layer: Layer, c: torch.Tensor, name: str) -> tuple[torch.Tensor | None, str | None]:
    """``c`` as a float64 vector over the layer's output channels, or why it is not one."""
    rank = layer.node.meta["val"].dim()
    ch = layer.channel_axis
    if c.dim() > rank:
        return None, f"constant {name} of rank {c.dim()} broadcasts the rank-{rank} {layer.what} output"
    dims = [1] * (rank - c.dim()) + list(c.shape)
    for axis, size in enumerate(dims):
        if axis != ch and size != 1:
            return None, (f"constant {name} {list(c.shape)} varies along axis {axis} of the {layer.what} "
                          f"output (only the channel axis {ch} may vary)")
    n = layer.out_channels
    if dims[ch] not in (1, n):
        return None, f"constant {name} has {dims[ch]} channels, the {layer.what} {n}"
    return c.reshape(-1).expand(n).clone(), None


class FoldBinary(RewriteRule):
    """Fold ``op`` (mul, div, add or sub) by a constant into the layer before it."""

    def __init__(self, op: str):
        self.name = op
        self.op = op
        packet = getattr(aten, op)
        self.targets = (packet.Tensor, packet.Scalar)
        self.also_rsub = op == "sub"   # only to refuse c - y with a reason

    def match(self, node, ctx):
        if self.also_rsub and is_op(node, aten.rsub):
            layer = as_layer(node.args[0])
            if layer is None:
                return None
            return MatchResult.fail(f"{layer.what} output is the subtrahend (c - y): only y - c is folded")
        if not is_op(node, *self.targets):
            return None
        lhs, rhs = node.args[0], arg(node, 1, "other")
        layer = as_layer(lhs)
        operand, layer_left = rhs, True
        if layer is None:
            layer, operand, layer_left = as_layer(rhs), lhs, False
            if layer is None:
                return None
        sym = _SYMBOL[self.op]
        if not layer_left and self.op in ("sub", "div"):
            return MatchResult.fail(f"{layer.what} output is the right operand (c {sym} y): "
                                    f"only y {sym} c is folded")
        alpha = arg(node, 2, "alpha", 1)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            return MatchResult.fail(f"alpha {alpha!r} is not a finite number")
        if not layer_left and alpha != 1:
            return MatchResult.fail(f"alpha={alpha} scales the {layer.what} output (c + alpha * y)")
        c, why = _constant(operand)
        if why:
            return MatchResult.fail(why)
        yv, ov = layer.node.meta["val"], node.meta.get("val")
        if not isinstance(ov, torch.Tensor) or ov.dtype != yv.dtype \
                or [str(s) for s in ov.shape] != [str(s) for s in yv.shape]:
            return MatchResult.fail(f"the {self.op} changes the {layer.what} output type "
                                    f"({yv.dtype}{list(yv.shape)} -> {getattr(ov, 'dtype', None)}"
                                    f"{list(getattr(ov, 'shape', []))})")
        if not yv.is_floating_point():
            return MatchResult.fail(f"{layer.what} output is not floating point ({yv.dtype})")
        name = f"%{operand.name}" if isinstance(operand, fx.Node) else repr(operand)
        vec, why = _per_channel(layer, c, name)
        if why:
            return MatchResult.fail(why)
        if not bool(torch.isfinite(vec).all()):
            return MatchResult.fail(f"constant {name} is not finite")
        if self.op == "div" and bool((vec == 0).any()):
            return MatchResult.fail(f"division by a constant that contains zero ({name})")
        why = layer_refusal(layer)
        if why:
            return MatchResult.fail(why)
        scale = shift = None
        if self.op == "mul":
            scale = vec
        elif self.op == "div":
            scale = 1.0 / vec
        else:
            shift = vec * float(alpha) * (-1.0 if self.op == "sub" else 1.0)
        return MatchResult.success(layer=layer, operand=operand, scale=scale, shift=shift)

    def rewrite(self, node, m, ctx):
        layer = m["layer"]
        fold_affine(node.graph.owning_module, layer, m["scale"], m["shift"], ctx)
        node.replace_all_uses_with(layer.node)
        node.graph.erase_node(node)
        erase_if_unused(m["operand"])
        log.debug("folded %%%s (%s) into %%%s", node.name, self.op, layer.node.name)


@register_pass("fold-binary", exact=True,
               description="fold mul/div/add/sub by a per-channel constant into the preceding conv or linear")
def fold_binary(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    rules = [FoldBinary(op) for op in ("mul", "div", "add", "sub")]
    for r in rules:
        ctx.stats.setdefault(r.name, 0)
    n = apply_rules(gm, rules, ctx)
    return PassResult(gm, n > 0, {"folded": n, **ctx.stats})
