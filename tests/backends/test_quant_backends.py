"""Quantized programs on every backend: every zoo model (tiny) quantized by insert-qdq and run on
TorchScript, ONNX Runtime and TVM against the quantized Program (the reference semantics) and
against float32 eager; on ONNX, the exported QDQ model and the integer kernels ONNX Runtime
really runs (its optimised graph); native lowering of Q/DQ on TorchScript and TVM."""

from __future__ import annotations

import collections
import functools

import onnx
import pytest
import torch

import optc
from optc.backends import lower
from optc.ir.verifier import compare_outputs, random_inputs_like
from optc.tools import zoo

ZOO = zoo.names()
#: The default run (-m "not slow") covers every architecture once on ONNX and TorchScript and three on
#: TVM (its builds take 3-15 s a model here); -m slow adds the Hugging Face twins and TVM for the rest.
FAST = ("mlp", "small_cnn", "resnet18", "resnet50", "mobilenet_v2", "bert", "gpt", "vit")
TVM_FAST = ("small_cnn", "resnet18", "bert")


def params(names, fast):
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


@functools.lru_cache(maxsize=None)
def quantized(name: str, pipeline: str = "default,insert-qdq"):
    """(model, program, quantized program, checked inputs): calibrated on 8 random inputs that do
    not include the inputs the backends are checked on (seeds 100, 101 and the example)."""
    torch.manual_seed(0)
    model, inputs = zoo.load(name, **zoo.tiny_config(name))
    program = optc.capture(model, inputs)
    calib = [random_inputs_like(program, seed=s) for s in range(1, 9)]
    q, _ = optc.optimize(program, pipeline, calibration_data=calib)
    checks = [(program.example_args, program.example_kwargs)] + [random_inputs_like(program, seed=s) for s in (100, 101)]
    return model, program, q, checks


@functools.lru_cache(maxsize=None)
def compiled_for(name: str, backend: str):
    return lower(quantized(name)[2], "cpu", backend)


def check_backend(name: str, backend: str):
    model, _, q, checks = quantized(name)
    compiled = compiled_for(name, backend)
    for args, kwargs in checks:
        with torch.no_grad():
            ref, fp32, got = q(*args, **kwargs), model(*args, **kwargs), compiled(*args, **kwargs)
        # An integer kernel (int32 accumulate, one requantization) and the Program's float emulation
        # round the same real numbers; where one lands on the other side of a rounding boundary, the
        # one-step difference travels through the later layers like quantization noise. So: close to
        # the quantized Program (a wrong scale, zero point or layout is far off: cosine < 0.9), and as
        # close to float32 as the Program itself is (within twice its error, on inputs calibration
        # did not see).
        err_q = 1 - compare_outputs(fp32, ref).cosine
        err_be = 1 - compare_outputs(fp32, got).cosine
        assert compare_outputs(ref, got).cosine > 0.99, f"{name} on {backend} vs the quantized program"
        assert err_be <= 2 * err_q + 1e-4, f"{name} on {backend}: 1 - cos vs fp32 {err_be:.2e}, program {err_q:.2e}"
    return compiled


@pytest.mark.parametrize("name", params(ZOO, FAST))
def test_zoo_model_quantized_on_onnx(name):
    check_backend(name, "onnx")


@pytest.mark.parametrize("name", params(ZOO, FAST))
def test_zoo_model_quantized_on_torchscript(name):
    compiled = check_backend(name, "torchscript")
    graph = str(compiled.module.graph)
    assert "aten::quantize_per_tensor" in graph and "aten::dequantize" in graph     # torch's own Q/DQ ops


@pytest.mark.parametrize("name", params(ZOO, TVM_FAST))
def test_zoo_model_quantized_on_tvm(name):
    check_backend(name, "tvm")


# ---- ONNX: the QDQ model and the integer kernels ONNX Runtime runs -------------------------------------
def ort_optimized_ops(compiled, tmp_path) -> collections.Counter:
    """Op types of the graph ONNX Runtime actually runs (ORT_ENABLE_ALL), read back from
    SessionOptions.optimized_model_filepath."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(compiled.model_bytes, so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def exported_ops(compiled) -> collections.Counter:
    return collections.Counter(n.op_type for n in onnx.load_from_string(compiled.model_bytes).graph.node)


def test_onnx_cnn_exports_qdq_and_runs_integer_convs(tmp_path):
    _, program, q, _ = quantized("resnet18")
    compiled = compiled_for("resnet18", "onnx")
    exported = exported_ops(compiled)
    assert exported["QuantizeLinear"] > 0 and exported["DequantizeLinear"] > 0
    convs = sum(1 for n in program.graph.nodes if n.target is torch.ops.aten.conv2d.default)
    ran = ort_optimized_ops(compiled, tmp_path)
    # every conv runs as an integer conv, the residual adds as integer adds, the classifier as QGemm
    assert ran["QLinearConv"] == convs == 20 and ran["Conv"] == 0
    assert ran["QLinearAdd"] == 8 and ran["QGemm"] == 1
    # what is left: the input's Q, the average pool in float between a DQ and the classifier's Q
    assert ran["QuantizeLinear"] == 2 and ran["DequantizeLinear"] == 1 and ran["ReduceMean"] == 1


def test_onnx_transformer_runs_integer_matmuls(tmp_path):
    _, program, q, _ = quantized("bert")
    compiled = compiled_for("bert", "onnx")
    assert exported_ops(compiled)["DequantizeLinear"] > 0
    linears = sum(1 for n in q.graph.nodes if n.target is torch.ops.aten.linear.default)
    ran = ort_optimized_ops(compiled, tmp_path)
    integer = ran["QGemm"] + ran["MatMulIntegerToFloat"] + ran["QLinearMatMul"]
    assert integer == linears > 0
    assert ran["DequantizeLinear"] == 0          # every DQ was folded into an integer kernel


def test_onnx_dynamic_scheme_runs_dynamic_integer_matmuls(tmp_path):
    _, _, q, checks = quantized("mlp", "default,insert-qdq{scheme=dynamic}")
    compiled = lower(q, "cpu", "onnx")
    exported = exported_ops(compiled)
    assert exported["DynamicQuantizeLinear"] == exported["MatMulInteger"] == 3      # standard ONNX in the file
    ran = ort_optimized_ops(compiled, tmp_path)
    assert ran["DynamicQuantizeMatMul"] == 3 and ran["MatMul"] + ran["Gemm"] + ran["FusedGemm"] == 0
    for args, kwargs in checks:
        with torch.no_grad():
            # dynamic ranges: both sides quantize the same tensor with the same scale
            assert compare_outputs(q(*args, **kwargs), compiled(*args, **kwargs)).max_rel_error < 1e-5


@pytest.mark.parametrize("backend", ["torchscript", "tvm"])
def test_dynamic_scheme_on_torchscript_and_tvm(backend):
    # optc::linear_dynamic is lowered through its definition (float kernels) and computes the same
    _, _, q, checks = quantized("bert", "default,insert-qdq{scheme=dynamic}")
    assert any(n.target is torch.ops.optc.linear_dynamic.default for n in q.graph.nodes)
    compiled = lower(q, "cpu", backend)
    for args, kwargs in checks:
        with torch.no_grad():
            assert compare_outputs(q(*args, **kwargs), compiled(*args, **kwargs)).max_rel_error < 1e-5


# ---- TVM lowers Q/DQ to Relax's own ops ------------------------------------------------------------------
def test_tvm_imports_relax_quantize_and_dequantize():
    from optc.backends.tvm import TVMBackend
    _, _, q, _ = quantized("small_cnn")
    text = TVMBackend()._import(q).mod.script()
    n_q = sum(1 for n in q.graph.nodes if n.target is torch.ops.optc.quantize_per_tensor.default)
    assert text.count("R.quantize(") == n_q > 0
    assert "R.dequantize(" in text and "R.round(" not in text      # native ops, not the decomposition


def test_backend_rounding_matches_the_reference_half_to_even():
    class QDQ(torch.nn.Module):
        def forward(self, x):
            q = torch.ops.optc.quantize_per_tensor(x, 0.5, 10, 0, 255, torch.uint8)
            return torch.ops.optc.dequantize_per_tensor(q, 0.5, 10, 0, 255, torch.uint8)

    # ties at 0.5, 1.5, 2.5 and -0.5 steps, and saturation at both ends
    x = torch.tensor([[-1.0, 0.0, 0.25, 0.5, 0.75, 1.25, 1.5, -0.25, 100.0, -100.0, 1000.0, 0.1]])
    program = optc.capture(QDQ(), (x,))
    want = program(x)
    for backend in ("onnx", "torchscript", "tvm"):
        got = lower(program, "cpu", backend)(x)
        assert torch.equal(got, want), (backend, got, want)


# ---- dynamic batch and artifacts ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_quantized_dynamic_batch_and_save_load(backend, tmp_path):
    torch.manual_seed(0)
    model, inputs = zoo.load("small_cnn", batch=2, **zoo.tiny_config("small_cnn"))
    program = optc.capture(model, inputs, dynamic_shapes="batch")
    q, _ = optc.optimize(program, "default,insert-qdq", calibration_data=[inputs] + [(torch.rand(4, 1, 8, 8),)] * 3)
    compiled = lower(q, "cpu", backend)
    loaded = optc.load(compiled.save(tmp_path / "m"))
    for batch in (1, 5):
        x = torch.rand(batch, 1, 8, 8)
        with torch.no_grad():
            ref, got = q(x), loaded(x)
        assert got.shape == (batch, 10)
        assert torch.equal(got, compiled(x))
        assert compare_outputs(ref, got).max_rel_error < 0.05


def test_onnx_session_can_leave_out_an_ort_optimizer(tmp_path):
    # what bench_quant uses on BERT: ONNX Runtime's CPU SkipLayerNormalization is slow here
    _, _, q, checks = quantized("bert")
    opts = {"ort_fusions": False, "ort_disabled_optimizers": ("SkipLayerNormFusion",)}
    compiled = lower(q, "cpu", "onnx", **opts)
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(compiled.model_bytes, so, providers=["CPUExecutionProvider"],
                         disabled_optimizers=["SkipLayerNormFusion"])
    ran = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    assert ran["SkipLayerNormalization"] == 0 and ran["LayerNormalization"] > 0
    # the default for a quantized program: the same options
    default = compiled_for("bert", "onnx")
    assert default.backend_options["ort_disabled_optimizers"] == ["SkipLayerNormFusion"]
    assert default.backend_options["ort_fusions"] == {} and ort_optimized_ops(default, tmp_path)["QGemm"] > 0
    fp32 = lower(quantized("bert")[1], "cpu", "onnx")
    assert fp32.backend_options["ort_disabled_optimizers"] == ["SkipLayerNormFusion"]   # float programs too (CPU)
    loaded = optc.load(compiled.save(tmp_path / "m"))
    assert loaded.backend_options["ort_disabled_optimizers"] == ["SkipLayerNormFusion"]
    args, kwargs = checks[0]
    assert torch.equal(loaded(*args, **kwargs), compiled(*args, **kwargs))
    with pytest.raises(optc.OptcError, match="ort_disabled_optimizers must be a tuple"):
        lower(q, "cpu", "onnx", ort_disabled_optimizers="SkipLayerNormFusion")


def test_integer_coverage_is_reported_per_backend():
    """The compile report of a quantized program says which convs and matmuls run integer
    kernels, read from what each runtime executes: ONNX Runtime's optimized graph (all of them
    on ResNet-18), TorchScript's frozen graph (none: float kernels on dequantized values)."""
    model, inputs = zoo.load("resnet18", **zoo.tiny_config("resnet18"))
    pipeline = "default,insert-qdq"
    _, onnx_report = optc.compile(model, inputs, backend="onnx", pipeline=pipeline, calibration_data=[inputs])
    assert onnx_report.integer_coverage["conv"] == (20, 20)
    assert onnx_report.integer_coverage["matmul"] == (1, 1)
    assert "conv 20/20, matmul 1/1 run as integer kernels (ONNX Runtime" in onnx_report.format()
    _, ts_report = optc.compile(model, inputs, backend="torchscript", pipeline=pipeline, calibration_data=[inputs])
    assert ts_report.integer_coverage["conv"] == (0, 20)
    # a float program has no such line
    _, float_report = optc.compile(model, inputs, backend="onnx")
    assert float_report.integer_coverage is None and "  integer " not in float_report.format()
