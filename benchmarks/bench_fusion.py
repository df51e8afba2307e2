"""Latency with and without the fusion passes, per model and backend, as ratios in one run.

    python benchmarks/bench_fusion.py [--models resnet50 mobilenet_v2 bert] \
        [--backends torchscript onnx tvm] [--runs 30] [--threads 2]

For each model and backend it compiles twice -- the cleanup-only pipeline
(``canonicalize,constant-fold,cse,dce``) and the target's default pipeline (cleanups + BN and
binary folding, layer-norm/GELU/attention fusion, QKV merging) -- then times the two
interleaved (one call of each per round) and reports the median of the per-round ratios
fused/unfused. A ratio below 1.0 means the fusions made the backend faster. It also checks
both against eager (max error relative to output scale).

One pass on and off, per backend::

    python benchmarks/bench_fusion.py --pass merge-parallel-linear --models bert_base llama_0_5b \
        --llama-layers 8 --backends torchscript onnx tvm --runs 25

compares the target's default pipeline with ``PASS`` in it (where the default lacks it, it is
put where the full fusion pipeline has it) against the same pipeline without it: the
``unfused`` column is then "without", ``fused`` "with". ``bert_base`` and ``llama_0_5b`` are
the HF models of ``bench_real_models.py`` (``--llama-layers`` sets the decoder's depth).
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


def _pair(backend: str, pass_name: str | None) -> tuple[str, str]:
    """(without, with) pipelines: the cleanups and the default, or the default pipeline of the
    full fusion set without and with ``pass_name``."""
    if pass_name is None:
        return BASE, "default"
    from optc.target import _FUSED, _FUSED_NHWC, make_target
    default = make_target("cpu", backend).default_pipeline
    full = _FUSED_NHWC if "convert-layout" in default else _FUSED
    names = [p for p in full.split(",")]
    if not any(p.split("{")[0] == pass_name for p in names):
        raise SystemExit(f"--pass {pass_name}: not a pass of the fusion pipeline ({full})")
    without = ",".join(p for p in names if p.split("{")[0] != pass_name)
    return without, full


def _load(name: str, config: dict):
    import bench_real_models
    if name in bench_real_models.MODELS:
        return bench_real_models.MODELS[name]()
    return zoo.load(name, **{k: v for k, v in config.items() if k in zoo.get(name).default_config})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2", "bert"])
    ap.add_argument("--backends", nargs="+", default=["torchscript", "onnx", "tvm"])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", action="append", default=[], help="model config key=value (all models)")
    ap.add_argument("--pass", dest="pass_name", help="compare the fusion pipeline with and without this pass only")
    ap.add_argument("--llama-layers", type=int, default=30, help="layers of llama_0_5b")
    args = ap.parse_args(argv)
    import bench_real_models
    bench_real_models.LLAMA_LAYERS = args.llama_layers
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
        model, inputs = _load(name, config)
        with torch.no_grad():
            ref = model(*inputs)
        for backend in args.backends:
            skip = backend_skip_reason(backend)
            if skip:
                print(f"| {name} | {backend} | skipped: {skip} |||||||")
                continue
            opts = {"threads": args.threads} if backend in ("onnx", "tvm") else {}
            without, with_ = _pair(backend, args.pass_name)
            unfused, _ = optc.compile(model, inputs, backend=backend, pipeline=without, **opts)
            fused, rep = optc.compile(model, inputs, backend=backend, pipeline=with_, **opts)
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
