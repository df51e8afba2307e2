"""``optc reduce``: a planted backend miscompile in the middle of a model is cut down to the
attention that carries it, written as a re-compilable ``.pt2``; a matching model has nothing to
reduce."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from optc.tools.cli import main
from optc.tools.reduce import reduce, save_reduced

pytest.importorskip("onnxruntime")


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(16, 16)
        self.qkv = torch.nn.Linear(16, 48)
        self.out = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        q, k, v = (t.view(1, 6, 2, 8).transpose(1, 2) for t in self.qkv(h).split(16, -1))
        p = (q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1)
        a = (p @ v).transpose(1, 2).reshape(1, 6, 16)
        return self.norm(torch.relu(self.out(a)) + h)



def test_reduces_to_the_attention_and_writes_a_reproducer(wrong_mha_translation, tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    result, (piece, inputs) = reduce(model, (torch.randn(1, 6, 16) * 2,), backend="onnx")
    assert result.pinned.kind == "mismatch"
    assert result.nodes_after < result.nodes_before
    ops = {str(n.target) for n in piece.graph.nodes if n.op == "call_function"}
    assert "aten.softmax.int" in ops                      # the attention is in the piece ...
    assert "aten.layer_norm.default" not in ops           # ... what follows it is not
    assert not any("tanh" in o for o in ops)               # ... nor what precedes its inputs
    assert result.failure is not None and result.failure.kind == "mismatch"
    files = save_reduced(result, piece, inputs, str(tmp_path / "red"))
    assert {os.path.basename(f) for f in files} == {"reduced.optc", "reduced.optc.weights", "reduced.py",
                                                    "reduced.pt2", "inputs.pt", "failure.json"}
    assert json.loads((tmp_path / "red" / "failure.json").read_text())["pinned"]["kind"] == "mismatch"
    assert result.replay == f"optc compare {tmp_path / 'red' / 'reduced.optc'} --backend onnx --pipeline default " \
                            "--target cpu"
    assert "replay (exit status 1 on the failure): optc compare" in result.format()
    # the written piece reproduces on its own
    ep = torch.export.load(str(tmp_path / "red" / "reduced.pt2"))
    saved_inputs = torch.load(str(tmp_path / "red" / "inputs.pt"))
    import optc
    compiled, _ = optc.compile(ep.module(), tuple(saved_inputs), backend="onnx", check=False)
    want = ep.module()(*saved_inputs)
    got = compiled(*saved_inputs)
    assert float((want - got).abs().max() / want.abs().max()) > 1e-3


def test_nothing_to_reduce(capsys):
    assert main(["reduce", "zoo:mlp", "--tiny", "--backend", "onnx"]) == 0
    assert "nothing to reduce" in capsys.readouterr().out


def test_the_reduced_piece_replays_as_text_and_as_plain_torch(wrong_mha_translation, tmp_path, capsys):
    """reduced.optc prints back as reduce wrote it through ``optc dump``, computes what the piece does, and
    fails through ``optc compare`` (the printed replay command); reduced.py's make() is the same piece in
    plain torch."""
    import importlib.util

    from optc.ir.printer import format_text
    torch.manual_seed(0)
    result, (piece, inputs) = reduce(Net().eval(), (torch.randn(1, 6, 16) * 2,), backend="onnx")
    red = tmp_path / "red"
    save_reduced(result, piece, inputs, str(red))
    text = (red / "reduced.optc").read_text()
    assert text == format_text(piece) == result.text
    assert main(["dump", str(red / "reduced.optc")]) == 0
    assert capsys.readouterr().out == text
    with torch.no_grad():
        want = piece(*inputs)
    # the text with its side file, loaded as a MODEL, runs the recorded inputs to the same values
    from optc.tools.models import load_model
    loaded = load_model(str(red / "reduced.optc"))
    assert [n.name for n in loaded.program.graph.nodes] == [n.name for n in piece.graph.nodes]
    for got, saved in zip(loaded.args, inputs):
        assert torch.equal(got, saved)
    with torch.no_grad():
        torch.testing.assert_close(loaded.program(*loaded.args), want, rtol=0, atol=0)
    # the printed command shows the failure: compare exits 1 with the backend's mismatch
    import shlex
    assert main(shlex.split(result.replay)[1:]) == 1
    assert re.search(r"^onnx .* MISMATCH$", capsys.readouterr().out, re.M)
    # reduced.py: plain torch (no optc import needed), make() -> (model, inputs)
    source = (red / "reduced.py").read_text()
    assert "import optc" not in source and "def make():" in source
    spec = importlib.util.spec_from_file_location("reduced_piece", red / "reduced.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, args = module.make()
    with torch.no_grad():
        torch.testing.assert_close(model(*args), want, rtol=0, atol=0)
