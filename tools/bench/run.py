"""The benchmark of one model (:func:`run_bench`): every candidate built, then timed interleaved."""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import tempfile
import time
from typing import Callable, Iterable, Sequence

import torch

from optc.tools.bench.candidates import (BASELINE_LABELS, BASELINES, Candidate, _eager, _first_line, _inductor, _openvino, _optc,
                                        _ort, _torchscript, backend_skip_reason, build_candidate)
from optc.tools.bench.report import BenchResult, _describe_inputs, _loadavg, machine_info
from optc.tools.bench.timing import DEFAULT_PAUSE_MS, interleaved


@contextlib.contextmanager
def _inductor_cache(directory: str | None) -> Iterable[None]:
    """torch.compile's on-disk caches go to ``directory`` for the block, or with None to a new
    temporary folder (a cold compile) removed afterwards; the compiled kernels stay loaded."""
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    tmp = None
    if directory is None:
        directory = tmp = tempfile.mkdtemp(prefix="optc-bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(directory)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def run_bench(model, args: tuple, kwargs: dict, *, label: str, backends: Sequence[str] = ("onnx", "torchscript", "tvm"),
              baselines: Sequence[str] | None = None, runs: int = 50, warmup: int = 5, threads: int = 2,
              pipeline: str = "default", backend_options: dict | None = None, command: str = "",
              inductor_cache: str | None = None, pause_ms: float = DEFAULT_PAUSE_MS, seed: int = 0,
              tvm_tune: int = 0, tuning_db: str | None = None,
              progress: Callable[[str], None] | None = None) -> BenchResult:
    """Build every candidate for ``model(*args, **kwargs)`` and time them interleaved (module doc).

    ``tvm_tune`` > 0 adds ``optc tvm tuned``: the TVM backend with that MetaSchedule trial budget,
    its compile time including the tuning, into ``tuning_db`` (default: a fresh temporary
    database, so that the time is that of a first tuning)."""
    say = progress or (lambda msg: None)
    if baselines is None:
        from optc.tools.bench.candidates import default_baselines
        baselines = default_baselines()
    t_start = time.perf_counter()
    machine = machine_info()
    torch.set_num_threads(threads)
    kwargs = dict(kwargs)
    with torch.no_grad():
        reference = model(*args, **kwargs)
    cands: list[Candidate] = []
    say("eager")
    cands.append(build_candidate("eager", "baseline", _eager(model, args, kwargs), reference))
    for base in baselines:
        if base == "eager":
            continue
        label_b = BASELINE_LABELS[base]
        say(label_b)
        if base == "inductor":
            cold = inductor_cache is None or not os.path.isdir(inductor_cache) or not os.listdir(inductor_cache)
            note = "defaults (inductor), " + ("cold cache" if cold else "warm cache")
            with _inductor_cache(inductor_cache):
                cands.append(build_candidate(label_b, "baseline", _inductor(model, args, kwargs), reference, note))
        elif base == "torchscript":
            cands.append(build_candidate(label_b, "baseline", _torchscript(model, args, kwargs), reference,
                                         "trace+freeze+optimize_for_inference"))
        elif base == "ort":
            cands.append(build_candidate(label_b, "baseline", _ort(model, args, kwargs, threads), reference,
                                         "plain torch.onnx.export(dynamo=True), ORT_ENABLE_ALL"))
        elif base == "openvino":
            cands.append(build_candidate(label_b, "baseline", _openvino(model, args, kwargs, threads), reference,
                                         "openvino.convert_model(model), CPU defaults"))
    for backend in backends:
        name = f"optc {backend}"
        say(name)
        reason = backend_skip_reason(backend)
        if reason is not None:
            cands.append(Candidate(name, "optc", error=f"skipped: {reason}"))
            continue
        opts = dict(backend_options or {}).get(backend, {})
        build = _optc(model, args, kwargs, backend, pipeline, threads, opts)
        cand = build_candidate(name, "optc", build, reference)
        report = getattr(build, "report", None)
        if report is not None:
            passes = report.pipeline.pipeline or ""
            cand.note = f"pipeline '{pipeline}' ({len(passes.split(',')) if passes else 0} passes)"
            cand.details["compile_report"] = {"capture_s": report.capture_s, "optimize_s": report.optimize_s,
                                              "lowering_s": report.lowering_s,
                                              "artifact_bytes": report.artifact_bytes,
                                              "pipeline": report.pipeline.pipeline}
        cands.append(cand)
    if tvm_tune:
        name = "optc tvm tuned"
        say(f"{name} ({tvm_tune} trials)")
        reason = backend_skip_reason("tvm")
        if reason is not None:
            cands.append(Candidate(name, "optc", error=f"skipped: {reason}"))
        else:
            tmp = None if tuning_db else tempfile.mkdtemp(prefix="optc-bench-tuning-")
            try:
                opts = {**dict(backend_options or {}).get("tvm", {}), "tune": tvm_tune, "tuning_db": tuning_db or tmp}
                build = _optc(model, args, kwargs, "tvm", pipeline, threads, opts)
                cand = build_candidate(name, "optc", build, reference)
            finally:
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
            tuning = getattr(getattr(build, "compiled", None), "tuning", None) or {}
            cand.note = (f"tune={tvm_tune}: {tuning.get('tasks', '?')} kernels, {tuning.get('tuned', '?')} tuned, "
                         f"{tuning.get('applied', '?')} records used; {'db ' + tuning_db if tuning_db else 'fresh db'}")
            cand.details["tuning"] = tuning
            cands.append(cand)
    fns = {c.name: c.run for c in cands if c.ok}
    say(f"timing {len(fns)} candidates: {warmup} warm-up + {runs} rounds")
    failed: dict[str, BaseException] = {}
    times = interleaved(fns, runs=runs, warmup=warmup, pause_s=pause_ms / 1e3, seed=seed, errors=failed)
    for c in cands:
        c.times = times.get(c.name, [])
        if c.name in failed:
            c.error = f"failed while timed: {_first_line(failed[c.name])}"
    machine["loadavg_end"] = _loadavg()
    return BenchResult(model=label, inputs=_describe_inputs(args, kwargs), command=command, machine=machine,
                       threads=threads, runs=runs, warmup=warmup, candidates=cands,
                       date=datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                       wall_s=time.perf_counter() - t_start, pause_ms=pause_ms)
