"""Latency in NCHW against NHWC per backend and model, as paired ratios measured in one run.

    python benchmarks/bench_layout.py [--models resnet50 mobilenet_v2] [--backends torchscript onnx tvm] \
        [--runs 30] [--threads 2] [--batch 1] [--device cpu|cuda] [--json out.json]

For each model (full size, batch 1) the Program is captured once and, per backend, optimized
twice: with the target's default pipeline without ``convert-layout`` (NCHW: ``aten.conv2d``) and
with ``convert-layout{layout=NHWC}`` before its cleanups (NHWC: ``optc.conv2d_nhwc``). Every backend lowers both; TVM also lowers the
NCHW Program with its backend option ``layout="NHWC"`` (Relax's ``ConvertLayout`` inside the
backend, how the TVM backend ran NHWC before ``convert-layout`` existed). The candidates of
one (model, backend) are timed interleaved (one call of each per round, random order, a short
pause before each call), and each ratio is the median of the per-round ratios candidate/NCHW
(TorchScript also: NHWC lowered through the NHWC ops' ATen decompositions instead of channels-last
memory format, and both layouts without ``optimize_for_inference``, that NHWC row against that NCHW
one) with a 95% confidence interval of that median (``optc.tools.bench.median_ci``). A ratio below 1
means NHWC is faster. Each candidate is checked against eager (max error relative to the output
scale). The last column says which layout the backend's default pipeline (``optc/target.py``)
picks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch

import optc
from optc.backends.base import get_backend, lower
from optc.errors import OptcError
from optc.ir.verifier import compare_outputs
from optc.passes.pipeline import parse
from optc.target import make_target
from optc.tools import zoo
from optc.tools.bench import interleaved, machine_info, median_ci, paired_ratios


def pipelines(target) -> tuple[str, str]:
    """The target's default pipeline without any convert-layout (NCHW), and with
    ``convert-layout{layout=NHWC}`` before its final cleanups (NHWC)."""
    items = [str(i) for i in parse(target.default_pipeline) if i.name != "convert-layout"]
    cut = len(items) - 2 if items[-2:] == ["cse", "dce"] else len(items)
    return ",".join(items), ",".join(items[:cut] + ["convert-layout{layout=NHWC}"] + items[cut:])


@contextlib.contextmanager
def torchscript_decompositions():
    """Lower NHWC programs through the ATen decompositions of the NHWC ops (permute -> conv2d ->
    permute views) instead of channels-last memory format: the alternative design, for the record."""
    from optc.backends import torchscript_layout
    saved = torchscript_layout.stage_passes
    torchscript_layout.stage_passes = lambda gm: []
    try:
        yield
    finally:
        torchscript_layout.stage_passes = saved


def count_permutes(program) -> int:
    aten = torch.ops.aten
    return sum(1 for n in program.graph.nodes if n.op == "call_function"
               and n.target in (aten.permute.default, aten.transpose.int))


def relax_layout_transforms(program, threads: int) -> int | None:
    """How many layout transforms (``permute_dims``/``layout_transform``) Relax's ConvertLayout
    leaves in the NCHW program's Relax module (before constant folding)."""
    try:
        import tvm
        from tvm import relax
        from optc.backends import tvm_schedule as ts
        backend = get_backend("tvm")
        mod = backend._import(program)
        target = tvm.target.Target(ts.llvm_target(threads))
        with target:
            mod = tvm.transform.Sequential([ts.clip_to_min_max, relax.transform.CanonicalizeBindings(),
                                            relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})])(mod)
    except Exception:  # noqa: BLE001 - a figure for the docs, not a requirement
        return None
    text = mod["main"].script()
    return text.count("R.permute_dims(") + text.count("R.layout_transform(")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v2"])
    ap.add_argument("--backends", nargs="+", default=["torchscript", "onnx", "tvm"])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--pause-ms", type=float, default=50.0)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {info['cpu']}, {info['usable_cpus']} usable CPUs, load average {info['loadavg_start']} "
          f"(1/5/15 min) at start")
    results = []
    print("| model | backend | candidate | ms (median) | ratio vs NCHW [95% CI] | permutes | max err vs eager | "
          "default picks |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        model, inputs = zoo.load(name, batch=args.batch)
        with torch.no_grad():
            ref = model(*inputs)
        program = optc.capture(model, inputs)
        dev = args.device
        if dev == "cuda":
            model = model.cuda()
            inputs = tuple(t.cuda() for t in inputs)
        for backend in args.backends:
            target = make_target(dev, backend)
            try:
                get_backend(backend).check_available(target)
            except OptcError as e:
                print(f"| {name} | {backend} | skipped: {str(e).splitlines()[0]} |||||||")
                continue
            p_nchw, p_nhwc = pipelines(target)
            nchw, _ = optc.optimize(program, p_nchw, target=target)
            nhwc, rep = optc.optimize(program, p_nhwc, target=target)
            layout_stats = rep.stats("convert-layout")
            opts = {"threads": args.threads} if "threads" in get_backend(backend).option_names() else {}
            variants = {"NCHW": (nchw, {}), "NHWC": (nhwc, {})}
            if backend == "torchscript" and dev == "cpu":
                # the NHWC ops' ATen decompositions instead of channels-last memory format; and without
                # optimize_for_inference: oneDNN's plain NCHW and NHWC kernels, no blocked layout
                variants.update({"NHWC as decompositions": (nhwc, {}),
                                 "NCHW, optimize=False": (nchw, {"optimize": False}),
                                 "NHWC, optimize=False": (nhwc, {"optimize": False})})
            if backend == "tvm":
                # the backend option layout= is explicit here: "NCHW" leaves the NCHW Program as it
                # is, "NHWC" is a no-op on the NHWC one and converts the NCHW one inside Relax
                variants = {"NCHW": (nchw, {"layout": "NCHW"}), "NHWC": (nhwc, {"layout": "NHWC"}),
                            "NCHW + Relax ConvertLayout": (nchw, {"layout": "NHWC"})}
            compiled, compile_s, errors = {}, {}, {}
            for label, (prog, extra) in variants.items():
                t0 = time.perf_counter()
                with torchscript_decompositions() if label == "NHWC as decompositions" else contextlib.nullcontext():
                    compiled[label] = lower(prog, target, backend, **opts, **extra)
                compile_s[label] = time.perf_counter() - t0
                with torch.no_grad():
                    errors[label] = compare_outputs(ref, compiled[label](*inputs)).max_rel_error
            with torch.no_grad():
                times = interleaved({k: (lambda c=c: c(*inputs)) for k, c in compiled.items()}, runs=args.runs,
                                    warmup=3, pause_s=args.pause_ms / 1e3)
            picked = target.layout
            for label in variants:
                base = "NCHW, optimize=False" if label == "NHWC, optimize=False" else "NCHW"
                ratios = paired_ratios(times[label], times[base])
                med = statistics.median(ratios)
                lo, hi = median_ci(ratios)
                prog = variants[label][0]
                perms = count_permutes(prog)
                if label.endswith("ConvertLayout"):
                    n = relax_layout_transforms(nchw, args.threads)
                    perms_txt = f"0 (+{n} in Relax)" if n is not None else "0"
                else:
                    perms_txt = str(perms)
                ratio_txt = "1" if label == base else f"{med:.3f} [{lo:.3f}, {hi:.3f}]"
                print(f"| {name} | {backend} | {label} | {statistics.median(times[label]) * 1e3:.1f} | {ratio_txt} | "
                      f"{perms_txt} | {errors[label]:.1e} | {picked if label == 'NCHW' else ''} |", flush=True)
                results.append({"model": name, "backend": backend, "candidate": label,
                                "median_ms": statistics.median(times[label]) * 1e3, "ratio_vs_nchw": med,
                                "ratio_ci95": [lo, hi], "permutes": perms, "max_rel_error": errors[label],
                                "compile_s": compile_s[label], "default_layout": picked,
                                "times_s": times[label]})
            del compiled
            print(f"convert-layout on {name} ({target}): {layout_stats}", flush=True)
    info["loadavg_end"] = machine_info()["loadavg_start"]
    print(f"\nload average {info['loadavg_start']} at start, {info['loadavg_end']} at end; "
          f"versions: {info['versions']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "runs": args.runs, "threads": args.threads, "batch": args.batch,
                       "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
