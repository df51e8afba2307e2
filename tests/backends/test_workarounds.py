"""The backend workarounds (backends/workarounds.py): each rewrites exactly its pattern, keeps the
function, and leaves everything else alone. End-to-end regressions: tests/fuzz/test_regressions.py."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import optc
from optc.backends import lower, workarounds
from optc.backends.base import inline_decompositions
from optc.ir.verifier import check_close
from optc.tools.fuzz import KNOWN_ISSUES, KnownIssue, Mismatch, known_issue
from optc.tools.fuzzgen import ModelSpec, Op

aten = torch.ops.aten


def _gm(model, *inputs):
    """A private copy of the captured graph, as a backend gets it."""
    program = optc.capture(model.eval(), inputs)
    return program, inline_decompositions(program.graph_module)


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


class AddmmLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))
        self.b = nn.Parameter(torch.randn(3))
        self.b2 = nn.Parameter(torch.randn(5, 3))
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        a = torch.addmm(self.b, x, self.w)                       # -> linear
        c = torch.addmm(self.b2, x, self.w, beta=0.5, alpha=2.0)  # 2-d bias, scaled -> mm + add
        return self.fc(a), c                                     # addmm feeding a linear: the bug


def test_addmm_as_linear_keeps_the_function_and_runs_on_torchscript():
    x = torch.randn(5, 4)
    program, gm = _gm(AddmmLinear(), x)
    assert _targets(gm).count(aten.addmm.default) == 2
    assert workarounds.addmm_as_linear(gm) == 2
    t = _targets(gm)
    assert aten.addmm.default not in t and aten.linear.default in t and aten.mm.default in t
    check_close(program(x), gm(x), rtol=1e-6)
    compiled = lower(program, "cpu", "torchscript")
    for _ in range(3):   # the profiling executor specialises on the second and third call
        check_close(program(x), compiled(x), rtol=1e-5)


class ConvTanhGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        return F.gelu(h, approximate="tanh") + F.gelu(h)   # only the tanh form is rewritten


def test_tanh_gelu_as_formula_only_where_a_convolution_is():
    x = torch.randn(1, 2, 6, 6)
    program, gm = _gm(ConvTanhGelu(), x)
    assert workarounds.tanh_gelu_as_formula(gm) == 1
    gelus = [n for n in gm.graph.nodes if n.target is aten.gelu.default]
    assert len(gelus) == 1 and gelus[0].kwargs.get("approximate", "none") == "none"
    check_close(program(x), gm(x)[0], rtol=1e-6)
    compiled = lower(program, "cpu", "torchscript")
    for _ in range(3):
        check_close(program(x), compiled(x), rtol=1e-5)

    class LinearGelu(nn.Module):   # a GPT-style MLP keeps its fused op
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return F.gelu(self.fc(x), approximate="tanh")

    _, gm2 = _gm(LinearGelu(), torch.randn(2, 4))
    assert workarounds.tanh_gelu_as_formula(gm2) == 0


class Pools(nn.Module):
    def forward(self, x):
        a = F.max_pool2d(x, 1, 2, 0, ceil_mode=True)          # last ceil window dropped: floor length
        b = F.avg_pool2d(x, 2, 3, 1, ceil_mode=True)          # dropped too
        c = F.max_pool2d(x, 2, 2, 0, ceil_mode=True)          # 5 -> 3 windows: a real ceil window, kept
        return a.sum() + b.sum() + c.sum(), c


def test_ceil_pool_as_floor_only_where_the_windows_are_the_same():
    x = torch.randn(1, 2, 5, 5)
    program, gm = _gm(Pools(), x)
    assert workarounds.ceil_pool_as_floor(gm) == 2
    ceil = [n for n in gm.graph.nodes if n.op == "call_function" and "pool" in str(n.target)
            and (n.args[5] if n.target is aten.max_pool2d.default and len(n.args) > 5 else
                 n.args[4] if n.target is aten.avg_pool2d.default and len(n.args) > 4 else False)]
    assert len(ceil) == 1 and tuple(ceil[0].meta["val"].shape[-2:]) == (3, 3)
    check_close(program(x), gm(x), rtol=1e-6)
    check_close(program(x), lower(program, "cpu", "onnx")(x), rtol=1e-5)


class Alpha(nn.Module):
    def forward(self, x, y):
        return torch.add(x, y, alpha=0.5) - torch.sub(y, x, alpha=3) + torch.add(x, 2.0, alpha=2) + x.add(y)


def test_add_alpha_as_mul_on_tvm():
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    program, gm = _gm(Alpha(), x, y)
    assert workarounds.add_alpha_as_mul(gm) == 3
    assert all(n.kwargs.get("alpha", 1) == 1 for n in gm.graph.nodes if n.op == "call_function")
    check_close(program(x, y), gm(x, y)[0], rtol=1e-6)
    check_close(program(x, y), lower(program, "cpu", "tvm")(x, y), rtol=1e-5)


class Cumsum(nn.Module):
    def forward(self, x):
        m = x > 0
        return m.cumsum(1), x.to(torch.int32).cumsum(0), x.cumsum(1)


def test_cumsum_int64_on_tvm():
    x = torch.randn(3, 8) * 4
    program, gm = _gm(Cumsum(), x)
    assert workarounds.cumsum_int64(gm) == 2   # bool and int32; the float cumsum is left alone
    ref = program(x)
    assert [t.dtype for t in ref] == [torch.int64, torch.int64, torch.float32]
    got = lower(program, "cpu", "tvm")(x)
    assert [t.dtype for t in got] == [t.dtype for t in ref]
    check_close(ref, got, rtol=1e-6)


class Extremes(nn.Module):
    def forward(self, x):
        return x.amax((1, 3)), x.amin(-1, keepdim=True), x - x.amax(), torch.amax(x, 2, keepdim=True)


def test_amax_amin_as_max_dim_on_tvm():
    x = torch.randn(2, 3, 4, 5)
    program, gm = _gm(Extremes(), x)
    assert workarounds.amax_as_max_dim(gm) == 4
    assert not {aten.amax.default, aten.amin.default} & set(_targets(gm))
    check_close(program(x), gm(x), rtol=0)   # the same values, exactly
    check_close(program(x), lower(program, "cpu", "tvm")(x), rtol=0)


def test_known_issue_matching(monkeypatch):
    """The campaign's known-issue mechanism still works with no issue open."""
    spec = ModelSpec(inputs=((1, 3),), ops=(Op(kind="residual", inputs=(0, 0), params=(("op", "add_alpha"),),
                                               shape=(1, 3)),), outputs=(1,), seed=0)
    m = Mismatch("backend:tvm", "numeric", "output 0: error 0.5 > allowed 1e-05", spec)
    assert known_issue(m) is None
    issue = KnownIssue("x", "backend:tvm", r"^output \d+: error", "tvm", "test", trigger=("residual", (("op", "add_alpha"),)))
    monkeypatch.setattr("optc.tools.fuzz.KNOWN_ISSUES", [*KNOWN_ISSUES, issue])
    assert known_issue(m) is issue and m.signature == ("backend:tvm", "numeric", "known:x")
    other = Mismatch("backend:onnx", "numeric", "output 0: error 0.5 > allowed 1e-05", spec)
    assert known_issue(other) is None
