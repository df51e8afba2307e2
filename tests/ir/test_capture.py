import pytest
import torch
import torch.nn as nn

import optc
from optc.errors import CaptureError, InputSpecError
from optc.ir.printer import format_text


class ConvBnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x, mask=None, *, scale: float = 1.0):
        h = torch.relu(self.bn(self.conv(x)))
        pooled = h.mean((2, 3))
        out = self.fc(pooled) * scale
        return {"logits": out, "aux": (pooled, out.sum(-1))}


def _net():
    torch.manual_seed(0)
    return ConvBnNet().eval()


def test_capture_keeps_output_structure_and_matches_eager():
    model = _net()
    x = torch.randn(2, 3, 8, 8)
    program = optc.capture(model, (x,))
    got = program(x)
    ref = model(x)
    assert set(got) == {"logits", "aux"} and isinstance(got["aux"], tuple) and len(got["aux"]) == 2
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=0, atol=0)
    torch.testing.assert_close(got["aux"][1], ref["aux"][1], rtol=0, atol=0)


def test_capture_keyword_inputs():
    model = _net()
    x = torch.randn(1, 3, 8, 8)
    program = optc.capture(model, (x,), {"mask": None, "scale": 2.0})
    torch.testing.assert_close(program(x, mask=None, scale=2.0)["logits"], model(x, scale=2.0)["logits"])
    with pytest.raises(InputSpecError, match="specialised"):
        program(x, mask=None, scale=3.0)
    with pytest.raises(InputSpecError, match="signature"):
        program(x)
    with pytest.raises(InputSpecError, match="shape"):
        program(torch.randn(1, 3, 9, 9), mask=None, scale=2.0)


def test_capture_dict_example_inputs_are_keywords():
    class KwOnly(nn.Module):
        def forward(self, a, b):
            return a - b
    a, b = torch.randn(3), torch.randn(3)
    program = optc.capture(KwOnly(), {"a": a, "b": b})
    torch.testing.assert_close(program(a=a, b=b), a - b)


def test_capture_is_normalised():
    program = optc.capture(_net(), (torch.randn(1, 3, 8, 8),))
    gm = program.graph_module
    assert not any(n.op == "call_module" for n in gm.graph.nodes)
    assert not hasattr(gm, "_guards_fn")
    assert not gm._forward_pre_hooks and not gm._forward_hooks
    for n in gm.graph.nodes:
        if n.op != "output":
            assert "val" in n.meta, n.name
    assert any(n.op == "get_attr" and n.target == "conv.weight" for n in gm.graph.nodes)
    assert [s.name for s in program.input_specs] == ["x"]


def test_capture_never_modifies_the_user_model():
    model = _net()
    hook_calls = []
    model.fc.register_forward_hook(lambda *a: hook_calls.append(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = {k: id(v) for k, v in model.named_parameters()}
    program = optc.capture(model, (torch.randn(1, 3, 8, 8),))
    # the program shares the weights (one copy in memory), as tensors of its own (not the
    # user's Parameter objects, detached)
    assert program.graph_module.conv.weight.data_ptr() == model.conv.weight.data_ptr()
    assert program.graph_module.conv.weight is not model.conv.weight
    assert not program.graph_module.conv.weight.requires_grad
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {k: id(v) for k, v in model.named_parameters()} == ids
    assert not model.training and all(not m.training for m in model.modules())
    assert len(model.fc._forward_hooks) == 1


@pytest.mark.parametrize("pipeline", ["default", "default,prune-channels{ratio=0.5}", "default,to-half"])
@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_compile_and_run_never_write_the_shared_weights(pipeline, backend):
    """Passes make new tensors and backends read the weights: with the Program sharing the user's
    tensors, any in-place write would show up here."""
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    compiled, _ = optc.compile(model, (x,), backend=backend, pipeline=pipeline, check=False)
    compiled(x)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_buffer_the_graph_writes_gets_its_own_copy():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("n", torch.zeros(3))
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            self.n.add_(1)
            return self.fc(x) + self.n

    model = Counter().eval()
    program = optc.capture(model, (torch.randn(2, 3),))
    gm = program.graph_module
    assert gm.n.data_ptr() != model.n.data_ptr()              # written: copied
    assert gm.fc.weight.data_ptr() == model.fc.weight.data_ptr()   # only read: shared
    gm(torch.randn(2, 3))
    assert torch.equal(model.n, torch.zeros(3))


def test_capture_training_mode_warns_and_keeps_flag():
    model = _net().train()
    with pytest.warns(UserWarning, match="training mode"):
        optc.capture(model, (torch.randn(2, 3, 8, 8),))
    assert model.training and model.bn.training


def test_symbolic_method_gives_the_same_aten_graph():
    model = _net()
    x = torch.randn(1, 3, 8, 8)
    a = optc.capture(model, (x,))
    b = optc.capture(model, (x,), method="symbolic")
    assert format_text(a, with_source=False) == format_text(b, with_source=False)
    torch.testing.assert_close(b(x)["logits"], model(x)["logits"])


def test_printed_text_is_identical_between_two_captures():
    x = torch.randn(1, 3, 8, 8)
    assert str(optc.capture(_net(), (x,))) == str(optc.capture(_net(), (x,)))


def test_dynamic_batch():
    model = _net()
    program = optc.capture(model, (torch.randn(1, 3, 8, 8),), dynamic_shapes="batch")
    assert isinstance(program.input_specs[0].shape[0], str)
    x = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(program(x)["logits"], model(x)["logits"])


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:   # the line the error must point at
            return x + 1
        return x - 1


def test_data_dependent_control_flow_is_a_capture_error_with_source_and_hint():
    with pytest.raises(CaptureError) as info:
        optc.capture(DataDependent(), (torch.randn(3),))
    err = info.value
    assert "data-dependent control flow" in err.reason
    assert err.source is not None and "test_capture.py" in err.source
    assert "if x.sum() > 0" in str(err) or ":" in err.source
    assert "torch.cond" in err.hint


def test_symbolic_data_dependent_control_flow():
    with pytest.raises(CaptureError, match="data-dependent control flow"):
        optc.capture(DataDependent(), (torch.randn(3),), method="symbolic")


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown capture method 'jit'"):
        optc.capture(_net(), (torch.randn(1, 3, 8, 8),), method="jit")
    with pytest.raises(CaptureError, match="nn.Module"):
        optc.capture(lambda x: x, (torch.randn(1),))
    with pytest.raises(CaptureError, match="example inputs"):
        optc.capture(_net(), 3)


def test_wrong_input_shape_at_capture_names_the_reason():
    with pytest.raises(CaptureError):
        optc.capture(_net(), (torch.randn(1, 4, 8, 8),))
