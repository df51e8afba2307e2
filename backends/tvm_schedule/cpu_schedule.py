"""optc's default CPU schedule: the dlight rule ``CPUGeneric`` (register-tiled micro-kernels, ``NT_matmul``
kernels over ``[N, K]`` weights, parallel/vectorised injective kernels)."""

from __future__ import annotations

import logging
import math

from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from optc.backends.tvm_schedule.common import MAX_ACC_BYTES, _SCHEDULE_ERRORS

log = logging.getLogger("optc.backends.tvm")


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


def _vector_width(ext: int, lanes: int) -> int | None:
    """The widest of 2, 1 or 1/2 vectors, or 4 lanes, that divides ``ext``; None if none does."""
    return next((v for v in (2 * lanes, lanes, lanes // 2, 4) if ext % v == 0), None)


def _row_tile(vn: int, lanes: int, dtype_bytes: int) -> int:
    """How many rows of ``vn``-wide accumulators the micro-kernel keeps (in registers: at most
    :data:`MAX_ACC_BYTES`)."""
    return min(max(1, MAX_ACC_BYTES // (vn * dtype_bytes)), 8 if vn >= 2 * lanes else 12)


def _finish_tile(sch, block, acc, at, m_i, n_i, first_reduction, mt: int, vn: int) -> None:
    """The micro-kernel's inner part, once its loops are ordered ``... / reduction / m_i / n_i``:
    the accumulator's write-back under ``at`` with the elementwise epilogue inlined into it, the
    row tile unrolled, the column tile, the accumulator's init and its write-back vectorised."""
    sch.reverse_compute_at(acc, at, preserve_unit_loops=True)
    _reverse_inline_chain(sch, acc)
    if m_i is not None and mt > 1:
        sch.unroll(m_i)
    if vn > 1:
        sch.vectorize(n_i)
    init = sch.decompose_reduction(block, first_reduction)
    if vn > 1:
        init_loops = sch.get_loops(init)
        if sch.get(init_loops[-1]).kind != tirx.ForKind.VECTORIZED:
            sch.vectorize(init_loops[-1])
        wb_loops = sch.get_loops(acc)
        if _extent(sch, wb_loops[-1]) == vn:
            sch.vectorize(wb_loops[-1])


def _prepack(sch, block, read_index: int, vn: int) -> None:
    """Repack a constant weight ``[..., N] -> [N/vn, ..., vn]`` in a block that
    SplitLayoutRewritePreproc + FoldConstant evaluate at compile time."""
    cr = sch.cache_read(block, read_index, "global")

    def index_map(*idx):
        return (idx[-1] // vn, *idx[:-1], idx[-1] % vn)

    sch.transform_layout(cr, ("write", 0), index_map)
    sch.annotate(cr, "meta_schedule.layout_rewrite_preproc", True)


#: the row tile of a matmul whose row count is known only at run time
DYNAMIC_ROWS = 8


def _pad_dynamic(sch, block, n_s: int, lanes: int):
    """Pad a matmul-like block whose row or column count is known only at run time to a multiple of
    the micro-kernel's tile (``pad_einsum``: the input and output padded in buffers of their own),
    so that the tiles need no predicate: the padded block, or None (static, or not an einsum --
    then the last tile is predicated, about 2.7x slower on a Llama MLP's matmul than padded)."""
    loops = sch.get_loops(block)
    exts = [_extent(sch, lp) for lp in loops]
    m_dyn = n_s >= 2 and exts[n_s - 2] is None
    n_dyn = exts[n_s - 1] is None
    if not (m_dyn or n_dyn):
        return None
    padding = [1] * len(loops)
    if m_dyn:
        padding[n_s - 2] = DYNAMIC_ROWS
    if n_dyn:
        padding[n_s - 1] = lanes
    name = sch.get(block).name_hint
    try:
        sch.pad_einsum(block, padding)
    except _SCHEDULE_ERRORS:
        return None
    return sch.get_sblock(name)


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
    if vec_friendly:
        padded = _pad_dynamic(sch, block, n_s, lanes)
        if padded is not None:
            block = padded
            stmt, loops = sch.get(block), sch.get_loops(block)
            ivs = list(stmt.iter_vars)
            vvar = ivs[n_s - 1].var
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
    if n_ext is None:       # columns known at run time (attention scores): vectors, the last one predicated
        vn = lanes
    else:
        vn = _vector_width(n_ext, lanes)
    if vn is None:
        vn = n_ext if n_ext <= 2 * lanes else 1
    rows = _row_tile(vn, lanes, dtype_bytes)
    if n_s < 2:
        mt = 1
    elif m_ext is None:
        # rows known at run time (a dynamic sequence length): tiles of DYNAMIC_ROWS, the last one
        # predicated; left unscheduled, the kernel ran as a serial loop nest (580x slower)
        mt = min(rows, DYNAMIC_ROWS)
    else:
        mt = _largest_divisor(m_ext, rows)

    # contiguous weight panels avoid 4K aliasing / cache-set thrash on large power-of-two strides
    if prepack_idx is not None and vn > 1 and n_ext is not None and n_ext > vn:
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
    _finish_tile(sch, block, acc, fused, m_i, n_i, r_loops[0], mt, vn)
    return True


# ---- NT_matmul: a linear reading its weight as torch lays it out ---------------------------------------
#: up to this many rows (the product of the output's other axes) the NT kernel is a dot product per
#: output; above, it packs weight panels as it runs (measured, backends.md, TVM "Weights by reference")
NT_DOT_MAX_ROWS = 8


def _nt_operands(sch, block):
    """``(weight read index, spatial loops, reduction loop)`` of a block computing
    ``out[..., m, n] = sum_k A[..., m, k] * W[n, k]`` (an ``NT_matmul``: ``W`` 2-D, indexed by the
    last spatial axis and the one reduction axis, ``A`` by the reduction axis last); None otherwise."""
    stmt = sch.get(block)
    ivs = list(stmt.iter_vars)
    loops = sch.get_loops(block)
    if len(loops) != len(ivs) or len(ivs) < 2 or len(stmt.writes) != 1 or len(stmt.reads) < 2:
        return None
    kinds = [iv.iter_type for iv in ivs]
    if kinds[-1] != tirx.IterVar.CommReduce or any(k != tirx.IterVar.DataPar for k in kinds[:-1]):
        return None
    nvar, kvar = ivs[-2].var, ivs[-1].var
    out = stmt.writes[0]
    if not out.region or not _uses_var(out.region[-1].min, nvar):
        return None
    weight = other = None
    for i, r in enumerate(stmt.reads):
        if r.source.same_as(out.source) or not r.region:
            continue
        reg = r.region
        if len(reg) == 2 and _uses_var(reg[0].min, nvar) and _uses_var(reg[1].min, kvar) \
                and not _uses_var(reg[1].min, nvar) and not any(_uses_var(reg[0].min, iv.var) for iv in ivs[:-2]):
            weight = i if weight is None else weight
        elif _uses_var(reg[-1].min, kvar) and not any(_uses_var(x.min, nvar) for x in reg):
            other = i
    if weight is None or other is None:
        return None
    return weight, list(loops[:-1]), loops[-1]


def _tile_nt(sch, block, lanes: int, dtype_bytes: int) -> bool:
    """Schedule an ``NT_matmul`` (``params="reference"``: linears read ``W [N, K]`` in place,
    no transposed copy). Up to :data:`NT_DOT_MAX_ROWS` rows (decode steps) or with rows known
    only at run time: a dot product per output, vectorised along ``K`` (``rfactor``), up to 8
    outputs at a time, parallel over output columns. More rows: each parallel task packs its
    ``[K, VN]`` weight panel (a gathered transpose into a buffer of the task's own) and runs the
    register-tiled micro-kernel of :func:`_tile_main` over every row. False if the shapes do not
    fit (the next rule takes the block)."""
    found = _nt_operands(sch, block)
    if found is None or _reads_bool(sch, block):
        return False
    w_idx, s_loops, k_loop = found
    n_ext, k_ext = _extent(sch, s_loops[-1]), _extent(sch, k_loop)
    if n_ext is None or k_ext is None:
        return False
    m_exts = [_extent(sch, lp) for lp in s_loops[:-1]]
    rows = None if any(e is None for e in m_exts) else math.prod(m_exts)
    if rows is None or rows <= NT_DOT_MAX_ROWS or not s_loops[:-1]:
        return _nt_dot(sch, block, s_loops, k_loop, n_ext, k_ext, lanes)
    return _nt_packed(sch, block, w_idx, s_loops, k_loop, n_ext, lanes, dtype_bytes)


def _nt_dot(sch, block, s_loops, k_loop, n_ext: int, k_ext: int, lanes: int) -> bool:
    vk = next((v for v in (lanes, lanes // 2, 4) if v >= 4 and k_ext % v == 0), None)
    if vk is None:
        return False
    nt = next(v for v in (8, 4, 2, 1) if n_ext % v == 0)
    k_o, k_i = sch.split(k_loop, factors=[None, vk])
    rf = sch.rfactor(k_i, len(s_loops))         # rf[..., m, n, k_i]: k_i becomes spatial
    loops = sch.get_loops(rf)
    m_loops, n, ko, ki = loops[:len(s_loops) - 1], loops[len(s_loops) - 1], loops[-2], loops[-1]
    n_o, n_i = sch.split(n, factors=[None, nt])
    sch.reorder(n_o, *m_loops, ko, n_i, ki)
    sch.parallel(n_o)
    if nt > 1:
        sch.unroll(n_i)
    sch.vectorize(ki)
    sch.set_scope(rf, 0, "local")
    sch.reverse_compute_at(block, m_loops[-1] if m_loops else n_o)
    sch.decompose_reduction(rf, ko)
    return True


def _nt_packed(sch, block, w_idx: int, s_loops, k_loop, n_ext: int, lanes: int, dtype_bytes: int) -> bool:
    vn = _vector_width(n_ext, lanes)
    m_ext = _extent(sch, s_loops[-2])
    if vn is None or vn < 4 or m_ext is None:
        return False
    mt = _largest_divisor(m_ext, _row_tile(vn, lanes, dtype_bytes))
    acc = sch.cache_write(block, 0, "global")
    n_o, n_i = sch.split(s_loops[-1], factors=[None, vn])
    m_o, m_i = sch.split(s_loops[-2], factors=[None, mt])
    others = list(s_loops[:-2])
    sch.reorder(n_o, *others, m_o, k_loop, m_i, n_i)
    par = sch.fuse(n_o, *others) if others else n_o
    sch.parallel(par)
    # the task's weight panel W[n_o*vn:(n_o+1)*vn, :] as [K, vn], gathered once for all its rows
    panel = sch.cache_read(block, w_idx, "global")
    sch.compute_at(panel, par)
    sch.transform_layout(panel, ("write", 0), lambda a, c: (c, a))
    p_loops = sch.get_loops(panel)
    sch.reorder(p_loops[-1], p_loops[-2])
    sch.vectorize(sch.get_loops(panel)[-1])
    _finish_tile(sch, block, acc, m_o, m_i, n_i, k_loop, mt, vn)
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
        if blocks and all(not sch.get(b).iter_vars and not sch.get_loops(b) for b in blocks):
            # kernels written already scheduled, their loops inside one opaque block (a scan from
            # DispatchSortScan, under the root OptcWrapRootless gave it): nothing to schedule, and
            # a Schedule's copy of such a kernel with a dynamic shape gives its output buffer a
            # layout over a new shape variable that MakePackedAPI then finds undefined (TVM 0.27:
            # "variables (s27,) are used, but are not passed in as API arguments")
            return None
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
                ok = _tile_nt(sch, main, lanes, dtype_bytes) or \
                    _tile_main(sch, main, lanes, dtype_bytes, self.fallback, _layout_free_buffers(func))
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
