"""Folding a per-channel affine map into the convolution or linear layer before it.

``layer(x) * scale + shift`` per output channel is the layer with new constants::

    W'[c] = W[c] * scale[c]            (W[c]: the weight slice producing output channel c)
    b'[c] = b[c] * scale[c] + shift[c]

computed in float64 from the original tensors and rounded once to their dtype
(:func:`fold_affine`). A BatchNorm in eval mode is such a map (:func:`bn_scale_shift`);
:class:`FoldLayerBN` is the rule that folds one into the layer before it (``fold-conv-bn``,
``fold-linear-bn``); ``fold-binary`` folds constant multiplies and adds with :func:`fold_affine`.
The new weight and bias are new attributes; tensors are never modified in place.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

from optc.ir.rewrite import MatchResult, RewriteRule, add_attr, attr_value, carry_meta, erase_if_unused, infer_val
from optc.ir.views import BatchNorm, Layer, as_batch_norm, as_layer, bn_layer_refusal, bn_refusal, layer_refusal

if TYPE_CHECKING:
    from optc.passes.base import PassContext

log = logging.getLogger(__name__)


# ---- the affine map into the layer's constants ----------------------------------------------
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
                ctx: "PassContext") -> None:
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


# ---- batch norm as the affine map ------------------------------------------------------------
def bn_scale_shift(bn: BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, beta - mean * s)`` in float64, ``s = gamma / sqrt(var + eps)``."""
    mean, var = attr_value(bn.mean).double(), attr_value(bn.var).double()
    gamma = attr_value(bn.weight).double() if bn.weight is not None else torch.ones_like(mean)
    beta = attr_value(bn.bias).double() if bn.bias is not None else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def remove_bn(bn: BatchNorm, replacement: fx.Node) -> None:
    """Route ``bn``'s normalised output to ``replacement`` and erase the BatchNorm."""
    bn.output.replace_all_uses_with(replacement)
    graph = bn.node.graph
    for u in list(bn.node.users):
        graph.erase_node(u)          # getitems, all unused now
    graph.erase_node(bn.node)
    erase_if_unused(bn.weight, bn.bias, bn.mean, bn.var)


class FoldLayerBN(RewriteRule):
    """``batch_norm(layer(x, W, b)) ==> layer(x, W', b')`` for a layer of one of ``kinds``
    (``Layer.kind``): the BatchNorm's ``s = gamma / sqrt(var + eps)`` and ``beta - mean * s``
    folded by :func:`fold_affine`, the BatchNorm removed."""

    def __init__(self, name: str, kinds: tuple[str, ...]):
        self.name = name
        self.kinds = kinds

    def match(self, node: fx.Node, ctx: "PassContext") -> MatchResult | None:
        bn = as_batch_norm(node)
        if bn is None:
            return None
        layer = as_layer(bn.input)
        if layer is None or layer.kind not in self.kinds:
            return None
        why = bn_refusal(bn) or bn_layer_refusal(bn, layer) or layer_refusal(layer)
        if why:
            return MatchResult.fail(why)
        return MatchResult.success(bn=bn, layer=layer)

    def rewrite(self, node: fx.Node, m: MatchResult, ctx: "PassContext") -> None:
        bn, layer = m["bn"], m["layer"]
        scale, shift = bn_scale_shift(bn)
        fold_affine(node.graph.owning_module, layer, scale, shift, ctx)
        remove_bn(bn, layer.node)
        log.debug("folded %%%s into %%%s", node.name, layer.node.name)
