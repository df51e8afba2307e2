"""Relax rewrites of the pre-schedule pipeline: clip as min/max, constant ``call_tir`` folded at compile time (weight repacking)."""

from __future__ import annotations

import logging

import tvm
from tvm import relax, tirx
from tvm.target import Target

log = logging.getLogger("optc.backends.tvm")


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


# ---- linear weights read in place -----------------------------------------------------------------------
def _weight_params(func: relax.Function) -> list:
    """``func``'s weight parameters: those after its ``num_input`` inputs (all when unset)."""
    n_input = func.attrs["num_input"] if func.attrs is not None and "num_input" in func.attrs else 0
    return list(func.params[int(n_input):])


@tvm.transform.module_pass(opt_level=0, name="OptcFuseWeightTransposeMatmul")
def fuse_weight_transpose_matmul(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``matmul(x, permute_dims(W))`` with ``W`` one of ``main``'s 2-D weight parameters -> one
    ``NT_matmul`` kernel that reads ``W`` as torch lays it out (``[N, K]``), so that nothing
    transposes the weight into a copy (``params="reference"``; the CPU schedule's ``NT`` micro-
    kernels, ``cpu_schedule._tile_nt``). TVM's ``FuseTransposeMatmul``, restricted to weights: a
    transposed activation (attention's ``q @ k^T``) keeps its own kernels. Run before LegalizeOps."""
    from tvm.relax.transform import fuse_transpose_matmul as ftm

    main = mod["main"] if "main" in [gv.name_hint for gv in mod.functions] else None
    if not isinstance(main, relax.Function):
        return mod
    weights = [p for p in _weight_params(main) if getattr(p.ty, "ndim", -1) == 2]
    if not weights:
        return mod
    pattern, annotations, check = ftm._pattern()

    def _check(context) -> bool:
        w = context.annotated_expr["w"]
        return any(w.same_as(p) for p in weights) and check(context)

    mod = relax.transform.FuseOpsByPattern([("transpose_matmul_fuse", pattern, annotations, _check)],
                                           bind_constants=False)(mod)
    fuser = ftm._TransposeMatmulFuser(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            fuser.builder_.update_func(gv, fuser.visit_expr(func))
    return fuser.builder_.get()
