"""Purity and mutation queries on call nodes, and keys that say when two arguments are interchangeable.

What ``cse`` and ``constant-fold`` need to decide that a call may be merged with another or evaluated
ahead of time (and ``canonicalize`` to leave in-place writes alone):

- :func:`is_pure_call`: the result depends only on the arguments, and the call has no side effects;
- :func:`writes_in_place` / :func:`mutates`: a call writes into (one of) its arguments' data;
- :func:`arg_key`: a hashable key, equal exactly when two arguments are interchangeable.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx


def is_pure_call(node: fx.Node) -> bool:
    """True if ``node`` is a call_function whose result depends only on its arguments and
    which has no side effects: an ATen/custom ``OpOverload`` or an ``operator`` function (higher-order
    ops and opaque Python callables are not), not ``node.is_impure()`` (mutable schema, side effects), not
    random (``nondeterministic_seeded``), not an uninitialised allocation (``aten.empty*``)."""
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
