"""The ``optc`` command-line tool.

    optc --version
    optc passes [--target T]
    optc dump MODEL [--pipeline P] [--format text|json|dot] [--print-after-all DIR] ...
    optc compare MODEL [--pipeline P] [--backend B ...] [--json OUT]

Exit status: 0 on success; 2 for a usage or user error (bad arguments, a model that cannot
be loaded or captured, a malformed pipeline) with one line ``optc: error: ...`` on stderr
and never a traceback; 1 when optc itself fails (a pass crashes or breaks the numerics, or
an internal bug), with one line and ``-v`` for the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
import warnings
from contextlib import contextmanager
from typing import Iterator, Sequence

import optc
from optc.tools.args import non_negative, positive
from optc.backends.lowering import resolve
from optc.errors import OptcError, PassError, VerificationError

log = logging.getLogger("optc.tools.cli")

USAGE_ERROR = 2
FAILURE = 1

_MODEL_HELP = """\
MODEL is one of:
  zoo:NAME                  a model of optc's zoo (see --config, --tiny, --batch)
  path/to/file.py:factory   imports the file and calls factory()
  package.module:factory    imports the module (the working directory is on the path)
  path/to/model.pt2         a program saved by torch.export.save
  path/to/program.optc      optc's IR text (a dump, a reproducer), tensors from program.optc.weights
A factory returns an nn.Module or (model, example_inputs).
WARNING: loading a .py file, a module or a .pt2 runs code from it; load only what you trust.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but its errors are one line ``optc: error: ...`` (status 2), like ours."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"optc: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="optc", description="optc: a compiler-style graph optimizer for PyTorch models.",
                     epilog="Run 'optc COMMAND --help' for a command's options.\n"
                            "Exit status: 0 success; 1 optc failed (a pass crashed, numerics broke, a bug);\n"
                            "2 a usage or user error (bad arguments, a model that cannot be loaded or captured).",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"optc {optc.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("passes", help="list the registered passes and the target's default pipeline",
                       description="List every registered pass (name, exact/lossy, options with types and "
                                   "defaults, description) and the target's default pipeline; with NAME, one "
                                   "pass in full (each option's help, ordering constraints).")
    p.add_argument("name", nargs="?", metavar="NAME", help="show this pass in full")
    p.add_argument("--target", default="cpu", help="cpu, cuda, or BACKEND:DEVICE such as onnx:cpu (default: cpu)")
    p.set_defaults(func=cmd_passes)

    from optc.ir.printer import FORMATS
    d = sub.add_parser("dump", help="capture a model, run a pipeline and print the graph",
                       description="Capture MODEL, run the pipeline if one is given and print the graph\n"
                                   "(stdout, or --out); the pass report goes to stderr.",
                       epilog=_MODEL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("model", metavar="MODEL", help="the model to load (forms below)")
    d.add_argument("--input", action="append", default=[], metavar="SPEC",
                   help="an example input SHAPE[:DTYPE] such as 1x3x224x224:float32, once per positional "
                        "argument (dtype default float32; integer inputs are random in [0, 100)); replaces "
                        "the model's own example inputs")
    d.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="override a zoo model's config (int, float, bool, a,b,c tuple or string), repeatable")
    d.add_argument("--tiny", action="store_true", help="use the zoo model's tiny (unit-test) config")
    d.add_argument("--batch", type=int, default=None, help="batch size of a zoo model's inputs (default 1)")
    d.add_argument("--dynamic-batch", action="store_true", help="capture with dim 0 of every input dynamic")
    d.add_argument("--pipeline", metavar="P",
                   help="pipeline text, e.g. 'default' or 'dce,cse'; without it the captured graph is printed "
                        "(unless a pipeline option below is given: then 'default')")
    d.add_argument("--target", default="cpu", help="cpu, cuda, or BACKEND:DEVICE (picks 'default'; default cpu)")
    d.add_argument("--backend", default=None, metavar="B",
                   help="also run backend B's stage after the pipeline (its decompositions and legalizations, "
                        "numbered after the pipeline's passes in the dumps); the graph shown is what B lowers")
    d.add_argument("--format", choices=sorted(FORMATS), default="text", help="graph format (default text)")
    d.add_argument("--out", metavar="FILE", help="write the graph to FILE (atomically) instead of stdout; a FILE "
                                                 "ending in .optc also gets FILE.weights (the tensors and example "
                                                 "inputs): 'optc dump FILE' replays it (text format only)")
    d.add_argument("--print-after-all", metavar="DIR",
                   help="write 00_input.txt and NN_pass.txt (the graph after each pass) into DIR, replacing "
                        "the files of an earlier dump there")
    d.add_argument("--print-changed", metavar="DIR",
                   help="write NN_pass.txt as a unified diff for each pass that changed the graph into DIR")
    d.add_argument("--verify-each", action="store_true", help="run the verifier after each pass")
    d.add_argument("--check-numerics", action="store_true", help="check exact passes numerically against the "
                                                                   "previous program")
    d.add_argument("--bisect-limit", type=non_negative, metavar="N", help="run only the first N passes")
    d.add_argument("--disable-pass", action="append", default=[], metavar="NAME",
                   help="skip pass NAME wherever the pipeline has it (repeatable)")
    d.add_argument("--provenance", action="store_true",
                   help="after each node: the captured nodes it derives from and the pass (and rule) that made "
                        "it (the json format always has them: origin, pass, rule)")
    d.add_argument("--stats", action="store_true",
                   help="print parameters, FLOPs and bytes per layer and in total to stderr (before -> after "
                        "the pipeline when one runs)")
    _add_quant_arguments(d)
    d.add_argument("-v", "--verbose", action="store_true",
                   help="debug logging for optc (why rewrites did not fire) and tracebacks on errors")
    d.set_defaults(func=cmd_dump)

    from optc.tools.fuzz import add_fuzz_parser
    add_fuzz_parser(sub)   # optc fuzz: differential testing against eager (docs/fuzzing.md)
    _add_compile_parser(sub)
    from optc.tools.bench import add_bench_parser
    add_bench_parser(sub)  # optc bench: latency against eager and other runtimes (docs/benchmarks.md)
    from optc.tools.compare import add_compare_parser
    add_compare_parser(sub)  # optc compare: against a float64 reference, the first diverging node
    from optc.tools.bisect import add_bisect_parser
    add_bisect_parser(sub)  # optc bisect: the first pass and rewrite after which the compile stops matching
    from optc.tools.reduce import add_reduce_parser
    add_reduce_parser(sub)  # optc reduce: the smallest part of the graph that still fails the same way
    from optc.tools.report import add_report_parser
    add_report_parser(sub)  # optc report: one self-contained HTML page (graph, pipeline history, overlays)
    return parser


def _add_quant_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration-data", metavar="FILE",
                   help="what insert-qdq calibrates on: a file written by torch.save holding a list of samples "
                        "(each a tensor, a tuple of inputs, a dict of keyword inputs or an (args, kwargs) pair), "
                        "or one tensor whose dim 0 runs over the examples (split into the model's batch size); "
                        "without it insert-qdq warns and calibrates on random inputs")
    p.add_argument("--quant-report", action="store_true",
                   help="print insert-qdq's per-layer report: input scale and zero point, weight scales, SQNR of "
                        "each layer's output against float32 (dB), the worst layers first")


def load_calibration_data(path: str | None, example_args: tuple):
    """The samples in ``path`` (torch.save'd; read with weights_only=True), or None."""
    if path is None:
        return None
    import torch
    if not os.path.isfile(path):
        raise OptcError(f"--calibration-data '{path}': no such file")
    try:
        data = torch.load(path, weights_only=True)
    except Exception as e:  # torch.load raises pickle / zip / runtime errors
        raise OptcError(f"--calibration-data '{path}': cannot read it with torch.load: {error_line(e)}") from None
    if isinstance(data, torch.Tensor):
        if len(example_args) != 1 or not isinstance(example_args[0], torch.Tensor) or example_args[0].dim() < 1:
            raise OptcError(f"--calibration-data '{path}' is one tensor, but the model takes {len(example_args)} "
                            "positional inputs: save a list of samples (tuples of inputs) instead")
        return [(t,) for t in data.split(example_args[0].shape[0])]
    return data


def print_quant_report(rep, file=None) -> None:
    """insert-qdq's QuantReport as a table, then its three worst layers."""
    if rep is None:
        print("no quantization report: the pipeline has no insert-qdq", file=file)
        return
    print(rep.format(), file=file)
    worst = rep.worst(3)
    if worst:
        print("worst layers (lowest SQNR): " + ", ".join(f"{la.node} ({la.module or '-'}, {la.sqnr_db:.1f} dB)"
                                                       for la in worst), file=file)




# ---- entry point ---------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run ``optc`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:   # --help, --version and argparse's errors
        return e.code if isinstance(e.code, int) else (0 if e.code is None else USAGE_ERROR)
    if args.command is None:
        print("optc: error: missing COMMAND (one of: passes, dump; see 'optc --help')", file=sys.stderr)
        return USAGE_ERROR
    verbose = getattr(args, "verbose", False)
    with _logging(verbose), _warnings_as_lines():
        try:
            return args.func(args)
        except KeyboardInterrupt:
            print("optc: interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:   # `optc dump ... | head`
            _silence_stdout()
            return FAILURE
        except (PassError, VerificationError) as e:   # optc itself failed on a valid request
            return _report(e, FAILURE, verbose, hint=_reproducer_hint(args))
        except OptcError as e:
            return _report(e, USAGE_ERROR, verbose)
        except Exception as e:  # a bug in optc: one line, the traceback with -v
            return _report(e, FAILURE, verbose, internal=True)


def _report(e: BaseException, status: int, verbose: bool, *, hint: str = "", internal: bool = False) -> int:
    if verbose:
        traceback.print_exception(e, file=sys.stderr)
    msg = error_line(e)
    if internal:
        msg = f"internal error: {type(e).__name__}: {msg}"
    if hint:
        msg += f"; {hint}"
    if status == FAILURE and not verbose:
        msg += " (run with -v for the traceback)"
    print(f"optc: error: {msg}", file=sys.stderr)
    return status


def error_line(e: BaseException) -> str:
    """One line for an error: its first line; a CaptureError adds the user's line and the hint."""
    if isinstance(e, optc.CaptureError):
        msg = e.reason
        if e.source:
            msg += f" (at {e.source})"
        if e.hint:
            msg += f"; hint: {e.hint}"
        return msg
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _reproducer_hint(args: argparse.Namespace) -> str:
    for directory in (getattr(args, "print_after_all", None), getattr(args, "print_changed", None)):
        if directory and os.path.isfile(os.path.join(directory, "failure_reproducer.txt")):
            return f"reproducer: {os.path.join(directory, 'failure_reproducer.txt')}"
    return ""


@contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """optc's loggers to stderr (debug with -v); torch's own chatter hidden unless -v."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("optc: %(levelname)s: %(name)s: %(message)s"))
    optc_log, torch_log = logging.getLogger("optc"), logging.getLogger("torch")
    saved = (optc_log.level, optc_log.propagate, torch_log.level)
    optc_log.addHandler(handler)
    optc_log.setLevel(logging.DEBUG if verbose else logging.WARNING)
    optc_log.propagate = False
    if not verbose:   # torch logs export failures at ERROR; our CaptureError says it in one line
        torch_log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        optc_log.removeHandler(handler)
        optc_log.setLevel(saved[0])
        optc_log.propagate = saved[1]
        torch_log.setLevel(saved[2])


@contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Python warnings as one line each: ``optc: warning: ...``."""
    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).strip().splitlines()
        print(f"optc: warning: {text[0] if text else category.__name__}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# ---- optc passes ---------------------------------------------------------------------------
def cmd_passes(args: argparse.Namespace) -> int:
    from optc.passes.base import get_pass, registry
    from optc.tools.pass_listing import format_pass, format_table
    target = optc.resolve_target(args.target)
    reg = registry()
    if args.name is not None:   # an unknown name: PipelineError, one line listing the valid ones (status 2)
        print(format_pass(get_pass(args.name), reg, target.default_pipeline, str(target)))
    else:
        print(format_table(reg, target.default_pipeline, str(target)))
    return 0


# ---- optc dump -----------------------------------------------------------------------------
_DUMP_FILE = re.compile(r"^(\d\d_.+\.txt|pipeline\.txt|failure_reproducer\.txt)$")


def cmd_dump(args: argparse.Namespace) -> int:
    from optc.ir.printer import FORMATS
    from optc.passes.manager import DumpInstrument, PassManager
    from optc.tools.models import load_model, parse_config

    target = resolve(args.target, args.backend)[0] if args.backend else optc.resolve_target(args.target)
    pipeline = args.pipeline
    wants_pipeline = (args.print_after_all or args.print_changed or args.verify_each or args.check_numerics
                      or args.bisect_limit is not None or args.disable_pass or args.backend)
    if pipeline is None and wants_pipeline:
        pipeline = "default"
    if args.print_after_all and args.print_changed and \
            os.path.abspath(args.print_after_all) == os.path.abspath(args.print_changed):
        raise OptcError("--print-after-all and --print-changed need different directories")
    pm = None
    disable = [n.strip() for item in args.disable_pass for n in item.split(",") if n.strip()]
    if pipeline is not None:   # validate the pipeline before the (slow) load and capture
        instruments = [DumpInstrument(_dump_dir(d), mode) for d, mode in
                       ((args.print_after_all, "all"), (args.print_changed, "changed")) if d]
        pm = PassManager(pipeline, target=target, verify_each=args.verify_each,
                         check_numerics=args.check_numerics, bisect_limit=args.bisect_limit,
                         disable=disable, instruments=instruments)
    if args.out:
        _check_writable(args.out)
        if args.out.endswith(".optc") and args.format != "text":
            raise OptcError(f"--out '{args.out}' is an .optc program text: it takes --format text, not {args.format}")

    loaded = load_model(args.model, inputs=args.input, config=parse_config(args.config), tiny=args.tiny,
                        batch=args.batch)
    if loaded.program is not None:   # an .optc text: the Program as written, names and all
        if args.dynamic_batch:
            raise OptcError(f"--dynamic-batch does not apply to '{args.model}': its text gives the inputs' dims")
        program = loaded.program
    else:
        program = optc.capture(loaded.model, loaded.args, loaded.kwargs,
                               dynamic_shapes="batch" if args.dynamic_batch else None, name=loaded.name)
    report = None
    before = program
    calibration = load_calibration_data(args.calibration_data, loaded.args)
    if calibration is not None:
        from optc.ir.calibration import prepare_calibration_data
        if pm is None:
            raise OptcError("--calibration-data needs a --pipeline with insert-qdq")
        pm.extra["calibration_data"] = prepare_calibration_data(program, calibration)
    if pm is not None:
        program, report = pm.run(program)
    if args.backend is not None:   # the backend's stage, through the same instruments, numbered on
        from optc.backends.base import get_backend, run_backend_stage
        dumps = [DumpInstrument(d, mode, continued=True) for d, mode in
                 ((args.print_after_all, "all"), (args.print_changed, "changed")) if d]
        done = len(report.records) if report is not None else 0
        budget = None if args.bisect_limit is None else max(args.bisect_limit, done)
        program, stage = run_backend_stage(program, get_backend(target.backend), target, first_index=done + 1,
                                           instruments=dumps, bisect_limit=budget, disable=disable)
        if stage is not None:
            report.records += stage.records
            report.pipeline += f" | backend stage ({target.backend}): {stage.pipeline}"

    if args.provenance and args.format == "text":
        from optc.ir.printer import format_text
        text = format_text(program, with_provenance=True)
    else:
        text = FORMATS[args.format](program)
    if args.out and args.out.endswith(".optc"):   # the text and its tensors, so it replays
        from optc.ir.parser import save_program_text
        save_program_text(program, args.out, with_provenance=args.provenance)
    elif args.out:
        _write_atomic(args.out, text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    if report is not None:
        print(report.format(), file=sys.stderr)
    if args.quant_report:
        print_quant_report(program.graph_module.meta.get("optc_quant_report"), file=sys.stderr)
    if args.stats:
        from optc.ir.stats import format_stats, format_stats_diff, model_stats
        text = format_stats(model_stats(program)) if report is None else \
            format_stats_diff(model_stats(before), model_stats(program))
        print(text, file=sys.stderr)
    return 0


def _dump_dir(directory: str) -> str:
    """Create ``directory`` and clear the files of an earlier dump (NN_pass.txt ...) from it."""
    try:
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            if _DUMP_FILE.match(name):
                os.remove(os.path.join(directory, name))
    except OSError as e:
        raise OptcError(f"cannot use dump directory '{directory}': {e.strerror or e}") from None
    return directory


def _check_writable(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OptcError(f"cannot write --out '{path}': directory '{parent}' does not exist")
    if os.path.isdir(path):
        raise OptcError(f"cannot write --out '{path}': it is a directory")


def _write_atomic(path: str, text: str) -> None:
    from optc.ir.parser import write_atomic
    write_atomic(path, lambda f: f.write(text.encode()), what="--out")


# ---- optc compile --------------------------------------------------------------------------
def _add_compile_parser(sub) -> None:
    from optc.tools.bench import add_model_arguments
    c = sub.add_parser("compile", help="compile a model with a backend, save the artifact, compare with eager",
                       description="Capture MODEL, run the pipeline, lower it with --backend and save the artifact\n"
                                   "to --out (load it with optc.load). Prints the compile report (capture, per-pass\n"
                                   "and lowering time and statistics, artifact size), then the latency of eager and\n"
                                   "of the compiled model on the example inputs (timed interleaved, --runs rounds;\n"
                                   "the ratio is the median of the per-round ratios) and the max relative error.",
                       epilog=_MODEL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(c)
    c.add_argument("--backend", default=None, metavar="B",
                   help="torchscript, onnx or tvm (default: the one --target names, else onnx)")
    c.add_argument("--target", default="cpu", metavar="T", help="cpu, cuda, or BACKEND:DEVICE (default cpu)")
    c.add_argument("--pipeline", default="default", metavar="P", help="pipeline text (default: the target's default)")
    c.add_argument("--tune", type=non_negative, default=None, metavar="N",
                   help="tvm only: tuning trials, passed as the backend option tune=N")
    c.add_argument("--threads", type=positive, default=None, metavar="N",
                   help="threads for torch and, for backends with a 'threads' option (onnx), the runtime "
                        "(default: every core)")
    c.add_argument("--params", choices=("auto", "copy", "bound", "reference"), default=None,
                   help="onnx, torchscript and tvm: the runtime's own copy of the weights ('copy'; tvm also "
                        "'bound': compiled into the library) or the model's tensors by reference (no second copy; "
                        "about 1.1-1.3x slower), passed as the backend option params= (default auto; docs/backends.md)")
    c.add_argument("--dynamic-batch", action="store_true", help="capture with dim 0 of every input dynamic")
    c.add_argument("--precision", choices=("fp32", "bf16", "int8", "auto"), default=None,
                   help="fp32 (the default pipeline), bf16 (default,to-half{dtype=bfloat16}), int8 "
                        "(default,insert-qdq, calibrated on --calibration-data), or auto: each the backend takes, "
                        "the fastest whose cosine against eager float32 is >= --min-cosine (the table is printed)")
    c.add_argument("--min-cosine", type=float, default=0.999, metavar="C",
                   help="--precision auto: the accuracy budget (default 0.999)")
    c.add_argument("--weights", action="append", default=[], metavar="F",
                   help="the model's tensors from F: a .safetensors file or a folder of them (repeatable); for a "
                        "model built on the meta device (docs/cli.md)")
    c.add_argument("--out", required=True, metavar="DIR",
                   help="artifact folder (created; an earlier artifact there is replaced)")
    c.add_argument("--runs", type=non_negative, default=20, metavar="N",
                   help="timed rounds of the latency comparison (default 20; 0 skips it)")
    c.add_argument("--warmup", type=non_negative, default=3, metavar="N", help="untimed rounds first (default 3)")
    c.add_argument("--stats", action="store_true",
                   help="also print parameters, FLOPs, weight and activation bytes per layer, before and after the "
                        "pipeline (the report always has the totals)")
    c.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the check of the compiled model against the program (example inputs and a fresh "
                        "random draw; a mismatch is an error, exit status 1)")
    _add_quant_arguments(c)
    c.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks on errors")
    c.set_defaults(func=cmd_compile)




def cmd_compile(args: argparse.Namespace) -> int:
    import torch
    from optc.backends.base import MANIFEST
    from optc.passes.manager import PassManager
    from optc.tools.bench import DEFAULT_PAUSE_MS, interleaved, max_rel_error, paired_ratios
    from optc.tools.models import load_model, parse_config

    # everything that can be checked is checked before the (slow) load, capture and lowering
    target, backend = resolve(args.target, args.backend)
    if args.tune is not None and backend.name != "tvm":
        raise OptcError(f"--tune applies to the tvm backend only, not '{backend.name}'")
    if args.params is not None:
        modes = backend.params_modes
        if modes is None:
            raise OptcError(f"--params: the {backend.name} backend has no params option (onnx, torchscript and "
                            "tvm have)")
        if args.params not in modes:
            raise OptcError(f"--params {args.params}: the {backend.name} backend takes {', '.join(modes)}")
    backend.check_available(target)
    if args.precision is not None and args.pipeline != "default":
        raise OptcError("--precision chooses the pipeline: give --precision or --pipeline, not both")
    if args.precision in ("fp32", "bf16", "int8"):
        from optc.tools.precision import PIPELINES
        args.pipeline = PIPELINES[args.precision]
    PassManager(args.pipeline, target=target)   # a malformed pipeline or an unknown pass fails here
    out = os.path.abspath(args.out)
    if os.path.exists(out) and (not os.path.isdir(out) or (os.listdir(out) and
                                                            not os.path.exists(os.path.join(out, MANIFEST)))):
        raise OptcError(f"--out '{args.out}' exists and is not an optc artifact folder: refusing to overwrite it")
    options = {}
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        if "threads" in backend.option_names():
            options["threads"] = args.threads
    if args.tune is not None:
        options["tune"] = args.tune
    if args.params is not None:
        options["params"] = args.params

    loaded = load_model(args.model, inputs=args.input, config=parse_config(args.config), tiny=args.tiny,
                        batch=args.batch)
    if args.weights:   # memory-mapped: eager below reads the same pages the compile read
        from optc.ir.weights import with_weights
        loaded.model = with_weights(loaded.model, args.weights)
    progress = (lambda msg: print(f"optc: {msg}...", file=sys.stderr, flush=True)) if sys.stderr.isatty() else None
    calibration = load_calibration_data(args.calibration_data, loaded.args)
    if args.precision == "auto":
        from optc.tools.precision import choose, format_choice
        compiled, report, best, tried = choose(
            loaded.model, loaded.args, loaded.kwargs or {}, backend=backend.name, target=target,
            calibration_data=calibration, min_cosine=args.min_cosine, say=progress,
            compile_options=dict(options, check=args.check, dynamic_shapes="batch" if args.dynamic_batch else None))
        print(format_choice(tried, best, args.min_cosine))
    else:
        compiled, report = optc.compile(loaded.model, loaded.args, example_kwargs=loaded.kwargs or None,
                                        target=target, pipeline=args.pipeline, progress=progress,
                                        dynamic_shapes="batch" if args.dynamic_batch else None,
                                        calibration_data=calibration, check=args.check, **options)
    compiled.save(out)
    print(report.format())
    if args.quant_report:
        print_quant_report(report.quantization)
    if args.stats:
        print("per layer, before -> after the pipeline:")
        print(report.format_stats())
    files = ", ".join(sorted(os.listdir(out)))
    print(f"saved to {out} ({files})")

    model, call_args, call_kwargs = loaded.model, loaded.args, loaded.kwargs
    cuda = target.device == "cuda"
    if cuda:   # eager on the same device as the compiled model, so the comparison is fair
        model = model.to("cuda")
        call_args, call_kwargs = (torch.utils._pytree.tree_map(
            lambda t: t.to("cuda") if isinstance(t, torch.Tensor) else t, x) for x in (call_args, call_kwargs))

    def timed(fn):
        def run():
            out = fn(*call_args, **call_kwargs)
            if cuda:
                torch.cuda.synchronize()
            return out
        return run

    with torch.no_grad():
        reference = model(*call_args, **call_kwargs)
    err = max_rel_error(compiled(*call_args, **call_kwargs), reference)
    name = f"optc {backend.name}"
    if args.runs:
        times = interleaved({"eager": timed(model), name: timed(compiled)}, runs=args.runs, warmup=args.warmup,
                            pause_s=DEFAULT_PAUSE_MS / 1e3)
        import statistics
        eager_ms, optc_ms = (statistics.median(times[k]) * 1e3 for k in ("eager", name))
        ratio = statistics.median(paired_ratios(times[name], times["eager"]))
        threads = f"{torch.get_num_threads()} torch threads" + (
            f", {options['threads']} runtime threads" if "threads" in options else "")
        print(f"latency on the example inputs ({threads}; {args.warmup} warm-up + {args.runs} interleaved "
              f"rounds, {DEFAULT_PAUSE_MS:g} ms pause before each call; median):")
        print(f"  {'eager':<18}{eager_ms:10.3f} ms")
        print(f"  {name:<18}{optc_ms:10.3f} ms  {ratio:.2f}x eager (median of per-round ratios)")
    print("max relative error vs eager: " + (f"{err:.2e}" if err is not None else "n/a (outputs differ in structure)")
          + " (max |y - y_eager| / max |y_eager|)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
