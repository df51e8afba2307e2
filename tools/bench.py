"""Benchmark harness: optc's backends against eager PyTorch and the runtimes people use instead.

    optc bench zoo:resnet50 --runs 60 --warmup 5 --threads 2 --markdown

For one model, in **one process**, it builds every candidate and then times them **interleaved**:
each round calls every candidate once, in a fresh (seeded) random order so that no candidate always
follows the same other one, with ``--pause-ms`` (200) of sleep before each call so that the
previous runtime's spinning worker threads (ONNX Runtime's spin for 100-200 ms after a run) go
idle; ``--runs`` rounds after ``--warmup`` untimed rounds. The machines this project runs on
are shared and noisy (the same benchmark in a new process can run 1.8x slower), so the figures
that matter are ratios, and the ratio of a candidate to eager is the **median over rounds of the
per-round ratio** (paired: both calls of a round see the same machine state), not a ratio of two
medians taken minutes apart.

Candidates
----------
``eager``
    the model itself, under ``torch.no_grad()`` (always measured: every ratio is against it).
``torch.compile``  (``--baselines inductor``)
    ``torch.compile(model)`` with its defaults (inductor, no freezing). Inductor needs a C++
    compiler; any failure is reported in the row, never raised. Its caches go to a fresh
    temporary folder (``TORCHINDUCTOR_CACHE_DIR``), so its compile time is a cold compile;
    ``--inductor-cache DIR`` uses (and keeps) DIR instead, and the row says whether DIR was empty
    (cold) or not (warm) before the compile.
``torch.jit``  (``--baselines torchscript``)
    TorchScript as torch gives it: ``torch.jit.trace`` + ``torch.jit.freeze`` +
    ``torch.jit.optimize_for_inference`` of the eager model.
``onnxruntime``  (``--baselines ort``)
    a plain ``torch.onnx.export(model, args, kwargs=kwargs, dynamo=True)`` (its defaults: opset,
    the exporter's optimizer) run by an ``InferenceSession`` with ``ORT_ENABLE_ALL`` and
    ``intra_op_num_threads=--threads``, called the plain way: ``session.run(None, {name: ndarray})``
    (torch -> numpy and back are zero-copy views).
``optc BACKEND``  (``--backends onnx,torchscript,tvm``)
    ``optc.compile(model, args, backend=BACKEND, pipeline=--pipeline)`` (the target's default
    pipeline unless given), with ``threads=--threads`` for backends that take it. A backend that is
    unavailable here (package missing, module not written yet) is skipped with a note in its row.

Threads: ``torch.set_num_threads(--threads)`` for everything torch runs (eager, torch.compile,
TorchScript), ``intra_op_num_threads`` for ONNX Runtime.

What is measured
----------------
- **latency**: wall time (``time.perf_counter``) of one call on the example inputs, outputs
  included (the median over rounds, and the 10th-90th percentile spread);
- **x eager**: the median over rounds of this candidate's time / eager's time in the same round;
- **compile**: seconds from the start of the build (capture, export, trace, session creation...)
  to the end of the first call (lazy compilers -- torch.compile, TorchScript's profiling executor
  -- do their work there); for eager, the first call alone;
- **peak mem**: the growth of the process's peak resident set (RSS) during the compile: Linux's
  ``VmHWM`` is reset to the current RSS (``echo 5 > /proc/self/clear_refs``) right before the
  build, after ``gc.collect()`` and ``malloc_trim(0)`` (so freed memory of earlier candidates is
  given back and not silently reused), and read after the first call. It counts everything this
  process maps -- Python objects, torch's and ONNX Runtime's C++ allocations, weights copied into
  the artifact, the runtime's working memory of the first call -- but not child processes (the C++
  compiler torch.compile runs, its compile workers). "n/a" where the kernel refuses the reset;
- **max rel err**: ``max |y - y_eager| / max |y_eager|`` over the output tensors on the example
  inputs (normwise: elementwise relative errors blow up where the output is near 0).

The acceptance bars (:data:`BARS`) are checked on the median paired ratio and printed under the
table with its 95% confidence interval (:func:`median_ci`); a verdict whose interval contains the
bar says that it is not significant.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import importlib.metadata
import io
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.utils._pytree as pytree

from optc.errors import OptcError

#: Sleep before each timed call: ONNX Runtime's intra-op workers spin for about 100-200 ms after a
#: run (measured here: ~0.05 CPU-s after each ResNet-50 call), which would slow whichever candidate
#: runs next on a 2-core machine.
DEFAULT_PAUSE_MS = 200.0

BASELINES = ("eager", "inductor", "torchscript", "ort")
BASELINE_LABELS = {"eager": "eager", "inductor": "torch.compile", "torchscript": "torch.jit",
                   "ort": "onnxruntime"}
#: (candidate, reference, most allowed ratio): the project's acceptance bars.
BARS = (("optc onnx", "onnxruntime", 1.0), ("optc torchscript", "eager", 1.0), ("optc tvm", "onnxruntime", 3.0),
        ("optc tvm tuned", "onnxruntime", 1.5))
#: Candidates measured only on request (their bar is left out when they are absent).
OPTIONAL_CANDIDATES = frozenset({"optc tvm tuned"})


# ---- timing ------------------------------------------------------------------------------------
def interleaved(fns: dict[str, Callable[[], Any]], *, runs: int, warmup: int = 1, pause_s: float = 0.0,
                seed: int = 0, errors: dict[str, BaseException] | None = None) -> dict[str, list[float]]:
    """Time each zero-argument callable ``runs`` times, interleaved: one call of each per round,
    in a fresh random order every round (seeded), so that no candidate always runs right after the
    same other one; ``pause_s`` of sleep before each call lets the previous runtime's worker
    threads stop spinning. Returns ``{name: [seconds per round]}``.

    With ``errors`` (a dict), a callable that raises is dropped from the rotation, its exception
    stored there and its times emptied; without it, the exception propagates."""
    import random
    rng = random.Random(seed)
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}

    def call(name: str) -> float | None:
        if pause_s > 0:
            time.sleep(pause_s)
        t0 = time.perf_counter()
        try:
            fns[name]()
        except Exception as e:  # noqa: BLE001
            if errors is None:
                raise
            errors[name] = e
            names.remove(name)
            times[name] = []
            return None
        return time.perf_counter() - t0

    for _ in range(warmup):
        for name in list(names):
            call(name)
    for _ in range(runs):
        for name in rng.sample(names, len(names)):
            if name not in names:   # dropped earlier in this round
                continue
            dt = call(name)
            if dt is not None:
                times[name].append(dt)
    return times


def paired_ratios(times: list[float], ref: list[float]) -> list[float]:
    return [a / b for a, b in zip(times, ref) if b > 0]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: the order statistics ranked
    ``n/2 -+ z sqrt(n)/2`` (normal approximation of the binomial; (min, max) for small n)."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    k = int((n - z * n ** 0.5) / 2)   # 0-based rank of the lower bound
    k = max(0, min(k, (n - 1) // 2))
    return xs[k], xs[n - 1 - k]


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


# ---- candidates --------------------------------------------------------------------------------
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


# ---- the benchmark -----------------------------------------------------------------------------
@dataclass
class BenchResult:
    model: str
    inputs: str
    command: str
    machine: dict
    threads: int
    runs: int
    warmup: int
    candidates: list[Candidate]
    date: str
    wall_s: float = 0.0
    pause_ms: float = 0.0

    def by_name(self, name: str) -> Candidate | None:
        return next((c for c in self.candidates if c.name == name), None)

    def ratio(self, name: str, ref: str) -> tuple[float, float, float] | None:
        """The median over rounds of ``name``'s time / ``ref``'s time, and its 95% confidence
        interval (:func:`median_ci`)."""
        a, b = self.by_name(name), self.by_name(ref)
        if a is None or b is None or not a.times or not b.times:
            return None
        r = paired_ratios(a.times, b.times)
        return (statistics.median(r), *median_ci(r))

    def bars(self) -> list[tuple[str, str, float, tuple | None, str]]:
        """``(candidate, reference, bar, ratio, verdict)`` for each acceptance bar."""
        out = []
        for name, ref, bar in BARS:
            r = self.ratio(name, ref)
            cand = self.by_name(name)
            if cand is None and name in OPTIONAL_CANDIDATES:
                continue
            if r is None:
                refc = self.by_name(ref)
                if cand is None or refc is None:
                    why = f"no {name if cand is None else ref} row"
                else:
                    why = next((c.error for c in (cand, refc) if c.error), "no timings")
                verdict = f"not measured ({why})"
            else:
                verdict = "met" if r[0] <= bar else "NOT met"
                if r[1] <= bar <= r[2]:
                    verdict += " (not significant: the 95% CI contains the bar)"
            out.append((name, ref, bar, r, verdict))
        return out

    @staticmethod
    def from_json(d: dict) -> "BenchResult":
        """The result :meth:`to_json` wrote (to re-render a recorded run)."""
        cands = [Candidate(c["name"], c["kind"], error=c.get("error"), note=c.get("note", ""),
                           compile_s=c.get("compile_s"), peak_bytes=c.get("peak_rss_growth_bytes"),
                           max_rel_err=c.get("max_rel_err"), times=list(c.get("times_s", [])),
                           details={k: c[k] for k in ("compile_report",) if k in c})
                 for c in d["candidates"]]
        return BenchResult(model=d["model"], inputs=d["inputs"], command=d["command"], machine=d["machine"],
                           threads=d["threads"], runs=d["runs"], warmup=d["warmup"], candidates=cands,
                           date=d["date"], wall_s=d.get("wall_s", 0.0), pause_ms=d.get("pause_ms", 0.0))

    def to_json(self) -> dict:
        rows = []
        eager = self.by_name("eager")
        for c in self.candidates:
            row = {"name": c.name, "kind": c.kind, "error": c.error, "note": c.note,
                   "compile_s": c.compile_s, "peak_rss_growth_bytes": c.peak_bytes, "max_rel_err": c.max_rel_err,
                   "times_s": c.times, **c.details}
            if c.times:
                row["median_s"] = statistics.median(c.times)
                row["p10_s"], row["p90_s"] = percentile(c.times, 10), percentile(c.times, 90)
                if eager is not None and eager.times:
                    row["ratio_vs_eager"] = statistics.median(paired_ratios(c.times, eager.times))
            rows.append(row)
        return {"model": self.model, "inputs": self.inputs, "command": self.command, "date": self.date,
                "machine": self.machine, "threads": self.threads, "runs": self.runs, "warmup": self.warmup,
                "pause_ms": self.pause_ms,
                "wall_s": self.wall_s, "candidates": rows,
                "bars": [{"candidate": n, "reference": r, "bar": b, "ratio": q[0] if q else None,
                          "ci95": [q[1], q[2]] if q else None, "verdict": v}
                         for n, r, b, q, v in self.bars()]}

    # -- tables --
    def _rows(self) -> list[list[str]]:
        eager = self.by_name("eager")
        rows = []
        for c in self.candidates:
            if c.times:
                med = statistics.median(c.times)
                ratio = statistics.median(paired_ratios(c.times, eager.times)) if eager and eager.times else None
                lat = _ms(med)
                spread = f"{_ms(percentile(c.times, 10))}-{_ms(percentile(c.times, 90))}"
                rat = f"{ratio:.2f}x" if ratio is not None else "-"
            else:
                lat, spread, rat = "-", "-", "-"
            comp = f"{c.compile_s:.1f}" if c.compile_s is not None else "-"
            mem = f"{c.peak_bytes / 2 ** 20:.0f}" if c.peak_bytes is not None else ("n/a" if c.ok else "-")
            err = f"{c.max_rel_err:.1e}" if c.max_rel_err is not None else "-"
            note = c.error if c.error else c.note
            rows.append([c.name, lat, rat, spread, comp, mem, err, note])
        return rows

    def _protocol(self) -> str:
        return (f"{self.warmup} warm-up + {self.runs} timed rounds, each candidate once per round in random "
                f"order, {self.pause_ms:g} ms pause before each call")

    def pipelines(self) -> list[str]:
        """One line per optc candidate: the passes its pipeline ran."""
        return [f"pipeline of {c.name}: {c.details['compile_report']['pipeline'] or '(empty)'}"
                for c in self.candidates if "compile_report" in c.details]

    HEADER = ["candidate", "median ms", "x eager", "p10-p90 ms", "compile s", "peak MiB", "max rel err", "note"]

    def format(self, markdown: bool = False) -> str:
        m = self.machine
        lines = []
        if markdown:
            lines += [f"`{self.command}`", "",
                      f"- date: {self.date}; wall time {self.wall_s:.0f} s",
                      f"- machine: {m['cpu']}, {m['cores']} cores; {self.threads} threads used; "
                      f"load average {m['loadavg_start']} at start, {m['loadavg_end']} at end",
                      f"- versions: {_versions_text(m['versions'])}",
                      f"- model: {self.model}, inputs {self.inputs}; {self._protocol()}", ""]
            lines.append("| " + " | ".join(self.HEADER) + " |")
            lines.append("|" + "|".join("---:" if 0 < i < 7 else "---" for i in range(len(self.HEADER))) + "|")
            for r in self._rows():
                lines.append("| " + " | ".join(x.replace("|", "\\|") for x in r) + " |")
            lines.append("")
            for name, ref, bar, r, verdict in self.bars():
                shown = f"{r[0]:.3f}x (95% CI {r[1]:.3f}-{r[2]:.3f})" if r else "-"
                lines.append(f"- {name} / {ref} = {shown}; bar <= {bar:g}x: **{verdict}**")
            lines += [f"- {line}" for line in self.pipelines()]
            return "\n".join(lines) + "\n"
        lines += [f"command:  {self.command}",
                  f"date:     {self.date} (wall time {self.wall_s:.0f} s)",
                  f"machine:  {m['cpu']}, {m['cores']} cores; {self.threads} threads used; load average "
                  f"{m['loadavg_start']} -> {m['loadavg_end']}",
                  f"versions: {_versions_text(m['versions'])}",
                  f"model:    {self.model}, inputs {self.inputs}; {self._protocol()}", ""]
        rows = [self.HEADER] + self._rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.HEADER) - 1)]
        for r in rows:
            cells = [r[i].ljust(widths[i]) if i == 0 else r[i].rjust(widths[i]) for i in range(len(widths))]
            lines.append("  ".join(cells) + "  " + r[-1])
        lines.append("")
        for name, ref, bar, r, verdict in self.bars():
            shown = f"{r[0]:.3f}x (95% CI {r[1]:.3f}-{r[2]:.3f})" if r else "-"
            lines.append(f"{name} / {ref} = {shown}; bar <= {bar:g}x: {verdict}")
        lines += self.pipelines()
        return "\n".join(lines) + "\n"


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _versions_text(v: dict) -> str:
    return ", ".join(f"{k} {val}" for k, val in v.items() if val)


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    cores = os.cpu_count()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cpu = fields.get("Model name", cpu)
        if "Core(s) per socket" in fields and "Socket(s)" in fields:
            cores = int(fields["Core(s) per socket"]) * int(fields["Socket(s)"])
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    versions = {"python": platform.python_version()}
    for dist in ("optc", "torch", "onnxruntime", "onnx", "onnxscript", "apache-tvm"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    gcc = shutil.which("gcc")
    if gcc:
        try:
            first = subprocess.run([gcc, "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()
            versions["gcc"] = first[0].split()[-1] if first else None
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {"cpu": cpu, "cores": cores, "usable_cpus": affinity, "platform": platform.platform(),
            "versions": versions, "loadavg_start": _loadavg(), "loadavg_end": None}


def _loadavg() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _describe_inputs(args: tuple, kwargs: dict) -> str:
    def one(t):
        if isinstance(t, torch.Tensor):
            from optc.ir.program import dtype_short
            return f"{dtype_short(t.dtype)}[{','.join(map(str, t.shape))}]"
        return repr(t)
    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


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
              baselines: Sequence[str] = BASELINES, runs: int = 50, warmup: int = 5, threads: int = 2,
              pipeline: str = "default", backend_options: dict | None = None, command: str = "",
              inductor_cache: str | None = None, pause_ms: float = DEFAULT_PAUSE_MS, seed: int = 0,
              tvm_tune: int = 0, tuning_db: str | None = None,
              progress: Callable[[str], None] | None = None) -> BenchResult:
    """Build every candidate for ``model(*args, **kwargs)`` and time them interleaved (module doc).

    ``tvm_tune`` > 0 adds ``optc tvm tuned``: the TVM backend with that MetaSchedule trial budget,
    its compile time including the tuning, into ``tuning_db`` (default: a fresh temporary
    database, so that the time is that of a first tuning)."""
    say = progress or (lambda msg: None)
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


# ---- the command line --------------------------------------------------------------------------
def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _non_negative(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL, --input, --config, --tiny, --batch (as ``optc dump`` has them)."""
    p.add_argument("model", metavar="MODEL", help="the model to load (zoo:NAME, file.py:factory, module:factory, "
                                                  "file.pt2; see 'optc dump --help')")
    p.add_argument("--input", action="append", default=[], metavar="SPEC",
                   help="an example input SHAPE[:DTYPE] such as 1x3x224x224:float32, once per positional argument; "
                        "replaces the model's own example inputs")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="override a zoo model's config (repeatable)")
    p.add_argument("--tiny", action="store_true", help="use the zoo model's tiny (unit-test) config")
    p.add_argument("--batch", type=_positive, default=None, help="batch size of a zoo model's inputs (default 1)")


def add_bench_parser(sub) -> None:
    """Register ``optc bench`` on the CLI's subparsers."""
    p = sub.add_parser(
        "bench", help="latency, compile time and memory of optc's backends against eager and other runtimes",
        description="For MODEL, in one process: eager PyTorch, torch.compile (inductor), TorchScript (trace +\n"
                    "freeze + optimize_for_inference), ONNX Runtime on a plain torch.onnx.export, and optc with\n"
                    "each backend. Candidates are timed interleaved (one call of each per round, many rounds);\n"
                    "'x eager' is the median over rounds of the per-round ratio. Also compile time, peak RSS\n"
                    "growth during the compile and max relative error against eager. See docs/benchmarks.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--backends", default="onnx,torchscript,tvm",
                   help="comma-separated optc backends (default: onnx,torchscript,tvm; '' for none); an "
                        "unavailable one is skipped with a note")
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help=f"comma-separated baselines among {', '.join(BASELINES)} (default: all); eager is "
                        "always measured, as every ratio is against it")
    p.add_argument("--pipeline", default="default", metavar="P", help="optc pipeline (default: the target's)")
    p.add_argument("--warmup", type=_non_negative, default=5, metavar="N", help="untimed rounds first (default 5)")
    p.add_argument("--runs", type=_positive, default=50, metavar="N", help="timed rounds (default 50)")
    p.add_argument("--threads", type=_positive, default=None, metavar="N",
                   help="threads for torch and ONNX Runtime (default: every core this process may use)")
    p.add_argument("--pause-ms", type=float, default=DEFAULT_PAUSE_MS, metavar="MS",
                   help=f"sleep before each timed call so the previous runtime's spinning worker threads go idle "
                        f"(default {DEFAULT_PAUSE_MS:g})")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-round random order (default 0)")
    p.add_argument("--inductor-cache", metavar="DIR", default=None,
                   help="torch.compile's cache folder, kept (default: a fresh temporary one, so its compile "
                        "time is a cold compile); the row says whether DIR was empty before")
    p.add_argument("--tvm-tune", type=_non_negative, default=0, metavar="N",
                   help="also time the tvm backend tuned with N MetaSchedule trials ('optc tvm tuned'; its "
                        "compile time includes the tuning; default 0: not measured)")
    p.add_argument("--tuning-db", metavar="DIR", default=None,
                   help="tuning database for --tvm-tune (default: a fresh temporary one, so the time is a "
                        "first tuning's)")
    p.add_argument("--json", metavar="FILE", help="also write the results (with every timing) as JSON to FILE")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="progress, optc's debug log and tracebacks on stderr")
    p.set_defaults(func=cmd_bench)


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def bench_command(args: argparse.Namespace) -> str:
    """The command with every effective option spelled out (defaults included)."""
    parts = ["optc", "bench", args.model]
    for spec in args.input:
        parts += ["--input", spec]
    for item in args.config:
        parts += ["--config", item]
    if args.tiny:
        parts.append("--tiny")
    if args.batch is not None:
        parts += ["--batch", str(args.batch)]
    parts += ["--backends", args.backends, "--baselines", args.baselines]
    if args.pipeline != "default":
        parts += ["--pipeline", args.pipeline]
    parts += ["--warmup", str(args.warmup), "--runs", str(args.runs), "--threads", str(args.threads),
              "--pause-ms", f"{args.pause_ms:g}"]
    if args.seed:
        parts += ["--seed", str(args.seed)]
    if args.inductor_cache:
        parts += ["--inductor-cache", args.inductor_cache]
    if args.tvm_tune:
        parts += ["--tvm-tune", str(args.tvm_tune)]
    if args.tuning_db:
        parts += ["--tuning-db", args.tuning_db]
    if args.markdown:
        parts.append("--markdown")
    return " ".join(shlex.quote(p) for p in parts)


def cmd_bench(args: argparse.Namespace) -> int:
    from optc.backends.base import available_backends
    from optc.tools.models import load_model, parse_config

    backends = _split(args.backends)
    unknown = [b for b in backends if b not in available_backends()]
    if unknown:
        raise OptcError(f"unknown backend '{unknown[0]}' (valid: {', '.join(available_backends())})")
    baselines = _split(args.baselines)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise OptcError(f"unknown baseline '{unknown[0]}' (valid: {', '.join(BASELINES)})")
    if args.json:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            raise OptcError(f"cannot write --json '{args.json}': directory '{parent}' does not exist")
    if args.pipeline != "default":   # validate before the (slow) load
        from optc.passes.pipeline import parse
        parse(args.pipeline)
    if args.pause_ms < 0:
        raise OptcError(f"--pause-ms must be >= 0, got {args.pause_ms:g}")
    args.threads = args.threads or default_threads()
    loaded = load_model(args.model, inputs=args.input, config=parse_config(args.config), tiny=args.tiny,
                        batch=args.batch)
    progress = (lambda msg: print(f"optc: bench: {msg}", file=sys.stderr, flush=True)) if args.verbose else None
    result = run_bench(loaded.model, loaded.args, loaded.kwargs, label=loaded.label, backends=backends,
                       baselines=baselines, runs=args.runs, warmup=args.warmup, threads=args.threads,
                       pipeline=args.pipeline, command=bench_command(args),
                       inductor_cache=args.inductor_cache, pause_ms=args.pause_ms, seed=args.seed,
                       tvm_tune=args.tvm_tune, tuning_db=args.tuning_db, progress=progress)
    sys.stdout.write(result.format(markdown=args.markdown))
    sys.stdout.flush()
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(result.to_json(), f, indent=1)
                f.write("\n")
        except OSError as e:
            raise OptcError(f"cannot write --json '{args.json}': {e.strerror or e}") from None
    return 0


__all__ = ["BASELINES", "BARS", "BenchResult", "Candidate", "PeakRSS", "interleaved", "max_rel_error",
           "paired_ratios", "percentile", "run_bench", "add_bench_parser", "cmd_bench", "machine_info"]
