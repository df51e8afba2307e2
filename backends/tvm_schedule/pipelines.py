"""The Relax pipelines around the schedule: pre-schedule passes (decompositions, fast math, layout, fusion), scheduling, lowering; TIR function queries."""

from __future__ import annotations

import logging

import tvm
from tvm import relax, s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.target import Target

from optc.backends.tvm_schedule.common import _SCHEDULE_ERRORS
from optc.backends.tvm_schedule.cpu_schedule import default_rules
from optc.backends.tvm_schedule.relax_rewrites import (
    clip_to_min_max, fold_constant_call_tir, fuse_weight_transpose_matmul,
)

log = logging.getLogger("optc.backends.tvm")


# ---- pipelines ----------------------------------------------------------------------------------------
def pre_schedule_passes(target: Target, layout: str = "NHWC", lift_params: bool = False,
                        in_place: bool = False) -> list:
    """Relax -> fused, unscheduled TIR: the IR that MetaSchedule tunes and the default rules schedule.
    ``in_place`` (with ``lift_params``, CPU): linears read their weights as torch lays them out
    (``NT_matmul`` kernels, :func:`fuse_weight_transpose_matmul`) and no weight is marked
    layout-free, so that the load-time transform copies no linear weight (``params="reference"``)."""
    cpu = target.kind.name == "llvm"
    in_place = in_place and cpu and lift_params
    passes = [
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        # FoldBatchnormToConv2D is not used: with ConvertLayout it segfaults in 0.27 (ResNet-50);
        # optc's fold-conv-bn has folded BN already, and what is left fuses into the epilogue.
        relax.transform.DecomposeOpsForInference(),
        relax.transform.FastMathTransform(),      # erf/exp/tanh -> vectorisable polynomials
        clip_to_min_max,
        relax.transform.CanonicalizeBindings(),
    ]
    if layout is not None:
        # convolutions the Program has in the other layout (none after optc's convert-layout);
        # only conv2d: pools and elementwise ops follow by layout inference (listing pools trips
        # a NoDesiredLayout check in 0.27)
        kernel = {"NHWC": "HWIO", "NCHW": "OIHW"}[layout]
        passes.append(_if_calls("relax.nn.conv2d", relax.transform.ConvertLayout({"relax.nn.conv2d": [layout, kernel]})))
    if in_place:
        passes.append(fuse_weight_transpose_matmul)
    passes += [
        relax.transform.Normalize(),
        relax.transform.LegalizeOps(),
        fold_constant_call_tir(target),          # weight transposes to HWIO, in one build
        relax.transform.FoldConstant(),          # what is left (non-call_tir constant expressions)
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]
    if cpu and lift_params:
        # weights by reference: the transposes lifted now, so that main takes W^T as a parameter,
        # which AttachAttrLayoutFreeBuffers makes layout-free and the schedule repacks
        # (split_params.py, "two lifts, one transform")
        from optc.backends.tvm_schedule.split_params import first_lift
        passes.append(first_lift)
    if cpu and not in_place:
        passes.append(attach_layout_free_buffers)   # constant weights may be repacked
    if cpu:
        passes.append(_wrap_rootless)
    passes.append(s_tir.transform.StmtSimplify())   # reshape index math, using block-var ranges
    return passes


def _calls(mod: tvm.IRModule, op_name: str) -> bool:
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == op_name:
            found.append(e)

    for func in mod.functions.values():
        if isinstance(func, relax.Function) and not found:
            relax.analysis.post_order_visit(func.body, visit)
    return bool(found)


def _if_calls(op_name: str, inner):
    """``inner`` applied only to modules that call ``op_name``. ConvertLayout on a module without
    a conv2d (a layer norm and a 1-d average pool, found by optc fuzz) aborts with std::bad_alloc
    in 0.27; with no conv2d it has nothing to convert anyway. Named as ``inner``, so that
    ``PassContext(disabled_pass=[inner's name])`` leaves it out (``inner`` itself is called
    directly, which no ``PassContext`` checks)."""
    @tvm.transform.module_pass(opt_level=0, name=inner.info.name)
    def _pass(mod, ctx):
        return inner(mod) if _calls(mod, op_name) else mod
    return _pass


# named as Relax's pass, so that PassContext(disabled_pass=["AttachAttrLayoutFreeBuffers"]) (the
# TVM backend's disabled_passes option, optc bisect) still leaves it out
@tvm.transform.module_pass(opt_level=0, name="AttachAttrLayoutFreeBuffers")
def attach_layout_free_buffers(mod, _ctx):
    """Relax's ``AttachAttrLayoutFreeBuffers`` without its copies: each kernel gets the attribute
    ``layout_free_buffers`` -- the arguments that are constants or ``main``'s weights (after its
    ``num_input`` inputs) at *every* one of its call sites -- in place. TVM 0.27's pass renews
    every kernel it annotates (``cumsum`` -> ``cumsum1``) and keeps the explicit layout of a
    buffer from ``te.extern`` over the old shape variable: a ``cumsum`` over a dynamic length
    then fails to build ("variables (s27,) are used, but are not passed in as API arguments";
    transformers' mask of a decoder called without a cache). A kernel called with a weight at
    one site and an activation at another keeps that argument's layout (TVM's pass would
    duplicate the kernel)."""
    free: dict = {}
    for func in mod.functions.values():
        if not isinstance(func, relax.Function):
            continue
        n_input = int(func.attrs["num_input"]) if func.attrs is not None and "num_input" in func.attrs else None
        weights = list(func.params[n_input:]) if n_input is not None else []
        bound = {}

        def weight_like(e) -> bool:
            e = bound.get(e, e) if isinstance(e, relax.Var) else e
            return isinstance(e, tvm.ir.expr.Constant) or any(e.same_as(w) for w in weights)

        def visit(e):
            if isinstance(e, relax.VarBinding):
                bound[e.var] = e.value
                return
            if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.call_tir":
                gv, args = e.args[0], e.args[1]
                args = list(args.fields) if isinstance(args, relax.Tuple) else [args]
                here = {i for i, a in enumerate(args) if weight_like(a)}
                free[gv] = free[gv] & here if gv in free else here

        for block in getattr(func.body, "blocks", []):
            for b in block.bindings:
                visit(b)
                visit(b.value)
    if not free:
        return mod
    mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    for gv, indices in free.items():
        func = mod[gv]
        if isinstance(func, tirx.PrimFunc):
            mod[gv] = func.with_attr("layout_free_buffers", sorted(indices))
    return mod


def _has_root_block(func: tirx.PrimFunc) -> bool:
    try:
        s_tir.Schedule(func).get_sblock("root")
        return True
    except _SCHEDULE_ERRORS:
        return False


@tvm.transform.module_pass(opt_level=0, name="OptcWrapRootless")
def _wrap_rootless(mod, _ctx):
    """Give kernels written already scheduled (a scan from DispatchSortScan: its body is one
    block with plain loops inside, no ``root``) an empty root block around that body, and drop
    their ``layout_free_buffers``. SplitLayoutRewritePreproc visits every PrimFunc and fails
    on them in 0.27 ("There should be a compute block if there is only one subtree under the
    root", HF GPT-2's cumsum); the outer block changes nothing in the generated code."""
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tirx.PrimFunc) or _has_root_block(func):
            continue
        body = s_tir.SBlockRealize([], tirx.const(True, "bool"), s_tir.SBlock([], [], [], "root", func.body))
        func = func.with_body(body)
        if func.attrs is not None and "layout_free_buffers" in func.attrs:
            func = func.without_attr("layout_free_buffers")
        mod[gv] = func
    return mod


def schedule_passes(target: Target, database=None) -> list:
    """Tuned records first (functions they schedule are marked ``tirx.is_scheduled`` and skipped
    by dlight), then the default rules; on CPU, weight repacking folded into constants."""
    passes = []
    if database is not None:
        with target:  # MetaScheduleApplyDatabase reads Target.current() when constructed
            passes.append(relax.transform.MetaScheduleApplyDatabase(database))
    passes.append(dl.ApplyDefaultSchedule(*default_rules(target)))
    if target.kind.name == "llvm":
        passes += [
            relax.transform.SplitLayoutRewritePreproc(),   # weight-repacking blocks -> own call_tir
            fold_constant_call_tir(target),                # ...evaluated now, on the constants
            relax.transform.DeadCodeElimination(),
        ]
    return passes


def lower_passes(target: Target) -> list:
    """TVM's default_build_pipeline after LegalizeOps (which the pre-schedule passes ran)."""
    passes = [
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
        relax.transform.StaticPlanBlockMemory(),
    ]
    if target.kind.name == "cuda":
        passes.append(relax.transform.RewriteCUDAGraph())
    return passes + [
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ]


def _in_target(target: Target, passes: list, name: str):
    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pipeline(mod, _ctx):
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


def pre_schedule_pipeline(target: Target, layout: str = "NHWC", lift_params: bool = False, in_place: bool = False):
    """A pass: the module MetaSchedule should tune (identical to what :func:`build_pipeline` schedules)."""
    return _in_target(target, pre_schedule_passes(target, layout, lift_params, in_place), "OptcPreSchedule")


def build_pipeline(target: Target, layout: str = "NHWC", database=None, *, pre_scheduled: bool = False,
                   lift_params: bool = False, in_place: bool = False):
    """A pass for ``tvm.compile(relax_pipeline=...)``: Relax -> scheduled TIR -> VM-ready module.
    ``pre_scheduled``: the module already went through :func:`pre_schedule_pipeline`.
    ``lift_params``: ``main`` takes the weights as arguments (after its ``num_input`` inputs):
    what computes only on them (transposes, the CPU schedules' weight repacking) moves to
    ``main_transform_params`` (``LiftTransformParams``), which the model runs once when it loads,
    group of weights by group (``split_params.py``). On CPU the transposes were lifted before
    scheduling (``pre_schedule_passes(lift_params=True)``) and the repacking is lifted here; the
    two are composed into one transform. ``in_place``: see :func:`pre_schedule_passes`."""
    passes = [] if pre_scheduled else pre_schedule_passes(target, layout, lift_params, in_place)
    passes += schedule_passes(target, database)
    if lift_params:
        from optc.backends.tvm_schedule.split_params import compose_transform_params, split_transform_params
        passes += [relax.transform.LiftTransformParams(), compose_transform_params,
                   relax.transform.CanonicalizeBindings(), split_transform_params]
    passes += lower_passes(target)
    return _in_target(target, passes, "OptcBuild")


def apply_default_schedule(mod: tvm.IRModule, target: Target) -> tvm.IRModule:
    """The default rules applied to every PrimFunc of ``mod`` (a copy)."""
    with target:
        return dl.ApplyDefaultSchedule(*default_rules(target))(mod)


def tir_functions(mod: tvm.IRModule) -> dict[str, tirx.PrimFunc]:
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}


def _all_blocks(func: tirx.PrimFunc) -> list:
    """Every block of ``func`` (nested ones too), as SBlock statements."""
    sch = s_tir.Schedule(func)
    out, todo = [], list(sch.get_child_blocks(sch.get_sblock("root")))
    while todo:
        b = todo.pop()
        out.append(sch.get(b))
        todo.extend(sch.get_child_blocks(b))
    return out


def has_reduction(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` has a reduction block (the kernels worth tuning: matmul, conv, pooling)."""
    return any(iv.iter_type == tirx.IterVar.CommReduce for b in _all_blocks(func) for iv in b.iter_vars)


def _buffers(func: tirx.PrimFunc) -> list:
    """The parameter buffers of ``func`` (in TVM 0.27 the parameters are the buffers)."""
    return list(func.params)


def is_static(func: tirx.PrimFunc) -> bool:
    return all(isinstance(d, tirx.IntImm) for buf in _buffers(func) for d in buf.shape)
