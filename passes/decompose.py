"""Decompose ops a backend cannot lower into ATen ops it can (``ir/decompositions.py``).

Rewrite, per node whose op has an entry in the decomposition table::

    %y = transformers.grouped_mm_fallback(%x, %w, %offs)
      ==>  %rows = aten.arange(S) ... %y = aten.sum.dim_IntList(aten.where(..., aten.matmul(...)), [0])

``backend=NAME`` decomposes only the ops that backend lacks (the entry's ``needed_by``);
``backend=all`` (default) every op in the table. A node the entry refuses (``check``) is kept,
with the reason in the refusals (the backend then names it in its ``LoweringError``). Exact: each
decomposition computes the op's semantics (up to float rounding of the reordered matmuls).
"""

from __future__ import annotations

import torch.fx as fx

from optc.ir.decompositions import decomposition_for, inline
from optc.passes.base import Option, PassContext, PassResult, register_pass


@register_pass("decompose", exact=True,
               description="write ops a backend lacks (transformers' grouped_mm_fallback, histc) with ATen ops",
               options={"backend": Option(str, "all", "decompose for this backend only (torchscript, onnx, tvm, openvino), or all")})
def decompose(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    backend = ctx.options.get("backend", "all")
    n = 0
    for node in list(gm.graph.nodes):
        d = decomposition_for(node)
        if d is None or (backend != "all" and backend not in d.needed_by):
            continue
        reason = d.check(node)
        if reason is not None:
            ctx.reject(d.qualname, node, reason)
            continue
        if not ctx.allow_rewrite(d.qualname, node):
            continue
        ctx.current_node = node.name
        inline(node, d, ctx.pass_name)
        ctx.current_node = None
        ctx.bump(d.qualname)
        n += 1
    if n:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, n > 0, dict(ctx.stats))
