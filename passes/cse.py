"""Common-subexpression elimination.

Rewrite: a pure call that repeats an earlier one -- same target, same arguments once
earlier duplicates have been replaced -- is replaced by the earlier node, and so is a
``get_attr`` of a target already read::

    %a = f(%x, [1, 2], 0.5);  %b = f(%x, [1, 2], 0.5)   ==>   %a = f(%x, [1, 2], 0.5)   (%b -> %a)
    %w = get_attr fc.weight;  %w_1 = get_attr fc.weight  ==>   %w                       (%w_1 -> %w)

One sweep in topological order merges whole duplicated subtrees (the users of a merged
node then have equal arguments too). Literal arguments compare by type and value
(``1``, ``1.0`` and ``True`` differ: they promote differently), floats by ``repr``
(``-0.0`` differs from ``0.0``; ``nan`` equals ``nan``), nested lists/tuples/dicts
structurally.

Preconditions (else the node is never merged):
- the target is an ATen/custom ``OpOverload`` or a function of the ``operator`` module
  (``getitem``, symbolic-int arithmetic); higher-order ops and opaque Python callables are
  left alone;
- the call is pure: not ``node.is_impure()`` (mutable schema, side effects), not random
  (``nondeterministic_seeded``: ``aten.rand``, ``dropout`` even in eval mode -- the
  canonicalize pass removes those), not an uninitialised allocation (``aten.empty*``);
- no user mutates its result in place (two merged buffers would then alias).
"""

from __future__ import annotations

import logging
import operator
from typing import Any, Callable

import torch
import torch.fx as fx

from optc.passes.base import PassContext, PassResult, register_pass

log = logging.getLogger(__name__)


def is_pure_call(node: fx.Node) -> bool:
    """True if ``node`` is a call_function whose result depends only on its arguments and
    which has no side effects (see the module docstring). Shared with constant folding."""
    if node.op != "call_function":
        return False
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        if torch.Tag.nondeterministic_seeded in t.tags:
            return False
        if t._schema.is_mutable or node.is_impure():
            return False
        base = t._schema.name.split("::")[-1]
        return not (base.startswith("empty") or base.startswith("new_empty"))
    if getattr(t, "__module__", None) in ("_operator", "operator") or t is operator.getitem:
        return not node.is_impure()
    return False


# In-place ops that change only autograd metadata, never data (torch.tensor(...) literals are
# captured as lift_fresh_copy + detach_).
METADATA_ONLY_WRITES = (torch.ops.aten.detach_.default,)


def writes_in_place(node: fx.Node) -> bool:
    """True if ``node`` calls an op that writes into one of its arguments' data."""
    t = node.target
    return (node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable
            and t not in METADATA_ONLY_WRITES)


def mutates(user: fx.Node, node: fx.Node) -> bool:
    """True if call ``user`` writes into ``node``'s data (a mutable schema argument receives it)."""
    if not writes_in_place(user):
        return False
    t = user.target
    for i, a in enumerate(t._schema.arguments):
        if a.alias_info is None or not a.alias_info.is_write:
            continue
        value = user.args[i] if i < len(user.args) else user.kwargs.get(a.name)
        values = value if isinstance(value, (list, tuple)) else (value,)
        if any(v is node for v in values):
            return True
    return False


def arg_key(a: Any, node_key: Callable[[fx.Node], Any] | None = None) -> Any:
    """A hashable key that is equal exactly when two arguments are interchangeable.

    Nodes are keyed by identity, or by ``node_key(node)`` (e.g. a structural key).
    Raises ``TypeError`` for arguments that cannot be compared (tensors, SymInts, objects)."""
    if isinstance(a, fx.Node):
        return ("node", a) if node_key is None else ("node", node_key(a))
    if isinstance(a, float):
        return ("float", repr(a))
    if isinstance(a, (bool, int, str, type(None))):
        return (type(a).__name__, a)
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, tuple(arg_key(x, node_key) for x in a))
    if isinstance(a, dict):
        return ("dict", tuple(sorted((str(k), arg_key(v, node_key)) for k, v in a.items())))
    if isinstance(a, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return (type(a).__name__, str(a))
    if isinstance(a, slice):
        return ("slice", arg_key(a.start), arg_key(a.stop), arg_key(a.step))
    raise TypeError(f"cannot compare an argument of type {type(a).__name__}")


@register_pass("cse", exact=True, description="merge repeated pure computations and repeated get_attr nodes")
def cse(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    seen: dict[Any, fx.Node] = {}
    merged = 0
    for node in list(gm.graph.nodes):
        if node.op == "get_attr":
            key: Any = ("get_attr", node.target)
        elif node.op == "call_function" and is_pure_call(node):
            if any(mutates(u, node) for u in node.users):
                continue
            try:
                key = (node.target, arg_key(node.args), arg_key(dict(node.kwargs)))
            except TypeError as e:   # tensors, SymInts, opaque objects: never merged
                log.debug("cse: %%%s not merged: %s", node.name, e)
                continue
        else:
            continue
        first = seen.get(key)
        if first is None:
            seen[key] = node
            continue
        if any(mutates(u, first) for u in first.users):
            continue
        if not ctx.allow_rewrite("cse", node):
            continue
        log.debug("cse: %%%s -> %%%s", node.name, first.name)
        node.replace_all_uses_with(first)
        gm.graph.erase_node(node)
        merged += 1
    return PassResult(gm, merged > 0, {"merged": merged})
