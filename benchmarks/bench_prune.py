"""ResNet-50 with 50% of its channels pruned: FLOPs, parameters and latency per backend, as ratios.

    python benchmarks/bench_prune.py [--ratio 0.5] [--round-to 8] [--image-size 224] [--batch 1]
                                     [--backends eager,torchscript,onnx,tvm] [--rounds 30] [--threads 2]

The zoo's full-size ResNet-50 is captured once; the baseline runs ``default,fold-conv-bn``
and the pruned model ``prune-channels{ratio=R,round_to=N},default,fold-conv-bn`` (the same
cleanups and BatchNorm folding for both). Each is lowered by every backend available
here; per backend, the unpruned and the pruned model are timed in adjacent calls, ``--rounds``
times (order alternating), and the speedup is the median of the per-round ratios (with its
quartiles): these machines are noisy, only same-run, paired ratios are meaningful. ``eager`` is the Program's GraphModule run by PyTorch.
Each compiled pruned model is also checked against the pruned Program (numerics).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch

import optc
from optc.backends.base import get_backend, lower
from optc.errors import OptcError
from optc.ir.stats import model_stats
from optc.ir.verifier import compare_outputs
from optc.tools import zoo

PIPELINE = "default,fold-conv-bn"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except Exception:
        return platform.processor() or platform.machine()


def paired(a, b, inputs, rounds: int, pause_s: float = 0.05) -> tuple[float, float, list[float]]:
    """Time ``a`` and ``b`` in adjacent calls, ``rounds`` times (order alternating, a short pause
    before each call so that a runtime's spinning worker threads settle); returns the median
    milliseconds of each and the sorted per-round ratios ``t_a / t_b``. Adjacent calls see the
    same machine load, so the ratios survive a noisy machine better than separate medians."""
    ta, tb = [], []
    with torch.no_grad():
        for fn in (a, b, a, b):                 # warm-up
            fn(*inputs)
        for r in range(rounds):
            for which in ((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta)):
                time.sleep(pause_s)
                t0 = time.perf_counter()
                which[0](*inputs)
                which[1].append(time.perf_counter() - t0)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3, sorted(x / y for x, y in zip(ta, tb))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--backends", default="eager,torchscript,onnx,tvm")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2, help="threads for torch and every backend's runtime")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, inputs = zoo.load(args.model, batch=args.batch, image_size=args.image_size)
    t0 = time.perf_counter()
    program = optc.capture(model, inputs)
    capture_s = time.perf_counter() - t0
    prune = f"prune-channels{{ratio={args.ratio},round_to={args.round_to}}}"
    base, _ = optc.optimize(program, PIPELINE)
    t0 = time.perf_counter()
    pruned, report = optc.optimize(program, f"{prune},{PIPELINE}")
    prune_s = time.perf_counter() - t0
    s0, s1 = model_stats(program).total, model_stats(pruned).total
    print(f"{args.model} {args.image_size}x{args.image_size} batch {args.batch}: capture {capture_s:.1f} s, "
          f"pipeline '{prune},{PIPELINE}' {prune_s:.1f} s")
    print(report.format())
    print(f"params {s0.params / 1e6:.2f} M -> {s1.params / 1e6:.2f} M ({s0.params / s1.params:.2f}x fewer); "
          f"FLOPs {s0.flops / 1e9:.2f} G -> {s1.flops / 1e9:.2f} G ({s0.flops / s1.flops:.2f}x fewer); "
          f"weights {s0.weight_bytes / 2**20:.1f} MiB -> {s1.weight_bytes / 2**20:.1f} MiB", flush=True)

    runners: dict[tuple[str, str], object] = {}
    skipped = {}
    for be in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if be == "eager":
            runners[(be, "unpruned")] = base.graph_module
            runners[(be, "pruned")] = pruned.graph_module
            continue
        try:
            get_backend(be).check_available(optc.resolve_target("cpu", be))
            t0 = time.perf_counter()
            opts = {"threads": args.threads} if "threads" in get_backend(be).option_names() else {}
            runners[(be, "unpruned")] = lower(base, "cpu", be, **opts)
            runners[(be, "pruned")] = compiled = lower(pruned, "cpu", be, **opts)
            with torch.no_grad():
                rep = compare_outputs(pruned(*inputs), compiled(*inputs))
            print(f"{be}: lowered both in {time.perf_counter() - t0:.1f} s; pruned {be} vs pruned Program: {rep}",
                  flush=True)
        except OptcError as e:
            skipped[be] = str(e).splitlines()[0]
            print(f"{be}: skipped ({skipped[be]})", flush=True)

    results = {"model": args.model, "image_size": args.image_size, "batch": args.batch, "ratio": args.ratio,
               "round_to": args.round_to, "params": [s0.params, s1.params], "flops": [s0.flops, s1.flops],
               "weight_bytes": [s0.weight_bytes, s1.weight_bytes], "latency_ms": {}, "speedup": {},
               "speedup_iqr": {}, "skipped": skipped, "cpu": cpu_name(), "threads": torch.get_num_threads(),
               "rounds": args.rounds}
    print(f"\n{'backend':<12} {'unpruned ms':>12} {'pruned ms':>10} {'speedup':>8}   (medians of {args.rounds} "
          "paired rounds; speedup = median of per-round ratios, [quartiles])")
    for be in dict.fromkeys(k[0] for k in runners):
        a_ms, b_ms, ratios = paired(runners[(be, "unpruned")], runners[(be, "pruned")], inputs, args.rounds)
        q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
        results["latency_ms"][be] = [a_ms, b_ms]
        results["speedup"][be] = statistics.median(ratios)
        results["speedup_iqr"][be] = [q1, q3]
        print(f"{be:<12} {a_ms:>12.1f} {b_ms:>10.1f} {statistics.median(ratios):>7.2f}x   [{q1:.2f}, {q3:.2f}]",
              flush=True)
    print(f"machine: {results['cpu']}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"optc {optc.__version__}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
