"""Merge linears that read the same input into one linear and a split.

Rewrite (``W_i: [n_i, K]`` constant weights, ``b_i`` constant biases)::

    %y1 = aten.linear(%x, %W1, %b1)
    %y2 = aten.linear(%x, %W2, %b2)           ...
  ==>
    %w  = get_attr cat([W1, W2, ...], 0)      a new attribute, concatenated once
    %b  = get_attr cat([b1, b2, ...], 0)      zeros stand in for a missing bias
    %y  = aten.linear(%x, %w, %b)
    %s  = aten.split_with_sizes(%y, [n1, n2, ...], -1)
    %y1 = getitem(%s, 0);  %y2 = getitem(%s, 1)  ...

The merged linear goes where the first linear of the group was, so every user still comes
after its value. Q/K/V projections and gate/up projections are the usual groups.

Preconditions (refusals reported with the reason): at least ``min_group`` linears read
``%x`` as their input; each weight is a constant 2-D attribute and each bias a constant or
absent; weights and biases share one dtype and device. Linears are grouped by dtype and
device. The results become views of the merged output (strided along the last dim): a
user that needs a contiguous layout (``aten.view`` that would merge the last dim with
another, ``as_strided``) keeps its linear out of the group. Adding a zero bias is exact.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx
import torch.nn as nn

from optc.ir.queries import val
from optc.ir.rewrite import (MatchResult, RewriteRule, apply_rules, arg, attr_value, call, erase_if_unused,
                             fake_mode_of, is_op, new_constant)
from optc.memory import release_mapped
from optc.passes.base import Option, PassContext, PassResult, register_pass

log = logging.getLogger(__name__)
aten = torch.ops.aten

_VIEWS = (aten.view.default, aten._unsafe_view.default)
_LAYOUT_BOUND = (aten.as_strided.default, aten.as_strided_.default, aten.as_strided_scatter.default)


def _is_param(node: fx.Node) -> bool:
    gm = node.graph.owning_module
    obj = gm
    for atom in node.target.split("."):
        obj = getattr(obj, atom)
    return isinstance(obj, nn.Parameter)


class MergeParallelLinear(RewriteRule):
    name = "merge-parallel-linear"

    def __init__(self, min_group: int):
        self.min_group = max(2, min_group)

    def match(self, node: fx.Node, ctx: PassContext) -> MatchResult | None:
        linears = [u for u in node.users if is_op(u, aten.linear.default) and u.args[0] is node]
        if len(linears) < 2:
            return None                                 # nothing to merge with: not a candidate
        order = {n: i for i, n in enumerate(node.graph.nodes)}
        linears.sort(key=order.__getitem__)
        groups: dict[tuple, list[fx.Node]] = {}
        reasons = []
        for lin in linears:
            why = self._refusal(lin)
            if why:
                reasons.append(f"%{lin.name}: {why}")
                continue
            w = attr_value(lin.args[1])
            groups.setdefault((w.dtype, w.device), []).append(lin)
        mergeable = [g for g in groups.values() if len(g) >= self.min_group]
        if not mergeable:
            sizes = sorted((len(g) for g in groups.values()), reverse=True)
            if sizes and sizes[0] >= 2:
                reasons.append(f"{sizes[0]} compatible linears read %{node.name}, "
                               f"fewer than min_group={self.min_group}")
            elif not reasons:
                reasons.append(f"no two linears reading %{node.name} share a dtype and device")
            return MatchResult.fail("; ".join(reasons))
        return MatchResult.success(groups=mergeable)

    def _refusal(self, lin: fx.Node) -> str | None:
        w, b = lin.args[1], arg(lin, 2, "bias")
        wt = attr_value(w)
        if wt is None:
            return f"weight %{getattr(w, 'name', w)} is not a constant"
        if wt.dim() != 2:
            return f"weight is {wt.dim()}-D"
        if b is not None:
            bt = attr_value(b)
            if bt is None:
                return f"bias %{getattr(b, 'name', b)} is not a constant"
            if bt.dtype != wt.dtype or bt.device != wt.device or list(bt.shape) != [wt.shape[0]]:
                return f"bias {bt.dtype}{list(bt.shape)} does not match weight {wt.dtype}{list(wt.shape)}"
        ov = val(lin)
        if ov is None:
            return "missing shape metadata"
        return self._layout_refusal(lin, ov)

    @staticmethod
    def _layout_refusal(lin: fx.Node, ov: torch.Tensor) -> str | None:
        """Why the result may not become a view strided along the last dim (a split part)."""
        for u in lin.users:
            if is_op(u, *_LAYOUT_BOUND):
                return f"%{u.name} depends on the memory layout"
            if not is_op(u, *_VIEWS) or u.args[0] is not lin:
                continue
            uv = val(u)
            if uv is not None and [str(d) for d in uv.shape[:ov.dim() - 1]] == [str(d) for d in ov.shape[:-1]]:
                continue              # splits the last dim only (heads): always a valid view
            mode = fake_mode_of(lin.graph.owning_module)
            shape = list(ov.shape)
            with mode:
                wide = torch.empty(shape[:-1] + [shape[-1] + 1], dtype=ov.dtype, device=ov.device)
                part = wide.narrow(-1, 0, shape[-1])
                try:
                    u.target(part, *u.args[1:], **u.kwargs)
                except Exception:       # fake tensors raise RuntimeError or ValueError for bad views
                    return f"%{u.name} views it as {list(u.args[1])}, which a split part does not allow"
        return None

    def rewrite(self, node: fx.Node, m: MatchResult, ctx: PassContext) -> None:
        gm = node.graph.owning_module
        for group in m["groups"]:
            ws = [attr_value(lin.args[1]) for lin in group]
            bias_nodes = [arg(lin, 2, "bias") for lin in group]
            b_node = None     # (made before the weight: new_constant puts each new one first)
            if any(b is not None for b in bias_nodes):
                bs = [attr_value(b) if b is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
                      for b, w in zip(bias_nodes, ws)]
                first = next(b for b in bias_nodes if b is not None)
                b_node = new_constant(gm, f"{first.target}_merged", torch.cat(bs, 0),
                                      parameter=_is_param(first), pass_name=ctx.pass_name)
            w_node = new_constant(gm, f"{group[0].args[1].target}_merged", torch.cat(ws, 0),
                                  parameter=_is_param(group[0].args[1]), pass_name=ctx.pass_name)
            sizes = [int(w.shape[0]) for w in ws]
            kw = dict(like=group[0], pass_name=ctx.pass_name)
            g = node.graph
            with g.inserting_before(group[0]):
                merged = call(g, aten.linear.default, (node, w_node, b_node), name="linear", **kw)
                split = call(g, aten.split_with_sizes.default, (merged, sizes, -1), name="split", **kw)
                parts = [call(g, operator.getitem, (split, i), like=lin, pass_name=ctx.pass_name, name="getitem")
                         for i, lin in enumerate(group)]
            for lin, part in zip(group, parts):
                lin.replace_all_uses_with(part)
                erase_if_unused(lin, lin.args[1], arg(lin, 2, "bias"))
            # weights memory-mapped from a file (optc.compile(weights=...)): the parts were just read
            # to concatenate them, and the pages stay resident unless handed back (a no-op otherwise)
            release_mapped(ws)
            log.debug("merge-parallel-linear: %s -> %%%s", [n.name for n in group], merged.name)
            ctx.bump("merged_groups")
            ctx.bump("merged_linears", len(group))


@register_pass("merge-parallel-linear", exact=True,
               description="merge linears that read the same input (q/k/v, gate/up) into one linear and a split",
               options={"min_group": Option(int, 2, "merge groups of at least this many linears")},
               after=("prune-channels", "prune-heads"))
def merge_parallel_linear(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    ctx.stats.update(merged_groups=0, merged_linears=0)
    n = apply_rules(gm, [MergeParallelLinear(ctx.options["min_group"])], ctx)
    return PassResult(gm, n > 0, {"merged_groups": ctx.stats["merged_groups"],
                                  "merged_linears": ctx.stats["merged_linears"]})
