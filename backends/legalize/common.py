"""What every legalization rule shares: the rule base class and graph-building helpers.

A legalization is a :class:`~optc.ir.rewrite.RewriteRule` that steers a backend's library around
a bug or a gap of that library: it matches the op pattern the library gets wrong and rewrites it
into an equivalent one the library gets right. It never changes what the program computes; none
is a fallback. Each rule's docstring names the bug, the library version it was seen with and
where it was found; docs/fuzzing.md ("Findings") has a pure reproducer for each.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from optc.ir.rewrite import MatchResult, RewriteRule, carry_meta, compute_val

aten = torch.ops.aten

CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
         aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input)


def val(a: Any) -> Any:
    return a.meta.get("val") if isinstance(a, fx.Node) else None


def static_shape(v: Any) -> tuple[int, ...] | None:
    """The shape of fake tensor ``v`` as ints, or None if a dim is symbolic (reading a SymInt's
    value would guard on it and turn the Program's dynamic dim static)."""
    if not isinstance(v, torch.Tensor):
        return None
    dims = []
    for d in v.shape:
        if isinstance(d, torch.SymInt):
            d = d.node.maybe_as_int()
            if d is None:
                return None
        dims.append(int(d))
    return tuple(dims)


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


class GraphFacts:
    """Facts about the whole graph some rules depend on, computed once per pass run."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.has_conv = any(n.op == "call_function" and n.target in CONVS for n in gm.graph.nodes)


class Legalization(RewriteRule):
    """A rule of a backend's legalization pass.

    ``targets``: the ops it looks at (others are not candidates); ``backends``: the backends whose
    ``legalize`` pass runs it. :meth:`check` returns None (not a candidate), ``MatchResult.fail``
    (a candidate refused, with the reason) or a success; :meth:`apply` rewrites. A node a rule
    created is never a candidate of that rule again (the driver runs to a fixed point)."""

    name = "legalization"
    backends: tuple[str, ...] = ()
    targets: tuple = ()

    def __init__(self, facts: GraphFacts):
        self.facts = facts
        self.gm = facts.gm

    def match(self, node: fx.Node, ctx) -> MatchResult | None:
        if node.op != "call_function" or node.target not in self.targets:
            return None
        if node.meta.get("optc_rule") == self.name:
            return None
        return self.check(node)

    def check(self, node: fx.Node) -> MatchResult | None:
        return MatchResult.success()

    def rewrite(self, node: fx.Node, m: MatchResult, ctx) -> None:
        self.apply(node, m)
        self.gm.graph.lint()

    def apply(self, node: fx.Node, m: MatchResult) -> None:
        raise NotImplementedError

    # -- building ------------------------------------------------------------------------------
    def emit(self, before: fx.Node, target, args, kwargs=None) -> fx.Node:
        """A new call node before ``before``, with its source line, module path, shape and the
        rule that made it in ``meta``."""
        graph = self.gm.graph
        with graph.inserting_before(before):
            new = graph.call_function(target, tuple(args), kwargs or {})
        carry_meta(new, before, "legalize")
        new.meta["optc_rule"] = self.name
        try:
            new.meta["val"] = compute_val(new)
        except Exception:  # noqa: BLE001 - metadata only; the backend's export re-derives every shape
            pass
        return new

    def constant(self, before: fx.Node, hint: str, value: torch.Tensor) -> fx.Node:
        """A new attribute holding ``value`` and its get_attr node before ``before``."""
        from optc.ir.rewrite import add_attr
        target = add_attr(self.gm, hint, value)
        with self.gm.graph.inserting_before(before):
            node = self.gm.graph.get_attr(target)
        node.meta["val"] = compute_val(node)
        node.meta["optc_rule"] = self.name
        return node

    def replace(self, node: fx.Node, new: fx.Node) -> None:
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)


def fake_result(target, *args):
    """The fake result of ``target(*args)`` on fake tensors (shape arithmetic for a rewrite)."""
    from torch._guards import detect_fake_mode
    mode = detect_fake_mode([a for a in _flat(args) if isinstance(a, torch.Tensor)])
    with mode:
        return target(*args)


def _flat(x):
    if isinstance(x, (list, tuple)):
        for a in x:
            yield from _flat(a)
    else:
        yield x


__all__ = ["Legalization", "GraphFacts", "CONVS", "val", "static_shape", "arg", "fake_result"]
