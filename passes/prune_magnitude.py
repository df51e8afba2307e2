"""Unstructured magnitude pruning of convolution and linear weights.

``prune-magnitude{ratio=0.5,scope=global|layer,exclude=PATTERN}``::

    W' = W * M,   M[i] = 0 for the ``floor(ratio * n)`` entries of smallest |W[i]|, else 1

``scope=layer``: ``n`` and the ranking are per weight tensor (every layer reaches the
ratio); ``scope=global``: over all included weights together (one threshold: small layers
and layers with small weights lose more). Ties are broken by position, so exactly
``floor(ratio * n)`` weights are zeroed. ``exclude`` names layers to leave alone, by their
module path (``layer1.0.conv1``): globs separated by ``|`` or ``re:REGEX``, full match; a
pattern that matches no layer is an error.

Every convolution (any ``groups``, transposed too) and linear layer whose weight is a
floating-point constant is a candidate. The new weight is a new attribute; its mask is kept
in the weight's get_attr ``node.meta["prune_mask"]`` (bool, True = kept) so that
:func:`optc.recover` keeps pruned weights at zero, and masks compose when the pass runs
twice. The shapes do not change: the model gets sparse, not smaller (see
``prune-channels`` for that). Lossy: the manager reports the output error.

Statistics: ``layers``, ``weights``, ``zeroed``, ``sparsity`` (overall, over the included
layers) and ``per_layer`` (layer name -> sparsity reached).
"""

from __future__ import annotations

import logging
import re

import torch
import torch.fx as fx
import torch.nn as nn

from optc.ir.queries import layer_name
from optc.ir.rewrite import add_attr, attr_value, carry_meta, infer_val
from optc.ir.views import as_layer
from optc.passes.base import Option, PassContext, PassResult, register_pass
from optc.passes.options import LayerFilter, RatioOption

log = logging.getLogger(__name__)


class LayerSparsity(dict):
    """layer name -> sparsity; prints as a one-line summary in pass reports."""

    def __str__(self) -> str:
        if not self:
            return "{}"
        lo = min(self, key=self.get)
        hi = max(self, key=self.get)
        return f"{len(self)} layers, min {self[lo]:.3f} ({lo}), max {self[hi]:.3f} ({hi})"

    __repr__ = __str__


def prunable_weights(gm: fx.GraphModule) -> list[tuple[str, fx.Node, fx.Node]]:
    """``(layer name, layer node, weight get_attr node)`` of every candidate, one per weight."""
    out, seen = [], set()
    for node in gm.graph.nodes:
        layer = as_layer(node)
        if layer is None:
            continue
        w = layer.weight
        t = attr_value(w)
        if t is None or not t.is_floating_point() or w.target in seen:
            continue
        seen.add(w.target)
        out.append((layer_name(node), node, w))
    return out


def _smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest entries (ties by position: a stable sort)."""
    return torch.sort(values, stable=True).indices[:k]


@register_pass("prune-magnitude", exact=False, options={
    "ratio": RatioOption(float, 0.5, "fraction of the weights to zero, in [0, 1)"),
    "scope": Option(("global", "layer"), "global", "rank weights over all layers together or per layer"),
    "exclude": Option(str, "", "layers to leave alone: globs separated by | (fc|layer4.*) or re:REGEX"),
}, description="unstructured magnitude pruning: zero the smallest conv/linear weights (globally or per layer)")
def prune_magnitude(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    ratio, scope = ctx.options["ratio"], ctx.options["scope"]
    exclude = LayerFilter(ctx.options.get("exclude", ""))
    candidates = prunable_weights(gm)
    if exclude.alternatives:
        exclude.check(name for name, _, _ in candidates)
    layers = []
    for name, node, w in candidates:
        if exclude.excluded(name):
            ctx.reject("magnitude", node, f"layer '{name}' is excluded by '{exclude.pattern}'")
            continue
        layers.append((name, node, w))
    stats: dict = {"layers": len(layers), "weights": 0, "zeroed": 0, "sparsity": 0.0}
    if not layers:
        stats["nothing-to-prune"] = "no convolution or linear weights" if not candidates else "every layer excluded"
        return PassResult(gm, False, stats)

    weights = [attr_value(w) for _, _, w in layers]
    old_masks = [w.meta.get("prune_mask") for _, _, w in layers]
    # already-pruned entries rank first (magnitude 0): masks compose
    mags = [t.detach().abs().float().flatten() for t in weights]
    masks = [torch.ones(t.numel(), dtype=torch.bool) for t in weights]
    if scope == "layer":
        for mag, mask in zip(mags, masks):
            mask[_smallest(mag, int(ratio * mag.numel()))] = False
    else:
        flat = torch.cat(mags)
        drop = _smallest(flat, int(ratio * flat.numel()))
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        keep[drop] = False
        masks = list(torch.split(keep, [m.numel() for m in mags]))

    per_layer = LayerSparsity()
    modified = False
    for (name, node, w), t, mask, old in zip(layers, weights, masks, old_masks):
        mask = mask.reshape(t.shape).to(t.device)
        if old is not None:
            mask = mask & old.to(t.device)
        zeroed = int((~mask).sum())
        key = name if name not in per_layer else f"{name}#{node.name}"
        per_layer[key] = zeroed / t.numel()
        stats["weights"] += t.numel()
        stats["zeroed"] += zeroed
        if not bool(((~mask) & (t != 0)).any()):     # nothing new to zero: the graph stays
            if zeroed:
                w.meta["prune_mask"] = mask
            continue
        value = torch.where(mask, t.detach(), torch.zeros((), dtype=t.dtype, device=t.device))
        hint = re.sub(r"_sparse(_\d+)?$", "", str(w.target).replace(".", "_")) + "_sparse"
        target = add_attr(gm, hint, value, parameter=isinstance(t, nn.Parameter))
        with gm.graph.inserting_before(w):
            new = gm.graph.get_attr(target)
        carry_meta(new, w, ctx.pass_name)
        new.meta["prune_mask"] = mask
        infer_val(new)
        for same in [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == w.target]:
            same.replace_all_uses_with(new)
            gm.graph.erase_node(same)
        modified = True
    stats["sparsity"] = stats["zeroed"] / stats["weights"] if stats["weights"] else 0.0
    stats["per_layer"] = per_layer
    log.debug("prune-magnitude: %s", per_layer)
    return PassResult(gm, modified, stats)
