"""The candidates of a benchmark: eager, torch.compile, torch.jit, ONNX Runtime and optc's backends.

:func:`build_candidate` builds one, timing the build and first call and measuring the growth of
the process's peak RSS (:class:`PeakRSS`) and its max relative error against eager
(:func:`max_rel_error`); a failure becomes the row's error, never an exception.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import io
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.utils._pytree as pytree

from optc.errors import OptcError


BASELINES = ("eager", "inductor", "torchscript", "ort", "openvino")
BASELINE_LABELS = {"eager": "eager", "inductor": "torch.compile", "torchscript": "torch.jit",
                   "ort": "onnxruntime", "openvino": "openvino"}


def default_baselines() -> tuple[str, ...]:
    """Every baseline whose package is installed (openvino is an extra)."""
    import importlib.util
    return tuple(b for b in BASELINES if b != "openvino" or importlib.util.find_spec("openvino") is not None)


def max_rel_error(out: Any, ref: Any) -> float | None:
    """``max |y - ref| / max |ref|`` over the tensor leaves of two outputs (None if they differ in
    structure); computed in float64."""
    a = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    b = [t for t in pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return None
    err = 0.0
    for x, y in zip(a, b):
        if y.numel() == 0:
            continue
        x64, y64 = x.detach().cpu().double(), y.detach().cpu().double()
        scale = y64.abs().max().item()
        diff = (x64 - y64).abs().max().item()
        err = max(err, diff / scale if scale > 0 else diff)
    return err


# ---- peak memory -------------------------------------------------------------------------------
def _proc_status() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Peak RSS growth of this process over a ``with`` block (Linux: reset ``VmHWM`` through
    ``/proc/self/clear_refs``). ``growth`` is None where the reset is not possible."""

    def __init__(self):
        self.growth: int | None = None
        self._start: int | None = None

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._start = _proc_status().get("VmRSS")
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc) -> None:
        hwm = _proc_status().get("VmHWM")
        if self._start is not None and hwm is not None:
            self.growth = max(hwm - self._start, 0)


@dataclass
class Candidate:
    name: str
    kind: str                                   # "baseline" or "optc"
    run: Callable[[], Any] | None = None
    compile_s: float | None = None
    peak_bytes: int | None = None
    error: str | None = None                    # failed to build or run: the row says why
    note: str = ""
    max_rel_err: float | None = None
    times: list[float] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.run is not None and self.error is None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


@contextlib.contextmanager
def _quiet() -> Iterable[None]:
    """Silence Python warnings and the chatter exporters print to stdout/stderr."""
    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        warnings.simplefilter("ignore")
        yield


def build_candidate(name: str, kind: str, build: Callable[[], Callable[[], Any]], reference: Any = None,
                    note: str = "") -> Candidate:
    """Build one candidate, timing build + first call and measuring peak RSS growth; any
    exception becomes the row's error."""
    cand = Candidate(name, kind, note=note)
    try:
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            with _quiet():
                run = build()
                out = run()
            cand.compile_s = time.perf_counter() - t0
        cand.peak_bytes = mem.growth
        cand.run = run
        if reference is not None:
            cand.max_rel_err = max_rel_error(out, reference)
            if cand.max_rel_err is None:
                cand.note = (cand.note + "; " if cand.note else "") + "outputs differ in structure from eager"
    except OptcError as e:
        cand.error = str(e).strip().splitlines()[0]
    except Exception as e:  # noqa: BLE001 -- a failing baseline is a result, not a crash
        cand.error = _first_line(e)
    return cand


def _eager(model, args, kwargs):
    def build():
        def run():
            with torch.no_grad():
                return model(*args, **kwargs)
        return run
    return build


def _inductor(model, args, kwargs):
    def build():
        compiled = torch.compile(model)

        def run():
            with torch.no_grad():
                return compiled(*args, **kwargs)
        return run
    return build


def _torchscript(model, args, kwargs):
    def build():
        with torch.no_grad():
            if kwargs:
                traced = torch.jit.trace(model, example_kwarg_inputs=dict(kwargs), strict=False)
                if args:
                    raise OptcError("torch.jit.trace takes positional or keyword inputs, not both")
            else:
                traced = torch.jit.trace(model, tuple(args), strict=False)
            frozen = torch.jit.freeze(traced.eval())
            module = torch.jit.optimize_for_inference(frozen)

        def run():
            with torch.no_grad():
                return module(*args, **kwargs)
        return run
    return build


def _ort(model, args, kwargs, threads: int):
    def build():
        import onnxruntime as ort
        program = torch.onnx.export(model, tuple(args), kwargs=dict(kwargs) or None, dynamo=True, verbose=False)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        session = ort.InferenceSession(program.model_proto.SerializeToString(), so,
                                       providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        tensors = [t for t in pytree.tree_leaves((tuple(args), dict(kwargs))) if isinstance(t, torch.Tensor)]
        if len(names) != len(tensors):
            raise OptcError(f"the exported ONNX model has {len(names)} inputs, the model {len(tensors)} tensors")

        def run():
            feed = {n: t.detach().contiguous().numpy() for n, t in zip(names, tensors)}
            return [torch.from_numpy(v) for v in session.run(None, feed)]
        return run
    return build


def _openvino(model, args, kwargs, threads: int):
    """What an OpenVINO user does: ``openvino.convert_model(model, example_input=...)`` and
    ``compile_model(..., "CPU")`` with OpenVINO's defaults (its precision choice included: BF16 on
    CPUs with AMX), threads set."""
    def build():
        import openvino as ov
        if kwargs:
            raise OptcError("the openvino baseline takes positional inputs only")
        ov_model = ov.convert_model(model, example_input=tuple(args))
        compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_NUM_THREADS": threads})
        request = compiled.create_infer_request()
        n_out = len(compiled.outputs)

        def run():
            request.infer([t.detach().contiguous().numpy() for t in args])
            return [torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(n_out)]
        return run
    return build


def _optc(model, args, kwargs, backend: str, pipeline: str, threads: int, options: dict):
    def build():
        import optc
        from optc.backends.base import get_backend
        be = get_backend(backend)
        opts = dict(options)
        if "threads" in be.option_names():
            opts.setdefault("threads", threads)
        compiled, report = optc.compile(model, tuple(args), example_kwargs=dict(kwargs) or None, backend=backend,
                                        pipeline=pipeline, **opts)
        build.report = report
        build.compiled = compiled

        def run():
            return compiled(*args, **kwargs)
        return run
    return build


def backend_skip_reason(backend: str, target: str = "cpu") -> str | None:
    """Why optc's ``backend`` cannot run here (one line), or None."""
    import optc
    from optc.backends.base import get_backend
    try:
        tgt = optc.resolve_target(target, backend)
        get_backend(backend).check_available(tgt)
    except OptcError as e:
        return str(e).strip().splitlines()[0]
    return None
