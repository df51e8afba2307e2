"""``optc compare``: the optimized Program and the backends against a float64 reference, and the
first diverging node."""

from __future__ import annotations

import json

import pytest
import torch

import optc
from optc.tools.cli import main
from optc.tools.compare import compare

def test_float16_overflow_names_the_multiply_and_its_line(overflow_file, tmp_path, capsys):
    # y * y overflows in float16 (|y| reaches ~3,000): the first divergence is that multiply, at
    # line 12 of the user's file, while its input (y = h * 300) is within float16's tolerance
    out = tmp_path / "cmp.json"
    rc = main(["compare", f"{overflow_file}:make", "--pipeline", "to-half{dtype=float16,range_check=false}",
               "--json", str(out)])
    assert rc == 1
    data = json.loads(out.read_text())
    assert data["ok"] is False and data["located"] is True
    first = data["first_divergence"]
    assert first["op"] == "aten.mul" and first["source"] == "overflow.py:12" and first["error"] == "inf"
    assert [name for name, _ in first["inputs"]] == ["mul"] and first["inputs"][0][1] < 1e-2
    printed = capsys.readouterr().out
    assert "first divergence: %mul_1 (aten.mul) at overflow.py:12" in printed and "MISMATCH" in printed


def test_the_same_model_in_float32_passes_and_the_backends_too(overflow_file, capsys):
    rc = main(["compare", f"{overflow_file}:make", "--backend", "onnx", "--backend", "torchscript"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert printed.count(" ok") == 3 and "divergence" not in printed


def test_locate_on_request_reports_no_divergence_for_an_exact_pipeline():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)).eval()
    result = compare(model, (torch.randn(2, 4),), locate_divergence=True)
    assert result.ok and result.located and result.divergences == []
    assert result.candidates[0].outputs[0].max_rel <= 1e-6 and result.candidates[0].outputs[0].sqnr_db > 100


@torch.library.custom_op("optc_compare_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_opaque.register_fake
def _(x):
    return torch.empty_like(x)


class Opaque(torch.nn.Module):
    def forward(self, x):
        return torch.ops.optc_compare_test.opaque(x) + 1


def test_a_backend_that_cannot_lower_is_a_failed_row():
    result = compare(Opaque(), (torch.randn(3),), backends=["onnx"])
    assert not result.ok
    program, onnx = result.candidates
    assert program.ok and onnx.error is not None and "LoweringError" in onnx.error and "opaque" in onnx.error


def test_json_into_a_folder_that_does_not_exist_is_a_usage_error(overflow_file, tmp_path, capsys):
    rc = main(["compare", f"{overflow_file}:make", "--json", str(tmp_path / "missing" / "out.json")])
    assert rc == 2 and "does not exist or is not writable" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


@pytest.fixture
def wrong_fusion():
    """A test pass that fuses ``relu(x) * 2`` into one new node computing ``relu(x) * 2.01``: a
    planted miscompile in a node that did not exist in the captured graph."""
    import torch.fx as fx

    from optc.passes import base
    from optc.passes.base import PassResult, register_pass

    name = "test-wrong-fusion"

    def fn(gm: fx.GraphModule, ctx) -> PassResult:
        n = 0
        for node in list(gm.graph.nodes):
            if node.target == torch.ops.aten.mul.Tensor and node.args[1] == 2 \
                    and getattr(node.args[0], "target", None) == torch.ops.aten.relu.default:
                relu = node.args[0]
                with gm.graph.inserting_before(node):
                    fused = gm.graph.call_function(torch.ops.aten.mul.Tensor, (relu.args[0], 2.01), name="fused")
                    fused = gm.graph.call_function(torch.ops.aten.relu.default, (fused,), name="fused_relu")
                fused.meta.update(node.meta)
                fused.args[0].meta.update(node.meta)
                node.replace_all_uses_with(fused)
                gm.graph.erase_node(node)
                if not relu.users:
                    gm.graph.erase_node(relu)
                n += 1
        gm.recompile()
        return PassResult(gm, n > 0, {"fused": n})

    register_pass(name, exact=False, description="test only: a wrong fusion")(fn)
    yield name
    base._REGISTRY.pop(name, None)


def test_a_wrong_fused_node_is_located_through_provenance(wrong_fusion):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)) * 2)

    torch.manual_seed(0)
    result = compare(Net().eval(), (torch.randn(4, 6),), pipeline=wrong_fusion, top=3)
    assert not result.ok and result.located
    first = result.divergences[0]
    # the new node is compared with the captured multiply it took the place of (optc_value_of)
    assert first.node == "fused_relu" and first.created_by == wrong_fusion
    assert 4e-3 < first.error < 6e-3          # 2.01 / 2 - 1



def test_a_backend_miscompile_is_located_in_the_backend(wrong_mha_translation, attention_block):
    torch.manual_seed(0)
    result = compare(attention_block().eval(), (torch.randn(1, 6, 16) * 3,), backends=["onnx"], top=3)
    assert not result.ok and result.located
    assert result.divergences == []                    # the optimized Program itself is right
    first = result.backend_divergences["onnx"][0]
    assert first.op == "optc.ort_multihead_attention" and first.created_by == "ort-contrib-ops"
    assert first.backend_nodes == ["node_ort_multihead_attention"]
    assert first.error > 1e-3 and all(e <= 1e-4 for _, e in first.inputs)
    assert "onnx: first divergence: %ort_multihead_attention" in result.format()


def test_backend_locate_on_request_finds_nothing_in_a_right_model(attention_block):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    result = compare(attention_block().eval(), (torch.randn(1, 6, 16),), backends=["onnx"], locate_divergence=True)
    assert result.ok and result.backend_divergences == {"onnx": []}
    data = result.to_json()
    assert data["backend_divergences"] == {"onnx": []}


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        h = torch.sigmoid(self.conv(x)) * 1.5
        return self.fc(h.mean((2, 3)) - 0.25)


@pytest.fixture
def wrong_torchscript_sigmoid(monkeypatch):
    """TorchScript lowering planted to compute ``sigmoid`` as ``tanh`` (in the FX code it traces,
    after the stage: the optimized Program and the staged one are right)."""
    from optc.backends import torchscript_quant
    real = torchscript_quant.lower_quant_ops

    def planted(gm):
        real(gm)
        for n in gm.graph.nodes:
            if n.target == torch.ops.aten.sigmoid.default:
                n.target = torch.ops.aten.tanh.default
        gm.recompile()
    monkeypatch.setattr(torchscript_quant, "lower_quant_ops", planted)


def test_torchscript_node_map_and_instrumented_values():
    torch.manual_seed(0)
    model, x = _ConvNet().eval(), torch.randn(1, 3, 10, 10)
    compiled, _ = optc.compile(model, (x,), backend="torchscript")
    bmap = compiled.backend_map
    assert {"sigmoid", "mul", "mean", "sub"} <= set(bmap)
    assert all(bmap[k]["value"] for k in ("sigmoid", "mul", "mean", "sub"))
    values = compiled.intermediate_values([x], [bmap["mul"]["value"], bmap["sub"]["value"]])
    h = torch.sigmoid(model.conv(x)) * 1.5
    torch.testing.assert_close(values[bmap["mul"]["value"]], h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(values[bmap["sub"]["value"]], h.mean((2, 3)) - 0.25, rtol=1e-5, atol=1e-6)
    # the instrumented run is separate: the model still returns one output
    assert isinstance(compiled.run_flat([x]), (list, tuple)) and len(compiled.run_flat([x])) == 1


def test_a_torchscript_miscompile_is_located_in_the_backend(wrong_torchscript_sigmoid):
    torch.manual_seed(0)
    result = compare(_ConvNet().eval(), (torch.randn(1, 3, 10, 10),), backends=["torchscript"], top=3)
    assert not result.ok and result.divergences == []
    first = result.backend_divergences["torchscript"][0]
    assert first.node == "sigmoid" and first.backend_nodes == [n for n in first.backend_nodes if "tanh" in n]
    assert first.backend_nodes and first.error > 1e-2 and all(e <= 1e-4 for _, e in first.inputs)


@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_backend_maps_of_transformers_have_no_false_divergence(name):
    # regression: the ONNX exporter decomposes flatten into a new node it names view_3, and the
    # node map matched optc's own view_3 to it by name (every BERT/GPT reported a false divergence)
    pytest.importorskip("onnxruntime")
    from optc.tools.models import load_model
    loaded = load_model(f"zoo:{name}", tiny=True)
    result = compare(loaded.model, loaded.args, loaded.kwargs, backends=["onnx", "torchscript"],
                     locate_divergence=True)
    assert result.ok
    assert result.backend_divergences == {"onnx": [], "torchscript": []}
    assert result.divergences == []
