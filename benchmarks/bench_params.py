"""Weights in the runtime's own copy against weights by reference, on a Llama-family decoder, in one process.

    python benchmarks/bench_params.py [--backend tvm|onnx|torchscript] [--layers 8] [--hidden 1024] [--seq 128]
                                      [--decode] [--runs 20] [--threads 2]

The model is ``benchmarks/bench_memory.py``'s (random weights, built from a config). Both
``optc.compile(model, (ids,), backend=B, params=MODE)`` -- TVM: ``bound`` (weights compiled into
the library), ``copy`` (main's arguments, transposed and repacked once at load) and ``reference``
(read in place by NT_matmul kernels); ONNX: ``copy`` (ONNX Runtime loads and prepacks its own copy) and
``reference`` (the session runs on the model's tensors, prepacking off); TorchScript: ``copy``
(each linear's weight packed for oneDNN) and ``reference`` (oneDNN's linear over the model's
weight) -- without the
compile-time check, their error against eager, then all timed interleaved
(``optc.tools.bench.interleaved``): the median of the per-round ratios of each mode to the first
(``bound`` on TVM, ``copy`` elsewhere) with its 95% confidence interval. ``--decode``: one token (``--seq`` 1), the memory-bound case. Memory is
``bench_memory.py``'s job (``--routes optc-tvm optc-onnx optc-torchscript``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_memory import _build  # noqa: E402

import optc  # noqa: E402
from optc.tools import bench  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("tvm", "onnx", "torchscript"), default="tvm")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", action="store_true", help="one token: --seq 1")
    args = ap.parse_args(argv)
    if args.decode:
        args.seq = 1
    modes = ("bound", "copy", "reference") if args.backend == "tvm" else ("copy", "reference")
    torch.set_num_threads(args.threads)
    model, ids = _build(args.layers, args.hidden, args.seq)
    fns = {}
    with torch.no_grad():
        ref = model(ids)
        for mode in modes:
            threads = {} if args.backend == "torchscript" else {"threads": args.threads}  # (torch's own threads)
            compiled, _ = optc.compile(model, (ids,), backend=args.backend, params=mode, check=False, **threads)
            err = float((compiled(ids) - ref).abs().max() / ref.abs().max())
            print(f"{mode}: max error {err:.1e} of the output scale", flush=True)
            fns[mode] = (lambda c=compiled: c(ids))
    times = bench.interleaved(fns, runs=args.runs, warmup=2, pause_s=bench.DEFAULT_PAUSE_MS / 1e3)
    base = modes[0]
    print(f"{args.backend}, layers {args.layers} x hidden {args.hidden}, {args.seq} tokens, {args.threads} threads: "
          + ", ".join(f"{m} {statistics.median(times[m]) * 1e3:.1f} ms" for m in modes))
    for mode in modes[1:]:
        r = bench.paired_ratios(times[mode], times[base])
        lo, hi = bench.median_ci(r)
        print(f"  {mode} / {base} {statistics.median(r):.3f} [{lo:.3f}, {hi:.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
