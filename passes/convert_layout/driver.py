"""convert-layout's driver: one forward sweep over the graph in topological order.

Every node is claimed by the first rule of :data:`RULES` whose ``match`` takes it as a candidate;
a refusal, or no rule at all, is a *stop*: the node gets its inputs in their logical layout
(:func:`_fallback`). Layout-sensitive ops are converted only where :func:`_sensitive_candidates`
found them convertible and the bisection counter allows it.

Why not :func:`optc.ir.rewrite.apply_rules`, the shared driver of the other passes: it cannot run
these rules without changing what the pass computes.

- A rule here needs the layout of every input, produced by the same sweep: the rewriter's ``env``
  must hold an entry for *every* node, placeholders, constants and nodes no rule claims included,
  and nodes no rule claims must be rewritten too (their inputs permuted back, :func:`_fallback`).
  ``apply_rules`` only visits nodes with a successful match and leaves the others alone.
- ``apply_rules`` repeats sweeps to a fixed point (up to 10); here a second sweep would see nodes
  already in the target layout as new candidates and permute them again: one sweep is the
  algorithm, not a bound.
- On a refusal ``apply_rules`` goes on to the next rule; here the first rule that takes a node
  decides (a refused layout-sensitive op must stay in its layout, not fall through to a
  pointwise rule), and ``AbsorbPermute`` rewrites no node at all (the value's layout changes).
- Rules match on the rewriter's state (``match(node, rw)``), not on the pass context, and a rule
  may stop while building (:class:`~optc.passes.convert_layout.rewriter.Stop`), after its input
  permutes were made: the driver records the refusal and falls back.

Refusals and the rewrite counter go through the same ``PassContext`` as in ``apply_rules``
(``ctx.reject``, ``ctx.allow_rewrite``), so bisection and refusal reports see this pass alike.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

from optc.ir.queries import constant_nodes
from optc.ir.rewrite import MatchResult, infer_val, is_op
from optc.passes.base import PassContext, PassResult
from optc.passes.convert_layout.axis_rules import (AssertMetadata, Axis, Concat, GetItem, GlobalPool, Pad, Reduce,
                                                   Reshape, Select, Split, SymSize)
from optc.passes.convert_layout.families import FAMILIES
from optc.passes.convert_layout.perm import Perm, identity, inverse, is_identity
from optc.passes.convert_layout.rewriter import PASS, LayoutRule, Rewriter, Stop
from optc.passes.convert_layout.rules import AbsorbPermute, BatchNorm, Pointwise, Sensitive

log = logging.getLogger(__package__)     # "optc.passes.convert_layout", the pass's logger
aten = torch.ops.aten

#: the rules, in the order they are tried: the first whose ``match`` is not None claims the node
RULES: tuple[LayoutRule, ...] = (*(Sensitive(f) for f in FAMILIES), GlobalPool(), AbsorbPermute(), Pointwise(),
                                 Axis(), Concat(), Split(), GetItem(), Reduce(), Select(), SymSize(),
                                 AssertMetadata(), BatchNorm(), Pad(), Reshape())
SENSITIVE_RULES = tuple(r for r in RULES if isinstance(r, Sensitive))
#: the rules that can compute a constant subgraph in another layout (the rewriter re-emits with them)
SAME_RANK_RULES = tuple(r for r in RULES if r.same_rank)


def run(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """The pass: see :mod:`optc.passes.convert_layout`."""
    rw = Rewriter(gm, ctx, ctx.options["layout"], SAME_RANK_RULES)
    rw.const = set(constant_nodes(gm, _constant_op))
    todo = _sensitive_candidates(gm, rw)
    if not todo:
        log.debug("%s: no layout-sensitive op to convert to %s", PASS, rw.layout)
        return PassResult(gm, False, {"converted": 0})
    convert = {n for n, _ in todo}
    for node in list(gm.graph.nodes):
        rw.cursor = node
        if node.op in ("placeholder", "get_attr") or node in rw.const:
            rw.env[node] = (node, _logical_outputs(node, rw))
            continue
        if node.op == "output":
            _fallback(node, rw)
            continue
        done = False
        claimed = _claim(node, RULES, rw)
        if claimed is not None:
            rule, m = claimed
            if not m.ok:
                ctx.reject(rule.name, node, m.reason)
            elif isinstance(rule, AbsorbPermute):
                _absorb(node, m["q"], rw)
                done = True
            elif isinstance(rule, Sensitive) and (node not in convert or not ctx.allow_rewrite(rule.name, node)):
                pass                               # stays in its layout: logical inputs
            else:
                ctx.current_node = node.name
                done = _apply(node, rule, m, rw)
                ctx.current_node = None
                if done and isinstance(rule, Sensitive):
                    rw.stats["converted"] += 1
                    rw.stats[rule.name] = rw.stats.get(rule.name, 0) + 1
        if not done:
            _fallback(node, rw)
    _erase_dead(rw)
    gm.graph.lint()
    rw.stats["permutes"] = sum(1 for n in gm.graph.nodes if is_op(n, aten.permute.default, aten.transpose.int))
    stats = {k: v for k, v in rw.stats.items() if v or k in ("converted", "permutes")}
    return PassResult(gm, rw.stats["converted"] > 0, stats)


def _constant_op(n: fx.Node) -> bool:
    """A call that belongs to a constant subgraph (weights and what is computed from them): one with
    inputs, no side effects, not random."""
    return not n.is_impure() and bool(n.all_input_nodes) and not (
        isinstance(n.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in n.target.tags)


def _claim(node: fx.Node, rules: tuple[LayoutRule, ...], rw: Rewriter) -> tuple[LayoutRule, MatchResult] | None:
    """The first rule that takes ``node`` as a candidate (its ``match`` is not None), with its match."""
    for rule in rules:
        m = rule.match(node, rw)
        if m is not None:
            return rule, m
    return None


def _sensitive_candidates(gm: fx.GraphModule, rw: Rewriter) -> list[tuple[fx.Node, LayoutRule]]:
    """Layout-sensitive nodes not in the target layout that can be converted (refusals recorded)."""
    out = []
    for node in gm.graph.nodes:
        claimed = _claim(node, SENSITIVE_RULES, rw)
        if claimed is None:
            continue
        rule, m = claimed
        if not m.ok:
            rw.ctx.reject(rule.name, node, m.reason)
        elif m["src"] != rw.layout:
            out.append((node, rule))
    return out


def _logical_outputs(node: fx.Node, rw: Rewriter) -> Any:
    val = rw.logical.get(node)
    if isinstance(val, torch.Tensor):
        return identity(val.dim())
    if isinstance(val, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in val):
        return [identity(v.dim()) for v in val]
    return None


def _fallback(node: fx.Node, rw: Rewriter) -> None:
    """An op without a layout rule (or one that refused): its inputs in their logical layout."""
    stopped = any(rw.moving(a) for a in node.all_input_nodes)
    args, kwargs = rw.plain(node.args), rw.plain(dict(node.kwargs))
    if stopped and node.op == "call_function":
        rw.ctx.reject("propagate", node, f"{_target_name(node.target)} has no layout rule: its inputs are "
                      "permuted back to the logical layout")
    # a permute back is a view with other strides: graph outputs and ops that read strides get a
    # contiguous copy where the original value was contiguous (an Identity in ONNX and TVM)
    if node.op == "output":
        args = (type(args[0])(_contiguous_like(a, o, rw) for a, o in zip(args[0], node.args[0])),)
    elif is_op(node, *_READS_STRIDES):
        args = tuple(_contiguous_like(a, o, rw) for a, o in zip(args, node.args))
    changed = args != node.args or kwargs != node.kwargs
    if changed:
        rw.dead.extend(node.all_input_nodes)
        node.args, node.kwargs = args, kwargs
    if node.op == "call_function" and (changed or any(a in rw.strided for a in node.all_input_nodes)):
        # an eager kernel keeps its input's memory format: an op fed a permuted-back view (or a value
        # computed from one) may return permuted strides, on which a ``view`` fails ("view size is not
        # compatible with input tensor's size and stride"; found by optc fuzz on a BatchNorm and a
        # ``concat`` left in NCHW between NHWC convolutions): such views become reshapes
        rw.strided.add(node)
        if is_op(node, aten.view.default, aten._unsafe_view.default):
            node.target = aten.reshape.default
    rw.env[node] = (node, _logical_outputs(node, rw))


_READS_STRIDES = (aten.as_strided.default, aten.sym_stride.int, aten.sym_storage_offset.default)


def _contiguous_like(new, orig, rw: Rewriter):
    if not (isinstance(new, fx.Node) and isinstance(orig, fx.Node)) or new is orig:
        return new
    want, got = rw.logical.get(orig), new.meta.get("val")
    if isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor) and want.is_contiguous() \
            and not got.is_contiguous():
        key = (orig, "contiguous")
        if key not in rw.cache:
            rw.cache[key] = rw._call(aten.clone.default, (new,), orig, "clone",
                                     kwargs={"memory_format": torch.contiguous_format})
        return rw.cache[key]
    return new


def _apply(node: fx.Node, rule: LayoutRule, m: MatchResult, rw: Rewriter) -> bool:
    """Rewrite ``node`` in place with ``rule``; False (nothing changed) if the rule stopped."""
    try:
        built = rule.build(node, m, rw)
    except Stop as e:      # permutes it made for its inputs stay (valid, cached) or are erased unused
        rw.ctx.reject(rule.name, node, str(e))
        return False
    rw.dead.extend(node.all_input_nodes)
    changed_target = built.target is not node.target
    node.target, node.args, node.kwargs = built.target, built.args, built.kwargs
    if changed_target:
        node.meta["optc_pass"] = PASS
    rw._check(node, node, built.out)
    rw.env[node] = (node, built.out)
    return True


def _absorb(node: fx.Node, q: Perm, rw: Rewriter) -> None:
    """``node = permute(x, q)`` with ``x`` permuted: the result is ``x``'s physical value in layout
    ``q^-1 . P``; ``node`` itself is kept (re-pointed) as the logical value in case a user needs it."""
    x, p = rw.env[node.args[0]]
    out = tuple(inverse(q)[d] for d in p)
    rw.env[node] = (x, out)
    rw.stats["absorbed"] += 1
    rw.dead.append(node)
    if is_identity(out):
        return
    # the logical value, should something need it: the node itself, reading the physical input
    r = tuple(inverse(p)[d] for d in q)
    node.target, node.args, node.kwargs = aten.permute.default, (x, list(r)), {}
    infer_val(node)
    rw.cache[(node, identity(len(p)))] = node


def _erase_dead(rw: Rewriter) -> None:
    """Remove what the rewrite left unused: absorbed permutes, replaced weights, inputs it no longer
    reads, permutes made for a rule that then stopped. Nodes that were dead before stay."""
    candidates = set(rw.dead) | set(rw.created)
    changed = True
    while changed:
        changed = False
        for n in reversed(list(rw.graph.nodes)):
            if n not in candidates or n.users or n.op not in ("get_attr", "call_function"):
                continue
            if n.op == "call_function" and n.is_impure():
                continue
            candidates.update(n.all_input_nodes)
            candidates.discard(n)
            rw.graph.erase_node(n)
            changed = True


def _target_name(t) -> str:
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}" + ("" if t._overloadname == "default" else f".{t._overloadname}")
    return getattr(t, "__name__", str(t))
