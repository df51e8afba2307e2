"""to-half programs on every backend: zoo models (tiny) in float16 and bfloat16 on TorchScript,
ONNX Runtime and TVM, against the half Program (the reference semantics) and float32 eager; what
each backend does with half precision on CPU (docs/quantization.md)."""

from __future__ import annotations

import collections
import functools
import os
import sys

import onnx
import pytest
import torch

import optc
from optc.backends import lower
from optc.ir.verifier import compare_outputs, random_inputs_like
from optc.tools import zoo

ZOO = zoo.names()
FAST = ("small_cnn", "resnet18", "bert")
DTYPES = ("float16", "bfloat16")
#: unit roundoff of each half type
U = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


@functools.lru_cache(maxsize=None)
def halved(name: str, dtype: str):
    torch.manual_seed(0)
    model, inputs = zoo.load(name, **zoo.tiny_config(name))
    program = optc.capture(model, inputs)
    half, _ = optc.optimize(program, f"default,to-half{{dtype={dtype}}}")
    checks = [(program.example_args, program.example_kwargs), random_inputs_like(program, seed=7)]
    return model, half, checks


def _cases():
    """Three zoo models (a CNN, a ResNet, a transformer) x both half types x every backend. Every
    zoo model passed once on ONNX and TorchScript too (OPTC_HALF_ALL_ZOO=1 runs them, under -m slow);
    by default they stay out to keep this file at about 40 s."""
    names = ZOO if os.environ.get("OPTC_HALF_ALL_ZOO") else FAST
    for name in names:
        for backend in ("onnx", "torchscript", "tvm"):
            if backend == "tvm" and name not in FAST:
                continue
            for dtype in DTYPES:
                marks = () if name in FAST else (pytest.mark.slow,)
                yield pytest.param(name, dtype, backend, marks=marks, id=f"{name}-{dtype}-{backend}")


@pytest.mark.parametrize("name,dtype,backend", list(_cases()))
def test_zoo_model_in_half_precision(name, dtype, backend):
    model, half, checks = halved(name, dtype)
    compiled = lower(half, "cpu", backend)
    for args, kwargs in checks:
        with torch.no_grad():
            ref, fp32, got = half(*args, **kwargs), model(*args, **kwargs), compiled(*args, **kwargs)
        assert all(t.dtype == r.dtype for t, r in zip(torch.utils._pytree.tree_leaves(got),
                                                      torch.utils._pytree.tree_leaves(fp32)))
        # the backend computes the same half values in its own accumulation order (or, on TVM and
        # for bfloat16 on ONNX, the half ops in float32): a few roundings of u per layer apart
        err_ref = compare_outputs(ref, got).max_rel_error
        err_fp32 = compare_outputs(fp32, ref).max_rel_error
        assert err_ref <= max(2 * err_fp32, 16 * U[dtype]), (name, dtype, backend, err_ref, err_fp32)
        assert compare_outputs(fp32, got).cosine > 0.999


def test_onnx_float16_runs_float16_kernels_and_bfloat16_is_rounded_float32(tmp_path):
    _, half, _ = halved("bert", "float16")
    proto = onnx.load_from_string(lower(half, "cpu", "onnx").model_bytes)
    fp16 = {vi.name for vi in list(proto.graph.value_info) if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16}
    matmuls = [n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert any(n.input[0] in fp16 or n.output[0] in fp16 for n in matmuls)    # float16 matmuls in the file
    _, half, _ = halved("bert", "bfloat16")
    proto = onnx.load_from_string(lower(half, "cpu", "onnx").model_bytes)
    types = collections.Counter(t.type.tensor_type.elem_type for t in proto.graph.value_info)
    casts = [n for n in proto.graph.node if n.op_type == "Cast"]
    assert types[onnx.TensorProto.BFLOAT16] > 0 and len(casts) > 2 * 8       # values rounded through bf16
    assert all(n.op_type != "MatMul" or all(i not in {v.name for v in proto.graph.value_info
                                                      if v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16}
                                            for i in n.input) for n in proto.graph.node)


def test_bfloat16_for_onnx_runtime_on_cpu_is_refused_when_the_pipeline_is_built(monkeypatch):
    from optc.errors import PipelineError
    from optc.passes import PassManager

    def no_capture(*a, **k):
        raise AssertionError("capture must not run: the pipeline is refused first")

    with pytest.raises(PipelineError, match=r"to-half\{dtype=bfloat16\}' is refused for target onnx:cpu: ONNX "
                                            r"Runtime has no CPU bfloat16 kernels"):
        PassManager("default,to-half{dtype=bfloat16}", target=optc.resolve_target("cpu", "onnx"))
    monkeypatch.setattr(sys.modules["optc.ir.capture"], "capture", no_capture)
    with pytest.raises(PipelineError, match="no CPU bfloat16 kernels"):
        optc.compile(torch.nn.Linear(4, 4), (torch.randn(2, 4),), backend="onnx",
                     pipeline="default,to-half{dtype=bfloat16}")
    PassManager("default,to-half{dtype=float16}", target=optc.resolve_target("cpu", "onnx"))      # float16: fine
    PassManager("default,to-half{dtype=bfloat16}", target=optc.resolve_target("cpu", "torchscript"))


def test_torchscript_bfloat16_convolutions_run_in_channels_last_memory():
    """A bfloat16 program with convolutions gets the channels-last stage pass on TorchScript
    (oneDNN's bf16 convolutions are faster on it); a float32 one does not."""
    model, inputs = zoo.load("resnet18", **zoo.tiny_config("resnet18"))
    compiled, report = optc.compile(model, inputs, backend="torchscript", pipeline="default,to-half{dtype=bfloat16}")
    rec = next(r for r in report.backend_stage.records if r.name == "channels-last")
    # 20 convolutions; the 3 downsampling 1x1 weights are channels-last already ([O, I, 1, 1])
    assert rec.stats == {"convolutions": 17}
    assert report.check.ok
    _, float_report = optc.compile(model, inputs, backend="torchscript")
    assert all(r.name != "channels-last" for r in float_report.backend_stage.records)
