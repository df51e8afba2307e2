"""``optc bisect``: the first pass, and the first rewrite inside it, after which a compiled model
stops matching its eager self.

    optc bisect MODEL --backend B [--pipeline P] [--target T] [--rtol R] [--json OUT]

The model is captured once. Each *try* runs a prefix of the passes, lowers with the backend, runs
the compiled model on the example inputs and compares every output with the float64 eager
reference (``optc compare``'s measure and tolerances). The failure of the full compile is
**pinned** first: which output, and the order of magnitude of its error -- or, for a compile or
run that raises, the exception's type and first line. A try *reproduces* only if it fails the
same way; a try that fails another way (skipping a legalization makes the exporter raise, say)
counts as not reproducing and is reported, so the search cannot drift to another bug.

The search, each step a bisection over a range whose upper end reproduces:

1. the target pipeline's passes (``bisect_limit``), the backend stage run in full -- the first
   pass after which the failure reproduces;
2. inside that pass, its rewrites (the rewrite counter, ``max_rewrites``): the first rewrite
   that brings the failure, with its rule, node and the user's source line (a pass that does not
   count its rewrites is named as such);
3. if the failure reproduces with no pipeline pass at all: the backend stage's passes
   (``legalize``, ``ort-contrib-ops``, ...), the pipeline left out, then their rewrites;
4. if it reproduces with neither: the backend's own optimiser, where it can be switched -- ONNX
   Runtime's graph optimization levels (``disable``, ``basic``, ``extended``, ``all``): the lowest
   that fails; TVM's optional passes (``optc.backends.tvm.OPTIONAL_PASSES``: ``FastMathTransform``,
   ``FuseOps``, the default schedules, memory planning, ...; the backend option
   ``disabled_passes``): with all of them off first, then the first k of them on, in pipeline
   order, bisected -- the pass whose turn brings the failure, checked by leaving out that one
   alone. Failing with every optimization off means the exporter (importer) or a kernel.

Exit status: 0 when the full compile matches (nothing to bisect), 1 when a culprit was found,
2 on a usage error, 3 when the search could not attribute the failure (it stopped reproducing).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch



@dataclass(frozen=True)
class Failure:
    """What a try's failure looks like: a mismatch of output ``output`` with an error of order
    ``10**decade``, or an exception."""

    kind: str                      # "mismatch" or "error"
    output: int | None = None
    decade: float | None = None    # floor(log10(error)); inf for a non-finite error
    error: float | None = None     # the error itself (not part of the signature)
    error_type: str | None = None
    message: str | None = None

    def same_as(self, pinned: "Failure", *, any_output: bool = False) -> bool:
        """The same failure: the same exception, or a mismatch of the same output (any output with
        ``any_output``: a reduced piece has one) within one order of magnitude."""
        if self.kind != pinned.kind:
            return False
        if self.kind == "error":
            return self.error_type == pinned.error_type and self.message == pinned.message
        if not any_output and self.output != pinned.output:
            return False
        if math.isinf(pinned.decade) or math.isinf(self.decade):
            return self.decade == pinned.decade
        return abs(self.decade - pinned.decade) <= 1

    def describe(self) -> str:
        if self.kind == "error":
            return f"{self.error_type}: {self.message}"
        return f"output {self.output} off by {self.error:.3g} of its scale (order 1e{self.decade:g})"


@dataclass
class Try:
    passes: int                    # pipeline passes run (a prefix)
    stage_passes: int | None       # stage passes run (None: all)
    rewrites: int | None           # rewrite budget in the bisected part (None: all)
    session: str | None            # ONNX Runtime's optimization level (None: the default)
    outcome: str                   # "reproduces", "matches" or "fails differently: ..."
    disabled: list[str] | None = None   # TVM's optional passes left out (None: none)


@dataclass
class BisectResult:
    model: str
    backend: str
    pipeline: str
    pinned: Failure | None
    pipeline_passes: list[str] = field(default_factory=list)
    stage_passes: list[str] = field(default_factory=list)
    culprit: str | None = None     # "pipeline pass", "stage pass", "backend optimizer", "backend", None
    first_pass: dict | None = None          # {"index", "pass"}: index counted over the pipeline, then the stage
    first_rewrite: dict | None = None       # {"count", "pass", "rule", "node", "source"}
    session_level: str | None = None        # the lowest ONNX Runtime level that fails
    backend_pass: str | None = None         # TVM: the optional pass whose turn brings the failure
    note: str = ""
    tries: list[Try] = field(default_factory=list)

    @property
    def found(self) -> bool:
        return self.culprit is not None

    def to_json(self) -> dict:
        d = asdict(self)
        d["found"] = self.found
        if self.pinned and self.pinned.decade is not None and math.isinf(self.pinned.decade):
            d["pinned"]["decade"] = "inf"
        if self.pinned and self.pinned.error is not None and not math.isfinite(self.pinned.error):
            d["pinned"]["error"] = str(self.pinned.error)
        return d

    def format(self) -> str:
        lines = [f"model {self.model}, backend {self.backend}, pipeline {self.pipeline}"]
        if self.pinned is None:
            lines.append("the full compile matches the eager model: nothing to bisect")
            return "\n".join(lines)
        lines.append(f"pinned failure: {self.pinned.describe()}")
        for i, t in enumerate(self.tries, 1):
            where = f"pipeline passes 1..{t.passes}" if t.passes else "no pipeline pass"
            if t.stage_passes is not None:
                where += f", stage passes 1..{t.stage_passes}" if t.stage_passes else ", no stage pass"
            if t.rewrites is not None:
                where += f", first {t.rewrites} rewrites"
            if t.session is not None:
                where += f", ONNX Runtime optimization {t.session}"
            if t.disabled:
                d = t.disabled
                where += f", TVM without {', '.join(d)}" if len(d) <= 2 else \
                    f", TVM without {d[0]} .. {d[-1]} ({len(d)} optional passes)"
            lines.append(f"  try {i}: {where}: {t.outcome}")
        if self.first_pass:
            lines.append(f"first failing pass: #{self.first_pass['index']} {self.first_pass['pass']} ({self.culprit})")
        if self.first_rewrite:
            r = self.first_rewrite
            lines.append(f"first failing rewrite: #{r['count']} of {r['pass']}, rule {r['rule']} at %{r['node']}"
                         + (f" ({r['source']})" if r.get("source") else ""))
        if self.session_level:
            lines.append(f"ONNX Runtime: fails from optimization level '{self.session_level}' on")
        if self.backend_pass:
            lines.append(f"TVM: fails from optional pass {self.backend_pass} on")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


def _signature(outputs: list, reference: list, program, rtol: float | None, atol: float | None) -> Failure | None:
    from optc.tools.compare import _candidate   # the same measure as optc compare
    cand = _candidate("x", lambda *a, **k: outputs, (), {}, reference, program, rtol, atol)
    if cand.error is not None:
        return Failure("error", error_type="OutputError", message=cand.error)
    for o in cand.outputs:
        if not o.ok:
            e = o.max_rel
            decade = math.floor(math.log10(e)) if math.isfinite(e) and e > 0 else math.inf
            return Failure("mismatch", output=o.index, decade=decade, error=e)
    return None


def bisect(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, *, backend: str,
           pipeline: str = "default", target: str = "cpu", rtol: float | None = None, atol: float | None = None,
           label: str = "", progress: Callable[[str], None] | None = None) -> BisectResult:
    """See the module docstring."""
    import optc
    from optc.backends.lowering import resolve, run_backend_stage
    from optc.ir.source import node_source
    from optc.tools.compare import _flat, _reference
    say = progress or (lambda msg: None)
    kwargs = dict(kwargs or {})
    tgt, be = resolve(target, backend, {})
    reference, _ = _reference(model, args, kwargs)
    program = optc.capture(model, args, kwargs or None)
    result = BisectResult(label or type(model).__name__, be.name, pipeline, None)

    def attempt(passes: int | None, stage: int | None, rewrites: int | None = None, where: str = "pipeline",
                session: str | None = None, disabled: list[str] | None = None) -> tuple[Failure | None, Any, Any]:
        """Run a prefix; returns (failure or None, pipeline report, stage report)."""
        prep = srep = None
        try:
            opt, prep = optc.optimize(program, pipeline, tgt, bisect_limit=passes,
                                      max_rewrites=rewrites if where == "pipeline" else None)
            first = len(prep.records) + 1
            limit = None if stage is None else first - 1 + stage
            staged, srep = run_backend_stage(opt, be, tgt, first_index=first, bisect_limit=limit,
                                             max_rewrites=rewrites if where == "stage" else None)
            be.check_ops(staged, tgt)
            options = {"session_optimization": session} if session is not None else {}
            if disabled is not None:
                options["disabled_passes"] = list(disabled)
            compiled = be.lower(staged, tgt, **options)
            with torch.no_grad():
                got = _flat(compiled(*args, **kwargs))
            failure = _signature(got, reference, opt, rtol, atol)
        except Exception as e:  # noqa: BLE001 - a try that raises is an outcome
            failure = Failure("error", error_type=type(e).__name__,
                              message=(str(e).strip().splitlines() or [""])[0][:200])
        return failure, prep, srep

    def reproduces(passes, stage, rewrites=None, where="pipeline", session=None, disabled=None):
        failure, prep, srep = attempt(passes, stage, rewrites, where, session, disabled)
        if failure is None:
            outcome = "matches"
        elif failure.same_as(result.pinned):
            outcome = "reproduces"
        else:
            outcome = f"fails differently: {failure.describe()}"
        result.tries.append(Try(passes or 0, stage, rewrites, session, outcome, disabled))
        say(f"try {len(result.tries)}: {outcome}")
        return outcome == "reproduces", prep, srep

    def first_true(lo: int, hi: int, test: Callable[[int], bool]) -> int:
        """Smallest k in (lo, hi] with test(k), given test(hi) and not test(lo)."""
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if test(mid):
                hi = mid
            else:
                lo = mid
        return hi

    say("pinning the failure of the full compile")
    pinned, prep, srep = attempt(None, None)
    result.pipeline_passes = [r.text for r in prep.records] if prep else []
    result.stage_passes = [r.text for r in srep.records] if srep else []
    if pinned is None:
        return result
    result.pinned = pinned
    n_pipe, n_stage = len(result.pipeline_passes), len(result.stage_passes)

    def blame_rewrites(where: str, index: int, passes: int | None, stage: int | None, report) -> None:
        """Bisect the rewrites of pass ``index`` (1-based, within ``where``)."""
        records = report.records
        before = sum(r.rewrites for r in records[:index - 1])
        mine = records[index - 1].rewrites
        name = records[index - 1].text
        if mine == 0:
            result.note = f"pass {name} does not count its rewrites (no ctx.allow_rewrite): not bisected further"
            return
        if not reproduces(passes, stage, before + mine, where)[0]:
            result.note = f"pass {name} with its {mine} rewrites counted does not reproduce: not bisected further"
            return
        hit = {}

        def test(m: int) -> bool:
            ok, p, s = reproduces(passes, stage, m, where)
            if ok:
                hit[m] = (p if where == "pipeline" else s).last_rewrite
            return ok
        m = first_true(before, before + mine, test)
        last = hit.get(m)
        if last is None:
            test(m)
            last = hit.get(m)
        if last is None:
            return
        pass_name, rule, node = last
        src = None
        for n in program.graph.nodes:
            if n.name == node:
                src = node_source(n)
        result.first_rewrite = {"count": m - before, "pass": pass_name, "rule": rule, "node": node, "source": src}

    # 1. the pipeline
    if n_pipe and not reproduces(0, None)[0]:
        k = first_true(0, n_pipe, lambda k: reproduces(k, None)[0])
        result.culprit = "pipeline pass"
        result.first_pass = {"index": k, "pass": result.pipeline_passes[k - 1]}
        _, prep_k, _ = attempt(k, None)
        if prep_k is not None:
            blame_rewrites("pipeline", k, k, None, prep_k)
        return result
    # 3. the backend stage, without the pipeline
    if n_stage and not reproduces(0, 0)[0]:
        j = first_true(0, n_stage, lambda j: reproduces(0, j)[0])
        result.culprit = "stage pass"
        result.first_pass = {"index": n_pipe + j, "pass": result.stage_passes[j - 1]}
        _, _, srep_j = attempt(0, j)
        if srep_j is not None:
            blame_rewrites("stage", j, 0, j, srep_j)
        return result
    # 4. the backend's own optimizer
    if be.name == "onnx":
        levels = ["disable", "basic", "extended", "all"]
        for level in levels:
            if reproduces(0, None if n_stage == 0 else n_stage, session=level)[0]:
                result.session_level = level
                break
        if result.session_level == "disable":
            result.culprit = "backend"
            result.note = ("it fails with every ONNX Runtime graph optimization off, with no optc pass: the "
                           "exporter or an ONNX Runtime kernel (optc compare --backend onnx locates the node)")
        elif result.session_level is not None:
            result.culprit = "backend optimizer"
            result.note = (f"ONNX Runtime's '{result.session_level}' level brings it (lower levels match): one of "
                           "its graph transformers (disable them with the backend option ort_disabled_optimizers)")
        else:
            result.note = "no try reproduced the pinned failure: not attributed"
        return result
    if be.name == "tvm":
        return _blame_tvm_pass(result, tgt, lambda disabled: reproduces(0, None if n_stage == 0 else n_stage,
                                                                        disabled=disabled)[0], first_true)
    result.culprit = "backend"
    result.note = (f"it fails with no optc pass; {be.name}'s own optimiser cannot be switched from optc: the "
                   f"backend (optc compare --backend {be.name} compares it)")
    return result


def _blame_tvm_pass(result: BisectResult, target, reproduces_without: Callable[[list[str]], bool],
                    first_true: Callable) -> BisectResult:
    """Step 4 for TVM: the optional pass (``OPTIONAL_PASSES``, pipeline order) whose turn brings the
    failure -- every one off, then the first k on, bisected; ``reproduces_without(disabled)``."""
    from optc.backends.tvm import CUDA_REQUIRED, OPTIONAL_PASSES
    switches = [p for p in OPTIONAL_PASSES if not (target.device == "cuda" and p in CUDA_REQUIRED)]
    if reproduces_without(switches):
        result.culprit = "backend"
        result.note = ("it fails with every optional TVM pass off, with no optc pass: the importer, legalization "
                       "or a kernel (optc compare --backend tvm locates the node)")
        return result
    if not result.tries[-1].outcome == "matches":
        result.note = "with every optional TVM pass off it fails another way: not attributed"
        return result
    k = first_true(0, len(switches), lambda k: reproduces_without(switches[k:]))
    culprit = switches[k - 1]
    result.culprit = "backend optimizer"
    result.backend_pass = culprit
    if reproduces_without([culprit]):
        result.note = (f"TVM's {culprit} brings it when it runs after {', '.join(switches[:k - 1]) or 'no other'} "
                       "optional pass, but leaving it out alone does not remove it (a later optional pass "
                       "brings it too)")
    else:
        result.note = (f"TVM's {culprit} brings it (the passes before it match); the model compiles right "
                       f"without it: backend option disabled_passes=['{culprit}']")
    return result


# ---- the command ------------------------------------------------------------------------------------------
def add_bisect_parser(sub) -> None:
    from optc.tools.compare import add_debug_command
    p = add_debug_command(sub, "bisect", "find the first pass and rewrite after which the compiled model stops "
                                         "matching", __doc__)
    p.add_argument("--backend", required=True, metavar="B", help="the backend whose compile fails (onnx, torchscript, tvm)")
    p.add_argument("--rtol", type=float, default=None,
                   help="tolerance on the error relative to the output scale (default: from the dtype)")
    p.add_argument("--atol", type=float, default=None, help="also pass outputs whose max abs error is within this")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the result as JSON")
    p.set_defaults(func=cmd_bisect)


def cmd_bisect(args) -> int:
    import sys

    from optc.passes.manager import PassManager
    from optc.tools.compare import check_writable, write_json
    from optc.tools.models import load_model, parse_config
    PassManager(args.pipeline, target=args.target)        # a malformed pipeline fails before the load
    check_writable(args.json)
    loaded = load_model(args.model, inputs=args.input, config=parse_config(args.config), tiny=args.tiny,
                        batch=args.batch)
    result = bisect(loaded.model, loaded.args, loaded.kwargs, backend=args.backend, pipeline=args.pipeline,
                    target=args.target, rtol=args.rtol, atol=args.atol, label=loaded.label,
                    progress=lambda msg: print(f"optc: {msg}", file=sys.stderr, flush=True))
    print(result.format())
    if args.json:
        write_json(args.json, result.to_json())
    if result.pinned is None:
        return 0
    return 1 if result.found else 3


__all__ = ["bisect", "BisectResult", "Failure", "Try", "add_bisect_parser", "cmd_bisect"]
