"""What the compile-time check costs and what it measures, over the zoo.

    python benchmarks/bench_check.py [--models mlp small_cnn ...] [--full] [--backends torchscript onnx tvm]
                                     [--pipelines default "default,insert-qdq" ...] [--json out.json]

For every model x backend x pipeline, ``optc.compile(check=True)`` once: the check's own time
(``report.check_s``, measured inside the same compile, so machine noise between two compiles does
not enter the ratio) against the rest of the compile (capture + pipeline + lowering), and the
largest error the check saw (relative to the output scale) with its tolerance. ``--full`` uses the
zoo's published sizes (ResNet-50, BERT-base, ...) instead of the tiny configs. Timing belongs here,
never in tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import warnings

import torch

import optc
from optc.errors import NumericMismatchError
from optc.tools import zoo


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    amx = [f for f in flags if f.startswith("amx")]
    return ("AMX " + ",".join(amx)) if amx else "no AMX" + (", avx512_bf16" if "avx512_bf16" in flags else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[n for n in zoo.names() if not n.startswith("hf_")])
    ap.add_argument("--backends", nargs="+", default=["torchscript", "onnx", "tvm"])
    ap.add_argument("--pipelines", nargs="+", default=["default"])
    ap.add_argument("--full", action="store_true", help="the zoo's published sizes instead of the tiny configs")
    ap.add_argument("--json", help="write the rows to this file")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(2)
    rows = []
    print(f"{'model':14s} {'backend':12s} {'pipeline':32s} {'compile s':>9s} {'check s':>8s} {'ratio':>6s}  worst error (tolerance)")
    for name in args.models:
        model, inputs = zoo.load(name, **({} if args.full else zoo.tiny_config(name)))
        for pipeline in args.pipelines:
            for backend in args.backends:
                try:
                    _, report = optc.compile(model, inputs, backend=backend, pipeline=pipeline)
                    check, status = report.check, "ok"
                    compile_s = report.total_s - report.check_s
                    check_s = report.check_s
                except NumericMismatchError as e:
                    check, status, compile_s, check_s = e.report, "MISMATCH", float("nan"), e.report.time_s
                worst = check.worst
                row = {"model": name, "backend": backend, "pipeline": pipeline, "status": status,
                       "compile_s": compile_s, "check_s": check_s, "ratio": check_s / compile_s,
                       "worst_error": worst.error if worst else 0.0, "tolerance": worst.tolerance if worst else 0.0}
                rows.append(row)
                print(f"{name:14s} {backend:12s} {pipeline:32s} {compile_s:9.2f} {check_s:8.3f} {row['ratio']:6.3f}  "
                      f"{row['worst_error']:.2g} ({row['tolerance']:g}) {status}", flush=True)
    ratios = [r["ratio"] for r in rows if r["status"] == "ok"]
    if ratios:
        print(f"check / rest of the compile: median {statistics.median(ratios):.3f}, max {max(ratios):.3f} "
              f"over {len(ratios)} compiles; total {sum(r['check_s'] for r in rows):.1f} s of checks in "
              f"{sum(r['compile_s'] for r in rows if r['status'] == 'ok'):.1f} s of compiles")
    print(f"machine: {cpu_name()} ({cpu_flags()}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"optc {optc.__version__}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
