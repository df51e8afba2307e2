"""Dead-code elimination.

Rewrite: erase every node whose value no one uses, in reverse topological order, so chains
of dead nodes go in one sweep::

    %a = f(%x);  %b = g(%a)   (b unused)   ==>   (both erased)

Preconditions: none. Kept: placeholders (the signature), the output, and impure nodes
(``node.is_impure()``: in-place ops, random ops, asserts). Attributes no get_attr refers
to any more are dropped by the PassManager.
"""

from __future__ import annotations

import torch.fx as fx

from optc.passes.base import PassContext, PassResult, register_pass


@register_pass("dce", exact=True, description="remove nodes whose results are unused")
def dce(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("placeholder", "output") or node.users:
            continue
        if node.op == "call_function" and node.is_impure():
            continue
        gm.graph.erase_node(node)
        removed += 1
    return PassResult(gm, removed > 0, {"removed": removed})
