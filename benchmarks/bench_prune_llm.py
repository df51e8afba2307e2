"""A Llama-family decoder with half its heads (or half its heads and MLP units) pruned: parameters
and latency per backend, as ratios against the unpruned model in one run.

    python benchmarks/bench_prune_llm.py [--layers 8] [--pipelines "default,prune-heads{ratio=0.5}"]
                                         [--backends torchscript onnx tvm] [--runs 20] [--threads 2]

The model is ``llama_0_5b`` of ``bench_real_models.py`` (Qwen2-0.5B's decoder shape: hidden 896,
14 query heads and 2 key/value heads of 64, MLP 4864; random weights, nothing downloaded) with
``--layers`` layers, 128 tokens. Grouped-query attention makes a key/value head and the 7 query
heads that share it one group, so ``prune-heads{ratio=0.5}`` keeps one of the two key/value heads
and its 7 query heads. Per backend, the default pipeline and each pruned pipeline are compiled
and timed interleaved (one call of each per round, ``--runs`` rounds); the ratio is the median
of the per-round ratios pruned/unpruned with its 95% CI. The pruned model's output differs from
the unpruned one's (the weights are random: no accuracy is claimed); the column is the
compiled model against its own pruned program (the compile check's figure).
"""

from __future__ import annotations

import argparse
import statistics

import torch

import optc
from optc.tools.bench import backend_skip_reason, interleaved, machine_info, median_ci, paired_ratios

DEFAULT_PIPELINES = ("default,prune-heads{ratio=0.5}", "default,prune-channels{ratio=0.5}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--pipelines", nargs="+", default=list(DEFAULT_PIPELINES))
    ap.add_argument("--backends", nargs="+", default=["torchscript", "onnx", "tvm"])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import bench_real_models
    bench_real_models.LLAMA_LAYERS = args.layers
    torch.set_num_threads(args.threads)
    model, inputs = bench_real_models.llama_0_5b()
    params = sum(p.numel() for p in model.parameters())
    print(f"llama_0_5b with {args.layers} layers: {params / 1e6:.0f} M parameters, {inputs[0].shape[1]} tokens\n")
    print("| backend | pipeline | params after | unpruned ms | pruned ms | pruned/unpruned [95% CI] | check |")
    print("|---|---|---|---|---|---|---|")
    for backend in args.backends:
        skip = backend_skip_reason(backend)
        if skip:
            print(f"| {backend} | skipped: {skip} ||||||")
            continue
        opts = {"threads": args.threads} if backend in ("onnx", "tvm") else {}
        base, _ = optc.compile(model, inputs, backend=backend, **opts)
        for pipeline in args.pipelines:
            pruned, rep = optc.compile(model, inputs, backend=backend, pipeline=pipeline, **opts)
            record = next(r for r in rep.pipeline.records if r.name.startswith("prune"))
            after = record.stats.get("params_after")
            with torch.no_grad():
                times = interleaved({"base": lambda: base(*inputs), "pruned": lambda: pruned(*inputs)},
                                    runs=args.runs, warmup=3)
            ratios = paired_ratios(times["pruned"], times["base"])
            ratio, (lo, hi) = statistics.median(ratios), median_ci(ratios)
            check = f"{rep.check.outputs[0].error:.1e}" if rep.check else "not run"
            print(f"| {backend} | `{pipeline}` | {after / 1e6 if after else float('nan'):.0f} M of "
                  f"{record.stats.get('params_before', 0) / 1e6:.0f} M (graph constants) | "
                  f"{statistics.median(times['base']) * 1e3:.1f} | {statistics.median(times['pruned']) * 1e3:.1f} | "
                  f"{ratio:.3f} [{lo:.3f}, {hi:.3f}] | {check} |", flush=True)
            del pruned
        del base
    print(f"\nmachine: {machine_info()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
