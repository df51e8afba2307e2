"""Test helpers for passes, in the shape every pass test follows (see tests/passes/).

``check_pass`` captures a tiny ``before`` module, runs one pipeline with verify-each and the
honest-``modified`` check on, compares the canonical text (without source lines) with an
inline golden (refreshed by ``pytest --update-goldens``, via expecttest), re-verifies the
result, checks numerics against eager on the example inputs and fresh random ones, and
checks ``modified`` and the statistics. ``expected`` may be an exception class: then the
pipeline must raise it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.utils._pytree as pytree
import ast
import os
import re
import sys

from expecttest import EDIT_HISTORY, assert_eq, replace_string_literal

from optc.ir.capture import capture
from optc.ir.printer import format_text
from optc.ir.program import Program
from optc.ir.verifier import compare_outputs, random_inputs_like, verify
from optc.passes.manager import PassManager, PipelineReport

# Tolerances relative to the output scale, per dtype, for exact passes.
EXACT_RTOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@dataclass
class PassOutcome:
    program: Program
    report: PipelineReport
    text: str

    def stats(self, name: str) -> dict:
        return self.report.stats(name)

    def rejections(self, name: str) -> list:
        return [r for rec in self.report.records if rec.name == name for r in rec.rejections]


def check_pass(pipeline: str, before: nn.Module, inputs: Any, expected: str | type, *,
               kwargs: dict | None = None, modified: bool | None = None, stats: dict | None = None,
               rtol: float | None = None, reference: str = "eager", skip: int = 0,
               pm_options: dict | None = None, golden_digits: int | None = None) -> PassOutcome | None:
    """Run ``pipeline`` on ``before`` and check it (see module docstring).

    ``golden_digits``: compare the golden's float literals to this many significant digits --
    for values computed from kernel outputs (calibrated scales), whose last bits differ between
    CPUs (oneDNN's AVX2 and AVX-512 convolutions round differently).

    ``rtol``: tolerance relative to output scale; default per dtype (:data:`EXACT_RTOL`).
    Loosen it only for lossy passes, saying why at the call site.
    ``reference="fp64"``: compare against the model run in float64 and require the pass's
    error to be no worse than eager fp32's error (+ the per-dtype tolerance) -- for
    rewrites that legitimately change rounding (e.g. folding BatchNorm into weights).
    """
    before = before.eval()
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    program = capture(before, inputs, kwargs)
    pm = PassManager(pipeline, default="", verify_each=True, check_modified=True, **(pm_options or {}))
    if isinstance(expected, type) and issubclass(expected, BaseException):
        try:
            pm.run(program)
        except expected:
            return None
        raise AssertionError(f"pipeline {pipeline!r} did not raise {expected.__name__}")
    new, report = pm.run(program)
    text = format_text(new, with_source=False)
    assert_golden(text, expected, skip=1 + skip, digits=golden_digits)
    verify(new, repropagate=True)
    if modified is not None:
        got = any(r.modified for r in report.records)
        assert got == modified, f"pipeline {pipeline!r}: modified={got}, expected {modified}"
    if stats:
        for name, want in stats.items():
            got = report.stats(name)
            for k, v in want.items():
                assert got.get(k) == v, f"{name}: stat {k}={got.get(k)!r}, expected {v!r} (all: {got})"
    _check_numerics(before, program, new, rtol, reference)
    return PassOutcome(new, report, text)


_FLOAT = re.compile(r"(?<![\w.])-?\d+\.\d+(?:e[-+]?\d+)?(?![\w.])")


def _round_floats(text: str, digits: int) -> str:
    return _FLOAT.sub(lambda m: f"{float(m.group()):.{digits}g}", text)


def assert_golden(actual: str, expected: str, *, skip: int = 0, digits: int | None = None) -> None:
    """Compare with an inline golden; with ``EXPECTTEST_ACCEPT=1`` (``pytest --update-goldens``)
    rewrite the triple-quoted string argument of the calling ``check_pass(...)`` instead.
    ``digits``: float literals compared to that many significant digits."""
    if actual == expected or (digits is not None and _round_floats(actual, digits) == _round_floats(expected, digits)):
        return
    if not os.getenv("EXPECTTEST_ACCEPT"):
        assert_eq(expected, actual, msg="run pytest with --update-goldens to accept the new output")
        return
    frame = sys._getframe(1 + skip)
    filename = frame.f_code.co_filename
    # the frame's line number predates earlier edits of this file in this run
    lineno = EDIT_HISTORY.adjust_lineno(filename, frame.f_lineno)
    with open(filename) as f:
        src = f.read()
    literal = None
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Call) and node.lineno <= lineno <= (node.end_lineno or node.lineno):
            for a in list(node.args) + [k.value for k in node.keywords]:
                if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value == expected:
                    literal = a
    if literal is None:
        raise AssertionError(f"cannot find the golden string literal of the call at {filename}:{lineno}")
    new_src, delta = replace_string_literal(src, literal.lineno, literal.end_lineno, actual)
    with open(filename, "w") as f:
        f.write(new_src)
    EDIT_HISTORY.record_edit(filename, lineno, delta, actual)


def _check_numerics(model: nn.Module, program: Program, new: Program, rtol, reference: str) -> None:
    trials = [(program.example_args, program.example_kwargs)] + [random_inputs_like(program, seed=s) for s in (1, 2)]
    for args, kwargs in trials:
        with torch.no_grad():
            got = new(*args, **kwargs)
            if reference == "fp64":
                ref = _fp64(model)(*_to64(args), **_to64(kwargs))
                eager = model(*args, **kwargs)
                eager_err = compare_outputs(ref, eager).max_rel_error
                rep = compare_outputs(ref, got)
                tol = (rtol if rtol is not None else EXACT_RTOL[torch.float32]) + 4 * eager_err
            else:
                ref = model(*args, **kwargs)
                rep = compare_outputs(ref, got)
                dt = _dtype_of(ref)
                tol = rtol if rtol is not None else EXACT_RTOL.get(dt, 1e-5)
        assert rep.max_rel_error <= tol, f"numerics differ: {rep} > {tol:g}"


def _dtype_of(out) -> torch.dtype:
    for t in pytree.tree_leaves(out):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.dtype
    return torch.float32


def _fp64(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double()


def _to64(x):
    return pytree.tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, x)


def run_pass(pipeline: str, before: nn.Module, inputs: Any, kwargs: dict | None = None, **pm_options) -> PassOutcome:
    """Capture and run ``pipeline`` (checked) without a golden: for must-not-fire cases."""
    program = capture(before.eval(), inputs if isinstance(inputs, tuple) else (inputs,), kwargs)
    new, report = PassManager(pipeline, default="", verify_each=True, check_modified=True, **pm_options).run(program)
    return PassOutcome(new, report, format_text(new, with_source=False))


# ---- a backend that miscompiles on purpose (tests of the compile-time check) --------------------
from optc.backends.base import Backend, CompiledModel  # noqa: E402


class _PerturbedModel(CompiledModel):
    backend = "perturbed"

    def __init__(self, inner: CompiledModel, *, output: int, amount: float, static_shapes: list | None, **kw):
        super().__init__(inner.signature, inner.target, **kw)
        self.inner, self.output, self.amount, self.static_shapes = inner, output, amount, static_shapes

    def run_flat(self, inputs):
        if self.static_shapes is not None and [list(t.shape) for t in inputs] != self.static_shapes:
            raise RuntimeError(f"shapes {[list(t.shape) for t in inputs]} differ from the exported "
                               f"{self.static_shapes} (the dims were specialised)")
        outs = list(self.inner.run_flat(inputs))
        if self.amount and self.output < len(outs):
            y = outs[self.output].clone()
            flat = y.view(-1)
            if y.is_floating_point():
                flat[0] += self.amount * max(float(y.abs().max()), 1.0)
            else:
                flat[0] += 1
            outs[self.output] = y
        return outs

    def save_artifacts(self, directory):
        return self.inner.save_artifacts(directory)


class PerturbingBackend(Backend):
    """Test-only backend ``perturbed`` (``optc.testing.register_perturbing_backend()``): lowers with
    TorchScript, then adds ``amount`` times the output's scale to the first element of output
    ``output`` (one more for an integer output) on every call -- a planted miscompile. With
    ``static_shapes=True`` it also refuses inputs whose shapes differ from the example's, as a
    backend that specialised the dims it was meant to keep dynamic."""

    name = "perturbed"

    def stage(self, program, target):
        from optc.backends.base import get_backend
        return get_backend("torchscript").stage(program, target)

    def native_ops(self, target):
        from optc.backends.base import get_backend
        return get_backend("torchscript").native_ops(target)

    def lower(self, program, target, *, output: int = 0, amount: float = 1e-2, static_shapes: bool = False):
        from optc.backends.base import get_backend
        inner = get_backend("torchscript").lower(program, target)
        shapes = [list(t.shape) for t in program.example_flat_inputs()] if static_shapes else None
        return _PerturbedModel(inner, output=output, amount=amount, static_shapes=shapes)


def register_perturbing_backend() -> str:
    """Register :class:`PerturbingBackend` as backend ``perturbed``; returns its name."""
    from optc.backends.base import register_backend
    register_backend("perturbed", "optc.testing:PerturbingBackend")
    return "perturbed"
