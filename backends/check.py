"""The check a compiled model passes before it is handed over (``optc.compile(check=True)``).

The CompiledModel runs on the Program's example inputs and on one fresh random draw of the same
specs (floats standard normal, integers within the example's range; a dynamic dim drawn at
another size within its range, so a backend that specialised it fails here rather than at the
user's). Each output is compared with the optimized Program run eagerly on the same inputs:

- integer and boolean outputs must be equal;
- floating outputs: ``max |got - ref| / scale <= tolerance``, where ``scale`` is the largest
  finite ``|ref|`` of that output. Positions where the reference is NaN are not compared (NaN
  where eager has NaN is not a mismatch); a NaN or an infinity where the reference is finite is a
  mismatch; equal infinities agree. The tolerance comes from the least precise floating dtype
  the program computes in (:func:`compute_dtype`: the output's, or float16/bfloat16 inside a
  ``to-half`` program; :data:`TOLERANCE`) and, for a program with quantize/dequantize ops, from
  :data:`QUANTIZED_TOLERANCE` and :data:`QUANTIZED_MIN_COSINE` (a backend's integer kernels may
  round a value to the neighbouring step where the reference kernel rounded it the other way).

A mismatch raises :class:`~optc.errors.NumericMismatchError` naming the backend, the target, the
output, the inputs (example or fresh), the error and the tolerance; a compiled model that fails to
run on the fresh draw raises :class:`~optc.errors.LoweringError`. docs/backends.md ("The
compile-time check") states the rules and what the check costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils._pytree as pytree

from optc.errors import LoweringError, NumericMismatchError, OptcError
from optc.ir.program import Program

#: Largest error, relative to the output's scale, of a floating output computed by a backend
#: from a Program with no quantize ops: a few hundred ulps of the dtype at the output's scale
#: (reordered sums, fused kernels, fast-math approximations of exp/tanh/erf).
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 6e-2,
}
#: Programs with quantize/dequantize ops: relative error, and the cosine the output must keep.
QUANTIZED_TOLERANCE = 0.1
QUANTIZED_MIN_COSINE = 0.995


@dataclass
class OutputCheck:
    inputs: str              # "example" or "fresh"
    output: int              # flat output index
    dtype: str
    error: float             # relative to the output's scale (0/1 count of differing values for integers)
    tolerance: float
    cosine: float = 1.0
    ok: bool = True
    detail: str = ""


@dataclass
class CheckReport:
    """What the check measured: one entry per (input set, output)."""

    backend: str
    target: str
    outputs: list[OutputCheck] = field(default_factory=list)
    time_s: float = 0.0
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)

    @property
    def worst(self) -> OutputCheck | None:
        floats = [o for o in self.outputs if o.tolerance > 0]
        return max(floats, key=lambda o: o.error / o.tolerance) if floats else (self.outputs[0] if self.outputs else None)

    def format(self) -> str:
        if self.skipped:
            return f"check     skipped: {self.skipped}"
        w = self.worst
        n_sets = len({o.inputs for o in self.outputs})
        if w is None:
            return "check     no outputs to compare"
        head = f"check     {'passed' if self.ok else 'FAILED'}: {len(self.outputs)} outputs x {n_sets} input sets"
        if w.tolerance > 0:
            head += f", worst {w.error:.2g} of the output scale (output {w.output}, {w.inputs} inputs; tolerance {w.tolerance:g})"
        else:
            head += " (integer outputs equal)"
        return head + f", {self.time_s * 1e3:.0f} ms"

    def __str__(self) -> str:
        return self.format()


def compute_dtype(program: Program, dtype: torch.dtype) -> torch.dtype:
    """The least precise floating dtype the program computes in: an output returned in float32
    by a ``to-half`` program was computed in float16 or bfloat16 on its way."""
    order = [torch.float64, torch.float32, torch.float16, torch.bfloat16]   # by decreasing precision
    least = dtype
    for node in program.graph.nodes:
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor) and v.dtype in order and order.index(v.dtype) > order.index(least) \
                and least in order:
            least = v.dtype
    return least


def tolerance_for(program: Program, dtype: torch.dtype) -> float:
    base = TOLERANCE.get(compute_dtype(program, dtype), 1e-4)
    if _quantized(program):
        return max(QUANTIZED_TOLERANCE, base)
    return base


def _quantized(program: Program) -> bool:
    from optc.ir.quant_ops import is_quant_op
    return any(n.op == "call_function" and is_quant_op(n.target) for n in program.graph.nodes)


def compare_output(ref: torch.Tensor, got: torch.Tensor, tolerance: float, *, quantized: bool = False
                   ) -> tuple[float, float, bool, str]:
    """``(error, cosine, ok, detail)`` of one output (see the module docstring for the rules)."""
    if not isinstance(got, torch.Tensor):
        return math.inf, -1.0, False, f"the backend returned {type(got).__name__}, not a tensor"
    if tuple(ref.shape) != tuple(got.shape):
        return math.inf, -1.0, False, f"shape {list(got.shape)} != expected {list(ref.shape)}"
    if ref.dtype != got.dtype:
        return math.inf, -1.0, False, f"dtype {got.dtype} != expected {ref.dtype}"
    ref, got = ref.detach().cpu(), got.detach().cpu()
    if not ref.is_floating_point() and not ref.is_complex():
        differ = int((ref != got).sum())
        return float(differ), 1.0, differ == 0, (f"{differ} of {ref.numel()} values differ" if differ else "")
    r, g = ref.to(torch.float64), got.to(torch.float64)
    compared = ~torch.isnan(r)
    finite = torch.isfinite(r)
    scale = float(r[finite].abs().max()) if bool(finite.any()) else 0.0
    scale = scale if scale > 0 else 1.0
    bad_nonfinite = compared & finite & ~torch.isfinite(g)
    if bool(bad_nonfinite.any()):
        n = int(bad_nonfinite.sum())
        return math.inf, -1.0, False, f"{n} values are NaN or infinite where the reference is finite"
    inf_mismatch = compared & ~finite & (r != g)
    if bool(inf_mismatch.any()):
        return math.inf, -1.0, False, f"{int(inf_mismatch.sum())} infinities of the reference differ"
    both = compared & finite
    diff = (r - g).abs()[both]
    err = float(diff.max()) / scale if diff.numel() else 0.0
    rf, gf = r[both], g[both]
    denom = float(rf.norm() * gf.norm())
    cos = float(rf @ gf) / denom if denom > 0 else (1.0 if float(rf.norm()) == float(gf.norm()) else 0.0)
    ok = err <= tolerance and (not quantized or cos >= QUANTIZED_MIN_COSINE)
    return err, cos, ok, ""


def fresh_inputs(program: Program, seed: int = 1) -> tuple[tuple, dict]:
    """A random draw of the program's input specs; dynamic dims at another size where they can be."""
    from optc.backends.export import symbolic_dims
    gen = torch.Generator().manual_seed(seed)
    dims = symbolic_dims(program)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    sizes: dict[str, int] = {}
    for i, axes in dims.items():
        example = program.example_flat_inputs()[i]
        for axis, sym in axes.items():
            if sym not in sizes:
                lo, hi = _range(placeholders[i].meta["val"].shape[axis])
                now = int(example.shape[axis])
                sizes[sym] = now + 1 if now + 1 <= hi else (now - 1 if now - 1 >= max(lo, 1) else now)
    leaves, spec = pytree.tree_flatten((program.example_args, program.example_kwargs))
    flat_i = 0
    out = []
    for leaf, value in zip(program.input_leaves, leaves):
        if not leaf.is_tensor:
            out.append(value)
            continue
        shape = list(value.shape)
        for axis, sym in dims.get(flat_i, {}).items():
            shape[axis] = sizes[sym]
        out.append(_draw(value, shape, gen))
        flat_i += 1
    args, kwargs = pytree.tree_unflatten(out, spec)
    return tuple(args), dict(kwargs)


def _range(d) -> tuple[int, int]:
    from optc.backends.export import _sym_range
    return _sym_range(d) if isinstance(d, torch.SymInt) else (int(d), int(d))


def _draw(t: torch.Tensor, shape: list[int], gen: torch.Generator) -> torch.Tensor:
    if t.is_floating_point():
        return torch.randn(shape, generator=gen, dtype=t.dtype)
    if t.dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, 1)
    if lo == hi:
        return torch.full(shape, lo, dtype=t.dtype)
    return torch.randint(lo, hi + 1, shape, generator=gen, dtype=t.dtype)


@dataclass
class CheckPlan:
    """The program's half of the check, computed before lowering (:func:`plan_check`), so that
    the program and its weights can be released before the backend's runtime loads its own copy:
    the inputs, the program's outputs on them and each output's tolerance."""

    sets: list = field(default_factory=list)      # (label, args, kwargs, reference outputs, tolerances)
    quantized: bool = False


def plan_check(program: Program, *, seed: int = 1) -> CheckPlan:
    plan = CheckPlan(quantized=_quantized(program))
    for label, (args, kwargs) in (("example", (program.example_args, program.example_kwargs)),
                                  ("fresh", fresh_inputs(program, seed))):
        with torch.no_grad():
            ref = program(*args, **kwargs)
        leaves = pytree.tree_leaves(ref)
        tols = [tolerance_for(program, r.dtype) if isinstance(r, torch.Tensor) and (r.is_floating_point() or r.is_complex())
                else 0.0 for r in leaves]
        plan.sets.append((label, args, kwargs, leaves, tols))
    return plan


def run_check(compiled: Any, plan: CheckPlan) -> CheckReport:
    """Run ``compiled`` on the plan's inputs and compare with the program's outputs (see
    :func:`check_compiled`)."""
    import time
    t0 = time.perf_counter()
    backend, target = compiled.backend, str(compiled.target)
    report = CheckReport(backend, target)
    for label, args, kwargs, ref_leaves, tols in plan.sets:
        with torch.no_grad():
            try:
                got = compiled(*args, **kwargs)
            except OptcError as e:
                if label == "example":
                    raise
                raise LoweringError(f"the compiled model fails on a fresh draw of its input specs "
                                    f"({_shapes(args, kwargs)}): {e}", backend=backend) from e
            except Exception as e:  # noqa: BLE001 - a runtime's own error types
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise LoweringError(f"the compiled model fails on the {label} inputs ({_shapes(args, kwargs)}): "
                                    f"{type(e).__name__}: {first}", backend=backend) from e
        got_leaves = pytree.tree_leaves(got)
        if len(ref_leaves) != len(got_leaves):
            raise NumericMismatchError(f"[{backend}] {target}: the compiled model returns {len(got_leaves)} "
                                       f"outputs, the program {len(ref_leaves)}")
        for i, (r, g, tol) in enumerate(zip(ref_leaves, got_leaves, tols)):
            if not isinstance(r, torch.Tensor):
                continue
            floating = r.is_floating_point() or r.is_complex()
            err, cos, ok, detail = compare_output(r, g, tol, quantized=plan.quantized and floating)
            report.outputs.append(OutputCheck(label, i, str(r.dtype).replace("torch.", ""), err, tol, cos, ok, detail))
            if not ok:
                report.time_s = time.perf_counter() - t0
                raise mismatch_error(report, report.outputs[-1])
    report.time_s = time.perf_counter() - t0
    return report


def check_compiled(compiled: Any, program: Program, *, seed: int = 1) -> CheckReport:
    """Run ``compiled`` on the example inputs and a fresh draw; compare with ``program``.

    Raises :class:`NumericMismatchError` on a mismatch, :class:`LoweringError` when the compiled
    model fails on the fresh draw; returns the :class:`CheckReport` otherwise."""
    return run_check(compiled, plan_check(program, seed=seed))


def mismatch_error(report: CheckReport, o: OutputCheck, program: Program | None = None) -> NumericMismatchError:
    what = o.detail or (f"max error {o.error:.3g} of the output scale > tolerance {o.tolerance:g}"
                        + (f" (cosine {o.cosine:.5f})" if o.cosine < 1 else ""))
    if o.tolerance > 0 and o.detail == "" and o.error <= o.tolerance:
        what = f"cosine {o.cosine:.5f} < {QUANTIZED_MIN_COSINE} (max error {o.error:.3g} of the output scale)"
    err = NumericMismatchError(
        f"[{report.backend}] the compiled model for {report.target} does not compute what the program does: "
        f"output {o.output} ({o.dtype}) on the {o.inputs} inputs: {what}. Compile with check=False "
        f"(optc compile --no-check) to get the model anyway.")
    err.report = report
    return err


def _shapes(args, kwargs) -> str:
    leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    return ", ".join("x".join(map(str, t.shape)) or "scalar" for t in leaves)

