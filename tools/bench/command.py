"""The command line: ``optc bench`` (:func:`add_bench_parser`, :func:`cmd_bench`), and the model
arguments ``optc compile`` shares (:func:`add_model_arguments`)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from optc.errors import OptcError
from optc.tools.bench.candidates import BASELINES, default_baselines
from optc.tools.bench.run import run_bench
from optc.tools.args import non_negative, positive
from optc.tools.bench.timing import DEFAULT_PAUSE_MS






def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """MODEL, --input, --config, --tiny, --batch (as ``optc dump`` has them)."""
    p.add_argument("model", metavar="MODEL", help="the model to load (zoo:NAME, file.py:factory, module:factory, "
                                                  "file.pt2; see 'optc dump --help')")
    p.add_argument("--input", action="append", default=[], metavar="SPEC",
                   help="an example input SHAPE[:DTYPE] such as 1x3x224x224:float32, once per positional argument; "
                        "replaces the model's own example inputs")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="override a zoo model's config (repeatable)")
    p.add_argument("--tiny", action="store_true", help="use the zoo model's tiny (unit-test) config")
    p.add_argument("--batch", type=positive, default=None, help="batch size of a zoo model's inputs (default 1)")


def add_bench_parser(sub) -> None:
    """Register ``optc bench`` on the CLI's subparsers."""
    p = sub.add_parser(
        "bench", help="latency, compile time and memory of optc's backends against eager and other runtimes",
        description="For MODEL, in one process: eager PyTorch, torch.compile (inductor), TorchScript (trace +\n"
                    "freeze + optimize_for_inference), ONNX Runtime on a plain torch.onnx.export, and optc with\n"
                    "each backend. Candidates are timed interleaved (one call of each per round, many rounds);\n"
                    "'x eager' is the median over rounds of the per-round ratio. Also compile time, peak RSS\n"
                    "growth during the compile and max relative error against eager. See docs/benchmarks.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--backends", default="onnx,torchscript,tvm",
                   help="comma-separated optc backends (default: onnx,torchscript,tvm; '' for none); an "
                        "unavailable one is skipped with a note")
    p.add_argument("--baselines", default=",".join(default_baselines()),
                   help=f"comma-separated baselines among {', '.join(BASELINES)} (default: all whose package is "
                        "installed); eager is always measured, as every ratio is against it")
    p.add_argument("--pipeline", default="default", metavar="P", help="optc pipeline (default: the target's)")
    p.add_argument("--warmup", type=non_negative, default=5, metavar="N", help="untimed rounds first (default 5)")
    p.add_argument("--runs", type=positive, default=50, metavar="N", help="timed rounds (default 50)")
    p.add_argument("--threads", type=positive, default=None, metavar="N",
                   help="threads for torch and ONNX Runtime (default: every core this process may use)")
    p.add_argument("--pause-ms", type=float, default=DEFAULT_PAUSE_MS, metavar="MS",
                   help=f"sleep before each timed call so the previous runtime's spinning worker threads go idle "
                        f"(default {DEFAULT_PAUSE_MS:g})")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-round random order (default 0)")
    p.add_argument("--inductor-cache", metavar="DIR", default=None,
                   help="torch.compile's cache folder, kept (default: a fresh temporary one, so its compile "
                        "time is a cold compile); the row says whether DIR was empty before")
    p.add_argument("--tvm-tune", type=non_negative, default=0, metavar="N",
                   help="also time the tvm backend tuned with N MetaSchedule trials ('optc tvm tuned'; its "
                        "compile time includes the tuning; default 0: not measured)")
    p.add_argument("--tuning-db", metavar="DIR", default=None,
                   help="tuning database for --tvm-tune (default: a fresh temporary one, so the time is a "
                        "first tuning's)")
    p.add_argument("--json", metavar="FILE", help="also write the results (with every timing) as JSON to FILE")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="progress, optc's debug log and tracebacks on stderr")
    p.set_defaults(func=cmd_bench)


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def bench_command(args: argparse.Namespace) -> str:
    """The command with every effective option spelled out (defaults included)."""
    parts = ["optc", "bench", args.model]
    for spec in args.input:
        parts += ["--input", spec]
    for item in args.config:
        parts += ["--config", item]
    if args.tiny:
        parts.append("--tiny")
    if args.batch is not None:
        parts += ["--batch", str(args.batch)]
    parts += ["--backends", args.backends, "--baselines", args.baselines]
    if args.pipeline != "default":
        parts += ["--pipeline", args.pipeline]
    parts += ["--warmup", str(args.warmup), "--runs", str(args.runs), "--threads", str(args.threads),
              "--pause-ms", f"{args.pause_ms:g}"]
    if args.seed:
        parts += ["--seed", str(args.seed)]
    if args.inductor_cache:
        parts += ["--inductor-cache", args.inductor_cache]
    if args.tvm_tune:
        parts += ["--tvm-tune", str(args.tvm_tune)]
    if args.tuning_db:
        parts += ["--tuning-db", args.tuning_db]
    if args.markdown:
        parts.append("--markdown")
    return " ".join(shlex.quote(p) for p in parts)


def cmd_bench(args: argparse.Namespace) -> int:
    from optc.backends.base import available_backends
    from optc.tools.models import load_model, parse_config

    backends = _split(args.backends)
    unknown = [b for b in backends if b not in available_backends()]
    if unknown:
        raise OptcError(f"unknown backend '{unknown[0]}' (valid: {', '.join(available_backends())})")
    baselines = _split(args.baselines)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise OptcError(f"unknown baseline '{unknown[0]}' (valid: {', '.join(BASELINES)})")
    if args.json:
        parent = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(parent):
            raise OptcError(f"cannot write --json '{args.json}': directory '{parent}' does not exist")
    if args.pipeline != "default":   # validate before the (slow) load
        from optc.passes.pipeline import parse
        parse(args.pipeline)
    if args.pause_ms < 0:
        raise OptcError(f"--pause-ms must be >= 0, got {args.pause_ms:g}")
    args.threads = args.threads or default_threads()
    loaded = load_model(args.model, inputs=args.input, config=parse_config(args.config), tiny=args.tiny,
                        batch=args.batch)
    progress = (lambda msg: print(f"optc: bench: {msg}", file=sys.stderr, flush=True)) if args.verbose else None
    result = run_bench(loaded.model, loaded.args, loaded.kwargs, label=loaded.label, backends=backends,
                       baselines=baselines, runs=args.runs, warmup=args.warmup, threads=args.threads,
                       pipeline=args.pipeline, command=bench_command(args),
                       inductor_cache=args.inductor_cache, pause_ms=args.pause_ms, seed=args.seed,
                       tvm_tune=args.tvm_tune, tuning_db=args.tuning_db, progress=progress)
    sys.stdout.write(result.format(markdown=args.markdown))
    sys.stdout.flush()
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(result.to_json(), f, indent=1)
                f.write("\n")
        except OSError as e:
            raise OptcError(f"cannot write --json '{args.json}': {e.strerror or e}") from None
    return 0
