"""Structured pruning: physically remove output channels / hidden units / attention heads.

``prune-channels{ratio,criterion,round_to,exclude,norm_stats}`` and ``prune-heads{ratio,criterion}``.

For every channel group found by :mod:`optc.ir.channel_deps` (a producer's output
channels and everything tied to them), keep the ``ceil((1 - ratio) * C)`` most important
channels, rounded *up* to a multiple of ``round_to`` (and of the head size for attention
groups: heads go whole), never fewer than that multiple; then rewrite::

    W_producer'  = W_producer.index_select(out_dim, kept)     (and its bias)
    W_consumer'  = W_consumer.index_select(in_dim, kept_positions)
    BN/LN params, depthwise weights, constant operands   indexed the same way
    view/reshape/expand sizes, split sizes, slice bounds, depthwise groups   recomputed

and re-infer ``meta["val"]`` for the whole graph. New weights are new attributes; the old
ones are dropped by the manager. Input and output shapes never change (groups reaching
the output are refused by the analysis).

Importance of a channel (``criterion``): ``l1``/``l2`` -- the sum over the group's weight
members (producers' output slices, consumers' input slices, depthwise filters) of the
slice norms, each member normalised by its mean so that no layer dominates; ``bn-scale``
-- the sum of ``|gamma|`` of the group's BatchNorms (network slimming), ``l1`` for groups
without BatchNorm. Groups with slices (split/slice/cat cuts) are pruned per segment, so
that no slice is emptied.

Exactness of the surgery: the pruned program computes what the original computes with the
consumers' weights for the removed channels zeroed (:func:`zero_removed_channels`), up to
float rounding. The pass is lossy as a whole (the removed channels did contribute); the
manager reports the error. ``prune-heads`` prunes only attention-head groups (a
``view(B, L, H, D)`` split of q/k/v), by whole heads.

The plan (kept channels per group, keyed by the group's first producer node) is stored in
``program.meta["prune_plan"]``.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from optc.ir.channel_deps import ChannelGraph, ParamUse, ShapeUse, analyze, get_arg, set_arg
from optc.ir.program import Program, attr_tensors
from optc.ir.rewrite import add_attr, attr_node, attr_value, call, carry_meta, fake_mode_of, infer_val
from optc.passes.base import Option, PassContext, PassResult, register_pass
from optc.passes.options import LayerFilter, PositiveIntOption, RatioOption

log = logging.getLogger(__name__)
aten = torch.ops.aten

CRITERIA = ("l1", "l2", "bn-scale")


@dataclass
class PrunePlan:
    """Kept channels (sorted) per pruned group, keyed by the group's leader (first producer)."""

    keep: dict[str, tuple[int, ...]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)

    def kept_by_root(self, cg: ChannelGraph) -> dict[int, list[int]]:
        out = {}
        for g in cg.groups:
            if g.leader in self.keep:
                if self.sizes.get(g.leader) != g.size:
                    raise ValueError(f"prune plan does not fit this graph: group %{g.leader} has {g.size} channels, "
                                     f"the plan {self.sizes.get(g.leader)}")
                out[g.root] = list(self.keep[g.leader])
        missing = set(self.keep) - {g.leader for g in cg.groups}
        if missing:
            raise ValueError(f"prune plan names groups this graph does not have: {', '.join(sorted(missing))}")
        return out

    @property
    def removed(self) -> int:
        return sum(self.sizes[k] - len(v) for k, v in self.keep.items())


# ---- importance -------------------------------------------------------------------------------
_WEIGHT_ROLES = ("producer", "consumer", "depthwise")


def _slice_norms(t: torch.Tensor, dim: int, criterion: str) -> torch.Tensor:
    t = t.detach()
    other = [d for d in range(t.dim()) if d != dim]
    v = t.abs() if criterion == "l1" else t.float().pow(2)
    v = v.sum(other) if other else v
    return (v if criterion == "l1" else v.sqrt()).double()


def channel_importance(cg: ChannelGraph, criterion: str) -> tuple[dict[int, torch.Tensor], set[int]]:
    """Per-channel importance of every root space; and the roots that fell back to ``l1``."""
    scores = {g.root: torch.zeros(g.size, dtype=torch.float64) for g in cg.groups}
    has_bn: set[int] = set()

    def add(pu: ParamUse, v: torch.Tensor) -> None:
        mean = float(v.mean()) if v.numel() else 0.0
        if mean > 0:
            v = v / mean
        for r, pos, chans, share in cg.position_map(pu.layout):
            scores[r].index_add_(0, chans, v[pos] * share)

    if criterion == "bn-scale":
        for pu in cg.params:
            if pu.role == "bn" and pu.key in (1, "weight"):
                add(pu, attr_value(get_arg(pu.node, pu.key)).detach().double().abs())
                has_bn.update(r for r, *_ in cg.position_map(pu.layout))
    fallback = {r for r in scores if r not in has_bn} if criterion == "bn-scale" else set()
    for pu in cg.params:
        if pu.role not in _WEIGHT_ROLES:
            continue
        roots = {cg.find(p.space) for p in pu.layout.pieces if p.space is not None}
        if criterion == "bn-scale" and not (roots & fallback):
            continue
        add(pu, _slice_norms(attr_value(get_arg(pu.node, pu.key)), pu.dim, "l1" if criterion == "bn-scale"
                             else criterion))
    return scores, fallback


# ---- planning ---------------------------------------------------------------------------------
def _keep_count(n: int, ratio: float, unit: int) -> int:
    if n <= unit:
        return n
    k = math.ceil((1.0 - ratio) * n / unit - 1e-9) * unit
    return min(n, max(unit, k))


def make_plan(cg: ChannelGraph, *, ratio: float, criterion: str = "l1", round_to: int = 1,
              exclude: LayerFilter | None = None, heads_only: bool = False, norm_stats: bool = False,
              ctx: PassContext | None = None) -> tuple[PrunePlan, dict]:
    """Choose the kept channels of every prunable group; returns the plan and statistics."""
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion '{criterion}' (valid: {', '.join(CRITERIA)})")
    plan = PrunePlan()
    stats = {"groups": 0, "refused": 0, "pruned": 0, "channels_before": 0, "channels_after": 0}
    scores, fallback = channel_importance(cg, criterion)

    def refuse(g, why):
        stats["refused"] += 1
        if ctx is not None:
            ctx.reject("group", g.producers[0], why)
        else:
            log.debug("group %%%s not pruned: %s", g.leader, why)

    for g in cg.groups:
        if heads_only and not g.heads:
            continue
        stats["groups"] += 1
        stats["channels_before"] += g.size
        stats["channels_after"] += g.size
        if not g.prunable:
            refuse(g, g.reasons[0])
            continue
        if g.inexact and not norm_stats:
            refuse(g, g.inexact[0] + " (norm_stats=true allows it)")
            continue
        if exclude is not None:
            hit = next((name for name in g.layers if exclude.excluded(name)), None)
            if hit is not None:
                refuse(g, f"layer '{hit}' is excluded by '{exclude.pattern}'")
                continue
        if ratio == 0:
            continue
        unit = g.block * round_to // math.gcd(g.block, round_to)
        bounds = [0, *g.cuts, g.size]
        keep: list[int] = []
        s = scores[g.root]
        for a, b in zip(bounds, bounds[1:]):
            n = b - a
            k = _keep_count(n, ratio, unit if n % g.block == 0 else g.block)
            blocks = s[a:b].reshape(-1, g.block).sum(1)
            order = sorted(range(len(blocks)), key=lambda i: (-float(blocks[i]), i))[: k // g.block]
            keep.extend(a + i * g.block + j for i in sorted(order) for j in range(g.block))
        if len(keep) == g.size:
            continue
        plan.keep[g.leader] = tuple(keep)
        plan.sizes[g.leader] = g.size
        stats["pruned"] += 1
        stats["channels_after"] -= g.size - len(keep)
    if criterion == "bn-scale":
        stats["bn-scale-fallback-l1"] = sum(1 for g in cg.groups if g.root in fallback and g.prunable)
    return plan, stats


# ---- surgery -----------------------------------------------------------------------------------
_PRUNED_SUFFIX = re.compile(r"_(pruned|zeroed)(_\d+)?$")


def _replace_param(gm: fx.GraphModule, pu: ParamUse, value: torch.Tensor, old: torch.Tensor, suffix: str,
                   pass_name: str | None, mask: torch.Tensor | None = None) -> None:
    cur = get_arg(pu.node, pu.key)
    last_use = all(u is pu.node for u in cur.users) and \
        not any(n is not cur and n.op == "get_attr" and n.target == cur.target for n in gm.graph.nodes)
    if last_use and _PRUNED_SUFFIX.search(cur.target) and "." not in cur.target:
        delattr(gm, cur.target)   # an intermediate of this rewrite (a weight pruned on its out- then in-dim)
    hint = _PRUNED_SUFFIX.sub("", str(cur.target).replace(".", "_")) + suffix
    target = add_attr(gm, hint, value, parameter=isinstance(old, nn.Parameter))
    with gm.graph.inserting_before(cur):
        new = gm.graph.get_attr(target)
    carry_meta(new, cur, pass_name)
    if mask is not None:
        new.meta["prune_mask"] = mask
    infer_val(new, fake_mode_of(gm))
    set_arg(pu.node, pu.key, new)
    if not cur.users:
        gm.graph.erase_node(cur)


def _index(idx: list[int], device) -> torch.Tensor:
    return torch.tensor(idx, dtype=torch.long, device=device)


def apply_plan(gm: fx.GraphModule, plan: PrunePlan, *, pass_name: str | None = "prune-channels",
               cg: ChannelGraph | None = None) -> int:
    """Remove the channels ``plan`` does not keep; returns the number of members rewritten."""
    cg = cg or analyze(gm, log_refusals=False)
    kept = plan.kept_by_root(cg)
    if not kept:
        return 0
    touched = 0
    for pu in cg.params:
        idx = cg.kept_positions(pu.layout, kept)
        if idx is None:
            continue
        cur = get_arg(pu.node, pu.key)
        t = attr_value(cur)
        sel = _index(idx, t.device)
        mask = cur.meta.get("prune_mask")
        if mask is not None:
            mask = mask.index_select(pu.dim, sel.to(mask.device))
        _replace_param(gm, pu, t.detach().index_select(pu.dim, sel), t, "_pruned", pass_name, mask)
        touched += 1
    for su in cg.shapes:
        touched += _apply_shape(su, cg, kept, gm, pass_name)
    mode = fake_mode_of(gm)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        try:
            infer_val(node, mode)
        except (RuntimeError, ValueError):
            # a view torch.export recorded because the tensor it reads was laid out for it -- HF's
            # sdpa attention: ``attn.transpose(1, 2).reshape(...)`` over an SDPA output whose
            # memory layout depends on its head count -- may not be a view any more: a reshape
            # computes the same values either way
            if node.target not in (aten.view.default, aten._unsafe_view.default):
                raise
            node.target = aten.reshape.default
            infer_val(node, mode)
    return touched


def _apply_shape(su: ShapeUse, cg: ChannelGraph, kept: dict[int, list[int]], gm: fx.GraphModule,
                 pass_name: str | None) -> int:
    idx = cg.kept_positions(su.layout, kept)
    if idx is None:
        return 0
    node = su.node
    if su.kind == "select":
        src = get_arg(node, su.key)
        target = add_attr(gm, f"{src.name}_kept", _index(idx, src.meta["val"].device))
        with gm.graph.inserting_before(node):
            index = attr_node(gm, target, like=node, pass_name=pass_name)
            sel = call(gm.graph, aten.index_select.default, (src, su.index, index), like=node, pass_name=pass_name)
        set_arg(node, su.key, sel)
        return 1
    if su.kind == "sizes":
        sizes = list(node.args[su.key])
        if sizes[su.index] == -1:
            return 0
        sizes[su.index] = len(idx)
        set_arg(node, su.key, sizes)
    elif su.kind == "groups":
        set_arg(node, su.key, len(idx))
    elif su.kind == "normalized_shape":
        set_arg(node, su.key, [len(idx)])
    elif su.kind == "split":
        sizes = [sum(1 for i in idx if a <= i < b) for a, b in su.ranges]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        node.target = aten.split_with_sizes.default
        node.args, node.kwargs = (node.args[0], sizes, dim), {}
    elif su.kind == "index":
        # a constant list of consecutive positions: those kept of it, renumbered
        start, end = _kept_bounds(idx, *su.ranges[0])
        indices = list(node.args[1])
        src = indices[su.index]
        target = add_attr(gm, f"{src.name}_pruned", torch.arange(start, end, dtype=src.meta["val"].dtype))
        with gm.graph.inserting_before(node):
            indices[su.index] = attr_node(gm, target, like=node, pass_name=pass_name)
        node.args = (node.args[0], indices, *node.args[2:])
    elif su.kind == "slice":
        start, end = _kept_bounds(idx, *su.ranges[0])
        if node.target is aten.narrow.default:
            node.args = (node.args[0], node.args[1], start, end - start)
        else:
            step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
            node.args, node.kwargs = (node.args[0], node.args[1], start, end, step), {}
    else:
        raise ValueError(f"unknown shape member kind {su.kind}")
    return 1


def _kept_bounds(idx: list[int], a: int, b: int) -> tuple[int, int]:
    """The positions ``[a, b)`` of the old channels, renumbered over the kept ones ``idx``."""
    return sum(1 for i in idx if i < a), sum(1 for i in idx if i < b)


def zero_removed_channels(program: Program, plan: PrunePlan) -> Program:
    """The *original* program with every consumer's weights for the removed channels zeroed.

    The pruned program must equal this one up to float rounding: the exact statement of the
    surgery (every removed channel reaches the outputs only through consumers).
    """
    new = program.clone()
    gm = new.graph_module
    cg = analyze(gm, log_refusals=False)
    kept = plan.kept_by_root(cg)
    for pu in cg.params:
        if pu.role != "consumer":
            continue
        idx = cg.kept_positions(pu.layout, kept)
        if idx is None:
            continue
        t = attr_value(get_arg(pu.node, pu.key))
        keep = torch.zeros(t.shape[pu.dim], dtype=torch.bool, device=t.device)
        keep[_index(idx, t.device)] = True
        shape = [1] * t.dim()
        shape[pu.dim] = -1
        zeroed = torch.where(keep.reshape(shape), t.detach(), torch.zeros((), dtype=t.dtype, device=t.device))
        _replace_param(gm, pu, zeroed, t, "_zeroed", None)
    gm.recompile()
    return new


# ---- the passes -------------------------------------------------------------------------------
def _count(gm: fx.GraphModule) -> int:
    return sum(t.numel() for t in attr_tensors(gm).values())


def _prune(gm: fx.GraphModule, ctx: PassContext, *, heads_only: bool) -> PassResult:
    opts = ctx.options
    cg = analyze(gm)
    exclude = LayerFilter(opts.get("exclude", ""))
    if exclude.alternatives:
        exclude.check(cg.spaces[s].name for s in cg.producers.values())   # graph order
    plan, stats = make_plan(cg, ratio=opts["ratio"], criterion=opts["criterion"], round_to=opts.get("round_to", 1),
                            exclude=exclude, heads_only=heads_only, norm_stats=opts.get("norm_stats", False),
                            ctx=ctx)
    if not cg.groups:
        stats["nothing-to-prune"] = "no convolution or linear layer"
    elif heads_only and not stats["groups"]:
        stats["nothing-to-prune"] = "no attention heads"
    elif not plan.keep and stats["refused"] == stats["groups"]:
        stats["nothing-to-prune"] = f"all {stats['groups']} channel groups refused (see rejections)"
    if not plan.keep:
        return PassResult(gm, False, stats)
    before = _count(gm)
    apply_plan(gm, plan, pass_name=ctx.pass_name, cg=cg)
    after = sum(attr_value(n).numel() for n in gm.graph.nodes if n.op == "get_attr" and attr_value(n) is not None
                and n.users)
    stats["params_before"], stats["params_after"] = before, after
    if ctx.program is not None:
        ctx.program.meta["prune_plan"] = plan
    log.debug("%s: pruned %d groups, %d -> %d channels", ctx.pass_name, stats["pruned"], stats["channels_before"],
              stats["channels_after"])
    return PassResult(gm, True, stats)


_COMMON = {
    "ratio": RatioOption(float, 0.5, "fraction of each group's channels to remove, in [0, 1)"),
    "criterion": Option(CRITERIA, "l1", "channel importance: l1/l2 weight norms over the group, or bn-scale (|gamma|)"),
}


@register_pass("prune-channels", exact=False, options={
    **_COMMON,
    "round_to": PositiveIntOption(int, 1, "kept channel counts are rounded up to a multiple of this"),
    "exclude": Option(str, "", "layers to leave alone: globs separated by | (fc|layer4.*) or re:REGEX"),
    "norm_stats": Option(bool, False, "also prune channels a LayerNorm normalises over (changes its statistics)"),
}, description="structured pruning: remove conv output channels, linear hidden units and attention heads, with "
               "everything tied to them")
def prune_channels(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    return _prune(gm, ctx, heads_only=False)


@register_pass("prune-heads", exact=False, options=dict(_COMMON),
               description="structured pruning of whole attention heads (q/k/v out-features, the output "
                           "projection's in-features)")
def prune_heads(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    return _prune(gm, ctx, heads_only=True)
