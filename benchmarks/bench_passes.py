"""Capture time vs pass time for the BERT-style encoder at growing depth.

    python benchmarks/bench_passes.py [--layers 12 24 48] [--pipeline default] [--repeat 3]

Reports, per depth: capture time (torch.export + normalisation), the total time of the
pipeline's passes (excluding capture) and each pass's time, as the median of ``--repeat``
runs; then the ratios the foundation issue asks for: passes / capture per depth, and the
deepest model's pass time over the shallowest's. Timing belongs here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import optc
from optc.passes import PassManager
from optc.tools import zoo


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[12, 24, 48])
    ap.add_argument("--pipeline", default="default")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="write results to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for layers in args.layers:
        model, inputs = zoo.load("bert", num_layers=layers)
        captures, passes, per_pass = [], [], {}
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            program = optc.capture(model, inputs)
            captures.append(time.perf_counter() - t0)
            _, report = PassManager(args.pipeline, target="cpu").run(program)
            passes.append(report.passes_time_s)
            for r in report.records:
                per_pass.setdefault(r.text, []).append(r.time_s)
        row = {"layers": layers, "nodes": len(program.graph.nodes),
               "capture_s": statistics.median(captures), "passes_s": statistics.median(passes),
               "per_pass_s": {k: statistics.median(v) for k, v in per_pass.items()}}
        rows.append(row)
        print(f"bert layers={layers:3d} nodes={row['nodes']:6d}  capture {row['capture_s']:7.2f} s  "
              f"passes {row['passes_s']:7.3f} s  (passes/capture {row['passes_s'] / row['capture_s']:.3f})  "
              + "  ".join(f"{k} {v * 1e3:.0f} ms" for k, v in row["per_pass_s"].items()), flush=True)
    lo, hi = rows[0], rows[-1]
    print(f"passes at {hi['layers']} layers / at {lo['layers']} layers: {hi['passes_s'] / lo['passes_s']:.2f}x "
          f"(capture: {hi['capture_s'] / lo['capture_s']:.2f}x)")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, optc {optc.__version__}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
