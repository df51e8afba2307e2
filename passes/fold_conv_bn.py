"""Fold eval-mode BatchNorm into the preceding convolution.

Rewrite, per output channel ``c`` with ``s = gamma / sqrt(var + eps)``::

    %y = conv(%x, W, b, ...)
    %z = batch_norm(%y, gamma, beta, mean, var, training=False, momentum, eps)
        ==>   %z = conv(%x, W', b', ...)

    W'[c] = W[c] * s[c]
    b'[c] = (b[c] - mean[c]) * s[c] + beta[c]

since ``bn(y) = (y - mean) * s + beta`` is affine per channel and a convolution is linear in
``W`` and ``b``. ``W[c]`` is the weight slice that produces output channel ``c``: dim 0 of
``W`` for a convolution (``(out, in/groups, k...)``); for a transposed convolution, whose
weight is ``(in, out/groups, k...)``, channel ``c = g * out/groups + j`` is slice ``j`` of
dim 1 within the rows ``[g*in/groups, (g+1)*in/groups)`` of group ``g``. ``b = 0`` for a
convolution without bias (one is added); ``gamma = 1``, ``beta = 0`` for ``affine=False``.
``W'`` and ``b'`` are computed in float64 from the original tensors and rounded once to
their dtype, so the result differs from conv-then-bn by rounding only.

Ops: ``aten.conv1d|conv2d|conv3d``, ``aten.conv_transpose1d|2d|3d``,
``aten.convolution`` / ``aten._convolution`` (with their ``transposed`` flag), followed by
``aten.batch_norm``, ``aten._native_batch_norm_legit_no_training`` (and its ``getitem 0``),
or ``aten._native_batch_norm_legit`` / ``aten.native_batch_norm`` with ``training=False``.

Preconditions (else the BatchNorm stays; the refusal and its reason are recorded):
- the BatchNorm is in eval mode and has running statistics;
- its running statistics and affine parameters are constants (``get_attr``);
- the convolution's output has no user besides the BatchNorm;
- the convolution's weight and bias are constants and no other node reads them (shared
  weights would need a copy per user: refused rather than silently duplicated);
- the BatchNorm normalises the convolution's channel axis (dim 1: a batched input).

The new weight and bias are new attributes (tensors are never modified in place); the old
ones are dropped when nothing else uses them.

The helpers here (:func:`as_layer`, :func:`layer_refusal`, :func:`fold_affine`,
:func:`as_batch_norm`, ...) are shared with ``fold-linear-bn`` and ``fold-binary``.
"""

from __future__ import annotations

import logging
import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

from optc.ir.rewrite import (MatchResult, RewriteRule, add_attr, apply_rules, arg, attr_value, carry_meta,
                             erase_if_unused, infer_val, is_op)
from optc.passes.base import PassContext, PassResult, register_pass

log = logging.getLogger(__name__)
aten = torch.ops.aten

_CONVS = (aten.conv1d, aten.conv2d, aten.conv3d)
_CONV_TRANSPOSES = (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
_CONVOLUTIONS = (aten.convolution.default, aten._convolution.default)   # transposed flag at 6, groups at 8


# ---- layers: convolution or linear ------------------------------------------------------
@dataclass(frozen=True)
class Layer:
    """A convolution or linear node seen as ``y = W (*) x + b`` per output channel."""

    node: fx.Node
    kind: str              # "conv", "conv_transpose" or "linear"
    weight: Any            # the weight argument (a get_attr node when foldable)
    bias: Any              # the bias argument: a node or None
    groups: int

    @property
    def what(self) -> str:
        """The name used in refusal messages."""
        return "linear" if self.kind == "linear" else "conv"

    @property
    def channel_axis(self) -> int:
        """The axis of the output that holds the output channels."""
        rank = self.node.meta["val"].dim()
        if self.kind == "linear":
            return rank - 1
        spatial = self.weight.meta["val"].dim() - 2
        return rank - spatial - 1     # 1 for a batched input, 0 for an unbatched one

    @property
    def out_channels(self) -> int:
        w = self.weight.meta["val"]
        return int(w.shape[1]) * self.groups if self.kind == "conv_transpose" else int(w.shape[0])


def as_layer(node: Any) -> Layer | None:
    """``node`` as a :class:`Layer` if it is a convolution or ``aten.linear`` call."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    weight, bias = arg(node, 1, "weight"), arg(node, 2, "bias")
    if not isinstance(weight, fx.Node) or not isinstance(weight.meta.get("val"), torch.Tensor):
        return None
    if is_op(node, aten.linear):
        return Layer(node, "linear", weight, bias, 1)
    if is_op(node, *_CONVS):
        return Layer(node, "conv", weight, bias, 1)
    if is_op(node, *_CONV_TRANSPOSES):
        groups = arg(node, 6, "groups", 1)
        return Layer(node, "conv_transpose", weight, bias, groups) if isinstance(groups, int) else None
    if is_op(node, *_CONVOLUTIONS):
        transposed, groups = arg(node, 6, "transposed"), arg(node, 8, "groups")
        if not isinstance(transposed, bool) or not isinstance(groups, int):
            return None
        return Layer(node, "conv_transpose" if transposed else "conv", weight, bias, groups)
    return None


def _shared(node: fx.Node, user: fx.Node) -> bool:
    """Whether the constant ``node`` is read by anything besides ``user``."""
    if any(u is not user for u in node.users):
        return True
    return any(n is not node and n.op == "get_attr" and n.target == node.target for n in node.graph.nodes)


def layer_refusal(layer: Layer) -> str | None:
    """Why ``layer``'s weight and bias cannot absorb a per-channel affine map, or None."""
    users = len(layer.node.users)
    if users != 1:
        return f"{layer.what} output has {users} users"
    w = attr_value(layer.weight)
    if w is None:
        return f"{layer.what} weight %{layer.weight.name} is not a constant"
    if not w.is_floating_point():
        return f"{layer.what} weight is not floating point ({w.dtype})"
    if layer.bias is not None and attr_value(layer.bias) is None:
        return f"{layer.what} bias %{getattr(layer.bias, 'name', layer.bias)} is not a constant"
    if _shared(layer.weight, layer.node):
        return f"{layer.what} weight is shared with another node"
    if layer.bias is not None and _shared(layer.bias, layer.node):
        return f"{layer.what} bias is shared with another node"
    return None


def _scale_weight(layer: Layer, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``w`` with each output channel's slice multiplied by ``scale[c]`` (all float64)."""
    if layer.kind != "conv_transpose":
        return w * scale.reshape(-1, *[1] * (w.dim() - 1))
    g = layer.groups
    cin, opg, k = w.shape[0], w.shape[1], tuple(w.shape[2:])
    grouped = w.reshape(g, cin // g, opg, *k) * scale.reshape(g, 1, opg, *[1] * len(k))
    return grouped.reshape(w.shape)


_FOLDED_SUFFIX = re.compile(r"_folded(_\d+)?$")


def _folded_name(node: fx.Node) -> str:
    return _FOLDED_SUFFIX.sub("", str(node.target).replace(".", "_")) + "_folded"


def _bias_name(weight: fx.Node) -> str:
    """``conv.weight`` -> ``conv_bias_folded``: the name of a bias added to a layer without one."""
    base = _FOLDED_SUFFIX.sub("", str(weight.target).replace(".", "_"))
    base = base[: -len("weight")] + "bias" if base.endswith("weight") else base + "_bias"
    return base + "_folded"


def _new_attr(gm: fx.GraphModule, hint: str, value: torch.Tensor, like: torch.Tensor, mode_from: fx.Node, *,
              before: fx.Node | None = None, after: fx.Node | None = None, pass_name: str) -> fx.Node:
    """A get_attr for a new attribute ``value`` (a Parameter if ``like`` is one), placed
    before ``before`` or after ``after``."""
    target = add_attr(gm, hint, value, parameter=isinstance(like, nn.Parameter))
    where = gm.graph.inserting_before(before) if before is not None else gm.graph.inserting_after(after)
    with where:
        node = gm.graph.get_attr(target)
    carry_meta(node, None, pass_name)
    # the fake mode of a neighbouring value: fake_mode_of(gm) scans the whole graph per call
    mode = getattr(mode_from.meta.get("val"), "fake_mode", None)
    infer_val(node, mode if isinstance(mode, FakeTensorMode) else None)
    return node


def _set_bias(node: fx.Node, bias: fx.Node) -> None:
    if len(node.args) > 2:
        node.update_arg(2, bias)
    elif "bias" in node.kwargs:
        node.update_kwarg("bias", bias)
    else:
        node.args = (*node.args, bias)


def fold_affine(gm: fx.GraphModule, layer: Layer, scale: torch.Tensor | None, shift: torch.Tensor | None,
                ctx: PassContext) -> None:
    """Make ``layer`` compute ``layer(x) * scale + shift`` per output channel.

    ``scale`` and ``shift`` are float64 vectors of ``layer.out_channels`` (None: 1 and 0).
    New weight/bias attributes are computed in float64 and rounded once to the originals'
    dtype; a bias is added when the layer has none and ``shift`` is given.
    """
    w_old = attr_value(layer.weight)
    b_old = attr_value(layer.bias) if layer.bias is not None else None
    w_node = layer.weight
    if scale is not None:
        w_new = _scale_weight(layer, w_old.detach().to(torch.float64), scale.to(w_old.device))
        w_node = _new_attr(gm, _folded_name(layer.weight), w_new.to(w_old.dtype), w_old, layer.weight,
                           before=layer.weight, pass_name=ctx.pass_name)
        if len(layer.node.args) > 1:
            layer.node.update_arg(1, w_node)
        else:
            layer.node.update_kwarg("weight", w_node)
    if b_old is not None or shift is not None:
        b = (b_old.detach().to(torch.float64) if b_old is not None
             else torch.zeros(layer.out_channels, dtype=torch.float64, device=w_old.device))
        if scale is not None:
            b = b * scale.to(b.device)
        if shift is not None:
            b = b + shift.to(b.device)
        dtype = b_old.dtype if b_old is not None else w_old.dtype
        hint = _folded_name(layer.bias) if b_old is not None else _bias_name(layer.weight)
        place = {"before": layer.bias} if b_old is not None else {"after": w_node}
        b_node = _new_attr(gm, hint, b.to(dtype), b_old if b_old is not None else w_old, layer.weight,
                           pass_name=ctx.pass_name, **place)
        _set_bias(layer.node, b_node)
    erase_if_unused(layer.weight, layer.bias)   # the manager drops their attributes


# ---- batch norm ---------------------------------------------------------------------------
# op -> (index of `training` or a constant, index of eps, has running-stat arguments, returns a tuple)
_BN_OPS = {
    aten.batch_norm.default: (5, 7, True, False),
    aten._native_batch_norm_legit_no_training.default: (False, 6, True, True),
    aten._native_batch_norm_legit.default: (5, 7, True, True),
    aten.native_batch_norm.default: (5, 7, True, True),
    aten._native_batch_norm_legit.no_stats: (3, 5, False, True),
    aten._native_batch_norm_legit_functional.default: (5, 7, True, True),
}


@dataclass(frozen=True)
class BatchNorm:
    """A BatchNorm call: ``input`` normalised over dim 1 with the given parameters."""

    node: fx.Node
    input: Any
    weight: Any            # gamma: node or None
    bias: Any              # beta: node or None
    mean: Any
    var: Any
    eps: Any
    training: Any
    output: fx.Node | None  # the node holding the normalised value (the call, or its getitem 0)
    tuple_refusal: str | None


def as_batch_norm(node: Any) -> BatchNorm | None:
    """``node`` as a :class:`BatchNorm` if it is one of the BatchNorm ops (see docstring)."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _BN_OPS:
        return None
    train_i, eps_i, has_stats, returns_tuple = _BN_OPS[node.target]
    training = train_i if isinstance(train_i, bool) else arg(node, train_i, "training")
    mean = arg(node, 3, "running_mean") if has_stats else None
    var = arg(node, 4, "running_var") if has_stats else None
    output, why = node, None
    if returns_tuple:
        output = None
        for u in node.users:
            if u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int):
                if u.args[1] == 0:
                    output = u
                elif u.users:
                    why = f"bn's saved statistics (output {u.args[1]}) are used by %{next(iter(u.users)).name}"
            else:
                why = f"bn's result tuple is used directly by %{u.name}"
    return BatchNorm(node, node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias"), mean, var,
                     arg(node, eps_i, "eps"), training, output, why)


def bn_refusal(bn: BatchNorm) -> str | None:
    """Why ``bn`` is not an affine map with constant per-channel coefficients, or None."""
    if bn.training is not False:
        return "bn is in training mode" if bn.training is True else f"bn training flag is not constant ({bn.training!r})"
    if bn.mean is None or bn.var is None:
        return "bn has no running statistics"
    for what, n in (("running_mean", bn.mean), ("running_var", bn.var)):
        if attr_value(n) is None:
            return f"bn {what} is not a constant"
    for what, n in (("weight", bn.weight), ("bias", bn.bias)):
        if n is not None and attr_value(n) is None:
            return f"bn {what} is not a constant"
    if not isinstance(bn.eps, (int, float)):
        return f"bn eps is not a constant ({bn.eps!r})"
    if bn.tuple_refusal:
        return bn.tuple_refusal
    if bn.output is None:
        return "bn's normalised output is unused"
    if not bool((attr_value(bn.var).double() + bn.eps > 0).all()):
        return "bn running_var + eps is not positive"
    return None


def bn_scale_shift(bn: BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, beta - mean * s)`` in float64, ``s = gamma / sqrt(var + eps)``."""
    mean, var = attr_value(bn.mean).double(), attr_value(bn.var).double()
    gamma = attr_value(bn.weight).double() if bn.weight is not None else torch.ones_like(mean)
    beta = attr_value(bn.bias).double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def bn_layer_refusal(bn: BatchNorm, layer: Layer) -> str | None:
    """Why ``bn`` does not normalise ``layer``'s output channels, or None."""
    ch = layer.channel_axis
    if ch != 1:
        return f"bn normalises dim 1 of the {layer.what} output, but its channels are dim {ch}"
    n = int(attr_value(bn.mean).numel())
    if n != layer.out_channels:
        return f"bn has {n} channels, the {layer.what} {layer.out_channels}"
    return None


def remove_bn(bn: BatchNorm, replacement: fx.Node) -> None:
    """Route ``bn``'s normalised output to ``replacement`` and erase the BatchNorm."""
    bn.output.replace_all_uses_with(replacement)
    graph = bn.node.graph
    for u in list(bn.node.users):
        graph.erase_node(u)          # getitems, all unused now
    graph.erase_node(bn.node)
    erase_if_unused(bn.weight, bn.bias, bn.mean, bn.var)


def match_layer_bn(node: fx.Node, kinds: tuple[str, ...]) -> MatchResult | None:
    """The common match of ``fold-conv-bn`` and ``fold-linear-bn``: a BatchNorm whose input
    is a layer of one of ``kinds``."""
    bn = as_batch_norm(node)
    if bn is None:
        return None
    layer = as_layer(bn.input)
    if layer is None or layer.kind not in kinds:
        return None
    why = bn_refusal(bn) or bn_layer_refusal(bn, layer) or layer_refusal(layer)
    if why:
        return MatchResult.fail(why)
    return MatchResult.success(bn=bn, layer=layer)


def rewrite_layer_bn(node: fx.Node, m: MatchResult, ctx: PassContext) -> None:
    bn, layer = m["bn"], m["layer"]
    scale, shift = bn_scale_shift(bn)
    fold_affine(node.graph.owning_module, layer, scale, shift, ctx)
    remove_bn(bn, layer.node)
    log.debug("folded %%%s into %%%s", node.name, layer.node.name)


# ---- the pass -------------------------------------------------------------------------------
class ConvBN(RewriteRule):
    """``batch_norm(conv(x, W, b)) ==> conv(x, W', b')`` (see the module docstring)."""

    name = "conv-bn"

    def match(self, node, ctx):
        return match_layer_bn(node, ("conv", "conv_transpose"))

    def rewrite(self, node, m, ctx):
        rewrite_layer_bn(node, m, ctx)


@register_pass("fold-conv-bn", exact=True,
               description="fold eval-mode BatchNorm into the preceding convolution's weight and bias")
def fold_conv_bn(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    n = apply_rules(gm, [ConvBN()], ctx)
    return PassResult(gm, n > 0, {"folded": n})
