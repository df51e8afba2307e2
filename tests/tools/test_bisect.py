"""``optc bisect``: planted miscompiles in a pipeline pass (on one rewrite of several), in a
backend-stage pass, and in a backend itself; a model that matches; the pinned failure."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.fx as fx

from optc.passes import base
from optc.passes.base import PassResult, register_pass
from optc.tools.bisect import Failure, bisect
from optc.tools.cli import main


class Net(torch.nn.Module):
    """Three scalings: the planted pass rewrites each and gets only the second wrong."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.a(x)) * 0.5
        h = torch.tanh(h) * 3.0
        return self.b(h) * 2.0


@pytest.fixture
def second_rewrite_wrong():
    name = "test-bisect-second-wrong"

    def fn(gm: fx.GraphModule, ctx) -> PassResult:
        n = 0
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target == torch.ops.aten.mul.Tensor \
                    and isinstance(node.args[1], float) and not node.meta.get("test_rewritten"):
                if not ctx.allow_rewrite("scale", node):
                    continue
                n += 1
                factor = 1.5 if n == 2 else 1.0        # the second rewrite is the wrong one
                with gm.graph.inserting_before(node):
                    new = gm.graph.call_function(torch.ops.aten.mul.Tensor, (node.args[0], node.args[1] * factor))
                new.meta.update(node.meta)
                new.meta["test_rewritten"] = True
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
        gm.recompile()
        return PassResult(gm, n > 0, {"rewritten": n})

    register_pass(name, exact=False, description="test only: its second rewrite is wrong")(fn)
    yield name
    base._REGISTRY.pop(name, None)


def test_finds_the_pass_and_its_wrong_rewrite(second_rewrite_wrong):
    torch.manual_seed(0)
    pipeline = f"canonicalize,dce,{second_rewrite_wrong},cse"
    result = bisect(Net().eval(), (torch.randn(3, 8),), backend="onnx", pipeline=pipeline)
    assert result.pinned.kind == "mismatch" and result.pinned.output == 0
    assert result.culprit == "pipeline pass"
    assert result.first_pass == {"index": 3, "pass": second_rewrite_wrong}
    r = result.first_rewrite
    assert r["count"] == 2 and r["pass"] == second_rewrite_wrong and r["rule"] == "scale"
    assert r["node"] == "mul_1"                                  # tanh(h) * 3.0
    assert any(t.outcome == "matches" for t in result.tries)     # the search saw both sides
    text = result.format()
    assert f"first failing pass: #3 {second_rewrite_wrong}" in text and f"first failing rewrite: #2 of {second_rewrite_wrong}, rule scale at %mul_1" in text


def test_a_model_that_matches_has_nothing_to_bisect(capsys):
    rc = main(["bisect", "zoo:mlp", "--tiny", "--backend", "onnx"])
    assert rc == 0
    assert "nothing to bisect" in capsys.readouterr().out



class Sdpa(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = (t.view(1, 6, 2, 8).transpose(1, 2) for t in self.qkv(x).split(16, -1))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 6, 16)


def test_a_stage_pass_is_blamed_without_the_pipeline(wrong_mha_translation, tmp_path):
    torch.manual_seed(0)
    result = bisect(Sdpa().eval(), (torch.randn(1, 6, 16) * 2,), backend="onnx")
    assert result.culprit == "stage pass"
    assert result.first_pass["pass"] == "ort-contrib-ops"
    assert result.first_pass["index"] == len(result.pipeline_passes) + result.stage_passes.index("ort-contrib-ops") + 1
    assert result.first_rewrite["rule"] == "ort-multihead-attention" and result.first_rewrite["count"] == 1
    data = json.loads(json.dumps(result.to_json()))
    assert data["found"] and data["pinned"]["kind"] == "mismatch"


def test_a_backend_bug_is_named_as_such():
    from optc.backends.registry import unregister_backend
    from optc.testing import register_perturbing_backend
    name = register_perturbing_backend()
    try:
        torch.manual_seed(0)
        result = bisect(Net().eval(), (torch.randn(3, 8),), backend=name)
    finally:        # later tests list the registered backends
        unregister_backend(name)
    assert result.culprit == "backend" and result.first_pass is None
    assert "cannot be switched" in result.note


def test_the_signature_pins_output_and_order_of_magnitude():
    pinned = Failure("mismatch", output=1, decade=-2, error=0.03)
    assert Failure("mismatch", output=1, decade=-3, error=0.004).same_as(pinned)
    assert not Failure("mismatch", output=0, decade=-2, error=0.03).same_as(pinned)      # another output
    assert not Failure("mismatch", output=1, decade=-5, error=3e-5).same_as(pinned)      # another bug's size
    assert not Failure("error", error_type="LoweringError", message="x").same_as(pinned)
    inf = Failure("mismatch", output=0, decade=math.inf, error=math.inf)
    assert inf.same_as(inf) and not Failure("mismatch", output=0, decade=0, error=1.0).same_as(inf)


def test_bad_session_optimization_is_a_clear_error():
    import optc
    from optc.errors import LoweringError
    with pytest.raises(LoweringError, match="session_optimization must be one of"):
        optc.compile(Net().eval(), (torch.randn(3, 8),), backend="onnx", session_optimization="max")


@pytest.fixture
def wrong_tvm_fast_math(monkeypatch):
    """TVM's FastMathTransform planted to also compute ``sigmoid`` as ``tanh``: a bug inside an
    optional pass of TVM's build (``optc.backends.tvm.OPTIONAL_PASSES``)."""
    tvm = pytest.importorskip("tvm")
    from tvm import relax
    real = relax.transform.FastMathTransform

    @relax.expr_functor.mutator
    class SigmoidAsTanh(relax.PyExprMutator):
        def visit_call_(self, call):  # noqa: N802 (TVM's visitor naming)
            call = super().visit_call_(call)
            if isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.sigmoid":
                return relax.op.tanh(call.args[0])
            return call

    @tvm.transform.module_pass(opt_level=0, name="FastMathTransform")
    def planted(mod, _ctx):
        mod = real()(mod)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                mod[gv] = SigmoidAsTanh().visit_expr(func)
        return mod

    monkeypatch.setattr(relax.transform, "FastMathTransform", lambda: planted)


class SigmoidNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.sigmoid(self.a(x)) * 2.0)


def test_a_bug_in_an_optional_tvm_pass_is_named(wrong_tvm_fast_math):
    torch.manual_seed(0)
    result = bisect(SigmoidNet().eval(), (torch.randn(3, 8),), backend="tvm")
    assert result.culprit == "backend optimizer" and result.backend_pass == "FastMathTransform"
    assert result.first_pass is None and "disabled_passes=['FastMathTransform']" in result.note
    # every optional pass off matches; the last try leaves out the culprit alone, and matches too
    from optc.backends.tvm import OPTIONAL_PASSES
    off = [t for t in result.tries if t.disabled == list(OPTIONAL_PASSES)]
    assert len(off) == 1 and off[0].outcome == "matches"
    assert result.tries[-1].disabled == ["FastMathTransform"] and result.tries[-1].outcome == "matches"
    assert "TVM: fails from optional pass FastMathTransform on" in result.format()
    data = json.loads(json.dumps(result.to_json()))
    assert data["backend_pass"] == "FastMathTransform"


def test_a_tvm_bug_outside_its_optional_passes_is_the_backend(monkeypatch):
    pytest.importorskip("tvm")
    from tvm import relax

    from optc.backends import tvm as tvm_backend
    real = tvm_backend._convert_map

    def wrong(node, importer):       # the importer's translation of sigmoid planted as tanh
        return importer.block_builder.emit(relax.op.tanh(importer.env[node.args[0]]))
    monkeypatch.setattr(tvm_backend, "_convert_map", lambda: {**real(), "sigmoid.default": wrong})
    torch.manual_seed(0)
    result = bisect(SigmoidNet().eval(), (torch.randn(3, 8),), backend="tvm")
    assert result.culprit == "backend" and result.backend_pass is None
    assert "every optional TVM pass off" in result.note
