"""The backend stage: every rewrite a backend needs before its library sees the program.

After the target pipeline, :func:`~optc.backends.base.lower` runs the backend's stage -- a pipeline
of passes the backend declares (:meth:`~optc.backends.base.Backend.stage`) -- through the same
PassManager and instruments as the pipeline, on a copy of the Program. What runs there:

===========================  ================================================================
pass                         what it does
===========================  ================================================================
``decompose{backend=B}``     ops ``B`` cannot lower at all (transformers' grouped_mm_fallback,
                             histc, stable sort) written as ATen ops (``ir/decompositions.py``)
``convert-layout{...}``      TorchScript: an NHWC program back to logical NCHW ...
``channels-last``            ... with channels-last tensors (``torchscript_layout.py``)
``lower-optc-ops``           ``optc::`` ops the backend has no native translation for, replaced
                             by their ATen decomposition (the op's own definition)
``half-in-float32``          TVM: half conv / linear / matmul computed in float32 between casts
``bfloat16-as-rounded-float32``  ONNX: bfloat16 values held as rounded float32
``legalize{backend=B}``      the library's bugs and gaps (``backends/legalize/``)
``ort-contrib-ops``          ONNX on CPU: fused ops as ONNX Runtime's ``com.microsoft`` kernels
                             where they measured faster (``backends/onnx_contrib.py``)
===========================  ================================================================

Because it is a PassManager run, the stage appears in the compile report, in ``optc dump
--backend B --print-after-all DIR`` (numbered after the pipeline's files), in pass timing, in
bisection (``bisect_limit`` counts on across the stage) and with each rule's refusals. Its passes
are exact: none changes what the program computes.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.fx as fx

from optc.ir import ops as optc_ops
from optc.ir.program import Program
from optc.ir.rewrite import carry_meta, infer_val
from optc.passes.base import Option, PassContext, PassResult, register_pass
from optc.backends import legalize as _legalize  # noqa: E402,F401  (registers the legalize pass)

log = logging.getLogger("optc.backends")
aten = torch.ops.aten


# ---- lower-optc-ops --------------------------------------------------------------------------------
def _decomposition(target):
    for op in optc_ops.OPS.values():
        if op.overload is target:
            return op.decomposition
    return None


def _inline_traced(node: fx.Node, fn) -> bool:
    """Replace ``node`` by the ATen graph of ``fn`` traced on its inputs' fake values; False when
    that graph cannot stand alone (it captured a symbolic size as a constant)."""
    import torch.utils._pytree as pytree
    from torch.fx.experimental.proxy_tensor import make_fx
    from optc.ir.rewrite import fake_mode_of
    gm = node.graph.owning_module
    flat, spec = pytree.tree_flatten((tuple(node.args), dict(node.kwargs)))
    inputs = [a for a in flat if isinstance(a, fx.Node)]

    def call(*tensors):      # the op's call with its tensor arguments as the traced inputs
        it = iter(tensors)
        args, kwargs = pytree.tree_unflatten([next(it) if isinstance(a, fx.Node) else a for a in flat], spec)
        return fn(*args, **kwargs)

    with fake_mode_of(gm):
        sub = make_fx(call, tracing_mode="real")(*[a.meta["val"] for a in inputs])
    for n in sub.graph.nodes:
        if n.op == "get_attr" or any(isinstance(a, torch.SymInt) for a in _leaves((n.args, n.kwargs))):
            return False
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        return False
    env: dict[fx.Node, fx.Node] = dict(zip(placeholders, inputs))
    graph = node.graph
    result = None
    with graph.inserting_before(node):
        for n in sub.graph.nodes:
            if n.op in ("placeholder",):
                continue
            if n.op == "output":
                result = fx.map_arg(n.args[0], lambda x: env[x])
                continue
            new = graph.node_copy(n, lambda x: env[x])
            carry_meta(new, node, "lower-optc-ops")
            new.meta["optc_rule"] = f"decompose:{node.target}"
            infer_val(new)
            env[n] = new
    node.replace_all_uses_with(result)
    graph.erase_node(node)
    return True


def _leaves(x):
    if isinstance(x, (list, tuple)):
        for a in x:
            yield from _leaves(a)
    elif isinstance(x, dict):
        for a in x.values():
            yield from _leaves(a)
    else:
        yield x


@register_pass("lower-optc-ops", exact=True,
               description="replace optc:: ops a backend has no native translation for by their ATen decomposition")
def lower_optc_ops(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """``optc::`` ops whose target is not in ``ctx.extra["native_ops"]`` (the backend's own
    translations) become their decomposition: the ATen graph of the decomposition traced on the
    node's values, or -- where tracing captured a symbolic size -- a call of the decomposition
    function, which the backend's export traces with the dims kept symbolic."""
    native = set(ctx.extra.get("native_ops", ()))
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not optc_ops.is_optc_op(node.target) or node.target in native:
            continue
        fn = _decomposition(node.target)
        if fn is None:
            ctx.reject("lower-optc-ops", node, "no decomposition")
            continue
        if not ctx.allow_rewrite("lower-optc-ops", node):
            continue
        name = node.target._opname
        if not _inline_traced(node, fn):
            node.target = fn          # traced by the backend's export (symbolic dims)
            node.meta["optc_rule"] = f"decompose:{name}"
        ctx.bump(name)
        n += 1
    if n:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, n > 0, dict(ctx.stats))


# ---- half precision a library cannot compute ------------------------------------------------------
@register_pass("half-in-float32", exact=True,
               description="half conv/linear/matmul computed in float32 between casts (TVM 0.27's importer)",
               options={"dtypes": Option(("float16,bfloat16", "float16", "bfloat16"), "float16,bfloat16",
                                         "which half types")})
def half_in_float32(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    from optc.backends.half_lowering import half_compute_in_float32
    dtypes = tuple(getattr(torch, d) for d in ctx.options["dtypes"].split(","))
    n = half_compute_in_float32(gm, dtypes)
    return PassResult(gm, n > 0, {"rewritten": n} if n else {})


@register_pass("bfloat16-as-rounded-float32", exact=True,
               description="bfloat16 values held as float32 rounded to bfloat16 after each op (ONNX Runtime on CPU)")
def bfloat16_as_rounded_float32(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    from optc.backends.half_lowering import bfloat16_as_rounded_float32 as rewrite
    n = rewrite(gm)
    return PassResult(gm, n > 0, {"rewritten": n} if n else {})


@register_pass("channels-last", exact=True,
               description="TorchScript: conv inputs and weights of a logical-NCHW program in channels-last memory")
def channels_last(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    from optc.backends.torchscript_layout import to_channels_last
    n = to_channels_last(gm)
    return PassResult(gm, n > 0, {"convolutions": n} if n else {})


# ---- running a stage ----------------------------------------------------------------------------------
def run_stage(program: Program, passes: Iterable[str], target, *, native_ops=(), first_index: int = 1,
              instruments=(), bisect_limit: int | None = None, disable: Iterable[str] = (),
              max_rewrites: int | None = None):
    """Run the stage ``passes`` (pass texts) on a copy of ``program``; returns ``(program, report)``
    (``report`` None for an empty stage)."""
    passes = [p for p in passes if p]
    if not passes:
        return program, None
    from optc.passes.manager import PassManager
    pm = PassManager(",".join(passes), target=target, extra={"native_ops": frozenset(native_ops)},
                     first_index=first_index, instruments=instruments, bisect_limit=bisect_limit,
                     max_rewrites=max_rewrites,
                     disable=disable)
    return pm.run(program)


__all__ = ["run_stage", "lower_optc_ops", "half_in_float32", "bfloat16_as_rounded_float32", "channels_last"]
