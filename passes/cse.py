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
from typing import Any

import torch.fx as fx

from optc.ir.effects import arg_key, is_pure_call, mutates
from optc.passes.base import PassContext, PassResult, register_pass

log = logging.getLogger(__name__)


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
