"""TorchScript backend: every zoo model matches eager, structure, dynamic batch, save/load, errors."""

from __future__ import annotations

import os

import pytest
import torch

import optc
from optc.backends import get_backend, lower
from optc.errors import BackendUnavailableError, LoweringError, StaleWeightsError
from optc.ir.verifier import check_close, random_inputs_like

try:
    from optc.tools import zoo
    ZOO = zoo.names()
except ImportError:  # the zoo is another module's work; the backend tests stand without it
    ZOO = []


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_matches_eager(name, captured_zoo):
    model, inputs, program = captured_zoo(name)
    compiled = lower(program, "cpu", "torchscript")
    with torch.no_grad():
        check_close(model(*inputs), compiled(*inputs), rtol=1e-4)
        args, kwargs = random_inputs_like(program, seed=1)
        check_close(model(*args, **kwargs), compiled(*args, **kwargs), rtol=1e-4)


def test_structure_and_keywords_are_kept(captured_structured):
    model, program = captured_structured()
    compiled = lower(program, "cpu", "torchscript")
    x, bias = torch.randn(3, 8), torch.randn(3, 4)
    got = compiled(x, bias=bias)
    ref = model(x, bias=bias)
    assert isinstance(got, dict) and list(got) == ["act", "pair"]
    assert isinstance(got["pair"], tuple) and len(got["pair"]) == 2
    check_close(ref, got)
    assert compiled.backend_options == {"method": "trace", "optimize": True, "params": "copy"}


def test_optc_ops_are_decomposed_into_aten(captured_structured):
    _, program = captured_structured()
    assert "optc.channel_affine" in str(program)
    compiled = lower(program, "cpu", "torchscript")
    code = str(compiled.module.graph)
    assert "optc" not in code and "aten::mul" in code


def test_dynamic_batch_is_scripted(captured_structured):
    model, program = captured_structured(dynamic=True)
    compiled = lower(program, "cpu", "torchscript")
    assert compiled.backend_options["method"] == "script"
    for batch in (1, 5):
        x, bias = torch.randn(batch, 8), torch.randn(batch, 4)
        got = compiled(x, bias=bias)
        assert got["pair"][1].shape == (batch, 1)
        check_close(model(x, bias=bias), got)


def test_trace_with_dynamic_dims_is_an_error(captured_structured):
    _, program = captured_structured(dynamic=True)
    with pytest.raises(LoweringError, match=r"\[torchscript\] method='trace' specialises"):
        lower(program, "cpu", "torchscript", method="trace")


@pytest.mark.skipif("bert" not in ZOO, reason="needs the zoo's bert")
def test_dynamic_batch_zoo_bert(captured_zoo):
    """Two int64 inputs (ids, mask) sharing one dynamic batch."""
    model, _, program = captured_zoo("bert", dynamic=True)
    compiled = lower(program, "cpu", "torchscript")
    for batch in (1, 5):
        _, inputs = zoo.load("bert", batch=batch, **zoo.tiny_config("bert"))
        with torch.no_grad():
            check_close(model(*inputs), compiled(*inputs), rtol=1e-4)


def test_save_load_round_trip(tmp_path, convnet):
    model, inputs = convnet
    compiled, _ = optc.compile(model, inputs, backend="torchscript", pipeline="dce")
    path = compiled.save(tmp_path / "ts")
    assert sorted(os.listdir(path)) == ["manifest.json", "model.pt"]
    loaded = optc.load(path)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), compiled(x))
    check_close(model(x), loaded(x))
    # the artifact is plain TorchScript: torch.jit.load runs it without optc. It is the frozen
    # module without optimize_for_inference (optc re-applies that at load), so the kernels may
    # differ in rounding: equal to float32 rounding, not bit for bit.
    plain = torch.jit.load(os.path.join(path, "model.pt"))
    check_close(compiled(x), plain(x)[0], rtol=1e-5)


def test_custom_op_without_lowering(weird_model):
    model, inputs = weird_model
    program = optc.capture(model, inputs)
    with pytest.raises(LoweringError) as info:
        lower(program, "cpu", "torchscript")
    err = info.value
    assert err.backend == "torchscript" and err.op == "optc_test::weird" and err.node == "weird"
    assert err.source and err.source.startswith("conftest.py:")
    assert "optc_test::weird" in str(err) and "%weird" in str(err) and "[torchscript]" in str(err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a GPU")
def test_cuda_without_gpu_is_one_line():
    with pytest.raises(BackendUnavailableError) as info:
        get_backend("torchscript").check_available(optc.resolve_target("cuda", "torchscript"))
    assert "\n" not in str(info.value) and "cuda" in str(info.value)


@pytest.mark.cuda
def test_cuda_matches_eager(captured_structured):
    model, program = captured_structured()
    compiled = lower(program, "cuda", "torchscript")
    x, bias = torch.randn(3, 8), torch.randn(3, 4)
    got = compiled(x.cuda(), bias=bias.cuda())
    assert got["act"].is_cuda
    check_close(model(x, bias=bias), got)


def _tensor_constants(graph) -> list[torch.Tensor]:
    out = []
    for node in graph.nodes():
        if node.kind() == "prim::Constant" and isinstance(node.output().type(), torch._C.TensorType):
            out.append(node.output().toIValue())
    return out


@pytest.mark.parametrize("dynamic", [False, True])
def test_linear_weights_are_not_copied(tmp_path, dynamic):
    """With params='reference', each linear runs as oneDNN's over the user's weight itself: every
    weight constant of the running graph is the user's parameter storage (optimize_for_inference's
    FrozenLinearTranspose would clone each transposed; the backend hands the graph matmul over a
    view, which becomes oneDNN's linear), and the model still computes what eager does -- traced
    and scripted, after an in-place write to a weight, and after save/load."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16, bias=False),
                                torch.nn.Linear(16, 8)).eval()
    x = torch.randn(2, 5, 32)
    program = optc.capture(model, (x,), dynamic_shapes="batch" if dynamic else None)
    compiled = lower(program, "cpu", "torchscript", params="reference")
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    consts = [t for t in _tensor_constants(compiled.module.graph) if t.dim() == 2]
    assert len(consts) == 3
    assert all(t.untyped_storage().data_ptr() in storages for t in consts)
    kinds = [n.kind() for n in compiled.module.graph.nodes()]
    assert "aten::linear" not in kinds and "aten::matmul" not in kinds
    assert kinds.count("mkldnn::_linear_pointwise") == 3 and "aten::add" not in kinds   # biases folded in
    # the node map gives each linear its TorchScript node and value
    linears = [n.name for n in program.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(linears) == 3
    if not dynamic:      # scripted code records no FX lines
        for name in linears:
            assert compiled.backend_map[name]["nodes"][0].startswith("mkldnn::_linear_pointwise")
            assert compiled.backend_map[name]["value"]
        values = compiled.intermediate_values(list(program.example_flat_inputs()),
                                              [compiled.backend_map[linears[0]]["value"]])
        check_close(model[0](x), values[compiled.backend_map[linears[0]]["value"]], rtol=1e-5)
    with torch.no_grad():
        check_close(model(x), compiled(x), rtol=1e-5)
        x3 = torch.randn(3, 5, 32)
        if dynamic:
            check_close(model(x3), compiled(x3), rtol=1e-5)
    compiled.save(tmp_path / "m")
    loaded = optc.load(tmp_path / "m")
    with torch.no_grad():
        check_close(model(x), loaded(x), rtol=1e-5)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linears_run_on_packed_weights(tmp_path, dynamic, dtype):
    """params='copy': each linear runs as oneDNN's over its weight packed once into oneDNN's layout;
    the model matches eager, and so does a loaded artifact, which packs its own weights. A weight
    written in place afterwards (as load_state_dict writes it) would reach the biases, which the
    model reads in place, and not the packed weights nor the artifact: the model refuses to run,
    naming the weight."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16, bias=False),
                                torch.nn.Linear(16, 8)).eval().to(dtype)
    x = torch.randn(2, 5, 32, dtype=dtype)
    program = optc.capture(model, (x,), dynamic_shapes="batch" if dynamic else None)
    compiled = lower(program, "cpu", "torchscript", params="copy")
    kinds = [n.kind() for n in compiled.module.graph.nodes()]
    assert kinds.count("mkldnn::_linear_pointwise") == 3 and "aten::matmul" not in kinds
    assert not [t for t in _tensor_constants(compiled.module.graph) if t.dim() == 2]   # no dense weight left
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    if not dynamic:      # the node map and an instrumented run see the packed linears too
        first = next(n.name for n in program.graph.nodes if n.target is torch.ops.aten.linear.default)
        value = compiled.backend_map[first]["value"]
        assert compiled.backend_map[first]["nodes"][0].startswith("mkldnn::_linear_pointwise") and value
        with torch.no_grad():
            check_close(model[0](x), compiled.intermediate_values(list(program.example_flat_inputs()), [value])[value],
                        rtol=rtol)
    with torch.no_grad():
        check_close(model(x), compiled(x), rtol=rtol)
        if dynamic:
            x3 = torch.randn(3, 5, 32, dtype=dtype)
            check_close(model(x3), compiled(x3), rtol=rtol)
    compiled.save(tmp_path / "m")
    loaded = optc.load(tmp_path / "m")
    assert loaded.backend_options["params"] == "copy"
    assert [n.kind() for n in loaded.module.graph.nodes()].count("mkldnn::_linear_pointwise") == 3
    with torch.no_grad():
        check_close(model(x), loaded(x), rtol=rtol)
        expected = model(x)
        model[2].weight.mul_(-0.5)
        with pytest.raises(StaleWeightsError, match=r"torchscript: weight '.*2.*weight' was modified in place"):
            compiled(x)
        check_close(expected, loaded(x), rtol=rtol)     # the artifact has its own weights


def test_params_auto_packs_unless_the_copy_would_crowd_memory(monkeypatch, caplog):
    """params='auto' packs the weights; where a copy of them would take more than half the memory
    available it runs on the user's weights instead and says so."""
    import optc.memory
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 8)).eval()
    x = torch.randn(2, 32)
    program = optc.capture(model, (x,))
    assert lower(program, "cpu", "torchscript").backend_options["params"] == "copy"
    weight_bytes = sum(p.nbytes for p in model.parameters())
    monkeypatch.setattr(optc.memory, "available_bytes", lambda: weight_bytes)
    with caplog.at_level("WARNING", logger="optc.backends"):
        compiled = lower(program, "cpu", "torchscript")
    assert compiled.backend_options["params"] == "reference"
    assert "params='reference'" in caplog.text
    with torch.no_grad():
        check_close(model(x), compiled(x), rtol=1e-5)
    with pytest.raises(LoweringError, match="params must be one of"):
        lower(program, "cpu", "torchscript", params="shared")


class _ParallelProjections(torch.nn.Module):
    """q/k/v and gate/up projections of one input each (what merge-parallel-linear would concatenate)."""

    def __init__(self, d=32):
        super().__init__()
        self.q, self.k, self.v = (torch.nn.Linear(d, d) for _ in range(3))
        self.gate, self.up = torch.nn.Linear(d, 2 * d, bias=False), torch.nn.Linear(d, 2 * d, bias=False)
        self.down = torch.nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1) @ self.v(x)
        return self.down(torch.nn.functional.silu(self.gate(a)) * self.up(a))


def test_default_pipeline_holds_no_second_copy_of_parallel_projections():
    """torchscript:cpu's default pipeline leaves merge-parallel-linear out (no faster there,
    docs/benchmarks.md): every weight of the running graph is the user's own storage."""
    torch.manual_seed(0)
    model = _ParallelProjections().eval()
    x = torch.randn(2, 5, 32)
    compiled, report = optc.compile(model, (x,), backend="torchscript")
    assert "merge-parallel-linear" not in [r.name for r in report.pipeline.records]
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    reference, _ = optc.compile(model, (x,), backend="torchscript", params="reference")
    consts = [t for t in _tensor_constants(reference.module.graph) if t.dim() == 2]
    assert len(consts) == 6 and all(t.untyped_storage().data_ptr() in storages for t in consts)
    with torch.no_grad():
        check_close(model(x), compiled(x), rtol=1e-5)
    # the pass is still there for whoever asks for it
    merged, report = optc.compile(model, (x,), backend="torchscript", pipeline="default,merge-parallel-linear")
    assert report.pipeline.stats("merge-parallel-linear")["merged_linears"] == 5
    with torch.no_grad():
        check_close(model(x), merged(x), rtol=1e-5)
