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


# ---- pages of memory-mapped weights handed back (optc.memory) ------------------------------------
linux_pageout = pytest.mark.skipif(
    not os.uname().sysname == "Linux" or tuple(int(x) for x in os.uname().release.split(".")[:2]) < (5, 4),
    reason="MADV_PAGEOUT needs Linux 5.4 or later")


def _mapped_rss_kib(path: str) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    path, cur, total = os.path.realpath(path), None, 0
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5:
                cur = parts[5] if len(parts) >= 6 else None
            elif parts[0] == "Rss:" and cur == path:
                total += int(parts[1])
    return total


@linux_pageout
def test_mapped_weight_pages_are_handed_back_and_read_again(tmp_path):
    from safetensors import safe_open

    from optc.memory import mapped_weights, page_out_mapped, release_mapped
    path = str(tmp_path / "w.safetensors")
    g = torch.Generator().manual_seed(0)
    safetensors_torch.save_file({k: torch.randn(1024, 2048, generator=g) for k in "abc"}, path)   # 8 MiB each
    handle = safe_open(path, framework="pt", device="cpu")
    a, b, c = (handle.get_tensor(k) for k in "abc")
    sums = [float(t.sum()) for t in (a, b, c)]                       # every page read
    assert _mapped_rss_kib(path) >= 3 * 8 * 1024 - 64
    # outside a compile with weights=, nothing is handed back
    assert release_mapped([a]) == 0 and _mapped_rss_kib(path) >= 3 * 8 * 1024 - 64
    anon = torch.randn(1024, 2048)
    with mapped_weights([path]):
        assert release_mapped([anon]) == 0                       # never memory that is not the file's
        assert release_mapped([anon.to_sparse(), torch.empty(8, device="meta")]) == 0   # no storage / none real
        before = _mapped_rss_kib(path)
        assert release_mapped([a, b.numpy().T]) >= 2 * (8 * 1024 - 8) * 1024   # a transposed numpy view too
        assert _mapped_rss_kib(path) <= before - 2 * (8 * 1024 - 8)
    float(a.sum()), float(b.sum())                               # read again: faulted back in
    assert _mapped_rss_kib(path) >= 3 * 8 * 1024 - 64
    page_out_mapped([path], keep=[c])
    assert 8 * 1024 - 8 <= _mapped_rss_kib(path) <= 8 * 1024 + 16    # only c's pages stay
    assert [float(t.sum()) for t in (a, b, c)] == sums          # nothing lost


class ParallelBlock(nn.Module):
    """q, k, v projections of one input (merge-parallel-linear concatenates them)."""

    def __init__(self, d=512):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, d) for _ in range(3))
        self.out = nn.Linear(d, d)

    def forward(self, x):
        return self.out(torch.tanh(self.q(x)) * self.k(x) + self.v(x))


def _parallel_block_file(tmp_path):
    torch.manual_seed(0)
    model = ParallelBlock().eval()
    path = str(tmp_path / "p.safetensors")
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model, path


def _spy_madvise(monkeypatch) -> list[int]:
    """The lengths of every madvise optc.memory makes from now on (the calls still happen)."""
    import optc.memory as memory
    advised: list[int] = []
    real = memory._madvise

    def spy():
        fn = real()

        def call(addr, length, advice):
            advised.append(length)
            return fn(addr, length, advice)
        return call
    monkeypatch.setattr(memory, "_madvise", spy)
    return advised


@linux_pageout
def test_compile_from_a_file_hands_back_the_pages_it_has_read(tmp_path, monkeypatch):
    """With weights=, the q/k/v parts merge-parallel-linear concatenated, everything the check read,
    and each weight the ONNX backend wrote out are handed back (madvise on the file's pages); a
    materialised model's memory never is. The compiled model still matches eager."""
    model, path = _parallel_block_file(tmp_path)
    advised = _spy_madvise(monkeypatch)
    x = torch.randn(4, 512)
    with torch.device("meta"):
        meta = ParallelBlock().eval()
    # merge-parallel-linear (not in onnx:cpu's default pipeline) replaces the q/k/v weights
    compiled, report = optc.compile(meta, (x,), backend="onnx", weights=path, external_data_threshold=0,
                                    pipeline="default,merge-parallel-linear")
    assert report.pipeline.stats("merge-parallel-linear")["merged_linears"] == 3
    with torch.no_grad():
        check_close(model(x), compiled(x), rtol=1e-5)
    qkv = 3 * 512 * 512 * 4
    assert sum(advised) >= qkv            # at least the merged parts (then the check's and the writer's)
    advised.clear()
    compiled, _ = optc.compile(model, (x,), backend="onnx", external_data_threshold=0)
    assert advised == []                  # a materialised model: nothing is paged out


@linux_pageout
def test_weights_cast_to_bfloat16_from_a_file_are_handed_back(tmp_path, monkeypatch):
    """to-half casts each weight read from the file; the float32 pages it read, and those the
    pass's numeric comparison read, are handed back (every weight's bytes at least once)."""
    model, path = _parallel_block_file(tmp_path)
    advised = _spy_madvise(monkeypatch)
    x = torch.randn(4, 512)
    with torch.device("meta"):
        meta = ParallelBlock().eval()
    compiled, report = optc.compile(meta, (x,), backend="torchscript", weights=path,
                                    pipeline="default,to-half{dtype=bfloat16}")
    assert report.pipeline.stats("to-half")["weights"] >= 2
    with torch.no_grad():
        check_close(model(x), compiled(x), rtol=3e-2)            # bfloat16's error, not a wrong answer
    assert sum(advised) >= 4 * 512 * 512 * 4


def test_tvm_by_reference_from_a_file_hands_back_what_it_copies_aligned(tmp_path, monkeypatch):
    """TVM reads weights 64-byte aligned: a memory-mapped weight that is not gets an aligned copy for
    its load-time transform, and the file's pages it was read from are handed back rather than held
    beside the copy; TVM's importer converts none of the weights (it would copy every unaligned one
    for an attribute optc drops). The compiled model matches eager."""
    pytest.importorskip("tvm")
    import optc.backends.tvm as tvm_backend
    model, path = _parallel_block_file(tmp_path)
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter
    handed: list = []
    real = tvm_backend.release_mapped
    monkeypatch.setattr(tvm_backend, "release_mapped", lambda ts: (handed.extend(ts), real(ts))[1])
    converted: list = []            # what TVM's importer converts (copies, when not aligned)
    convert = ExportedProgramImporter._convert_pytorch_tensor_to_tvm
    monkeypatch.setattr(ExportedProgramImporter, "_convert_pytorch_tensor_to_tvm",
                        lambda self, t: (converted.append(tuple(t.shape)), convert(self, t))[1])
    x = torch.randn(4, 512)
    with torch.device("meta"):
        meta = ParallelBlock().eval()
    compiled, _ = optc.compile(meta, (x,), backend="tvm", weights=path, params="reference")
    with torch.no_grad():
        check_close(model(x), compiled(x), rtol=1e-5)
    unaligned = [t for t in compiled.params if t.data_ptr() % 64]
    assert unaligned and {t.data_ptr() for t in handed} == {t.data_ptr() for t in unaligned}
    assert (512, 512) not in converted          # no weight converted by the importer: they are main's arguments
