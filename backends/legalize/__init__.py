"""Backend legalization: rewrites that steer a backend's library around its bugs and gaps.

Each backend's stage (:meth:`optc.backends.base.Backend.stage`) runs the pass
``legalize{backend=B}``: the rules of ``B`` (``torchscript.py``, ``onnx.py``, ``tvm.py``, and the
shared ones in ``shared.py``), applied by the shared driver :func:`optc.ir.rewrite.apply_rules` to a
fixed point, with the PassManager's instruments: they appear in ``optc dump --backend B
--print-after-all``, in the pipeline report with per-rule statistics and refusal reasons, and in
bisection. Order among the rules is not positional: each rewrites what the library gets wrong into
ops the library gets right, and a rule that produces another rule's pattern (adaptive max pooling
into ``amax``, which TVM lacks too) is met by the driver's next sweep.

The table of every rule with its bug is in docs/backends.md; each rule's docstring names the bug
and the library version, and docs/fuzzing.md has a pure reproducer.
"""

from __future__ import annotations

import torch.fx as fx

from optc.backends.legalize import onnx as _onnx
from optc.backends.legalize import shared as _shared
from optc.backends.legalize import torchscript as _torchscript
from optc.backends.legalize import tvm as _tvm
from optc.backends.legalize.common import GraphFacts, Legalization
from optc.ir.rewrite import apply_rules
from optc.passes.base import Option, PassContext, PassResult, register_pass

ALL_RULES: tuple[type[Legalization], ...] = _torchscript.RULES + _onnx.RULES + _tvm.RULES + _shared.RULES
BACKENDS = ("torchscript", "onnx", "tvm", "openvino")


def rules_for(backend: str) -> tuple[type[Legalization], ...]:
    return tuple(r for r in ALL_RULES if backend in r.backends)


@register_pass("legalize", exact=True,
               description="rewrite what a backend's library gets wrong into what it gets right (its bugs and gaps)",
               options={"backend": Option(BACKENDS, "onnx", "the backend whose rules run")})
def legalize(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    facts = GraphFacts(gm)
    rules = [cls(facts) for cls in rules_for(ctx.options["backend"])]
    n = apply_rules(gm, rules, ctx)
    if n:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(gm, n > 0, dict(ctx.stats))


__all__ = ["ALL_RULES", "rules_for", "legalize", "Legalization"]
