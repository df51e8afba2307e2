"""The public entry points: optimize, compile and load."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from optc.errors import OptcError
from optc.ir.program import Program
from optc.ir.stats import ModelStats, human_bytes, model_stats
from optc.passes.manager import PassManager, PipelineReport
from optc.target import Target, resolve_target

if TYPE_CHECKING:
    from optc.backends.base import CompiledModel


def optimize(program: Program, pipeline: str = "default", target: Target | str = "cpu", *,
             verify_each: bool = False, check_numerics: bool = False, dump_dir: str | None = None,
             print_after_all: bool = False, print_changed: bool = False, bisect_limit: int | None = None,
             max_rewrites: int | None = None, disable: Iterable[str] = (),
             calibration_data: Any = None) -> tuple[Program, PipelineReport]:
    """Run ``pipeline`` (text; ``default`` = the target's default pipeline) over ``program``.

    Returns the new Program and a :class:`~optc.passes.manager.PipelineReport`. ``program``
    itself is never modified; on failure a :class:`~optc.errors.PassError` names the pass, the
    passes before it and the node, and ``program`` is still intact.

    ``calibration_data``: the inputs ``insert-qdq`` calibrates on -- an iterable of samples, each
    one call's inputs (a tensor, a tuple of positional inputs, a dict of keyword inputs or an
    ``(args, kwargs)`` pair). Checked against the program's signature before any pass runs
    (:class:`~optc.errors.InputSpecError` naming the sample). Without it, ``insert-qdq`` warns
    and calibrates on random inputs.
    """
    if not isinstance(program, Program):
        raise TypeError(f"optimize() takes a Program (from optc.capture), got {type(program).__name__}")
    if calibration_data is not None:   # checked before any pass runs; a generator is read once, here
        from optc.ir.calibration import prepare_calibration_data
        calibration_data = prepare_calibration_data(program, calibration_data)
    tgt = resolve_target(target)
    pm = PassManager(pipeline, target=tgt, verify_each=verify_each, check_numerics=check_numerics,
                     dump_dir=dump_dir, print_after_all=print_after_all, print_changed=print_changed,
                     bisect_limit=bisect_limit, max_rewrites=max_rewrites, disable=disable,
                     extra={"calibration_data": calibration_data} if calibration_data is not None else None)
    return pm.run(program)


# ---- compile and load ----------------------------------------------------------------------------
@dataclass
class CompileReport:
    """What :func:`compile` did and what it cost."""

    name: str
    backend: str
    target: str
    pipeline: PipelineReport
    capture_s: float
    optimize_s: float
    lowering_s: float
    artifact_bytes: int
    stats_before: "ModelStats | None" = None   # parameters, FLOPs, bytes per layer: the captured model
    stats_after: "ModelStats | None" = None    # ... and the optimized one that was lowered
    quantization: Any = None                   # insert-qdq's per-layer QuantReport (scale, zero point, SQNR)
    backend_stage: "PipelineReport | None" = None   # the backend's stage (backends/stage.py), run at lowering
    check: Any = None                          # backends.check.CheckReport (None: check=False)
    check_s: float = 0.0
    peak_rss_bytes: int | None = None          # this process's peak resident memory during compile()
    rss_growth_bytes: int | None = None        # ... over what it held when compile() started
    weight_bytes: int = 0                      # the captured model's weights (parameters and buffers)
    integer_coverage: dict | None = None       # quantized programs: convs / matmuls run as integer kernels
    params: str | None = None                  # the backend's weights mode (params=: copy, bound, reference)

    def memory_summary(self) -> str:
        if self.peak_rss_bytes is None:
            return "not measured (no /proc on this system)"
        ratio = f" = {self.peak_rss_bytes / self.weight_bytes:.2f}x the weights ({human_bytes(self.weight_bytes, ' ')})" \
            if self.weight_bytes else ""
        return f"peak RSS {human_bytes(self.peak_rss_bytes, ' ')}{ratio}; grew by {human_bytes(self.rss_growth_bytes, ' ')}"

    @property
    def total_s(self) -> float:
        return self.capture_s + self.optimize_s + self.lowering_s + self.check_s

    def format(self) -> str:
        return "\n".join([
            f"compiled {self.name} for {self.target} ({self.backend})",
            f"  capture   {self.capture_s * 1e3:10.1f} ms",
            f"  pipeline  {self.optimize_s * 1e3:10.1f} ms  {self.pipeline.pipeline or '(empty)'}",
            f"  lowering  {self.lowering_s * 1e3:10.1f} ms" + (f"  weights: params={self.params}" if self.params else ""),
            *([f"  {self.check.format()}"] if self.check is not None else ["  check     off (check=False)"]),
            f"  total     {self.total_s * 1e3:10.1f} ms",
            f"  artifact  {human_bytes(self.artifact_bytes, ' '):>10}",
            f"  memory    {self.memory_summary()}",
            *([f"  integer   {self.coverage_summary()}"] if self.quantization is not None else []),
            *([f"  model     {self.stats_summary()}"] if self.stats_before and self.stats_after else []),
            self.pipeline.format(),
            *([f"backend stage ({self.backend}):", self.backend_stage.format()] if self.backend_stage else []),
        ])

    def coverage_summary(self) -> str:
        c = self.integer_coverage
        if not c:
            return f"kernels not reported by the {self.backend} backend"
        parts = [f"{k} {c[k][0]}/{c[k][1]}" for k in ("conv", "matmul") if c.get(k) and c[k][1]]
        left = ", ".join(f"{o} {n}" for o, n in (c.get("float_ops") or {}).items())
        return (", ".join(parts) or "no conv or matmul") + f" run as integer kernels ({c.get('source', '')})" + \
            (f"; float: {left}" if left else "")

    def stats_summary(self) -> str:
        """Totals before -> after the pipeline: parameters, FLOPs, weight bytes."""
        from optc.ir.stats import human
        a, b = self.stats_before.total, self.stats_after.total

        def cell(label, x, y, fmt):
            return f"{label} {fmt(x)}" + ("" if x == y else f" -> {fmt(y)}" + (f" ({x / y:.2f}x fewer)" if y and x > y else ""))
        return ", ".join([cell("params", a.params, b.params, human), cell("FLOPs", a.flops, b.flops, human),
                          cell("weights", a.weight_bytes, b.weight_bytes, lambda n: human_bytes(n, " "))])

    def format_stats(self) -> str:
        """Per layer and in total, before -> after the pipeline (``optc compile --stats``)."""
        from optc.ir.stats import format_stats_diff
        if not (self.stats_before and self.stats_after):
            return "(no statistics)"
        return format_stats_diff(self.stats_before, self.stats_after)

    def __str__(self) -> str:
        return self.format()


def compile(model: Any, example_inputs: Any = (), *, example_kwargs: dict | None = None,
            backend: str | None = None, target: Target | str = "cpu", pipeline: str = "default",
            dynamic_shapes: Any = None, calibration_data: Any = None,
            progress: "Callable[[str], None] | None" = None, check: bool = True, weights: Any = None,
            **backend_options) -> tuple["CompiledModel", CompileReport]:
    """Capture ``model``, run the target's pipeline, lower it with ``backend``.

    ``model`` is an ``nn.Module`` called as ``model(*example_inputs, **example_kwargs)`` (or an
    already captured Program). ``backend`` defaults to the one ``target`` names (``"onnx:cuda"``),
    else ``"onnx"``. ``dynamic_shapes`` is passed to capture (``"batch"``: dim 0 of every input).
    ``backend_options`` go to the backend's ``lower`` (onnx: ``opset``, ``threads``, ``optimize``,
    ``external_data_threshold``, ``params``; torchscript: ``method``, ``optimize``, ``params``); unknown
    ones are errors.
    ``calibration_data``: what ``insert-qdq`` calibrates on (see :func:`optimize`); its per-layer
    report is ``report.quantization``. ``progress``: called with a short message as each phase
    starts (``optc compile`` prints them on a terminal).

    ``check`` (default True): before returning, run the compiled model on the example inputs and
    on a fresh random draw of the same specs and compare it with the optimized Program
    (:mod:`optc.backends.check`); a mismatch raises :class:`~optc.errors.NumericMismatchError`
    naming the backend, the output, the error and the tolerance. ``report.check`` holds what it
    measured.

    ``weights``: for a model built on the ``meta`` device (or to replace a model's tensors): a
    ``.safetensors`` file, a folder of them, a mapping of names to tensors, or a list of those
    (:mod:`optc.ir.weights`); the files are memory-mapped, read as the weights are used. A name
    that is missing or a shape that differs is a :class:`~optc.errors.WeightsError` naming the
    tensor. The user's model is not modified.

    Returns the :class:`~optc.backends.base.CompiledModel` (called like ``model``; ``save(dir)``)
    and a :class:`CompileReport`. Availability of the backend and device is checked first, before
    the (slow) capture.
    """
    from optc.backends.lowering import resolve
    from optc.memory import RSSWatch

    tgt, be = resolve(target, backend, backend_options)
    be.check_available(tgt)
    if isinstance(pipeline, str):
        from optc.passes.manager import PassManager
        PassManager(pipeline, target=tgt)      # a malformed or refused pipeline fails before the (slow) capture
    say = progress or (lambda msg: None)

    watch = RSSWatch().__enter__()
    try:
        # the model travels in a list that _compile empties: with weights=, the loaded copy (and
        # its memory-mapped weights) is referenced from nowhere else and is released before the
        # backend's runtime loads its own copy of the weights
        models = [model]
        if weights is not None:
            if isinstance(model, Program):
                raise OptcError("weights= applies to an nn.Module, not to a captured Program")
            from optc.ir.weights import weight_files, with_weights
            say("reading the weights")
            models = [with_weights(model, weights)]
            mapped = weight_files(weights)
        else:
            mapped = []
        del model
        from optc.memory import mapped_weights
        with mapped_weights(mapped):     # passes and backends hand back the pages they no longer need
            return _compile(models, example_inputs, example_kwargs, tgt, be, pipeline, dynamic_shapes,
                            calibration_data, check, say, backend_options, watch)
    finally:
        watch.__exit__(None, None, None)


def _compile(models, example_inputs, example_kwargs, tgt, be, pipeline, dynamic_shapes, calibration_data, check,
             say, backend_options, watch):
    import gc

    from optc.backends.lowering import lower
    from optc.errors import OptcError
    from optc.ir.capture import capture
    from optc.ir.program import attr_tensors
    t0 = time.perf_counter()
    model = models.pop()
    if isinstance(model, Program):
        if example_inputs not in ((), None) or example_kwargs or dynamic_shapes is not None:
            raise OptcError("compile() of a captured Program takes no example inputs or dynamic_shapes "
                            "(the Program has them)")
        program = model
    else:
        say("capturing")
        program = capture(model, example_inputs, example_kwargs, dynamic_shapes=dynamic_shapes)
    t1 = t0 if isinstance(model, Program) else time.perf_counter()   # a Program is not captured again
    del model
    captured = program
    say(f"running the pipeline ({'the target default' if pipeline == 'default' else pipeline})")
    program, preport = optimize(program, pipeline, tgt, calibration_data=calibration_data)
    t2 = time.perf_counter()
    # what the report and the check need from the programs, taken before lowering: the programs
    # (and the weights only they hold) are released before the backend's runtime loads its copy
    facts = dict(name=program.name, stats_before=model_stats(captured), stats_after=model_stats(program),
                 quantization=program.graph_module.meta.get("optc_quant_report"),
                 weight_bytes=sum(t.nbytes for t in attr_tensors(captured.graph_module).values()))
    del captured
    plan = None
    if check:
        from optc.backends.check import plan_check
        say("running the program on the check inputs")
        plan = plan_check(program)
        # with weights=, every weight was read for the reference outputs: the backend reads each once
        # more as it writes it out, from the page cache or the file, not from this resident set
        from optc.memory import hand_back_mapped
        hand_back_mapped()
    t_plan = time.perf_counter()
    say(f"lowering with {be.name} for {tgt.device}")
    compiled = lower(program, tgt, pipeline=preport.pipeline, **backend_options)
    del program
    gc.collect()
    t3 = time.perf_counter()
    check_report = None
    if plan is not None:
        from optc.backends.check import run_check
        say("checking the compiled model against the program")
        check_report = run_check(compiled, plan)
    t4 = time.perf_counter()
    if facts["quantization"] is not None:
        try:
            facts["integer_coverage"] = compiled.integer_coverage()
        except Exception as e:  # noqa: BLE001 - a report line, never a failed compile
            facts["integer_coverage"] = {"source": f"not read: {type(e).__name__}: {str(e)[:100]}"}
    report = CompileReport(backend=be.name, target=str(tgt), pipeline=preport,
                           capture_s=t1 - t0, optimize_s=t2 - t1, lowering_s=t3 - t_plan,
                           artifact_bytes=compiled.artifact_size(),
                           check=check_report, check_s=(t4 - t3) + (t_plan - t2),
                           backend_stage=getattr(compiled, "stage_report", None),
                           params=compiled.backend_options.get("params"), **facts)
    watch.__exit__(None, None, None)
    report.peak_rss_bytes, report.rss_growth_bytes = watch.peak, watch.growth
    return compiled, report


def load(directory: str | os.PathLike) -> "CompiledModel":
    """Load a folder written by ``CompiledModel.save``: reads ``manifest.json``, checks the sha256
    of every artifact file (:class:`~optc.errors.ArtifactError` naming the file) and hands the
    folder to the backend that wrote it."""
    from optc.backends.base import load_artifact
    return load_artifact(directory)
