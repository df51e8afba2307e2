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

Modules: :mod:`.timing` (interleaved timing, paired ratios, their statistics),
:mod:`.candidates` (building each candidate, peak RSS, max relative error), :mod:`.report`
(:class:`BenchResult`: the table, the bars, JSON; the machine), :mod:`.run` (:func:`run_bench`),
:mod:`.command` (``optc bench``).

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


from optc.tools.bench.candidates import (BASELINE_LABELS, BASELINES, Candidate, PeakRSS, backend_skip_reason,
                                        build_candidate, max_rel_error)
from optc.tools.bench.command import add_bench_parser, add_model_arguments, bench_command, cmd_bench, default_threads
from optc.tools.bench.report import BARS, OPTIONAL_CANDIDATES, BenchResult, machine_info
from optc.tools.bench.run import run_bench
from optc.tools.bench.timing import DEFAULT_PAUSE_MS, interleaved, median_ci, paired_ratios, percentile

__all__ = ["BASELINES", "BARS", "BenchResult", "Candidate", "PeakRSS", "interleaved", "max_rel_error",
           "paired_ratios", "percentile", "run_bench", "add_bench_parser", "cmd_bench", "machine_info",
           # used by optc compile and the benchmarks/ scripts
           "DEFAULT_PAUSE_MS", "BASELINE_LABELS", "OPTIONAL_CANDIDATES", "median_ci", "build_candidate",
           "backend_skip_reason", "add_model_arguments", "bench_command", "default_threads"]
