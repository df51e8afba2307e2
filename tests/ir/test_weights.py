"""Models built on the meta device, compiled with their weights from safetensors files or a
mapping (``optc.compile(..., weights=...)``, ``optc compile --weights``); every bad input named."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
import torch.nn as nn

import optc
from optc.errors import WeightsError
from optc.ir.verifier import check_close

safetensors_torch = pytest.importorskip("safetensors.torch")


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 50, bias=False)
        self.head.weight = self.embed.weight                # tied, as LMs do
        self.register_buffer("scale", torch.full((d,), 0.5))   # persistent buffer

    def forward(self, ids):
        h = self.embed(ids)
        h = self.norm(h + self.fc2(torch.relu(self.fc1(h))) * self.scale)
        return self.head(h)


def _ids():
    return (torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0)),)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = Block().eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"}   # one of the tied pair
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(state, str(path))
    return model, str(path)


def _meta():
    with torch.device("meta"):
        return Block().eval()


def test_meta_model_compiles_from_a_safetensors_file(saved):
    model, path = saved
    meta = _meta()
    compiled, report = optc.compile(meta, _ids(), backend="onnx", weights=path)
    with torch.no_grad():
        check_close(model(*_ids()), compiled(*_ids()), rtol=1e-5)
    assert all(p.is_meta for p in meta.parameters())         # the user's model is not modified
    assert report.weight_bytes > 0


def test_a_folder_of_shards_and_a_mapping(saved, tmp_path):
    model, _ = saved
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "head.weight"}
    shards = tmp_path / "shards"
    shards.mkdir()
    names = sorted(state)
    safetensors_torch.save_file({k: state[k] for k in names[:3]}, str(shards / "model-00001-of-00002.safetensors"))
    safetensors_torch.save_file({k: state[k] for k in names[3:5]}, str(shards / "model-00002-of-00002.safetensors"))
    rest = {k: state[k] for k in names[5:]}
    compiled, _ = optc.compile(_meta(), _ids(), backend="torchscript", weights=[str(shards), rest])
    with torch.no_grad():
        check_close(model(*_ids()), compiled(*_ids()), rtol=1e-5)


def test_a_missing_tensor_is_named(saved, tmp_path):
    model, _ = saved
    state = {k: v for k, v in model.state_dict().items() if k not in ("head.weight", "fc2.bias")}
    path = tmp_path / "partial.safetensors"
    safetensors_torch.save_file(state, str(path))
    with pytest.raises(WeightsError, match=r"no tensor for 'fc2\.bias'"):
        optc.compile(_meta(), _ids(), backend="onnx", weights=str(path))


def test_a_wrong_shape_is_named(saved, tmp_path):
    model, _ = saved
    state = {k: v for k, v in model.state_dict().items() if k != "head.weight"}
    state["fc1.weight"] = torch.zeros(8, 16)
    path = tmp_path / "wrong.safetensors"
    safetensors_torch.save_file(state, str(path))
    with pytest.raises(WeightsError, match=r"'fc1\.weight' .*shape \[8, 16\].*has \[32, 16\]"):
        optc.compile(_meta(), _ids(), backend="onnx", weights=str(path))


def test_a_meta_model_without_weights_is_a_clear_error():
    with pytest.raises(WeightsError, match=r"Block has \d+ tensors on the meta device \('embed\.weight'.*weights="):
        optc.compile(_meta(), _ids(), backend="onnx")


def test_a_meta_buffer_no_checkpoint_has_is_named(saved):
    class WithRope(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Block()
            self.register_buffer("inv_freq", torch.arange(4.0), persistent=False)

        def forward(self, ids):
            return self.inner(ids) + self.inv_freq.sum()

    _, path = saved
    with torch.device("meta"):
        meta = WithRope().eval()
    with pytest.raises(WeightsError, match=r"'inv_freq' still on the meta device"):
        optc.compile(meta, _ids(), backend="onnx", weights=path)
    # given in the weights, it is taken: and the wrapper's names ('inner.fc1.weight') find the
    # file's ('fc1.weight') by their common prefix
    compiled, _ = optc.compile(meta, _ids(), backend="onnx", weights=[path, {"inv_freq": torch.arange(4.0)}])
    assert compiled(*_ids()).shape == (2, 7, 50)


def test_not_safetensors_and_not_there(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        optc.compile(_meta(), _ids(), backend="onnx", weights=str(tmp_path / "nope.safetensors"))
    pt = tmp_path / "model.pt"
    torch.save({}, str(pt))
    with pytest.raises(WeightsError, match="not a .safetensors file"):
        optc.compile(_meta(), _ids(), backend="onnx", weights=str(pt))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(WeightsError, match="cannot read"):
        optc.compile(_meta(), _ids(), backend="onnx", weights=str(bad))


def test_cli_compile_with_weights(saved, tmp_path, capsys):
    from optc.tools.cli import main
    _, path = saved
    factory = tmp_path / "meta_model.py"
    factory.write_text(textwrap.dedent(f"""\
        import torch, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_weights import Block


        def make():
            with torch.device("meta"):
                model = Block().eval()
            return model, (torch.randint(0, 50, (2, 7)),)
        """))
    out = tmp_path / "art"
    rc = main(["compile", f"{factory}:make", "--weights", path, "--backend", "onnx", "--out", str(out), "--runs", "0"])
    assert rc == 0, capsys.readouterr()
    assert "max relative error vs eager" in capsys.readouterr().out
