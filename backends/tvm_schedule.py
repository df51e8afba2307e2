"""TVM schedules and pipelines for the TVM backend (``backends/tvm.py``).

TVM 0.27's default CPU pipeline applies no schedule at all (every kernel runs as one serial loop
nest: ResNet-50 takes seconds), the wheel has no BLAS/DNNL to offload to, and dlight's CPU rules
cover only GEMV and row reductions. This module supplies the missing default schedule and the
Relax pipeline around it:

``CPUGeneric`` (a dlight :class:`ScheduleRule`)
    * one reduction block whose last spatial axis is the output's contiguous axis and also
      indexes some input contiguously -- matmul with a ``[K, N]`` weight, NHWC convolution with
      an HWIO weight, depthwise convolution, NHWC pooling -- becomes a register-tiled micro-kernel::

          parallel(fuse(n_o, <other spatial>, m_o)) / reduction loops / unroll(m_i) / vectorize(n_i)

      with a small accumulator (``cache_write``, at most :data:`MAX_ACC_BYTES` so LLVM keeps it
      in registers), the elementwise epilogue (bias, folded BN, ReLU, residual add) inlined into
      the write-back, and constant weights repacked at compile time to ``[N/VN, ..., VN]`` panels;
    * other reductions run their spatial loops in parallel;
    * injective kernels are inlined into one loop nest: parallel outer loops, vectorised inner loop.

``cpu_pipeline`` / ``cuda_pipeline``
    Relax -> fused, scheduled TIR -> VM-ready module. The CPU one runs convolutions in
    NHWC/HWIO (the layout the micro-kernel vectorises: optc's convert-layout produces it, and
    ``ConvertLayout`` converts what is left), marks constant weights layout-free so
    that their repacking is folded at compile time, applies tuned records first (MetaSchedule
    database) and the default rules to everything else. The CUDA one applies dlight's GPU rules.

Also here: thread-pool configuration (TVM's default pool on x86 uses half the cores and pins the
calling thread to core 0), the MetaSchedule builder function, and :func:`check_kernel`, which
decides whether a tuned kernel may replace the default one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import Callable

import numpy as np
import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

log = logging.getLogger("optc.backends.tvm")

#: Accumulator tile budget: at most LLVM's stack-alloca limit, so the tile is promoted to registers.
MAX_ACC_BYTES = 1024
LAYOUTS = ("NHWC", "NCHW")
# What a refused schedule primitive raises (ScheduleError and TVM's other errors are RuntimeErrors).
_SCHEDULE_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)


# ---- targets --------------------------------------------------------------------------------------
def host_cpu() -> str:
    """LLVM's name for this machine's CPU (``cascadelake``, ``znver4``...)."""
    from tvm.target.codegen import llvm_get_system_cpu
    return str(llvm_get_system_cpu())


def llvm_target(threads: int, mcpu: str | None = None) -> dict:
    """The TVM target (a JSON dict) for this host's CPU with ``threads`` cores."""
    return {"kind": "llvm", "mcpu": mcpu or host_cpu(), "num-cores": int(threads)}


def cuda_target(device_id: int = 0) -> dict:
    """The TVM target for CUDA device ``device_id``, with its compute capability as ``arch``."""
    dev = tvm.cuda(device_id)
    arch = "sm_" + str(dev.compute_version).replace(".", "")
    return {"kind": "cuda", "arch": arch, "max_threads_per_block": int(dev.max_threads_per_block),
            "max_shared_memory_per_block": int(dev.max_shared_memory_per_block), "thread_warp_size": 32}


# ---- threads ----------------------------------------------------------------------------------------
_THREADS = threading.local()


def configure_threads(n: int) -> None:
    """Make TVM's thread pool of the calling thread run ``n`` workers on every core this process
    may use.

    TVM's pool is per calling thread and created on the first parallel kernel. Left alone on x86
    it starts ``cores / 2`` workers (it assumes hyper-threading: 1 on a 2-core machine) and pins
    the calling thread -- Python's main thread, and every thread torch or ONNX Runtime starts
    from it later -- to core 0. Mode ``-3`` (kSpecifyThreadShareAllCore) with the process's CPU
    set avoids both. Cheap when nothing changes (remembered per thread).
    """
    if getattr(_THREADS, "n", None) == n:
        return
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = list(range(os.cpu_count() or 1))
    tvm.get_global_func("runtime.config_threadpool")(-3, int(n), [str(c) for c in cpus])
    _THREADS.n = n


# ---- Relax rewrites -----------------------------------------------------------------------------------
@relax.expr_functor.mutator
class _ClipToMinMax(relax.PyExprMutator):
    """``clip(x, lo, hi) -> minimum(maximum(x, lo), hi)``: ``relax.clip`` has no layout-inference
    rule in 0.27, so ConvertLayout would wrap every ReLU6 in NHWC->NCHW->NHWC transposes."""

    def visit_call_(self, call):  # noqa: N802 (TVM's visitor naming)
        call = super().visit_call_(call)
        if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.clip":
            x = call.args[0]
            dtype = str(x.ty.dtype if hasattr(x, "ty") else x.dtype)   # 0.27: struct info is ``ty``

            def scalar(a):
                a = getattr(a, "value", a)
                return float(getattr(a, "value", a))

            y = relax.op.maximum(x, relax.const(scalar(call.args[1]), dtype))
            return relax.op.minimum(y, relax.const(scalar(call.args[2]), dtype))
        return call


@tvm.transform.module_pass(opt_level=0, name="ClipToMinMax")
def clip_to_min_max(mod, _ctx):
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = _ClipToMinMax().visit_expr(func)
    return mod


@relax.expr_functor.mutator
class _ConstantCallTIR(relax.PyExprMutator):
    """Collects ``call_tir(f, (constants...))`` calls (``replace`` empty), or replaces the collected
    calls by their values (``replace``: a list of ``(call, value)``)."""

    def __init__(self, mod, replace=None):
        super().__init__(mod)
        self.found: list = []
        self.replace = replace or []

    def _constant(self, arg):
        if isinstance(arg, relax.Var):
            arg = self.lookup_binding(arg)
        if isinstance(arg, tvm.ir.expr.Constant) and isinstance(arg.value, tvm.runtime.Tensor):
            return arg
        return None

    def visit_call_(self, call):  # noqa: N802
        for old, value in self.replace:
            if call.same_as(old):
                return value
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir") or len(call.args) != 2:
            return call
        args = call.args[1]
        consts = [self._constant(a) for a in (args.fields if isinstance(args, relax.Tuple) else [args])]
        out = call.ty_args[0] if call.ty_args else None   # 0.27: struct info is "ty"
        outs = list(out.fields) if isinstance(out, tvm.ir.type.TupleType) else [out]
        static = all(isinstance(o, relax.TensorType) and o.shape is not None and all(
            isinstance(d, tirx.IntImm) for d in o.shape.values) for o in outs)
        if consts and all(c is not None for c in consts) and static and not self.replace:
            self.found.append((call, consts, outs))
        return call


def _fold_constant_call_tir(mod: tvm.IRModule, target: Target) -> tvm.IRModule:
    """FoldConstant for ``call_tir`` on constants, building every kernel it needs in *one* module.

    Relax's FoldConstant builds each kernel separately: one LLVM compilation per weight
    (transposes to HWIO, weight repacking), 40 s for a small MobileNetV2 on the project's
    machine. Folded values feed the next round (chains of constant kernels).
    """
    dev = tvm.cpu() if target.kind.name == "llvm" else tvm.device(target.kind.name, 0)
    for _ in range(8):
        main = mod["main"]
        collector = _ConstantCallTIR(mod)
        collector.visit_expr(main)
        if not collector.found:
            break
        kernels = {}
        for call, _consts, _outs in collector.found:
            gv = call.args[0]
            kernels[gv.name_hint] = mod[gv].with_attr("global_symbol", gv.name_hint)
        lib = tvm.compile(tvm.IRModule(kernels), target=target)
        replace = []
        for call, consts, outs in collector.found:
            results = [tvm.runtime.empty([int(d) for d in o.shape.values], str(o.dtype), dev) for o in outs]
            lib[call.args[0].name_hint](*[c.value for c in consts], *results)
            value = relax.const(results[0]) if len(results) == 1 else relax.Tuple([relax.const(r) for r in results])
            replace.append((call, value))
        mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
        mod["main"] = _ConstantCallTIR(mod, replace).visit_expr(main)
        mod = relax.transform.DeadCodeElimination()(mod)
    return mod


def fold_constant_call_tir(target: Target):
    """A pass: :func:`_fold_constant_call_tir`."""
    @tvm.transform.module_pass(opt_level=0, name="FoldConstantCallTIR")
    def _pass(mod, _ctx):
        return _fold_constant_call_tir(mod, target)

    return _pass


# ---- the default CPU schedule --------------------------------------------------------------------------
def _extent(sch, loop) -> int | None:
    e = sch.get(loop).extent
    return int(e) if isinstance(e, tirx.IntImm) else None


def _reads_bool(sch, block) -> bool:
    """The block reads a bool buffer. TVM 0.27's LLVM codegen of such a block, vectorised, can
    combine a loaded bool (``i8`` lanes) with a computed one (``i1`` lanes) in one ``and`` and
    fails module verification ("Both operands to a binary operator are not of the same type";
    a histogram's one-hot sum): those blocks stay scalar."""
    return any(str(r.source.dtype) == "bool" for r in sch.get(block).reads)


def _is_reduction(sch, block) -> bool:
    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _uses_var(expr, var) -> bool:
    from tvm.tirx.analysis import undefined_vars
    return any(v.same_as(var) for v in undefined_vars(expr))


def _vector_lanes(target: Target, bits: int = 32) -> int:
    from tvm.target.codegen import llvm_get_vector_width
    width = llvm_get_vector_width(target)
    if width is None or width <= 0:
        width = 128
    return max(width // bits, 4)


def _largest_divisor(n: int, cap: int) -> int:
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1


def _schedule_injective(sch, block, lanes: int) -> None:
    """Parallel over the fused outer loops, vectorise the innermost (split to a lane multiple)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    if any(_extent(sch, loop) == 0 for loop in loops):
        # an empty tensor (Phi-3's q[..., rotary_dim:] with rotary_dim = head_dim): nothing to run,
        # and fusing a zero-extent loop divides by zero in TVM's index arithmetic
        return
    last = loops[-1]
    ext = _extent(sch, last)
    outer = list(loops[:-1])
    vec = None
    if ext is not None and not _reads_bool(sch, block):
        for v in (lanes * 4, lanes * 2, lanes, lanes // 2, 4):
            if v <= ext and ext % v == 0:
                if v == ext:
                    vec = last
                else:
                    o, vec = sch.split(last, factors=[None, v])
                    outer.append(o)
                break
        else:
            outer.append(last)
    else:
        outer.append(last)
    if outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    if vec is not None:
        try:
            sch.vectorize(vec)
        except _SCHEDULE_ERRORS:  # e.g. a non-vectorisable intrinsic in the body: stays scalar
            pass


def _inline_all(sch, root, keep) -> None:
    """Inline every injective block except ``keep`` (compute_inline, else reverse_compute_inline)."""
    changed = True
    while changed:
        changed = False
        for b in sch.get_child_blocks(root):
            if any(sch.get(b).same_as(sch.get(k)) for k in keep) or _is_reduction(sch, b):
                continue
            for inline in (sch.compute_inline, sch.reverse_compute_inline):
                try:
                    inline(b)
                except _SCHEDULE_ERRORS:
                    continue
                changed = True
                break
            if changed:
                break


def _reverse_inline_chain(sch, block) -> None:
    """Inline the chain of single consumers of ``block`` (the epilogue) into it."""
    while True:
        consumers = sch.get_consumers(block)
        if len(consumers) != 1:
            return
        try:
            sch.reverse_compute_inline(consumers[0])
        except _SCHEDULE_ERRORS:
            return


def _prepack(sch, block, read_index: int, vn: int) -> None:
    """Repack a constant weight ``[..., N] -> [N/vn, ..., vn]`` in a block that
    SplitLayoutRewritePreproc + FoldConstant evaluate at compile time."""
    cr = sch.cache_read(block, read_index, "global")

    def index_map(*idx):
        return (idx[-1] // vn, *idx[:-1], idx[-1] % vn)

    sch.transform_layout(cr, ("write", 0), index_map)
    sch.annotate(cr, "meta_schedule.layout_rewrite_preproc", True)


def _tile_main(sch, block, lanes: int, dtype_bytes: int, fallback: bool, layout_free=()) -> bool:
    """Register-tile the reduction ``block``; False if its shape does not fit the micro-kernel."""
    stmt = sch.get(block)
    ivs = list(stmt.iter_vars)
    loops = sch.get_loops(block)
    if len(loops) != len(ivs):
        return False
    kinds = ["S" if iv.iter_type == tirx.IterVar.DataPar else "R" for iv in ivs]
    if "R" not in kinds or kinds[0] != "S":
        return False
    n_s = kinds.index("R")          # loops bind iter vars one to one, spatial first
    if any(k != "R" for k in kinds[n_s:]) or len(stmt.writes) != 1:
        return False
    vvar = ivs[n_s - 1].var         # vector axis: the last spatial iter var...
    w = stmt.writes[0].region
    if not w or not _uses_var(w[-1].min, vvar):     # ...must index the output's last dim
        return False
    vec_friendly = any(r.region and _uses_var(r.region[-1].min, vvar) for r in stmt.reads) \
        and not _reads_bool(sch, block)
    out_buf = stmt.writes[0].source
    mvar = ivs[n_s - 2].var if n_s >= 2 else None
    prepack_idx = None              # a constant weight read along the vector axis, not the row axis
    for i, r in enumerate(stmt.reads):
        if r.source.same_as(out_buf) or not r.region:
            continue
        if not any(r.source.same_as(b) for b in layout_free):
            continue
        if not _uses_var(r.region[-1].min, vvar):
            continue
        if mvar is not None and any(_uses_var(x.min, mvar) for x in r.region):
            continue
        prepack_idx = i
        break
    s_loops, r_loops = loops[:n_s], loops[n_s:]
    if not vec_friendly:
        if not fallback:
            return False
        sch.parallel(sch.fuse(*s_loops) if len(s_loops) > 1 else s_loops[0])   # a row reduction
        return True
    n_ext = _extent(sch, s_loops[-1])
    m_ext = _extent(sch, s_loops[-2]) if n_s >= 2 else 1
    if n_ext is None or m_ext is None:
        return False
    vn = next((v for v in (2 * lanes, lanes, lanes // 2, 4) if n_ext % v == 0), None)
    if vn is None:
        vn = n_ext if n_ext <= 2 * lanes else 1
    max_rows = max(1, MAX_ACC_BYTES // (vn * dtype_bytes))
    mt = _largest_divisor(m_ext, min(max_rows, 8 if vn >= 2 * lanes else 12)) if n_s >= 2 else 1

    # contiguous weight panels avoid 4K aliasing / cache-set thrash on large power-of-two strides
    if prepack_idx is not None and vn > 1 and n_ext > vn:
        _prepack(sch, block, prepack_idx, vn)
    acc = sch.cache_write(block, 0, "global")
    n_o, n_i = sch.split(s_loops[-1], factors=[None, vn])
    if n_s >= 2:
        m_o, m_i = sch.split(s_loops[-2], factors=[None, mt])
        others = list(s_loops[:-2])
    else:
        m_o = m_i = None
        others = []
    par = [n_o] + others + ([m_o] if m_o is not None else [])   # weight panel outermost
    inner = ([m_i] if m_i is not None else []) + [n_i]
    sch.reorder(*par, *r_loops, *inner)
    fused = sch.fuse(*par) if len(par) > 1 else par[0]
    sch.parallel(fused)
    sch.reverse_compute_at(acc, fused, preserve_unit_loops=True)
    _reverse_inline_chain(sch, acc)
    if m_i is not None and mt > 1:
        sch.unroll(m_i)
    if vn > 1:
        sch.vectorize(n_i)
    init = sch.decompose_reduction(block, r_loops[0])
    if vn > 1:
        init_loops = sch.get_loops(init)
        if sch.get(init_loops[-1]).kind != tirx.ForKind.VECTORIZED:
            sch.vectorize(init_loops[-1])
        wb_loops = sch.get_loops(acc)
        if _extent(sch, wb_loops[-1]) == vn:
            sch.vectorize(wb_loops[-1])
    return True


def _layout_free_buffers(func: tirx.PrimFunc) -> list:
    if func.attrs is None or "layout_free_buffers" not in func.attrs:
        return []
    return [func.params[int(i)] for i in func.attrs["layout_free_buffers"]]


class CPUGeneric(ScheduleRule):
    """The default CPU schedule (see the module docstring). ``fallback=False`` takes only kernels
    whose single reduction fits the micro-kernel (so dlight's CPU Reduction rule can have the
    rest); ``fallback=True`` schedules everything it can parallelise."""

    def __init__(self, fallback: bool = False):
        self.fallback = fallback

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def apply(self, func, target, _tunable):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        try:
            root = sch.get_sblock("root")
        except _SCHEDULE_ERRORS:  # no root block: a kernel written already scheduled (a scan from DispatchSortScan)
            return None
        blocks = sch.get_child_blocks(root)
        lanes = _vector_lanes(target)
        reductions = [b for b in blocks if _is_reduction(sch, b)]
        if not reductions:
            _inline_all(sch, root, keep=sch.get_output_blocks(root))
            for b in sch.get_child_blocks(root):
                _schedule_injective(sch, b, lanes)
            return sch
        done = set()
        if len(reductions) == 1:
            main = reductions[0]
            name = sch.get(main).name_hint
            dtype_bytes = max(1, sch.get(main).writes[0].source.dtype.bits // 8)
            try:
                ok = _tile_main(sch, main, lanes, dtype_bytes, self.fallback, _layout_free_buffers(func))
            except _SCHEDULE_ERRORS as e:  # a schedule primitive refused: leave it to the next rule
                log.debug("CPUGeneric: %s not tiled: %s", name, str(e).strip().splitlines()[-1:])
                return None
            if not ok:
                return None
            done.add(name)
        elif not self.fallback:
            return None
        for b in sch.get_child_blocks(root):
            loops = sch.get_loops(b)
            if sch.get(b).name_hint in done or not loops or sch.get(loops[0]).kind != tirx.ForKind.SERIAL:
                continue
            if not _is_reduction(sch, b):
                _schedule_injective(sch, b, lanes)
                continue
            ivs = sch.get(b).iter_vars
            spatial = [lp for lp, iv in zip(loops, ivs) if iv.iter_type == tirx.IterVar.DataPar]
            n_spatial = sum(iv.iter_type == tirx.IterVar.DataPar for iv in ivs)
            # parallelise the leading spatial loops when they are exactly the block's spatial axes
            if spatial and len(loops) == len(ivs) and all(
                    sch.get(lp).same_as(sch.get(loops[i])) for i, lp in enumerate(spatial[:n_spatial])):
                sch.parallel(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])
        return sch


def default_rules(target: Target) -> tuple:
    """The dlight rules of the default schedule for ``target``."""
    if target.kind.name == "cuda":
        return (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())
    return (CPUGeneric(), dl.cpu.Reduction(), CPUGeneric(fallback=True))


# ---- pipelines ----------------------------------------------------------------------------------------
def pre_schedule_passes(target: Target, layout: str = "NHWC") -> list:
    """Relax -> fused, unscheduled TIR: the IR that MetaSchedule tunes and the default rules schedule."""
    cpu = target.kind.name == "llvm"
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
    if cpu:
        passes.append(relax.transform.AttachAttrLayoutFreeBuffers())   # constant weights may be repacked
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
    in 0.27; with no conv2d it has nothing to convert anyway."""
    @tvm.transform.module_pass(opt_level=0, name=f"OptcIfCalls[{op_name}]")
    def _pass(mod, ctx):
        return inner(mod) if _calls(mod, op_name) else mod
    return _pass


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


def pre_schedule_pipeline(target: Target, layout: str = "NHWC"):
    """A pass: the module MetaSchedule should tune (identical to what :func:`build_pipeline` schedules)."""
    return _in_target(target, pre_schedule_passes(target, layout), "OptcPreSchedule")


def build_pipeline(target: Target, layout: str = "NHWC", database=None, *, pre_scheduled: bool = False):
    """A pass for ``tvm.compile(relax_pipeline=...)``: Relax -> scheduled TIR -> VM-ready module.
    ``pre_scheduled``: the module already went through :func:`pre_schedule_pipeline`."""
    passes = [] if pre_scheduled else pre_schedule_passes(target, layout)
    passes += schedule_passes(target, database) + lower_passes(target)
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


# ---- MetaSchedule helpers --------------------------------------------------------------------------------
def make_fast_build():
    """The MetaSchedule builder function. Defined in a closure so cloudpickle ships it by value:
    its workers then import neither optc (torch) nor ``tvm.s_tir.tensor_intrin``, which the
    default builder imports (tens of seconds to minutes per worker, past its 30 s timeout)."""

    def fast_build(mod, target, _params):
        from tvm.driver import build as tvm_build
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        return tvm_build(mod, target=target)

    return fast_build


def cpu_tensor_intrinsics_only() -> None:
    """Register the x86 tensor intrinsics without importing every target's.

    MetaSchedule's TuneContext imports ``tvm.s_tir.tensor_intrin``, whose ``__init__`` imports the
    intrinsics of every target: 2 minutes on the project's loaded machine, 85 s of it for CUDA.
    CPU tuning needs only the x86 ones (its default rules name the VNNI/AVX-512 dot products).
    The package is registered without running its ``__init__``; other submodules
    (``tvm.s_tir.tensor_intrin.cuda``) still import normally when something asks for them.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        import tvm.s_tir  # noqa: F401  (the parent package must exist)
        spec = importlib.util.find_spec(name)
        if spec is None:
            return
        sys.modules[name] = importlib.util.module_from_spec(spec)
    importlib.import_module(name + ".x86")


# ---- checking a tuned kernel -------------------------------------------------------------------------
@dataclass
class KernelCheck:
    """The verdict on one tuned kernel against its default (untuned) schedule."""

    ok: bool                  # correct and faster: the tuned record may be used
    correct: bool
    reason: str
    max_error: float = float("nan")   # max |tuned - default| / max(1, max |default|)
    unwritten: int = 0        # output values the tuned kernel left as NaN where the default wrote
    tuned_us: float = float("nan")
    default_us: float = float("nan")

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in self.__dict__.items()}


def _written_params(func: tirx.PrimFunc) -> set:
    """Indices of the parameters whose buffers some block of ``func`` writes (its outputs)."""
    written = [w.source for b in _all_blocks(func) for w in b.writes]
    return {i for i, p in enumerate(func.params) if any(p.same_as(w) for w in written)}


def _random_args(func: tirx.PrimFunc, outputs: set, rng: np.random.Generator, dev) -> list:
    args = []
    for i, p in enumerate(func.params):
        buf = p
        shape = [int(d) for d in buf.shape]
        dtype = str(buf.dtype)
        if i in outputs:
            if dtype.startswith("float"):
                data = np.full(shape, np.nan, dtype=dtype)
            else:   # no NaN for integers: an out-of-range sentinel
                data = np.full(shape, np.iinfo(dtype).min if dtype.startswith("int") else 0, dtype=dtype)
        elif dtype.startswith("float"):
            data = rng.standard_normal(shape).astype(dtype)
        elif dtype == "bool":
            data = rng.integers(0, 2, shape).astype(bool)
        else:   # indices (gather, embedding): 0 is always in range
            data = np.zeros(shape, dtype=dtype)
        args.append(tvm.runtime.tensor(data, dev))
    return args


def _build(func: tirx.PrimFunc, target: Target):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)


def _time_us(lib, args, dev, min_ms: float) -> float:
    f = lib.mod.time_evaluator("main", dev, number=1, repeat=5, min_repeat_ms=int(round(min_ms)))
    return float(np.median(f(*args).results)) * 1e6


def check_kernel(default: tirx.PrimFunc, tuned: tirx.PrimFunc, target: Target, *, rtol: float = 1e-4,
                 speedup: float = 1.03, min_repeat_ms: float = 20.0, seed: int = 0) -> KernelCheck:
    """Whether the ``tuned`` form of a kernel may replace its ``default`` (untuned) form.

    Both are built and run on the same random inputs with every output buffer pre-filled with NaN
    (integer outputs: the type's minimum), so a kernel that leaves outputs unwritten is caught
    even when the stale memory happens to hold the right values. The tuned outputs must match
    the default ones within ``rtol`` of the output scale (``max(1, max |default|)``), with NaN
    exactly where the default has NaN. Then both are timed with constant-weight repacking
    removed (it runs once at compile time in the real build): the tuned kernel is kept only if
    it is at least ``speedup`` times faster.
    """
    if target.kind.name != "llvm":
        dev = tvm.device(target.kind.name, 0)
    else:
        dev = tvm.cpu()
    if [(str(b.dtype), list(b.shape)) for b in _buffers(default)] != [(str(b.dtype), list(b.shape)) for b in _buffers(tuned)]:
        return KernelCheck(False, False, "signature differs")
    outputs = _written_params(default)
    if not outputs:
        return KernelCheck(False, False, "the default kernel writes no parameter")
    rng = np.random.default_rng(seed)
    ref_args = _random_args(default, outputs, rng, dev)
    got_args = [tvm.runtime.tensor(a.numpy(), dev) for a in ref_args]
    try:
        lib_default = _build(default, target)
        lib_tuned = _build(tuned, target)
        lib_default["main"](*ref_args)
        lib_tuned["main"](*got_args)
    except Exception as e:  # noqa: BLE001 - a kernel that does not build or run is rejected
        return KernelCheck(False, False, f"build/run failed: {type(e).__name__}: {str(e).strip().splitlines()[-1:]}")
    worst, unwritten = 0.0, 0
    for i in sorted(outputs):
        ref, got = ref_args[i].numpy(), got_args[i].numpy()
        if ref.dtype.kind == "f":
            ref_nan, got_nan = np.isnan(ref), np.isnan(got)
            unwritten += int(np.count_nonzero(got_nan & ~ref_nan))
            if np.any(ref_nan & ~got_nan):
                return KernelCheck(False, False, "tuned kernel wrote values where the default left NaN")
            finite = ~ref_nan & ~got_nan
            scale = max(1.0, float(np.max(np.abs(ref[finite]), initial=0.0)))
            diff = np.abs(ref[finite].astype(np.float64) - got[finite].astype(np.float64))
            worst = max(worst, float(np.max(diff, initial=0.0)) / scale)
        else:
            worst = max(worst, float(np.count_nonzero(ref != got)))
    if unwritten:
        return KernelCheck(False, False, f"tuned kernel left {unwritten} output values unwritten",
                           max_error=worst, unwritten=unwritten)
    if not worst <= rtol:
        return KernelCheck(False, False, f"tuned kernel differs from the default: {worst:.3g} > {rtol:g}",
                           max_error=worst)
    try:
        default_us, tuned_us = _time_pair(default, tuned, target, dev, min_repeat_ms, rng)
    except Exception as e:  # noqa: BLE001
        return KernelCheck(False, True, f"timing failed: {type(e).__name__}: {str(e).strip().splitlines()[-1:]}",
                           max_error=worst)
    ok = tuned_us * speedup <= default_us
    reason = (f"correct, {default_us / tuned_us:.2f}x the default's speed"
              + ("" if ok else f" (needs {speedup:.2f}x)"))
    return KernelCheck(ok, True, reason, max_error=worst, tuned_us=tuned_us, default_us=default_us)


def _time_pair(default, tuned, target, dev, min_ms, rng):
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    strip = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)
    out = []
    for func in (default, tuned):
        stripped = strip(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}))["main"]
        args = _random_args(stripped, _written_params(stripped), rng, dev)
        lib = _build(stripped, target)
        lib["main"](*args)   # warm-up
        out.append(_time_us(lib, args, dev, min_ms))
    return out[0], out[1]


# ---- MetaSchedule tuning with checked records ------------------------------------------------------------
DECISIONS = "decisions.json"


def _workload_key(workload: tvm.IRModule) -> str:
    return str(tvm_ffi.structural_hash(workload))


def _read_decisions(db_dir: str) -> dict:
    path = os.path.join(db_dir, DECISIONS)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        log.warning("tvm tuning: ignoring unreadable %s: %s", path, e)
        return {}


def _write_decisions(db_dir: str, decisions: dict) -> None:
    tmp = os.path.join(db_dir, DECISIONS + ".tmp")
    with open(tmp, "w") as f:
        json.dump(decisions, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(db_dir, DECISIONS))


def _json_database(path: str):
    from tvm.s_tir import meta_schedule as ms
    os.makedirs(path, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=path)


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _meta_schedule_logging():
    """MetaSchedule's ``create_loggers`` rebuilds its logger with ``logging.config.dictConfig`` and
    lists every handler already on ``tvm.s_tir.meta_schedule`` by name: a handler it did not
    create (unnamed: "'NoneType' object has no attribute 'format'"; or named, unknown to its
    config) makes tuning fail. Such handlers are set aside for the call and put back after; its
    chatter on stdout is silenced (the tqdm bar shows progress)."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    foreign = [h for h in logger.handlers if not (h.get_name() or "").startswith("tvm.s_tir.meta_schedule")]
    for h in foreign:
        logger.removeHandler(h)
    if logger.level == logging.NOTSET:   # else it sets DEBUG, and its console handler prints every XGB round
        logger.setLevel(logging.INFO)
    # its console handler writes the task table to stdout each round: here it goes to devnull
    # (the same lines are in DIR/tuned/logs/), and afterwards only warnings, to stderr
    with open(os.devnull, "w") as null:
        try:
            with contextlib.redirect_stdout(null):
                yield
        finally:
            for h in logger.handlers:
                if (h.get_name() or "").endswith(".console") and isinstance(h, logging.StreamHandler):
                    h.setStream(sys.stderr)
                    h.setLevel(logging.WARNING)
            for h in foreign:
                logger.addHandler(h)


def _progress_callback(bar):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            bar.update(len(measure_candidates))

    return _Progress()


def _no_bar(progress: bool | None) -> bool | None:
    return None if progress is None else not progress   # tqdm: None = only on a terminal


def tune(mod: tvm.IRModule, target: Target, *, trials: int, db_dir: str, threads: int,
         progress: bool | None = None, check: Callable | None = None):
    """Tune the kernels of ``mod`` (the output of :func:`pre_schedule_pipeline`) that have a
    reduction and static shapes, and return ``(database, summary)``: a MetaSchedule database of
    the *checked* records only (None if there are none) for :func:`build_pipeline`.

    ``db_dir`` holds ``tuned/`` (MetaSchedule's own JSON database and logs), ``checked/`` (the
    records that passed :func:`check_kernel`) and ``decisions.json`` (per workload: kept or not,
    why, the timings). A workload with a decision is never tuned or checked again, so a second
    compile of the same model reuses the records. ``trials`` = 0 only applies what is there;
    ``trials`` = -n means n trials for each kernel still to tune.
    ``progress``: tqdm bars over trials and checks (None: when stderr is a terminal).
    """
    from tqdm import tqdm
    check = check or check_kernel
    os.makedirs(db_dir, exist_ok=True)
    decisions = _read_decisions(db_dir)
    checked_dir = os.path.join(db_dir, "checked")
    summary = {"db_dir": db_dir, "tasks": 0, "tuned": 0, "untuned": 0, "applied": 0, "rejected": {}, "trials": 0}
    if trials != 0:
        from tvm.s_tir import meta_schedule as ms
        if target.kind.name == "llvm":
            cpu_tensor_intrinsics_only()
        extracted = [t for t in ms.relax_integration.extract_tasks(mod, target)
                     if is_static(t.dispatched[0]["main"]) and has_reduction(t.dispatched[0]["main"])]
        summary["tasks"] = len(extracted)
        todo = [t for t in extracted if _workload_key(t.dispatched[0]) not in decisions]
        if trials < 0:   # -n: n trials per kernel still to tune
            trials = -trials * len(todo)
        summary["trials"] = trials
        if todo and trials:
            tuned_dir = os.path.join(db_dir, "tuned")
            raw = _json_database(tuned_dir)
            with tqdm(total=trials, desc=f"tvm tuning {len(todo)} kernels", unit="trial", disable=_no_bar(progress)) as bar, \
                    _env(TVM_NUM_THREADS=threads):
                try:
                    with _meta_schedule_logging():
                        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                            todo, work_dir=tuned_dir)
                        ms.tune_tasks(
                            tasks=contexts, task_weights=weights, work_dir=tuned_dir,
                            max_trials_global=trials, max_trials_per_task=trials,
                            num_trials_per_iter=max(1, min(64, trials)),
                            builder=ms.builder.LocalBuilder(f_build=make_fast_build(), max_workers=threads,
                                                            timeout_sec=300),
                            runner=ms.runner.LocalRunner(timeout_sec=120),
                            database=raw, cost_model="xgb",
                            measure_callbacks=list(ms.measure_callback.MeasureCallback.create("default"))
                            + [_progress_callback(bar)],
                        )
                except Exception as e:  # noqa: BLE001 - the tuner failing costs speed, never correctness
                    # what it committed before failing is still checked below; the rest keeps the
                    # default schedule and stays undecided, so the next compile tunes it again
                    summary["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1][:200]}"
                    log.warning("tvm tuning stopped early (%s); the kernels it did not finish keep their default "
                                "schedule", summary["error"])
            checked = _json_database(checked_dir)
            for task in tqdm(todo, desc="tvm checking tuned kernels", unit="kernel",
                             disable=_no_bar(progress)):
                workload = task.dispatched[0]
                key = _workload_key(workload)
                record = raw.query_tuning_record(workload, target, "main")
                sch = raw.query_schedule(workload, target, "main")
                if record is None or sch is None:   # no trial reached it (budget) or none built: undecided,
                    summary["untuned"] += 1         # so a later compile with more trials tunes it
                    continue
                default = apply_default_schedule(workload, target)["main"]
                verdict = check(default, sch.mod["main"], target)
                decisions[key] = {"task": task.task_name, **verdict.to_json()}
                summary["tuned"] += 1
                if verdict.ok:
                    # the record's own workload (MetaSchedule's normalised copy of the task's module):
                    # its trace replays on that one. ``workload`` itself can differ structurally, and
                    # a trace that does not replay makes the whole database fail to load (MobileNetV2,
                    # a grouped conv: "parallel_for_dynamic error")
                    checked.commit_tuning_record(ms.database.TuningRecord(
                        record.trace, checked.commit_workload(record.workload.mod), record.run_secs, target,
                        record.args_info))
                else:
                    summary["rejected"][task.task_name] = verdict.reason
                    log.info("tvm tuning: %s keeps its default schedule: %s", task.task_name, verdict.reason)
            _write_decisions(db_dir, decisions)
    if not os.path.exists(os.path.join(checked_dir, "database_tuning_record.json")):
        return None, summary
    try:
        database = _json_database(checked_dir)
    except Exception as e:  # noqa: BLE001 - a record that no longer replays (written by an older optc or TVM)
        summary["error"] = (f"the checked records in {checked_dir} do not load ({type(e).__name__}: "
                            f"{(str(e).strip().splitlines() or [''])[-1][:200]}); delete that folder to tune again")
        log.warning("tvm tuning: %s; every kernel keeps its default schedule", summary["error"])
        return None, summary
    summary["applied"] = sum(1 for f in tir_functions(mod).values()
                             if database.has_workload(tvm.IRModule({"main": f})))
    return (database if len(database) else None), summary


__all__ = ["CPUGeneric", "KernelCheck", "LAYOUTS", "MAX_ACC_BYTES", "apply_default_schedule", "build_pipeline",
           "check_kernel", "configure_threads", "tune", "cuda_target", "default_rules", "has_reduction", "host_cpu",
           "is_static", "llvm_target", "lower_passes", "make_fast_build", "pre_schedule_passes",
           "pre_schedule_pipeline", "schedule_passes", "cpu_tensor_intrinsics_only", "tir_functions"]
