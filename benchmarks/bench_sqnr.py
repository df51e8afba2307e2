"""optc compare's SQNR ranking of a quantized model against ONNX Runtime's ``qdq_loss_debug``.

    python benchmarks/bench_sqnr.py [--model resnet50] [--calibration 8] [--show 5] [--threads 2] [--json FILE]

The zoo model (full size, batch 1; ``--tiny`` for the unit-test size), quantized by optc with
``default,insert-qdq`` on ``--calibration`` random inputs (``random_inputs_like`` seeds 1..N, as
``bench_quant.py``). On those same inputs:

``optc``
    ``optc.tools.compare.compare(model, inputs, pipeline="default,insert-qdq",
    calibration_data=...)`` -- what ``optc compare`` prints and writes under ``"sqnr"``: every
    fake-quantized activation's SQNR against the float program insert-qdq ran on, worst first;
``ORT``
    ``onnxruntime.quantization.qdq_loss_debug`` on optc's float and QDQ programs lowered by optc's
    ONNX backend (``optc.tools.ort_sqnr.ort_layer_sqnr``: tensor names made ORT's
    ``x`` / ``x_DequantizeLinear_Output`` through the backend's node map, then ORT's
    ``modify_model_output_intermediate_tensors``, ``collect_activations`` -- ONNX Runtime with
    graph optimizations off --, ``create_activation_matching`` and ``compute_activation_error``;
    its ``xmodel_err``).

Prints both rankings side by side (the ``--show`` worst of each), whether the worst three agree
(same layers, same order), the largest SQNR difference over all activations, the times, and the
machine. ``--calibration`` is small by default: ``collect_activations`` keeps every float tensor of
every sample, dequantized weights included (ResNet-50: about 0.3 GB a sample).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import torch

import optc
from optc.ir.verifier import random_inputs_like
from optc.passes.pipeline import Pipeline, parse
from optc.tools import bench, zoo
from optc.tools.bench.report import _loadavg
from optc.tools.compare import compare
from optc.tools.ort_sqnr import ort_layer_sqnr


def amx_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = sorted({w for line in f if line.startswith("flags") for w in line.split() if w.startswith("amx")})
        return " ".join(flags) or "none"
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--tiny", action="store_true", help="the zoo's unit-test size")
    ap.add_argument("--calibration", type=int, default=8, help="random calibration inputs (also the SQNR inputs)")
    ap.add_argument("--pipeline", default="default,insert-qdq")
    ap.add_argument("--show", type=int, default=5, help="worst activations printed from each tool")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write both rankings to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    machine = bench.machine_info()
    print(f"bench_sqnr: {' '.join(sys.argv)}")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, AMX: {amx_flags()}; {args.threads} threads; "
          f"load average at start {machine['loadavg_start']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v))

    torch.manual_seed(0)
    model, inputs = zoo.load(args.model, **(zoo.tiny_config(args.model) if args.tiny else {}))
    captured = optc.capture(model, inputs)
    calib = [random_inputs_like(captured, seed=s) for s in range(1, args.calibration + 1)]

    t0 = time.perf_counter()
    result = compare(model, inputs, pipeline=args.pipeline, calibration_data=calib, label=args.model)
    t_optc = time.perf_counter() - t0
    ours = {s.node: s for s in result.sqnr}

    t0 = time.perf_counter()
    # the float program: the same pipeline without insert-qdq (what insert-qdq ran on, for "default,insert-qdq")
    float_pipeline = Pipeline(tuple(i for i in parse(args.pipeline) if i.name != "insert-qdq"))
    float_program, _ = optc.optimize(captured, str(float_pipeline))
    quant_program, _ = optc.optimize(captured, args.pipeline, calibration_data=calib)
    t_programs = time.perf_counter() - t0
    t0 = time.perf_counter()
    theirs = ort_layer_sqnr(float_program, quant_program, [captured.flatten_inputs(a, k) for a, k in calib])
    t_ort = time.perf_counter() - t0

    ort_rank = sorted(theirs, key=theirs.get)
    our_rank = [s.node for s in result.sqnr]
    common = set(theirs) & set(ours)
    diffs = {n: ours[n].sqnr_db - theirs[n] for n in common}
    worst_diff = max(diffs, key=lambda n: abs(diffs[n])) if diffs else None
    agree = our_rank[:3] == ort_rank[:3]

    print(f"\n{args.model}{' (tiny)' if args.tiny else ''}, {args.pipeline}, {args.calibration} random "
          f"calibration inputs (the SQNR inputs too): {len(ours)} fake-quantized activations (optc), "
          f"{len(theirs)} (ORT), {len(common)} in both")
    w = max([len(n) for n in our_rank[:args.show] + ort_rank[:args.show]] + [18])
    print(f"{'':>3}  {'optc compare':<{w}} {'dB':>8}  {'layer / module':<34}  {'ORT qdq_loss_debug':<{w}} {'dB':>8}")
    for i in range(args.show):
        a = result.sqnr[i] if i < len(result.sqnr) else None
        b = ort_rank[i] if i < len(ort_rank) else None
        where = f"{a.layer or '-'} / {a.module or '-'}" if a else ""
        print(f"{i + 1:>3}  {a.node if a else '':<{w}} {a.sqnr_db if a else float('nan'):8.3f}  {where:<34}  "
              f"{b or '':<{w}} {theirs.get(b, float('nan')):8.3f}")
    print(f"worst three agree (same activations, same order): {'yes' if agree else 'NO'}"
          + ("" if agree else f" (optc {our_rank[:3]}, ORT {ort_rank[:3]})"))
    if worst_diff is not None:
        print(f"largest difference over the {len(common)} activations: {abs(diffs[worst_diff]):.2g} dB "
              f"(%{worst_diff})")
    print(f"time: optc compare {t_optc:.1f} s (reference, pipeline with calibration, SQNR); "
          f"the two programs again {t_programs:.1f} s; ORT's tool on their ONNX exports {t_ort:.1f} s")
    machine["loadavg_end"] = _loadavg()
    print(f"load average at end {machine['loadavg_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "argv": sys.argv, "agree_worst3": agree,
                       "optc": [[s.node, s.op, s.layer, s.module, s.sqnr_db] for s in result.sqnr],
                       "ort": [[n, theirs[n]] for n in ort_rank]}, f, indent=1)
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
