import json

import pytest
import torch
import torch.nn as nn

import optc
from optc.errors import NumericMismatchError, VerificationError
from optc.ir.printer import format_dot, format_json, format_text
from optc.ir.verifier import check_close, compare_outputs, verify, verify_numerics


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x).relu().to(torch.float64)


def _program():
    torch.manual_seed(0)
    return optc.capture(Small().eval(), (torch.randn(4, 3),))


def test_text_format():
    text = format_text(_program())
    assert text.splitlines()[0] == "graph(%x : f32[4,3]):"
    assert "  %fc_weight : f32[2,3] = get_attr fc.weight" in text
    assert "%linear : f32[4,2] = aten.linear(%x, %fc_weight, %fc_bias)  # test_printer_verifier.py:" in text
    assert "%to : f64[4,2] = aten.to.dtype(%relu, f64)" in text
    assert text.rstrip().endswith("return (%to)")


def test_json_and_dot_formats():
    doc = json.loads(format_json(_program()))
    by_name = {n["name"]: n for n in doc["nodes"]}
    assert by_name["linear"]["shape"] == [4, 2] and by_name["linear"]["dtype"] == "f32"
    assert by_name["linear"]["args"][0] == {"node": "x"}
    assert by_name["linear"]["source"].startswith("test_printer_verifier.py:")
    dot = format_dot(_program())
    assert dot.startswith("digraph optc {") and '"linear" -> "relu";' in dot


def test_verify_accepts_a_captured_program():
    verify(_program(), repropagate=True)


def test_verify_catches_a_dangling_attribute():
    p = _program()
    node = next(n for n in p.graph.nodes if n.op == "get_attr")
    node.target = "no_such_weight"
    with pytest.raises(VerificationError, match="no_such_weight"):
        verify(p)


def test_verify_catches_missing_and_stale_metadata():
    p = _program()
    relu = next(n for n in p.graph.nodes if n.name == "relu")
    val = relu.meta.pop("val")
    with pytest.raises(VerificationError, match="%relu: call_function node has no meta"):
        verify(p)
    relu.meta["val"] = val.to(torch.float16)
    verify(p)   # structure is fine...
    with pytest.raises(VerificationError, match="%relu: meta\\['val'\\] says torch.float16"):
        verify(p, repropagate=True)   # ...but re-propagation disagrees


def test_verify_catches_use_before_definition():
    p = _program()
    relu = next(n for n in p.graph.nodes if n.name == "relu")
    out = p.graph.output_node()
    relu.prepend(out)   # moves the output before relu
    with pytest.raises(VerificationError, match="does not lint"):
        verify(p)


def test_numeric_comparison():
    a = torch.tensor([1.0, 2.0, -4.0])
    rep = compare_outputs(a, a + torch.tensor([0.0, 0.0, 4e-4]))
    assert rep.max_abs_error == pytest.approx(4e-4, rel=1e-3) and rep.max_rel_error == pytest.approx(1e-4, rel=1e-3)
    check_close(a, a + 1e-6)
    with pytest.raises(NumericMismatchError, match="differ"):
        check_close(a, a * 1.01)
    with pytest.raises(NumericMismatchError, match="shape"):
        check_close(a, a[:2])
    rep = compare_outputs(a, torch.tensor([1.0, float("nan"), -4.0]))
    assert rep.max_rel_error == float("inf")


def test_verify_numerics_between_program_and_eager():
    torch.manual_seed(0)
    model = Small().eval()
    p = optc.capture(model, (torch.randn(4, 3),))
    verify_numerics(model, p, (torch.randn(4, 3),))
    with pytest.raises(NumericMismatchError):
        verify_numerics(lambda x: model(x) + 1, p, (torch.randn(4, 3),))
