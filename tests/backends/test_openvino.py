"""OpenVINO backend: zoo models match eager by both routes, precision follows the program, INT8
kernels for a quantized program, the IR saves and loads, bad options and a missing package."""

from __future__ import annotations


import pytest
import torch

import optc
from optc.backends import lower
from optc.errors import LoweringError
from optc.ir.verifier import check_close, random_inputs_like

ov = pytest.importorskip("openvino", reason="needs the openvino extra: pip install optc[openvino]")

from optc.tools import zoo  # noqa: E402

ZOO = zoo.names()


@pytest.mark.parametrize("route", ["export", "onnx"])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_matches_eager(name, route, captured_zoo):
    model, inputs, program = captured_zoo(name)
    compiled = lower(program, "cpu", "openvino", route=route)
    assert compiled.backend_options["route"] == route and compiled.backend_options["precision"] == "f32"
    with torch.no_grad():
        check_close(model(*inputs), compiled(*inputs), rtol=1e-4)
        args, kwargs = random_inputs_like(program, seed=1)
        check_close(model(*args, **kwargs), compiled(*args, **kwargs), rtol=1e-4)


def test_dynamic_batch(captured_zoo):
    model, _, program = captured_zoo("mlp", dynamic=True)
    compiled = lower(program, "cpu", "openvino")
    for batch in (1, 5):
        x = torch.randn(batch, *program.example_flat_inputs()[0].shape[1:])
        check_close(model(x), compiled(x), rtol=1e-4)


def _runtime_precisions(compiled, layer: str | None = None) -> set[str]:
    """The precisions OpenVINO's CPU plugin runs the layers in (of type ``layer``, or all)."""
    out = set()
    for op in compiled.compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if "runtimePrecision" in info and (layer is None or info["layerType"].astype(str) == layer):
            out.add(info["runtimePrecision"].astype(str))
    return out


def test_precision_follows_the_program():
    model, inputs = zoo.load("resnet18", **zoo.tiny_config("resnet18"))
    f32, _ = optc.compile(model, inputs, backend="openvino")
    bf16, report = optc.compile(model, inputs, backend="openvino", pipeline="default,to-half{dtype=bfloat16}")
    assert f32.backend_options["precision"] == "f32" and _runtime_precisions(f32, "Convolution") == {"f32"}
    assert bf16.backend_options["precision"] == "bf16" and report.check.ok
    assert _runtime_precisions(bf16, "Convolution") == {"bf16"}


def test_quantized_program_runs_int8_kernels():
    model, inputs = zoo.load("resnet18", **zoo.tiny_config("resnet18"))
    with pytest.warns(UserWarning, match="no calibration_data"):
        compiled, report = optc.compile(model, inputs, backend="openvino", pipeline="default,insert-qdq")
    assert compiled.backend_options["route"] == "onnx" and report.check.ok
    assert _runtime_precisions(compiled, "Convolution") <= {"i8", "u8"}, _runtime_precisions(compiled)
    assert report.integer_coverage["conv"] == (20, 20) and report.integer_coverage["matmul"] == (1, 1)
    with pytest.warns(UserWarning), pytest.raises(LoweringError, match="route='export' cannot lower"):
        optc.compile(model, inputs, backend="openvino", pipeline="default,insert-qdq", route="export")


def test_save_load_round_trip(tmp_path, captured_zoo):
    model, inputs, program = captured_zoo("bert")
    compiled = lower(program, "cpu", "openvino", threads=1)
    compiled.save(str(tmp_path / "art"))
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == ["manifest.json", "model.bin", "model.xml"]
    loaded = optc.load(str(tmp_path / "art"))
    assert loaded.backend_options["threads"] == 1
    check_close(compiled(*inputs), loaded(*inputs), rtol=0)


def test_bad_options_are_lowering_errors(captured_zoo):
    _, _, program = captured_zoo("mlp")
    with pytest.raises(LoweringError, match="route must be one of auto, export, onnx"):
        lower(program, "cpu", "openvino", route="bogus")
    with pytest.raises(LoweringError, match="threads must be a positive int"):
        lower(program, "cpu", "openvino", threads=0)
    with pytest.raises(LoweringError, match="precision must be f32, bf16 or f16"):
        lower(program, "cpu", "openvino", precision="int4")


class _DataEdgedHistogram(torch.nn.Module):
    def forward(self, x):
        return torch.histc(x, bins=4) + 1     # min = max = 0: edges from the data, not decomposed


def test_an_op_openvino_cannot_convert_is_named():
    with pytest.raises(LoweringError) as info:
        optc.compile(_DataEdgedHistogram(), (torch.randn(16),), backend="openvino")
    e = info.value
    assert "OpenVINO (export route) has no conversion for aten.histc.default" in str(e)
    assert e.op == "aten::histc" and e.node == "histc" and "test_openvino.py" in e.source


class _MoeRouting(torch.nn.Module):
    """What transformers' MoE layers (Mixtral) write and OpenVINO's frontend lacked: ``histc``
    of the chosen experts, ``empty_like`` filled by an index_put (``inv[perm] = arange``)."""

    def forward(self, scores):
        top = scores.topk(2, -1).indices.flatten()
        counts = torch.histc(top.float(), bins=4, min=0, max=3)
        perm = top.argsort(stable=True)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        return counts, inv


def test_moe_routing_ops_are_decomposed_for_openvino():
    torch.manual_seed(0)
    model, x = _MoeRouting(), torch.randn(6, 4)
    compiled, report = optc.compile(model, (x,), backend="openvino")
    assert {"aten::histc", "aten::empty_like"} <= set(report.backend_stage.stats("decompose"))
    got, want = compiled(x), model(x)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


class _EmptyCacheCat(torch.nn.Module):
    """transformers' first key/value cache update: ``torch.cat([torch.tensor([]), k], dim=-2)`` (torch's
    legacy rule lets an empty 1-d tensor join any concatenation), here with a dynamic length."""

    def forward(self, k):
        return torch.cat([torch.tensor([]), k], dim=-2) * 2.0


def test_an_op_openvino_fails_to_convert_is_named_with_its_reason():
    # without canonicalize's drop-empty-cat-operand, OpenVINO's frontend fails on the concatenation
    # (its Concat takes no rank-1 operand with axis -2); the error names the op, the node and why
    k = torch.randn(2, 5, 8)
    dynamic = ({1: torch.export.Dim("seq", min=2, max=32)},)
    with pytest.raises(LoweringError) as info:
        optc.compile(_EmptyCacheCat(), (k,), backend="openvino", pipeline="dce", dynamic_shapes=dynamic)
    e = info.value
    assert "OpenVINO (export route) failed to convert aten.cat.default: Axis -2 out of the tensor rank range" \
        in str(e), str(e)
    assert e.op == "aten::cat" and e.node == "cat" and "test_openvino.py" in e.source
    # the default pipeline drops the empty operand, also with a dynamic length
    compiled, report = optc.compile(_EmptyCacheCat(), (k,), backend="openvino", dynamic_shapes=dynamic)
    assert report.pipeline.stats("canonicalize")["drop-empty-cat-operand"] == 1
    k2 = torch.randn(2, 11, 8)
    assert torch.equal(compiled(k2), k2 * 2.0)
