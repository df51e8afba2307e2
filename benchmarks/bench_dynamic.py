"""A Llama-family decoder compiled with a static and with a dynamic sequence length, timed side by side.

    python benchmarks/bench_dynamic.py [--backend tvm] [--layers 4] [--hidden 1024] [--seq 128]
                                       [--params bound] [--runs 5] [--threads 2]

The model is ``benchmarks/bench_memory.py``'s (random weights, built from a config, called with
``use_cache=False``). ``optc.compile`` twice without the compile-time check: the example length
fixed, then ``dynamic_shapes=({1: Dim("seq", min=2, max=512)},)``; both run on ``--seq`` tokens,
their error against eager, then timed interleaved (``optc.tools.bench.interleaved``): the median
of the per-round ratios dynamic / static with its 95% confidence interval. What a dynamic length
costs on that backend (TVM: matmuls of run-time size padded to the tile, backends.md).
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
    ap.add_argument("--backend", default="tvm")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--params", default=None, help="the backend's params= mode (default: its own)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, ids = _build(args.layers, args.hidden, args.seq)
    options = {"params": args.params} if args.params else {}
    if args.backend in ("onnx", "tvm", "openvino"):
        options["threads"] = args.threads
    seq = torch.export.Dim("seq", min=2, max=512)
    fns = {}
    with torch.no_grad():
        ref = model(ids)
        for name, dynamic in (("static", None), ("dynamic", ({1: seq},))):
            compiled, _ = optc.compile(model, (ids,), backend=args.backend, dynamic_shapes=dynamic, check=False,
                                       **options)
            err = float((compiled(ids) - ref).abs().max() / ref.abs().max())
            print(f"{name}: max error {err:.1e} of the output scale", flush=True)
            fns[name] = (lambda c=compiled: c(ids))
    times = bench.interleaved(fns, runs=args.runs, warmup=1, pause_s=bench.DEFAULT_PAUSE_MS / 1e3)
    r = bench.paired_ratios(times["dynamic"], times["static"])
    lo, hi = bench.median_ci(r)
    print(f"{args.backend}, layers {args.layers} x hidden {args.hidden}, {args.seq} tokens, {args.threads} threads: "
          f"static {statistics.median(times['static']) * 1e3:.1f} ms, dynamic "
          f"{statistics.median(times['dynamic']) * 1e3:.1f} ms, dynamic / static {statistics.median(r):.3f} "
          f"[{lo:.3f}, {hi:.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
