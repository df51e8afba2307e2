"""The command line: ``optc fuzz`` (registered by :func:`add_fuzz_parser`, run by :func:`cmd_fuzz`)."""

from __future__ import annotations

import os
from typing import Sequence

from optc.tools.fuzz.campaign import parallel_campaign
from optc.tools.fuzz.kinds import KINDS
from optc.tools.fuzz.oracle import DEFAULT_BACKENDS
from optc.tools.fuzz.report import report_json


def add_fuzz_parser(sub) -> None:
    """Register ``optc fuzz`` on the CLI's subparsers."""
    import argparse
    p = sub.add_parser(
        "fuzz", help="differential testing: random models through every pass and backend, against eager",
        description="Generate random valid models and run each through capture, every registered pass alone,\n"
                    "the default pipeline and (at --backend-rate) every backend; compare with eager PyTorch in\n"
                    "float64. Each new kind of mismatch is shrunk to a minimal model and written to --out as a\n"
                    "standalone reproducer. Prints counts per pass and backend. Exit status 1 if a mismatch\n"
                    "that is not a known issue (optc.tools.fuzz.KNOWN_ISSUES) was found. See docs/fuzzing.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=1.0, help="how long to fuzz (default 1)")
    p.add_argument("--max-models", type=int, default=None, metavar="N", help="stop after N models")
    p.add_argument("--seed", type=int, default=0, help="campaign seed: model k is drawn from 'SEED:k' (default 0)")
    p.add_argument("--start", type=int, default=0, metavar="K", help="first model index (resume a campaign)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="processes to fuzz in (default 1; each runs single-threaded, so up to one per core)")
    p.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                   help="comma-separated backends to compare (default: all; '' for none); a backend whose "
                        "package is missing is skipped")
    p.add_argument("--backend-rate", default="0.1", metavar="R",
                   help="share of models each backend runs on: a number, or per backend such as "
                        "'onnx=0.1,torchscript=0.1,tvm=0.03' (default 0.1: lowering costs seconds)")
    p.add_argument("--passes", default=None, help="comma-separated passes to run alone (default: every registered pass)")
    p.add_argument("--max-ops", type=int, default=10, help="most ops per model (default 10)")
    p.add_argument("--kinds", default=None, help="comma-separated op kinds to draw from (default: all; see "
                                                 "optc.tools.fuzz.KINDS)")
    p.add_argument("--shrink-seconds", type=float, default=120.0, help="time to shrink each new mismatch (default 120)")
    p.add_argument("--out", default="fuzz-repro", help="folder for reproducers (default fuzz-repro/)")
    p.add_argument("--json", metavar="FILE", help="also write the counts as JSON to FILE (and, while it runs, each "
                                                  "worker's counts so far to FILE.workerN every 100 models)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress on stderr (a bar on a terminal; else a line each 5%% of the budget or minute)")
    p.set_defaults(func=cmd_fuzz)


def cmd_fuzz(args) -> int:
    import json
    from optc.backends.base import available_backends
    from optc.errors import OptcError
    from optc.passes.base import registry
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in available_backends()]
    if unknown:
        raise OptcError(f"unknown backend '{unknown[0]}' (valid: {', '.join(available_backends())})")
    passes = None
    if args.passes is not None:
        passes = [p.strip() for p in args.passes.split(",") if p.strip()]
        bad = [p for p in passes if p not in registry()]
        if bad:
            raise OptcError(f"unknown pass '{bad[0]}' (valid passes: {', '.join(sorted(registry()))})")
    if not args.minutes > 0 or (args.max_models is not None and args.max_models < 1):
        raise OptcError("--minutes must be > 0 and --max-models >= 1")
    rate = _parse_rate(args.backend_rate, backends)
    kinds = None
    if args.kinds is not None:
        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise OptcError(f"unknown op kind '{bad[0] if bad else ''}' (valid: {', '.join(KINDS)})")
    if not 1 <= args.max_ops <= 50:
        raise OptcError(f"--max-ops must be in [1, 50], got {args.max_ops}")
    if not 1 <= args.workers <= (os.cpu_count() or 1) * 4:
        raise OptcError(f"--workers must be in [1, {(os.cpu_count() or 1) * 4}], got {args.workers}")
    report = parallel_campaign(args.minutes, workers=args.workers, seed=args.seed, backends=backends, backend_rate=rate,
                      out=args.out, passes=passes, max_ops=args.max_ops, shrink_seconds=args.shrink_seconds,
                      progress=not args.no_progress, max_models=args.max_models, start=args.start, kinds=kinds,
                      checkpoint=args.json)
    print(report.format())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report_json(report), f, indent=2)
            f.write("\n")
    return 1 if report.unexplained else 0


def _parse_rate(text: str, backends: Sequence[str]) -> float | dict:
    from optc.errors import OptcError
    try:
        if "=" not in text:
            rate: float | dict = float(text)
            values = [rate]
        else:
            rate = {k.strip(): float(v) for k, v in (item.split("=", 1) for item in text.split(",") if item.strip())}
            values = list(rate.values())
            unknown = [b for b in rate if b not in backends]
            if unknown:
                raise OptcError(f"--backend-rate names backend '{unknown[0]}', which is not in --backends")
    except ValueError:
        raise OptcError(f"--backend-rate must be a number or BACKEND=NUMBER,..., got '{text}'") from None
    if not all(0 <= v <= 1 for v in values):
        raise OptcError(f"--backend-rate must be in [0, 1], got '{text}'")
    return rate
