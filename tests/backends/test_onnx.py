"""ONNX backend: every zoo model matches eager, translations, dynamic batch, external data, errors."""

from __future__ import annotations

import os
import sys

import onnx
import pytest
import torch

import optc
from optc.backends import get_backend, lower
from optc.backends.onnx import OPSET, default_threads
from optc.errors import BackendUnavailableError, LoweringError
from optc.ir.verifier import check_close, random_inputs_like

try:
    from optc.tools import zoo
    ZOO = zoo.names()
except ImportError:  # the zoo is another module's work; the backend tests stand without it
    ZOO = []


def _onnx_model(compiled) -> onnx.ModelProto:
    if compiled.model_bytes is not None:
        return onnx.load_from_string(compiled.model_bytes)
    return onnx.load(os.path.join(compiled.model_dir, "model.onnx"), load_external_data=False)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_matches_eager(name, captured_zoo):
    model, inputs, program = captured_zoo(name)
    compiled = lower(program, "cpu", "onnx")
    with torch.no_grad():
        check_close(model(*inputs), compiled(*inputs), rtol=1e-4)
        args, kwargs = random_inputs_like(program, seed=1)
        check_close(model(*args, **kwargs), compiled(*args, **kwargs), rtol=1e-4)


def test_structure_translation_and_session(captured_structured):
    model, program = captured_structured()
    compiled = lower(program, "cpu", "onnx")
    x, bias = torch.randn(3, 8), torch.randn(3, 4)
    got = compiled(x, bias=bias)
    assert isinstance(got, dict) and list(got) == ["act", "pair"] and isinstance(got["pair"], tuple)
    check_close(model(x, bias=bias), got)

    proto = _onnx_model(compiled)
    assert [o.version for o in proto.opset_import if o.domain == ""] == [OPSET]
    assert [i.name for i in proto.graph.input] == ["x", "bias"]
    assert [o.name for o in proto.graph.output] == ["output_0", "output_1", "output_2"]
    ops = {n.op_type for n in proto.graph.node} | {n.op_type for f in proto.functions for n in f.node}
    assert "channel_affine" not in ops and {"Mul", "Add"} <= ops   # translated, not a custom op

    options = compiled.session.get_session_options()
    assert options.intra_op_num_threads == default_threads()
    assert compiled.session.get_providers() == ["CPUExecutionProvider"]


def test_registered_translation_is_used(doubler):
    model, inputs = doubler
    compiled, _ = optc.compile(model, inputs, backend="onnx", pipeline="dce", optimize=False)
    check_close(model(*inputs), compiled(*inputs))
    ops = [n.op_type for n in _onnx_model(compiled).graph.node]
    assert "double" not in ops and "Add" in ops


def test_threads_option(captured_structured):
    _, program = captured_structured()
    compiled = lower(program, "cpu", "onnx", threads=1)
    assert compiled.session.get_session_options().intra_op_num_threads == 1
    with pytest.raises(LoweringError, match="threads must be a positive int"):
        lower(program, "cpu", "onnx", threads=0)
    with pytest.raises(LoweringError, match=r"opset 7 is not supported"):
        lower(program, "cpu", "onnx", opset=7)


def test_dynamic_batch(captured_structured):
    model, program = captured_structured(dynamic=True)
    compiled = lower(program, "cpu", "onnx")
    dims = [d.dim_param or d.dim_value for d in _onnx_model(compiled).graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and dims[1] == 8
    for batch in (1, 5):
        x, bias = torch.randn(batch, 8), torch.randn(batch, 4)
        got = compiled(x, bias=bias)
        assert got["pair"][1].shape == (batch, 1)
        check_close(model(x, bias=bias), got)


def test_external_data_round_trip(tmp_path, convnet):
    model, inputs = convnet
    program = optc.capture(model, inputs)
    compiled = lower(program, "cpu", "onnx", external_data_threshold=0)
    assert compiled.external_data and compiled.backend_options["external_data"]
    path = compiled.save(tmp_path / "ext")
    assert sorted(os.listdir(path)) == ["manifest.json", "model.onnx", "model.onnx.data"]
    assert os.path.getsize(os.path.join(path, "model.onnx.data")) >= 8 * 3 * 9 * 4   # the conv weight
    onnx.checker.check_model(os.path.join(path, "model.onnx"))
    loaded = optc.load(path)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), compiled(x))
    check_close(model(x), loaded(x))
    assert compiled.artifact_size() == sum(os.path.getsize(os.path.join(path, f)) for f in ("model.onnx", "model.onnx.data"))


def test_save_load_round_trip_in_memory(tmp_path, captured_structured):
    _, program = captured_structured()
    compiled = lower(program, "cpu", "onnx")
    assert not compiled.external_data
    loaded = optc.load(compiled.save(tmp_path / "m"))
    x, bias = torch.randn(3, 8), torch.randn(3, 4)
    a, b = compiled(x, bias=bias), loaded(x, bias=bias)
    assert all(torch.equal(p, q) for p, q in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)))


def test_custom_op_without_translation(weird_model):
    model, inputs = weird_model
    program = optc.capture(model, inputs)
    with pytest.raises(LoweringError) as info:
        lower(program, "cpu", "onnx")
    err = info.value
    assert (err.backend, err.op, err.node) == ("onnx", "optc_test::weird", "weird")
    assert err.source and err.source.startswith("conftest.py:")
    assert "register_onnx_translation" in str(err)


def test_exporter_error_names_the_node(monkeypatch, captured_structured):
    """An exporter failure becomes a LoweringError naming the node and the user's line."""
    _, program = captured_structured()
    from optc.backends import onnx as onnx_backend

    def broken(*args, **kwargs):
        raise RuntimeError("ConversionError: failed to convert node %linear (aten::linear): boom")

    monkeypatch.setattr(onnx_backend, "_export", broken)
    with pytest.raises(LoweringError) as info:
        lower(program, "cpu", "onnx")
    err = info.value
    assert (err.backend, err.op, err.node) == ("onnx", "aten::linear", "linear")
    assert err.source and err.source.startswith("conftest.py:")
    assert "boom" in str(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_gpu_is_one_line(monkeypatch):
    def no_capture(*a, **k):
        raise AssertionError("capture must not run when the target is unavailable")

    monkeypatch.setattr(sys.modules["optc.ir.capture"], "capture", no_capture)
    with pytest.raises(BackendUnavailableError) as info:
        optc.compile(torch.nn.Linear(2, 2), (torch.randn(1, 2),), backend="onnx", target="cuda")
    assert "\n" not in str(info.value) and "cuda" in str(info.value)


def test_missing_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # makes `import onnxruntime` fail
    with pytest.raises(BackendUnavailableError) as info:
        get_backend("onnx").check_available(optc.resolve_target("cpu", "onnx"))
    msg = str(info.value)
    assert "\n" not in msg and "onnxruntime" in msg and "pip install onnxruntime" in msg
    with pytest.raises(BackendUnavailableError):
        optc.compile(torch.nn.Linear(2, 2), (torch.randn(1, 2),), backend="onnx")


@pytest.mark.cuda
def test_cuda_provider_matches_eager(captured_structured):
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider")
    model, program = captured_structured(dynamic=True)
    compiled = lower(program, "cuda", "onnx")
    assert compiled.session.get_providers()[0] == "CUDAExecutionProvider"
    for batch in (1, 5):
        x, bias = torch.randn(batch, 8), torch.randn(batch, 4)
        got = compiled(x.cuda(), bias=bias.cuda())
        assert got["act"].is_cuda
        check_close(model(x, bias=bias), got)


def _op_types(proto) -> set:
    return {n.op_type for n in proto.graph.node} | {n.op_type for f in proto.functions for n in f.node}


def test_ort_transformer_fusions(captured_zoo):
    model, inputs, program = captured_zoo("bert")
    fused = lower(program, "cpu", "onnx")
    assert fused.backend_options["ort_fusions"].get("BiasGelu", 0) >= 2
    assert "BiasGelu" in _op_types(_onnx_model(fused))
    # SkipLayerNormalization is slower on CPU here: neither optc's fusions nor the session's create it
    assert "SkipLayerNormalization" not in _op_types(_onnx_model(fused))
    assert fused.backend_options["ort_disabled_optimizers"] == ["SkipLayerNormFusion"]
    plain = lower(program, "cpu", "onnx", ort_fusions=False)
    assert plain.backend_options["ort_fusions"] == {}
    proto = _onnx_model(plain)
    assert not [o for o in proto.opset_import if o.domain == "com.microsoft"]
    onnx.checker.check_model(proto, full_check=True)   # plain ONNX, for any runtime
    with torch.no_grad():
        check_close(model(*inputs), fused(*inputs), rtol=1e-4)
    with pytest.raises(LoweringError, match="ort_fusions must be True, False or 'auto'"):
        lower(program, "cpu", "onnx", ort_fusions="yes")


def test_ort_fusions_keep_tanh_gelu(captured_zoo):
    """onnxruntime's BiasGelu fusion ignores approximate='tanh'; the GPT's GELUs stay as they are."""
    model, inputs, program = captured_zoo("gpt")
    program, _ = optc.optimize(program, "default")   # fuse-gelu: aten.gelu(approximate="tanh") -> ONNX Gelu
    compiled = lower(program, "cpu", "onnx")
    proto = _onnx_model(compiled)
    gelus = [n for n in proto.graph.node if n.op_type == "Gelu"]
    assert gelus and all(any(a.name == "approximate" and a.s == b"tanh" for a in n.attribute) for n in gelus)
    assert "BiasGelu" not in _op_types(proto)
    with torch.no_grad():
        check_close(model(*inputs), compiled(*inputs), rtol=1e-4)


def test_ort_fusions_that_change_the_outputs_are_not_used(captured_zoo, monkeypatch, caplog):
    import onnxruntime.transformers.optimizer as ort_opt
    real = ort_opt.optimize_model

    def broken(model, **kw):   # fuses, then doubles the first output
        fused = real(model, **kw)
        out = fused.model.graph.output[0]
        doubled = onnx.helper.make_node("Add", [out.name, out.name], [out.name + "_x2"])
        for node in fused.model.graph.node:
            node.output[:] = [o + "_pre" if o == out.name else o for o in node.output]
            node.input[:] = [i + "_pre" if i == out.name else i for i in node.input]
        doubled.input[:] = [out.name + "_pre", out.name + "_pre"]
        doubled.output[:] = [out.name]
        fused.model.graph.node.append(doubled)
        return fused

    monkeypatch.setattr(ort_opt, "optimize_model", broken)
    model, inputs, program = captured_zoo("bert")
    with caplog.at_level("WARNING", logger="optc.backends.onnx"):
        compiled = lower(program, "cpu", "onnx")
    assert compiled.backend_options["ort_fusions"] == {} and "change output 0" in caplog.text
    assert "BiasGelu" not in _op_types(_onnx_model(compiled))
    with torch.no_grad():
        check_close(model(*inputs), compiled(*inputs), rtol=1e-4)


def test_a_crashing_ort_optimizer_leaves_the_plain_model(captured_zoo, monkeypatch, caplog):
    import onnxruntime.transformers.optimizer as ort_opt

    def crash(model, **kw):   # its pattern matchers raised IndexError on a [1, 1] layer norm (optc fuzz)
        raise IndexError("list index out of range")

    monkeypatch.setattr(ort_opt, "optimize_model", crash)
    model, inputs, program = captured_zoo("bert")
    with caplog.at_level("WARNING", logger="optc.backends.onnx"):
        compiled = lower(program, "cpu", "onnx")
    assert compiled.backend_options["ort_fusions"] == {} and "IndexError" in caplog.text
    with torch.no_grad():
        check_close(model(*inputs), compiled(*inputs), rtol=1e-4)


class _RMSNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(1 + 0.2 * torch.randn(16))

    def forward(self, x):
        return torch.nn.functional.rms_norm(x, [16], self.w, 1e-6) @ torch.ones(16, 4)


def test_rms_norm_runs_as_one_simplified_layer_norm_kernel(tmp_path):
    # aten.rms_norm is translated in the form ONNX Runtime's SimplifiedLayerNormFusion takes
    import onnxruntime as ort
    model, x = _RMSNorm().eval(), torch.randn(2, 5, 16) * 3
    compiled, _ = optc.compile(model, (x,), backend="onnx")
    check_close(model(x), compiled(x), rtol=1e-5)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(compiled.model_bytes, so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert ops.count("SimplifiedLayerNormalization") == 1 and "Sqrt" not in ops, ops


def test_a_disk_that_fills_while_streaming_leaves_nothing_behind(convnet, monkeypatch, tmp_path):
    """The external data is streamed into a private folder; when the disk fills half-way the
    compile fails with the OS error and the half-written folder is removed."""
    import errno
    import tempfile

    import onnx_ir
    model, inputs = convnet
    program = optc.capture(model, inputs)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    real_save = onnx_ir.save

    def save_then_fill(model, path, **kw):
        real_save(model, path, **kw)                  # the files are there ...
        with open(path + ".data", "ab") as f:
            f.write(b"\0" * 16)
        raise OSError(errno.ENOSPC, "No space left on device")    # ... and then the disk is full

    monkeypatch.setattr(onnx_ir, "save", save_then_fill)
    with pytest.raises((OSError, LoweringError), match="No space left on device"):
        lower(program, "cpu", "onnx", external_data_threshold=0)
    assert [p for p in os.listdir(tmp_path) if p.startswith("optc-onnx-")] == []


class _Mlp(torch.nn.Module):
    """Two linears on a [batch, seq, features] input (torch.export keeps them as 3-D matmuls, which
    the exporter writes as MatMul over a transposed weight) and a bias-free one; 256 KiB weights."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(256, 512)
        self.down = torch.nn.Linear(512, 256, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _weights_read_in_place(compiled, model) -> set[str]:
    """The parameters of ``model`` whose memory the session was handed (by address)."""
    pointers = {a.__array_interface__["data"][0] for a in (compiled.shared or {}).values()}
    return {n for n, p in model.named_parameters() if p.data_ptr() in pointers}


def test_params_reference_runs_the_session_on_the_models_own_weights(tmp_path):
    """params="reference": each linear weight stays [out, in] (FusedMatMul with transB=1, no
    transposed copy), the session is handed the model's own parameters -- and reads them in place:
    a write the version counter does not see (through numpy) shows in the next call -- the output
    matches eager and the copy route, and the saved artifact is complete (loads and runs alone)."""
    torch.manual_seed(0)
    model = _Mlp().eval()
    x = torch.randn(2, 8, 256)
    copy, _ = optc.compile(model, (x,), backend="onnx", params="copy")
    compiled, _ = optc.compile(model, (x,), backend="onnx", params="reference")
    assert copy.shared is None and copy.backend_options["params"] == "copy"
    assert compiled.backend_options["params"] == "reference" and compiled.external_data
    assert _weights_read_in_place(compiled, model) == {"up.weight", "down.weight"}
    proto = _onnx_model(compiled)
    fused = [n for n in proto.graph.node if n.op_type == "FusedMatMul"]
    assert len(fused) == 2 and all(n.domain == "com.microsoft" for n in fused)
    assert all(onnx.helper.get_attribute_value(a) == 1 for n in fused for a in n.attribute if a.name == "transB")
    assert not any(n.op_type == "MatMul" for n in proto.graph.node)
    shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
    assert sorted(shapes[n.input[1]] for n in fused) == [[256, 512], [512, 256]]   # [out, in], as torch has them
    with torch.no_grad():
        check_close(model(x), compiled(x), rtol=1e-5)
        check_close(copy(x), compiled(x), rtol=1e-5)
        # the session reads the parameter's memory: zero a row behind torch's back
        before = compiled(x)
        saved = model.down.weight.detach().clone()
        model.down.weight.detach().numpy()[3] = 0.0
        try:
            after = compiled(x)
            assert (after[..., 3] == 0).all() and not torch.equal(before[..., 3], after[..., 3])
            assert torch.equal(before[..., :3], after[..., :3])
        finally:
            model.down.weight.detach().numpy()[:] = saved.numpy()
        loaded = optc.load(compiled.save(tmp_path / "ref"))
        assert loaded.shared is None
        check_close(compiled(x), loaded(x), rtol=1e-5)


def test_a_weight_written_after_a_compile_by_reference_is_refused():
    """An in-place write to a weight the session reads by reference (the model trained on, a
    load_state_dict) makes the compiled model refuse to run, naming the weight; a model compiled
    with its own copy runs on, unchanged."""
    from optc.errors import StaleWeightsError
    torch.manual_seed(0)
    model = _Mlp().eval()
    x = torch.randn(2, 8, 256)
    compiled, _ = optc.compile(model, (x,), backend="onnx", params="reference")
    copy, _ = optc.compile(model, (x,), backend="onnx", params="copy")
    before = copy(x)
    compiled(x)
    model.load_state_dict({k: v + 1.0 if k == "up.weight" else v for k, v in model.state_dict().items()})
    with pytest.raises(StaleWeightsError, match=r"weight 'up\.weight' was modified in place"):
        compiled(x)
    assert torch.equal(copy(x), before)


def test_params_auto_copies_unless_the_copy_would_not_fit(monkeypatch, caplog, tmp_path):
    """"auto" copies (ONNX Runtime's prepacked matmuls are faster) unless a copy of the weights the
    process holds would take more than half the memory available: then it runs on them by
    reference, with a warning saying why. Weights read from a weight file do not count (the
    compile releases them); an int8 program, an in-memory model, always copy. An unknown mode is
    a LoweringError naming the modes."""
    import optc.memory
    torch.manual_seed(0)
    model = _Mlp().eval()
    x = torch.randn(2, 8, 256)
    weight_bytes = sum(p.nbytes for p in model.parameters())
    small, _ = optc.compile(model, (x,), backend="onnx")
    assert small.backend_options["params"] == "copy" and not small.external_data
    plenty, _ = optc.compile(model, (x,), backend="onnx", external_data_threshold=0)
    assert plenty.backend_options["params"] == "copy" and plenty.shared is None
    monkeypatch.setattr(optc.memory, "available_bytes", lambda: weight_bytes)     # a copy would take all of it
    with caplog.at_level("WARNING", logger="optc.backends.onnx"):
        tight, _ = optc.compile(model, (x,), backend="onnx", external_data_threshold=0)
    assert tight.backend_options["params"] == "reference" and tight.shared
    assert "params='reference'" in caplog.text and "memory available" in caplog.text
    int8, _ = optc.compile(model, (x,), backend="onnx", pipeline="default,insert-qdq{scheme=dynamic}",
                           external_data_threshold=0)
    assert int8.backend_options["params"] == "copy" and int8.shared is None
    # the same weights from a file: the copy replaces the file's pages, it does not double them
    from safetensors.torch import save_file
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    with torch.device("meta"):
        meta = _Mlp().eval()
    from_file, _ = optc.compile(meta, (x,), backend="onnx", weights=tmp_path / "w.safetensors",
                                external_data_threshold=0)
    assert from_file.backend_options["params"] == "copy"
    with torch.no_grad():
        check_close(model(x), from_file(x), rtol=1e-5)
    with pytest.raises(LoweringError, match="params must be one of auto, copy, reference"):
        optc.compile(model, (x,), backend="onnx", params="shared")
