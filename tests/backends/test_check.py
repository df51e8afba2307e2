"""The check a compiled model passes before ``optc.compile`` returns it (``backends/check.py``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import optc
from optc.backends import base
from optc.backends.check import TOLERANCE, check_compiled, compare_output, fresh_inputs
from optc.errors import LoweringError, NumericMismatchError
from optc.backends.registry import unregister_backend
from optc.testing import register_perturbing_backend
from optc.tools.cli import main


@pytest.fixture
def perturbed():
    name = register_perturbing_backend()
    yield name
    unregister_backend(name)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 6)

    def forward(self, x):
        y = self.lin(x)
        return {"scores": y, "label": y.argmax(-1), "positive": y > 0}


def test_planted_miscompile_is_caught(perturbed):
    x = torch.randn(3, 8)
    with pytest.raises(NumericMismatchError) as info:
        optc.compile(TwoHeads().eval(), (x,), backend=perturbed, amount=1e-2)
    msg = str(info.value)
    assert "[perturbed]" in msg and "perturbed:cpu" in msg and "output 0" in msg
    assert "example inputs" in msg and "> tolerance 0.0001" in msg
    assert info.value.report.outputs[-1].error == pytest.approx(1e-2, rel=0.05)


def test_a_perturbation_below_the_tolerance_passes_and_is_reported(perturbed):
    compiled, report = optc.compile(TwoHeads().eval(), (torch.randn(3, 8),), backend=perturbed, amount=1e-6)
    assert report.check.ok and len(report.check.outputs) == 6          # 3 outputs x 2 input sets
    worst = report.check.worst
    assert worst.output == 0 and 5e-7 < worst.error < 2e-6
    assert "check     passed: 6 outputs x 2 input sets" in report.format()


def test_integer_outputs_are_compared_exactly(perturbed):
    with pytest.raises(NumericMismatchError, match=r"output 1 \(int64\) on the example inputs: 1 of 3 values differ"):
        optc.compile(TwoHeads().eval(), (torch.randn(3, 8),), backend=perturbed, output=1, amount=1)


def test_check_false_returns_the_miscompiled_model(perturbed):
    compiled, report = optc.compile(TwoHeads().eval(), (torch.randn(3, 8),), backend=perturbed, check=False)
    assert report.check is None and "check     off" in report.format()


class SqrtOfInput(nn.Module):
    def forward(self, x):
        return torch.sqrt(x) * 2, torch.log(x.abs())    # NaN where x < 0, -inf where x == 0


@pytest.mark.parametrize("backend", ["torchscript", "onnx", "tvm"])
def test_nan_where_eager_has_nan_is_not_a_mismatch(backend):
    x = torch.tensor([[4.0, -1.0, 0.0, 2.25]])
    compiled, report = optc.compile(SqrtOfInput(), (x,), backend=backend)
    assert report.check.ok
    y = compiled(x)[0]
    assert torch.isnan(y[0, 1]) and y[0, 0] == 4.0


def test_compare_output_rules():
    ref = torch.tensor([1.0, float("nan"), float("-inf"), 4.0])
    assert compare_output(ref, ref.clone(), 1e-4)[2]                              # NaN and inf agree
    assert compare_output(ref, torch.tensor([1.0, 7.0, float("-inf"), 4.0]), 1e-4)[2]   # anything where ref is NaN
    err, _, ok, detail = compare_output(ref, torch.tensor([1.0, 0.0, float("-inf"), float("nan")]), 1e-4)
    assert not ok and err == math.inf and "NaN or infinite where the reference is finite" in detail
    _, _, ok, detail = compare_output(ref, torch.tensor([1.0, 0.0, float("inf"), 4.0]), 1e-4)
    assert not ok and "infinities" in detail
    err, _, ok, _ = compare_output(ref, torch.tensor([1.0, 0.0, float("-inf"), 4.001]), 1e-4)
    assert not ok and err == pytest.approx(0.001 / 4, rel=1e-3)       # float32 4.001
    _, _, ok, detail = compare_output(torch.tensor([1, 2]), torch.tensor([1, 2], dtype=torch.int32), 0)
    assert not ok and "dtype" in detail


def test_a_backend_that_specialised_dynamic_dims_fails_the_fresh_draw(perturbed):
    x = torch.randn(2, 8)
    with pytest.raises(LoweringError, match=r"fails on the fresh inputs \(3x8\).*specialised"):
        optc.compile(nn.Linear(8, 4).eval(), (x,), backend=perturbed, amount=0.0, static_shapes=True,
                     dynamic_shapes="batch")
    # with static shapes the fresh draw has the example's shapes: the same backend passes
    compiled, report = optc.compile(nn.Linear(8, 4).eval(), (x,), backend=perturbed, amount=0.0,
                                    static_shapes=True)
    assert report.check.ok


def test_fresh_draw_varies_dynamic_dims_within_their_range():
    program = optc.capture(nn.Linear(8, 4), (torch.randn(2, 8),), dynamic_shapes="batch")
    (x,), _ = fresh_inputs(program)
    assert list(x.shape) == [3, 8]
    static = optc.capture(nn.Linear(8, 4), (torch.randn(2, 8),))
    (y,), _ = fresh_inputs(static)
    assert list(y.shape) == [2, 8] and not torch.equal(y, static.example_args[0])


def test_integer_inputs_are_drawn_within_the_example_range():
    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)

        def forward(self, ids):
            return self.emb(ids)

    ids = torch.tensor([[0, 9, 3, 5]])
    program = optc.capture(Embed(), (ids,))
    (fresh,), _ = fresh_inputs(program)
    assert fresh.dtype == torch.int64 and int(fresh.min()) >= 0 and int(fresh.max()) <= 9


def test_float64_programs_are_checked_at_float64_precision():
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)).double().eval()
    compiled, report = optc.compile(model, (torch.randn(4, 8, dtype=torch.float64),), backend="torchscript")
    assert report.check.ok and all(o.tolerance == TOLERANCE[torch.float64] for o in report.check.outputs)
    assert report.check.worst.error < 1e-12


def test_check_compiled_directly_and_its_report():
    model = nn.Linear(4, 2).eval()
    program = optc.capture(model, (torch.randn(1, 4),))
    compiled = base.lower(program, "cpu", "torchscript")
    report = check_compiled(compiled, program)
    assert report.ok and {o.inputs for o in report.outputs} == {"example", "fresh"}
    assert "tolerance 0.0001" in report.format()


def test_cli_compile_prints_the_check_and_no_check_skips_it(tmp_path, capsys):
    assert main(["compile", "zoo:mlp", "--tiny", "--backend", "torchscript", "--out", str(tmp_path / "a"),
                 "--runs", "0"]) == 0
    out = capsys.readouterr().out
    assert "check     passed: 2 outputs x 2 input sets" in out
    assert main(["compile", "zoo:mlp", "--tiny", "--backend", "torchscript", "--out", str(tmp_path / "b"),
                 "--runs", "0", "--no-check"]) == 0
    assert "check     off" in capsys.readouterr().out


def test_cli_compile_mismatch_exits_1(tmp_path, capsys, perturbed):
    status = main(["compile", "zoo:mlp", "--tiny", "--backend", perturbed, "--out", str(tmp_path / "a"), "--runs", "0"])
    assert status == 1
    err = capsys.readouterr().err
    assert "does not compute what the program does" in err and not (tmp_path / "a").exists()
