"""The PassManager: runs a pipeline over a Program with instruments.

The manager copies the Program once at the pipeline's entry; from there each pass works in
place. Before each pass it keeps a cheap snapshot (graph copied, tensors shared -- passes
never mutate tensors in place), which is what lets it

- roll back: a failed pass leaves the previous Program intact and raises :class:`PassError`
  naming the pass, the passes before it and the node it was working on;
- check ``modified`` is honest (graph fingerprint before/after, ``check_modified``);
- compare numerics: exact passes against the previous Program (``check_numerics``), lossy
  passes always have the error they introduce measured and reported.

Debugging is done by instruments with before/after hooks (LLVM's pass instrumentation):
print-after-all / print-changed (as a unified diff) into a dump folder of ``NN_pass.txt``
files, verify-each, per-pass timing and statistics, ``disable`` and a bisection limit on pass
runs (``bisect_limit``, like ``-opt-bisect-limit``) and on individual rewrites
(``max_rewrites``, like ``-debug-counter``).
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

from optc.ir import provenance
from optc.errors import NumericMismatchError, OptcError, PassError
from optc.ir.printer import format_text
from optc.ir.program import Program, attr_tensors
from optc.ir.rewrite import remove_unused_attrs
from optc.ir.verifier import compare_outputs, random_inputs_like, verify
from optc.memory import hand_back_mapped, mapping_active
from optc.passes.base import PassContext, RewriteBudget
from optc.passes.pipeline import Pipeline, ResolvedPass, resolve

log = logging.getLogger("optc.passes")


@dataclass
class PassRecord:
    index: int
    name: str
    text: str
    status: str                  # "ran", "disabled", "bisected"
    modified: bool = False
    time_s: float = 0.0
    nodes_before: int = 0
    nodes_after: int = 0
    stats: dict = field(default_factory=dict)
    rejections: list = field(default_factory=list)
    exact: bool = True
    error: Any = None            # NumericReport vs the previous program (lossy passes; exact when checked)
    note: str = ""               # why the pipeline moved this pass (ResolvedPass.moved)
    rewrites: int = 0            # rewrites it counted through ctx.allow_rewrite (the bisection counter)


@dataclass
class PipelineReport:
    pipeline: str
    records: list[PassRecord] = field(default_factory=list)
    total_s: float = 0.0
    rewrites: int = 0                          # rewrites counted over the run
    last_rewrite: tuple | None = None          # (pass, rule, node) of the last rewrite allowed

    @property
    def passes_time_s(self) -> float:
        return sum(r.time_s for r in self.records)

    def record(self, name: str) -> PassRecord:
        for r in self.records:
            if r.name == name:
                return r
        raise KeyError(name)

    def stats(self, name: str) -> dict:
        """Statistics of pass ``name`` summed over all its runs."""
        out: dict = {}
        for r in self.records:
            if r.name == name:
                for k, v in r.stats.items():
                    out[k] = out.get(k, 0) + v if isinstance(v, (int, float)) else v
        return out

    def format(self) -> str:
        lines = [f"pipeline: {self.pipeline}",
                 f"{'#':>3}  {'pass':<28}{'ms':>9}  {'changed':<8}{'nodes':>13}  stats"]
        for r in self.records:
            if r.status != "ran":
                lines.append(f"{r.index:>3}  {r.text:<28}{'':>9}  {r.status}")
                continue
            stats = ", ".join(f"{k}={_fmt(v)}" for k, v in r.stats.items())
            if r.error is not None:
                stats = (stats + ", " if stats else "") + f"error: {r.error}"
            lines.append(f"{r.index:>3}  {r.text[:28]:<28}{r.time_s * 1e3:>9.1f}  {'yes' if r.modified else 'no':<8}"
                         f"{f'{r.nodes_before}->{r.nodes_after}':>13}  {stats}")
        lines.append(f"total pass time: {self.passes_time_s * 1e3:.1f} ms")
        lines += [f"note: pass {r.index} {r.text} {r.note}" for r in self.records if r.note]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"pipeline": self.pipeline, "passes_time_s": self.passes_time_s, "passes": [
            {"index": r.index, "pass": r.text, "status": r.status, "modified": r.modified, "time_s": r.time_s,
             "nodes_before": r.nodes_before, "nodes_after": r.nodes_after,
             "stats": {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in r.stats.items()},
             "error": None if r.error is None else str(r.error), "note": r.note} for r in self.records]}

    def __str__(self) -> str:
        return self.format()


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---- instruments -------------------------------------------------------------------------
class Instrument:
    """Hooks around each pass run. ``after`` sees the program before and after the pass."""

    def start(self, program: Program, passes: list[ResolvedPass]) -> None: ...
    def after(self, record: PassRecord, before: Program, after: Program) -> None: ...
    def failed(self, record: PassRecord, before: Program, exc: BaseException) -> None: ...


class DumpInstrument(Instrument):
    """Writes ``00_input.txt`` then ``NN_pass.txt`` per pass into ``directory``.

    ``mode="all"``: the full graph after every pass. ``mode="changed"``: a unified diff for
    passes that changed the graph only. On failure writes ``failure_reproducer.txt``: the
    input graph of the failing pass and the pipeline text to rerun it.
    """

    def __init__(self, directory: str, mode: str = "all", *, continued: bool = False):
        if mode not in ("all", "changed"):
            raise ValueError("dump mode must be 'all' or 'changed'")
        self.dir = directory
        self.mode = mode
        self.continued = continued   # a later stage (the backend's) of the same dump: numbering goes on
        os.makedirs(directory, exist_ok=True)

    def _write(self, name: str, text: str) -> None:
        path = os.path.join(self.dir, name)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    def start(self, program, passes):
        text = ",".join(p.text for p in passes) + "\n"
        if self.continued:
            path = os.path.join(self.dir, "pipeline.txt")
            before = open(path).read() if os.path.exists(path) else ""
            self._write("pipeline.txt", before + text)
            return
        self._write("00_input.txt", format_text(program))
        self._write("pipeline.txt", text)

    def after(self, record, before, after):
        if record.status != "ran":
            return
        fname = f"{record.index:02d}_{record.name}.txt"
        if self.mode == "all":
            self._write(fname, f"// after {record.text} (changed: {'yes' if record.modified else 'no'})\n"
                        + format_text(after))
        elif record.modified:
            diff = difflib.unified_diff(format_text(before).splitlines(True), format_text(after).splitlines(True),
                                        fromfile=f"before {record.text}", tofile=f"after {record.text}")
            self._write(fname, "".join(diff))

    def failed(self, record, before, exc):
        self._write("failure_reproducer.txt",
                    f"// pass '{record.text}' failed: {exc}\n// rerun: optc dump <model> --pipeline '{record.text}'\n"
                    f"// input graph:\n" + format_text(before))


class LogInstrument(Instrument):
    def after(self, record, before, after):
        if record.status == "ran":
            log.info("%s: %.1f ms, changed=%s, %s", record.text, record.time_s * 1e3, record.modified, record.stats)


def graph_fingerprint(program: Program) -> str:
    text = format_text(program, with_source=False)
    return hashlib.sha256(text.encode()).hexdigest()


# ---- the manager -------------------------------------------------------------------------
class PassManager:
    def __init__(self, pipeline: str | Pipeline, *, target: Any = None, default: str | None = None,
                 verify_each: bool = False, check_numerics: bool = False, numeric_rtol: float = 1e-4,
                 check_modified: bool = False, dump_dir: str | None = None, print_after_all: bool = False,
                 print_changed: bool = False, bisect_limit: int | None = None, max_rewrites: int | None = None,
                 disable: Iterable[str] = (), instruments: Iterable[Instrument] = (),
                 extra: dict | None = None, first_index: int = 1):
        from optc.target import resolve_target
        self.target = resolve_target(target) if target is not None else None
        if default is None:
            default = self.target.default_pipeline if self.target is not None else resolve_target("cpu").default_pipeline
        self.passes = resolve(pipeline, default)
        if self.target is not None and self.target.backend is not None:
            for rp in self.passes:
                reason = rp.info.refuse(rp.options, self.target) if rp.info.refuse is not None else None
                if reason:
                    from optc.errors import PipelineError
                    raise PipelineError(f"pass '{rp.text}' is refused for target {self.target}: {reason}")
        self.pipeline_text = str(pipeline)
        self.verify_each = verify_each
        self.check_numerics = check_numerics
        self.numeric_rtol = numeric_rtol
        self.check_modified = check_modified or verify_each
        self.bisect_limit = bisect_limit
        self.max_rewrites = max_rewrites
        self.disable = set(disable)
        from optc.passes.base import registry
        unknown = [d for d in self.disable if d not in registry()]
        if unknown:
            from optc.errors import PipelineError
            raise PipelineError(f"cannot disable unknown pass '{unknown[0]}' (valid passes: {', '.join(sorted(registry()))})")
        self.extra = dict(extra or {})
        self.first_index = first_index   # a backend stage numbers its passes after the pipeline's
        self.instruments: list[Instrument] = [LogInstrument(), *instruments]
        if dump_dir and (print_after_all or print_changed):
            self.instruments.append(DumpInstrument(dump_dir, "all" if print_after_all else "changed"))
        elif dump_dir:
            self.instruments.append(DumpInstrument(dump_dir, "all"))
        elif print_after_all or print_changed:
            raise ValueError("print_after_all / print_changed need a dump_dir")

    def run(self, program: Program) -> tuple[Program, PipelineReport]:
        t_start = time.perf_counter()
        current = program.clone()
        report = PipelineReport(",".join(p.text for p in self.passes))
        budget = RewriteBudget(self.max_rewrites)    # counts every rewrite; limits them with max_rewrites
        for inst in self.instruments:
            inst.start(current, self.passes)
        numeric_inputs = None
        ran: list[str] = []
        for idx, rp in enumerate(self.passes, start=self.first_index):
            record = PassRecord(idx, rp.name, rp.text, "ran", exact=rp.info.exact, note=rp.moved)
            if rp.moved:
                log.info("pass %d %s %s", idx, rp.text, rp.moved)
            report.records.append(record)
            if rp.name in self.disable:
                record.status = "disabled"
                log.info("pass %d %s disabled", idx, rp.text)
                continue
            if self.bisect_limit is not None and idx > self.bisect_limit:
                record.status = "bisected"
                log.info("BISECT: not running pass (%d) %s", idx, rp.text)
                continue
            before = current.clone()
            fp_before = graph_fingerprint(before) if self.check_modified else None
            record.nodes_before = len(current.graph.nodes)
            ctx = PassContext(rp.name, dict(rp.options), program=current, target=self.target,
                              budget=budget, extra=self.extra)
            used_before = budget.used
            dynamic_before = _dynamic_dims(current)
            try:
                t0 = time.perf_counter()
                result = rp.info.fn(current.graph_module, ctx)
                record.time_s = time.perf_counter() - t0
                gm = result.graph_module
                if result.modified:
                    remove_unused_attrs(gm)
                    gm.recompile()
                    provenance.record(before.graph_module, gm, rp.name)
                current = current.with_graph_module(gm)
                record.modified = bool(result.modified)
                record.stats = dict(result.stats)
                record.rewrites = budget.used - used_before
                record.rejections = list(ctx.rejections)
                if ctx.rejections:
                    record.stats.setdefault("not-fired", len(ctx.rejections))
                record.nodes_after = len(current.graph.nodes)
                lost = [d for d in dynamic_before if d not in _dynamic_dims(current)]
                if lost:
                    raise PassError(f"the pass made dynamic dim{'s' if len(lost) > 1 else ''} "
                                    f"{', '.join(lost)} static (a rule compared a symbolic size with == or "
                                    "branched on it, which guards on the example's size; compare with "
                                    "optc.ir.queries.known_equal / same_shape)")
                if self.check_modified:
                    changed = graph_fingerprint(current) != fp_before
                    if changed and not result.modified:
                        raise PassError("the pass reported 'unchanged' but changed the graph")
                if self.verify_each:
                    verify(current, repropagate=True)
                if result.modified and (not rp.info.exact or self.check_numerics):
                    if numeric_inputs is None:
                        numeric_inputs = [(program.example_args, program.example_kwargs), random_inputs_like(program, seed=1)]
                    record.error = self._compare(before, current, numeric_inputs)
                    if rp.info.exact and record.error.max_rel_error > self.numeric_rtol:
                        raise NumericMismatchError(f"exact pass changed the numerics: {record.error} "
                                                   f"> tolerance {self.numeric_rtol:g}")
                if result.modified and mapping_active():
                    # weights memory-mapped from a file that the pass replaced (concatenated, cast,
                    # quantized, folded), and what the numeric comparison read: pages handed back
                    # but for the weights the program still holds (nothing outside such a compile)
                    hand_back_mapped(keep=attr_tensors(gm).values())
            except Exception as e:  # any failure inside a pass: roll back and report with context
                record.status = "failed"
                for inst in self.instruments:
                    inst.failed(record, before, e)
                node = ctx.current_node or getattr(e, "node", None)
                src = None
                if node is not None:
                    src = next((n.meta.get("optc_source") for n in before.graph.nodes if n.name == node), None)
                msg = str(e) if isinstance(e, OptcError) else f"{type(e).__name__}: {e}"
                if isinstance(e, PassError) and e.pass_name:
                    e.program = before
                    raise
                err = PassError(msg, pass_name=rp.text, previous=list(ran), node=node, source=src)
                err.program = before   # the last good Program, for inspection
                raise err from e
            ran.append(rp.text)
            for inst in self.instruments:
                inst.after(record, before, current)
        report.total_s = time.perf_counter() - t_start
        report.rewrites, report.last_rewrite = budget.used, budget.last
        return current, report

    @staticmethod
    def _compare(before: Program, after: Program, inputs):
        worst = None
        with torch.no_grad():
            for args, kwargs in inputs:
                ref = before(*args, **kwargs)
                hand_back_mapped()      # the weights it read from a mapped file, before the other program reads its own
                rep = compare_outputs(ref, after(*args, **kwargs))
                if worst is None or rep.max_rel_error > worst.max_rel_error:
                    worst = rep
        return worst


def _dynamic_dims(program: Program) -> list[str]:
    """``input[dim]`` for every symbolic dim of the program's inputs."""
    out = []
    for spec in program.input_specs:
        for i, d in enumerate(spec.shape):
            if isinstance(d, str):
                out.append(f"{spec.name}[{i}]")
    return out


def run_pipeline(program: Program, pipeline: str = "default", **kwargs) -> tuple[Program, PipelineReport]:
    return PassManager(pipeline, **kwargs).run(program)

