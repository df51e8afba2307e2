"""The oracle: one generated model through every target, compared with eager PyTorch.

The oracle (:func:`oracle`, :func:`run_oracle`) runs one generated model
(:mod:`optc.tools.fuzz.source`) through every *target* and compares each with eager PyTorch:

- ``capture``: :func:`optc.capture` alone;
- ``pass:NAME``: every registered pass alone, default options (``PassManager(NAME)`` with the
  honest-``modified`` check on, then the verifier with shape re-propagation if it changed the graph);
- ``pipeline:default``: the cpu target's default pipeline;
- ``backend:NAME``: the ``NAME:cpu`` target's default pipeline, then ``lower`` (a backend whose
  package or module is missing is reported ``unavailable`` and skipped).

Rules (see docs/fuzzing.md). The reference is the eager model in float64
(``deepcopy(model).double()`` on the inputs cast to float64). For every output ``i``,
errors are ``max |out - ref| / max |ref|``. The eager float32 model's error ``e_i`` measures
how much float32 rounding alone moves this output; a target passes if its error is at most
``max(factor * e_i, floor)`` (``factor=8``, ``floor=1e-5``): loose enough for a reassociated
sum or a folded weight, tight enough for a wrong axis or a dropped term (errors of order 1).
Outputs must also have the eager model's shapes and dtypes, and be finite. Lossy passes are
held to ``PassInfo.lossy_tolerance`` when they declare one, else only run, shapes and
finiteness are checked (status ``unchecked``). Two input sets are compared: the example
inputs the model was captured with and a fresh set (a pass must not specialise on the
example). A model whose float64 or float32 eager output is not finite is discarded.
"""

from __future__ import annotations

import copy
import math
import re
import time
import warnings
from typing import Any, Iterable

import torch

from optc.tools.fuzz.results import Mismatch, OracleResult, _first_line, output_errors
from optc.tools.fuzz.source import build_model, make_inputs
from optc.tools.fuzz.spec import ModelSpec

FACTOR = 8.0
FLOOR = 1e-5
N_INPUT_SETS = 2
DEFAULT_BACKENDS = ("torchscript", "onnx", "tvm")


def target_names(passes: Iterable[str] | None = None, backends: Iterable[str] = (), pipeline: bool = True) -> list[str]:
    from optc.passes.base import registry
    names = ["capture"] + [f"pass:{p}" for p in (registry() if passes is None else passes)]
    if pipeline:
        names.append("pipeline:default")
    return names + [f"backend:{b}" for b in backends]


def run_target(spec: ModelSpec, target: str) -> OracleResult:
    """:func:`oracle` on ``target`` alone (``"pass:cse"``, ``"pipeline:default"``,
    ``"backend:onnx"``): what a reproducer, a regression test or a rerun of a campaign's model
    checks."""
    backends = [target.split(":", 1)[1]] if target.startswith("backend:") else []
    passes = [target.split(":", 1)[1]] if target.startswith("pass:") else []
    return oracle(spec, passes=passes, backends=backends, pipeline=target == "pipeline:default", only=target)


def run_oracle(spec: ModelSpec, passes: Iterable[str] | None = None, backends: Iterable[str] = (), **kw) -> list[Mismatch]:
    """The mismatches of ``spec`` (see :func:`oracle`)."""
    return oracle(spec, passes, backends, **kw).mismatches


def oracle(spec: ModelSpec, passes: Iterable[str] | None = None, backends: Iterable[str] = (), *,
           pipeline: bool = True, only: str | None = None, factor: float = FACTOR, floor: float = FLOOR,
           n_input_sets: int = N_INPUT_SETS) -> OracleResult:
    """Run ``spec`` through capture, each pass in ``passes`` (default: every registered pass),
    the default pipeline (``pipeline``) and each backend in ``backends``; compare with eager.

    ``only``: run just that target (``"pass:cse"``, ``"backend:onnx"``; shrinking uses it).
    """
    from optc.passes.base import registry
    reg = registry()
    passes = list(reg) if passes is None else list(passes)
    backends = list(backends)
    res = OracleResult(spec)
    model = build_model(spec)
    input_sets = [make_inputs(spec, k) for k in range(n_input_sets)]
    refs = _references(model, input_sets)
    if isinstance(refs, str):
        res.discarded = refs
        return res
    check = _Checker(spec, refs, factor, floor, res)

    def wanted(target: str) -> bool:
        return only is None or only == target

    program = check.run("capture", None, None, lambda: _capture(model, input_sets[0]))
    if program is None:
        for t in target_names(passes, backends, pipeline)[1:]:
            if wanted(t):
                res.status[t] = "blocked"
        return res
    for name in passes:
        target = f"pass:{name}"
        if not wanted(target):
            continue
        info = reg[name]
        tol = None if info.exact else info.lossy_tolerance
        check.run(target, name, None, lambda: _optimize(program, name, "cpu", input_sets),
                  exact=info.exact, lossy_tolerance=tol, plugin=_plugin_of(info))
    if pipeline and wanted("pipeline:default"):
        check.run("pipeline:default", "default", None, lambda: _optimize(program, "default", "cpu", input_sets))
    for b in backends:
        target = f"backend:{b}"
        if wanted(target):
            check.run_backend(target, b, program, input_sets)
    _recheck_in_float64(res, spec, n_input_sets)
    return res


#: A numeric mismatch of an exact target below this share of the output scale is run again in float64.
ROUNDING_MAX = 1e-3
#: ... and is float32 rounding, not a finding, when the float64 run agrees with the float64 reference this well.
FLOAT64_AGREE = 1e-9


def _recheck_in_float64(res: "OracleResult", spec: ModelSpec, n_input_sets: int) -> None:
    """A small numeric mismatch of an exact target on an ill-conditioned model (cancellation in
    ``1 + erf(x)`` for x << 0, a norm of a near-constant row) can be float32 rounding amplified by
    the model, not a wrong rewrite: the same target run on the model in float64 then agrees with
    the float64 reference to 1e-9, which a rewrite that computes another function cannot. Such a
    mismatch becomes status ``rounding`` (counted, not a finding). A target that cannot run in
    float64 keeps its mismatch."""
    keep = []
    for m in res.mismatches:
        if m.kind != "numeric" or m.error is None or not m.error < ROUNDING_MAX or m.allowed is None \
                or not math.isfinite(m.allowed):
            keep.append(m)
            continue
        e64 = _float64_error(spec, m, n_input_sets)
        if e64 is None or not e64 <= FLOAT64_AGREE:
            keep.append(m)
            continue
        res.status[m.target] = "rounding"
        res.notes[m.target] = f"float32 rounding on an ill-conditioned model (float64 run agrees to {e64:.1g})"
    res.mismatches = keep


def _float64_error(spec: ModelSpec, m: "Mismatch", n_input_sets: int) -> float | None:
    """Max error (relative to the output scale) of ``m``'s target run on ``spec``'s model in float64."""
    from optc.backends.base import lower
    from optc.target import resolve_target
    try:
        model = build_model(spec).double()
        input_sets = [tuple(t.double() if t.is_floating_point() else t for t in make_inputs(spec, k))
                      for k in range(n_input_sets)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = _capture(model, input_sets[0])
            if m.target.startswith("pass:"):
                fn = _optimize(program, m.target.split(":", 1)[1], "cpu", input_sets)
            elif m.target == "pipeline:default":
                fn = _optimize(program, "default", "cpu", input_sets)
            elif m.target.startswith("backend:"):
                tgt = resolve_target("cpu", m.backend)
                fn = lower(_optimize(program, "default", tgt, input_sets), tgt)
            else:
                return None
            with torch.no_grad():
                return max(err for inputs in input_sets
                           for ref in (model(*inputs),) for err, _ in output_errors(ref, ref, fn(*inputs)))
    except Exception:  # noqa: BLE001 - an op without a float64 kernel (or another output shape): no verdict
        return None


def _references(model, input_sets) -> list | str:
    """Per input set ``(inputs, fp64 reference, fp32 eager)``; a string if the model is unusable."""
    model64 = copy.deepcopy(model).double()
    out = []
    with torch.no_grad():
        for inputs in input_sets:
            ref = model64(*[t.double() for t in inputs])
            eager = model(*inputs)
            for t in _leaves(ref) + _leaves(eager):
                if not bool(torch.isfinite(t).all()):
                    return "eager output is not finite"
            out.append((inputs, ref, eager))
    return out


def _leaves(x) -> list:
    import torch.utils._pytree as pytree
    return [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


def _capture(model, inputs):
    import optc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optc.capture(model, inputs)


def _optimize(program, pipeline: str, target: str, input_sets):
    """Run ``pipeline`` with the honest-``modified`` check; the verifier (with shape
    re-propagation) runs on the result when a pass changed the graph."""
    from optc.ir.verifier import verify
    from optc.passes.manager import PassManager
    pm = PassManager(pipeline, target=target, check_modified=True, extra={"calibration_data": list(input_sets)})
    out, report = pm.run(program)
    fired = any(r.modified for r in report.records)
    if fired:
        verify(out, repropagate=True)
    out._fuzz_fired = fired   # noqa: SLF001 (our own marker: did any pass change the graph)
    return out


def _is_refusal(e: BaseException) -> bool:
    """A pass that declines a model on purpose: the PassManager's PassError caused by a plain
    :class:`~optc.errors.OptcError` (a typed, user-facing reason such as "nothing to quantize").
    Crashes (any other exception), verifier failures and dishonest ``modified`` flags are findings."""
    from optc.errors import OptcError, PassError
    cause = e.__cause__
    return isinstance(e, PassError) and cause is not None and type(cause) is OptcError


def _plugin_of(info) -> str | None:
    mod = getattr(info.fn, "__module__", "") or ""
    return None if mod.startswith("optc.") or mod == "__main__" else mod


class _Checker:
    def __init__(self, spec, refs, factor, floor, res: OracleResult):
        self.spec, self.refs, self.factor, self.floor, self.res = spec, refs, factor, floor, res
        self._pipelines: dict[str, Any] = {}

    def run(self, target, pipeline, backend, make, *, exact=True, lossy_tolerance=None, plugin=None):
        """Build the target's callable with ``make`` and compare it; returns it (None on error)."""
        plugins = (plugin,) if plugin else ()
        t0 = time.perf_counter()
        try:
            fn = make()
        except Exception as e:  # any failure on a valid model is a finding, but a deliberate refusal
            if _is_refusal(e):
                self.res.status[target] = "refused"
                self.res.notes[target] = _first_line(str(e))
            else:
                self._error(target, pipeline, backend, e, plugins)
            return None
        finally:
            self.res.times[target] = time.perf_counter() - t0
        # a pass that left the graph as captured (the honest-modified check holds it to that) is
        # run on the example inputs only: fresh inputs matter where a rewrite could specialise
        fired = getattr(fn, "_fuzz_fired", True)
        self.compare(target, pipeline, backend, fn, exact=exact, lossy_tolerance=lossy_tolerance, plugins=plugins,
                     input_sets=None if fired else 1)
        if getattr(fn, "_fuzz_fired", False):
            self.res.changed.add(target)
            if self.res.status.get(target) == "ok":
                self.res.status[target] = "fired"
        return fn

    def run_backend(self, target, name, program, input_sets):
        from optc.backends.base import get_backend, lower
        from optc.errors import BackendUnavailableError, LoweringError
        from optc.target import resolve_target
        try:
            tgt = resolve_target("cpu", name)
            get_backend(name).check_available(tgt)
        except BackendUnavailableError as e:
            self.res.status[target] = "unavailable"
            self.res.notes[target] = str(e).splitlines()[0]
            return
        except Exception as e:  # the backend's module fails to import: a finding, not a crash of the fuzzer
            self._error(target, "default", name, e, ())
            return
        t0 = time.perf_counter()
        try:
            optimized = self._pipelines.get(tgt.default_pipeline)
            if optimized is None:
                optimized = _optimize(program, "default", tgt, input_sets)
                self._pipelines[tgt.default_pipeline] = optimized
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled = lower(optimized, tgt)
        except LoweringError as e:
            if re.match(r"(\[\w+\] )?cannot lower", str(e)):   # an explicit, named refusal: a coverage gap
                self.res.status[target] = "unsupported"
                self.res.notes[target] = str(e).splitlines()[0]
            else:
                self._error(target, "default", name, e, ())
            return
        except Exception as e:  # any failure on a valid model is a finding
            self._error(target, "default", name, e, ())
            return
        finally:
            self.res.times[target] = time.perf_counter() - t0
        self.compare(target, "default", name, compiled)

    def compare(self, target, pipeline, backend, fn, *, exact=True, lossy_tolerance=None, plugins=(), input_sets=None):
        worst = None
        for inputs, ref, eager in self.refs[:input_sets]:
            try:
                with torch.no_grad():
                    got = fn(*inputs)
                errors = output_errors(ref, eager, got)
            except ValueError as e:
                self._add(Mismatch(target, "shape", str(e), self.spec, pipeline, backend, plugins=plugins))
                return
            except Exception as e:  # running the result failed
                self._error(target, pipeline, backend, e, plugins)
                return
            for i, (err, eager_err) in enumerate(errors):
                allowed = max(self.factor * eager_err, self.floor)
                if not exact:
                    allowed = math.inf if lossy_tolerance is None else max(allowed, lossy_tolerance)
                if not err <= allowed and (worst is None or err / allowed > worst[0] / worst[1]):
                    worst = (err, allowed, i, eager_err)
                if not exact and not math.isfinite(err):
                    worst = (err, allowed, i, eager_err)
        if worst is not None:
            err, allowed, i, eager_err = worst
            detail = (f"output {i}: error {err:.3g} > allowed {allowed:.3g} (eager fp32 error {eager_err:.3g}; "
                      "errors relative to max|fp64 reference|)")
            self._add(Mismatch(target, "numeric", detail, self.spec, pipeline, backend, error=err, allowed=allowed,
                               plugins=plugins))
            return
        self.res.status[target] = "ok" if exact or lossy_tolerance is not None else "unchecked"

    def _error(self, target, pipeline, backend, e: BaseException, plugins):
        text = f"{type(e).__name__}: {e}".strip()
        if len(text) > 3000:   # TorchScript puts the reason after a long traceback: keep both ends
            text = text[:1500] + "\n...\n" + text[-1500:]
        self._add(Mismatch(target, "error", text, self.spec, pipeline, backend,
                           exc_type=type(e).__name__, plugins=plugins))

    def _add(self, m: Mismatch):
        self.res.status[m.target] = "mismatch"
        self.res.mismatches.append(m)
