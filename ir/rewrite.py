"""Helpers for passes that rewrite a Program's graph.

- shape metadata for new nodes (:func:`infer_val`, :func:`fake_mode_of`),
- attributes (:func:`add_attr`, :func:`attr_node`, :func:`attr_value`),
- carrying ``node.meta`` (source line, module path, provenance) to replacement nodes,
- rewrite rules as values (:class:`RewriteRule`, :class:`MatchResult`) and one bounded
  driver (:func:`apply_rules`) that records why each refused match was refused.

Matching never mutates the graph; only ``RewriteRule.rewrite`` does.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode

from optc.ir.program import get_attr

if TYPE_CHECKING:
    from optc.passes.base import PassContext

log = logging.getLogger(__name__)

CARRIED_META = ("stack_trace", "nn_module_stack", "optc_source", "source_fn_stack", "from_node", "optc_origin")


# ---- shapes ---------------------------------------------------------------------------
def fake_mode_of(gm: fx.GraphModule) -> FakeTensorMode:
    """The FakeTensorMode of ``gm``'s metadata (cached on the GraphModule: one graph, one mode)."""
    mode = getattr(gm, "_optc_fake_mode", None)
    if mode is not None:
        return mode
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr", "call_function"):
            v = n.meta.get("val")
            if isinstance(v, torch.Tensor):
                mode = detect_fake_mode([v])
                if mode is not None:
                    break
    if mode is None:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
    gm._optc_fake_mode = mode
    return mode


def _fake_arg(a, mode: FakeTensorMode, gm: fx.GraphModule | None):
    if isinstance(a, fx.Node):
        if "val" not in a.meta:
            if a.op == "get_attr" and gm is not None:
                a.meta["val"] = mode.from_tensor(get_attr(gm, a.target), static_shapes=True)
            else:
                raise ValueError(f"input %{a.name} has no meta['val']")
        return a.meta["val"]
    if isinstance(a, (list, tuple)):
        return type(a)(_fake_arg(x, mode, gm) for x in a)
    if isinstance(a, dict):
        return {k: _fake_arg(v, mode, gm) for k, v in a.items()}
    return a


def compute_val(node: fx.Node, mode: FakeTensorMode | None = None) -> Any:
    """Run ``node``'s op on its inputs' fake values; returns the fake result (not stored)."""
    gm = node.graph.owning_module
    mode = mode or fake_mode_of(gm)
    if node.op == "get_attr":
        return mode.from_tensor(get_attr(gm, node.target), static_shapes=True)
    if node.op != "call_function":
        raise ValueError(f"cannot compute a value for a {node.op} node")
    args = _fake_arg(node.args, mode, gm)
    kwargs = _fake_arg(dict(node.kwargs), mode, gm)
    with mode:
        return node.target(*args, **kwargs)


def infer_val(node: fx.Node, mode: FakeTensorMode | None = None) -> Any:
    """Compute and store ``node.meta['val']``."""
    node.meta["val"] = compute_val(node, mode)
    return node.meta["val"]


def carry_meta(new: fx.Node, like: fx.Node | None, pass_name: str | None = None) -> None:
    """Copy source line and module path from ``like``; record which pass created ``new``."""
    if like is not None:
        for key in CARRIED_META:
            if key in like.meta and key not in new.meta:
                new.meta[key] = like.meta[key]
    if pass_name:
        new.meta["optc_pass"] = pass_name


def call(graph: fx.Graph, target: Callable, args: tuple, kwargs: dict | None = None, *,
         like: fx.Node | None = None, pass_name: str | None = None, name: str | None = None) -> fx.Node:
    """Insert a call_function node (at the graph's current insert point) with full metadata."""
    # the name must be given at creation: fx's namespace caches a node's first name
    node = graph.create_node("call_function", target, args, kwargs or {}, name=name)
    carry_meta(node, like, pass_name)
    infer_val(node)
    return node


# ---- attributes ---------------------------------------------------------------------------
_ATTR_SANITIZE = re.compile(r"[^0-9a-zA-Z_]")


def add_attr(gm: fx.GraphModule, name_hint: str, value: torch.Tensor, *, parameter: bool = False) -> str:
    """Register ``value`` on ``gm`` under a fresh top-level name derived from ``name_hint``."""
    base = _ATTR_SANITIZE.sub("_", name_hint) or "_const"
    if base[0].isdigit():
        base = "_" + base
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    if parameter:
        gm.register_parameter(name, nn.Parameter(value.detach(), requires_grad=False))
    else:
        gm.register_buffer(name, value.detach())
    return name


def attr_node(gm: fx.GraphModule, target: str, *, like: fx.Node | None = None, pass_name: str | None = None) -> fx.Node:
    """Insert a get_attr node for an existing attribute (at the current insert point)."""
    node = gm.graph.get_attr(target)
    carry_meta(node, like, pass_name)
    node.meta.pop("stack_trace", None)
    node.meta.pop("optc_source", None)
    infer_val(node)
    return node


def new_constant(gm: fx.GraphModule, name_hint: str, value: torch.Tensor, *, parameter: bool = False,
                 pass_name: str | None = None) -> fx.Node:
    """``add_attr`` + a get_attr node for it, placed before the first non-placeholder node."""
    target = add_attr(gm, name_hint, value, parameter=parameter)
    first = next((n for n in gm.graph.nodes if n.op != "placeholder"), None)
    with gm.graph.inserting_before(first):
        return attr_node(gm, target, pass_name=pass_name)


def attr_value(node: fx.Node) -> torch.Tensor | None:
    """The tensor behind a get_attr node, or None if ``node`` is not a get_attr."""
    if isinstance(node, fx.Node) and node.op == "get_attr":
        obj = get_attr(node.graph.owning_module, node.target)
        return obj if isinstance(obj, torch.Tensor) else None
    return None


def remove_unused_attrs(gm: fx.GraphModule) -> int:
    """Delete attributes no get_attr node refers to any more; returns how many."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    removed = 0
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in used:
            mod_path, _, leaf = name.rpartition(".")
            mod = gm.get_submodule(mod_path) if mod_path else gm
            if leaf in mod._parameters:
                del mod._parameters[leaf]
            elif leaf in mod._buffers:
                del mod._buffers[leaf]
            removed += 1
    return removed


# ---- matching -------------------------------------------------------------------------------
def is_op(node: Any, *targets) -> bool:
    """True if ``node`` is a call_function to one of ``targets`` (OpOverload or packet)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    t = node.target
    for want in targets:
        if t is want:
            return True
        if isinstance(want, torch._ops.OpOverloadPacket) and isinstance(t, torch._ops.OpOverload) \
                and t.overloadpacket is want:
            return True
    return False


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` / keyword ``name`` of a call node, else ``default``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


@dataclass(frozen=True)
class MatchResult:
    """A match (``ok``) with captured values, or a refusal with the reason."""

    ok: bool
    reason: str = ""
    values: dict = field(default_factory=dict)

    @staticmethod
    def fail(reason: str) -> "MatchResult":
        return MatchResult(False, reason)

    @staticmethod
    def success(**values) -> "MatchResult":
        return MatchResult(True, "", values)

    def __bool__(self) -> bool:
        return self.ok

    def __getitem__(self, key):
        return self.values[key]


class RewriteRule:
    """A rewrite as a value: ``match`` (pure) then ``rewrite`` (mutates).

    ``match`` returns ``None`` when the node is not even a candidate (wrong op: no log line),
    ``MatchResult.fail(reason)`` when a candidate was refused (logged at debug level and kept
    in the pass statistics), or ``MatchResult.success(...)``.
    """

    name: str = "rule"

    def match(self, node: fx.Node, ctx: "PassContext") -> MatchResult | None:
        raise NotImplementedError

    def rewrite(self, node: fx.Node, m: MatchResult, ctx: "PassContext") -> None:
        raise NotImplementedError


def apply_rules(gm: fx.GraphModule, rules: Iterable[RewriteRule], ctx: "PassContext", *,
                max_iterations: int = 10) -> int:
    """Apply ``rules`` over the graph until nothing matches (at most ``max_iterations`` sweeps).

    Returns the number of rewrites. Each rewrite first asks ``ctx.allow_rewrite()`` (the
    bisection counter). Refusals are reported through ``ctx.reject``.
    """
    rules = list(rules)
    total = 0
    for _ in range(max_iterations):
        changed = 0
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node._erased:
                continue
            for rule in rules:
                m = rule.match(node, ctx)
                if m is None:
                    continue
                if not m.ok:
                    ctx.reject(rule.name, node, m.reason)
                    continue
                if not ctx.allow_rewrite(rule.name, node):
                    continue
                ctx.current_node = node.name
                rule.rewrite(node, m, ctx)
                ctx.current_node = None
                ctx.stats[rule.name] = ctx.stats.get(rule.name, 0) + 1
                changed += 1
                break
        total += changed
        if not changed:
            break
    return total


def erase_if_unused(*nodes: fx.Node) -> None:
    for n in nodes:
        if isinstance(n, fx.Node) and not n._erased and not n.users and n.op != "placeholder":
            n.graph.erase_node(n)
