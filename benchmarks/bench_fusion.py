"""Latency with and without the fusion passes, per model and backend, as ratios in one run.

    python benchmarks/bench_fusion.py [--models resnet50 mobilenet_v2 bert] \
        [--backends torchscript onnx tvm] [--runs 30] [--threads 2]

For each model and backend it compiles twice -- the cleanup-only pipeline
(``canonicalize,constant-fold,cse,dce``) and the target's default pipeline (cleanups + BN and
binary folding, layer-norm/GELU/attention fusion, QKV merging) -- then times the two
interleaved (one call of each per round) and reports the median of the per-round ratios
fused/unfused. A ratio below 1.0 means the fusions made the backend faster. It also checks
both against eager (max error relative to output scale).
"""

from __future__ import annotations

import argparse
import statistics

import torch

import optc
from optc.ir.verifier import compare_outputs
from optc.tools import zoo
from optc.tools.bench import backend_skip_reason, interleaved, machine_info, median_ci, paired_ratios

BASE = "canonicalize,constant-fold,cse,dce"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2", "bert"])
    ap.add_argument("--backends", nargs="+", default=["torchscript", "onnx", "tvm"])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", action="append", default=[], help="model config key=value (all models)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = {}
    for kv in args.config:
        k, v = kv.split("=", 1)
        for conv in (int, float):
            try:
                v = conv(v)
                break
            except ValueError:
                pass
        config[k] = v
    print(f"| model | backend | unfused ms | fused ms | fused/unfused [95% CI] | fused passes fired | err unfused | err fused |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model, inputs = zoo.load(name, **{k: v for k, v in config.items() if k in zoo.get(name).default_config})
        with torch.no_grad():
            ref = model(*inputs)
        for backend in args.backends:
            skip = backend_skip_reason(backend)
            if skip:
                print(f"| {name} | {backend} | skipped: {skip} |||||||")
                continue
            opts = {"threads": args.threads} if backend in ("onnx", "tvm") else {}
            unfused, _ = optc.compile(model, inputs, backend=backend, pipeline=BASE, **opts)
            fused, rep = optc.compile(model, inputs, backend=backend, pipeline="default", **opts)
            fired = {r.name: r.stats for r in rep.pipeline.records if r.modified} if hasattr(rep, "pipeline") else {}
            with torch.no_grad():
                times = interleaved({"unfused": lambda: unfused(*inputs), "fused": lambda: fused(*inputs)},
                                    runs=args.runs, warmup=3)
                e0 = compare_outputs(ref, unfused(*inputs)).max_rel_error
                e1 = compare_outputs(ref, fused(*inputs)).max_rel_error
            ratios = paired_ratios(times["fused"], times["unfused"])
            ratio, (lo, hi) = statistics.median(ratios), median_ci(ratios)
            fired_txt = ", ".join(sorted(k for k in fired if k not in ("canonicalize", "constant-fold", "cse", "dce")))
            print(f"| {name} | {backend} | {statistics.median(times['unfused']) * 1e3:.1f} | "
                  f"{statistics.median(times['fused']) * 1e3:.1f} | {ratio:.3f} [{lo:.3f}, {hi:.3f}] | {fired_txt} | {e0:.1e} | {e1:.1e} |",
                  flush=True)
            del unfused, fused
    info = machine_info()
    print(f"\nmachine: {info}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
