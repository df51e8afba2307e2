"""TVM weights bound as constants against weights by reference, on a Llama-family decoder, in one process.

    python benchmarks/bench_tvm_params.py [--layers 8] [--hidden 1024] [--seq 128] [--runs 20] [--threads 2]

The model is ``benchmarks/bench_memory.py``'s (random weights, built from a config). Both
``optc.compile(model, (ids,), backend="tvm", params=MODE)`` for MODE ``bound`` and ``reference``
(no compile-time check), their error against eager, then both timed interleaved
(``optc.tools.bench.interleaved``): the median of the per-round ratios reference / bound with its
95% confidence interval. Memory is ``bench_memory.py``'s job (``--routes optc-tvm``).
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
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, ids = _build(args.layers, args.hidden, args.seq)
    fns = {}
    with torch.no_grad():
        ref = model(ids)
        for mode in ("bound", "reference"):
            compiled, _ = optc.compile(model, (ids,), backend="tvm", params=mode, check=False, threads=args.threads)
            err = float((compiled(ids) - ref).abs().max() / ref.abs().max())
            print(f"{mode}: max error {err:.1e} of the output scale", flush=True)
            fns[mode] = (lambda c=compiled: c(ids))
    times = bench.interleaved(fns, runs=args.runs, warmup=2, pause_s=bench.DEFAULT_PAUSE_MS / 1e3)
    r = bench.paired_ratios(times["reference"], times["bound"])
    lo, hi = bench.median_ci(r)
    print(f"layers {args.layers} x hidden {args.hidden}, {args.seq} tokens, {args.threads} threads: "
          f"bound {statistics.median(times['bound']) * 1e3:.1f} ms, reference "
          f"{statistics.median(times['reference']) * 1e3:.1f} ms, reference / bound {statistics.median(r):.3f} "
          f"[{lo:.3f}, {hi:.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
