"""optc.compile / optc.load: report, manifest, hashes, atomic saves, input validation, registry."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import optc
from optc.backends import base, get_backend, lower
from optc.backends.base import CompiledModel, register_backend
from optc.errors import ArtifactError, BackendUnavailableError, InputSpecError, OptcError
from optc.ir.verifier import check_close


@pytest.fixture(scope="module")
def saved(tmp_path_factory, captured_structured):
    """A TorchScript artifact of the structured model (cheap to lower), and its model."""
    model, program = captured_structured()
    compiled = lower(program, "cpu", "torchscript", pipeline="dce")
    path = compiled.save(tmp_path_factory.mktemp("art") / "structured")
    return model, compiled, path


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_compile_returns_model_and_report(structured):
    model, args, kwargs = structured
    compiled, report = optc.compile(model, args, example_kwargs=kwargs, backend="torchscript", pipeline="dce")
    assert isinstance(compiled, CompiledModel) and compiled.backend == "torchscript"
    check_close(model(*args, **kwargs), compiled(*args, **kwargs))
    assert report.backend == "torchscript" and report.target == "torchscript:cpu"
    assert report.pipeline.pipeline == "dce" and compiled.pipeline == "dce"
    assert report.artifact_bytes == compiled.artifact_size() > 0
    assert min(report.capture_s, report.optimize_s, report.lowering_s) >= 0
    text = report.format()
    for word in ("capture", "pipeline", "lowering", "artifact", "KiB", "dce"):
        assert word in text


def test_compile_reports_progress(structured):
    model, args, kwargs = structured
    msgs = []
    optc.compile(model, args, example_kwargs=kwargs, backend="torchscript", pipeline="dce", progress=msgs.append)
    assert msgs == ["capturing", "running the pipeline (dce)", "running the program on the check inputs",
                    "lowering with torchscript for cpu", "checking the compiled model against the program"]


def test_compile_default_pipeline(structured):
    model, args, kwargs = structured
    compiled, report = optc.compile(model, args, example_kwargs=kwargs, backend="torchscript")
    assert report.pipeline.pipeline == optc.resolve_target("cpu", "torchscript").default_pipeline
    check_close(model(*args, **kwargs), compiled(*args, **kwargs))


def test_compile_takes_a_program_and_target_string(captured_structured):
    model, program = captured_structured()
    compiled, report = optc.compile(program, target="torchscript:cpu", pipeline="dce")
    assert compiled.backend == "torchscript" and report.capture_s == 0.0   # nothing was captured
    with pytest.raises(OptcError, match="takes no example inputs"):
        optc.compile(program, (torch.randn(1),), backend="torchscript")


def test_unknown_backend_and_option():
    with pytest.raises(OptcError, match=r"unknown backend 'tflite' \(valid: torchscript, onnx, tvm, openvino\)"):
        optc.compile(torch.nn.Linear(2, 2), (torch.randn(1, 2),), backend="tflite")
    with pytest.raises(OptcError, match=r"backend 'torchscript' has no option 'opset' \(valid options: method, optimize, params\)"):
        optc.compile(torch.nn.Linear(2, 2), (torch.randn(1, 2),), backend="torchscript", opset=18)


def test_backend_module_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(base._BACKENDS, "ghost", "optc.backends.ghost:GhostBackend")
    with pytest.raises(BackendUnavailableError) as info:
        get_backend("ghost")
    assert "\n" not in str(info.value) and "optc.backends.ghost" in str(info.value)
    register_backend("ghost2", "optc.backends.base:NoSuchClass")
    try:
        with pytest.raises(BackendUnavailableError, match="defines no Backend subclass NoSuchClass"):
            get_backend("ghost2")
    finally:
        base._BACKENDS.pop("ghost2")


def test_manifest_contents(saved):
    _, compiled, path = saved
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["format"] == "optc-artifact" and manifest["format_version"] == 1
    assert manifest["optc_version"] == optc.__version__
    assert manifest["backend"] == "torchscript" and manifest["target"]["device"] == "cpu"
    assert manifest["pipeline"] == "dce"
    assert manifest["inputs"] == [{"name": "x", "shape": [3, 8], "dtype": "f32"},
                                  {"name": "bias", "shape": [3, 4], "dtype": "f32"}]
    assert [o["shape"] for o in manifest["outputs"]] == [[3, 4], [3, 4], [3, 1]]
    assert [leaf["path"] for leaf in manifest["input_leaves"]] == ["args[0]", "kwargs['bias']"]
    assert manifest["options"] == {"method": "trace", "optimize": True, "params": "copy"}
    assert list(manifest["files"]) == ["model.pt"]
    assert manifest["files"]["model.pt"]["sha256"] == base.sha256_file(os.path.join(path, "model.pt"))
    assert manifest["versions"]["torch"] == torch.__version__


def test_load_round_trip_is_identical(saved):
    model, compiled, path = saved
    loaded = optc.load(path)
    assert loaded.pipeline == "dce" and loaded.signature.out_spec == compiled.signature.out_spec
    x, bias = torch.randn(3, 8), torch.randn(3, 4)
    a, b = compiled(x, bias=bias), loaded(x, bias=bias)
    assert list(b) == ["act", "pair"]
    assert all(torch.equal(p, q) for p, q in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)))


def test_corrupted_artifact_names_the_file(saved, tmp_path):
    path = _copy(saved[2], tmp_path / "bad")
    target = os.path.join(path, "model.pt")
    data = bytearray(open(target, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(target, "wb").write(bytes(data))
    with pytest.raises(ArtifactError, match=r"artifact file 'model.pt' is corrupted"):
        optc.load(path)


def test_missing_manifest_or_file(saved, tmp_path):
    path = _copy(saved[2], tmp_path / "nomanifest")
    os.remove(os.path.join(path, "manifest.json"))
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        optc.load(path)
    path = _copy(saved[2], tmp_path / "nofile")
    os.remove(os.path.join(path, "model.pt"))
    with pytest.raises(ArtifactError, match="artifact file 'model.pt' is missing"):
        optc.load(path)
    with pytest.raises(ArtifactError, match="no such artifact folder"):
        optc.load(tmp_path / "nothing")


def test_failed_save_leaves_no_folder(saved, tmp_path, monkeypatch):
    _, compiled, _ = saved
    original = type(compiled).save_artifacts

    def half_written(self, directory):
        original(self, directory)          # the artifact is on disk ...
        raise OSError("disk full")         # ... when the save fails

    monkeypatch.setattr(type(compiled), "save_artifacts", half_written)
    with pytest.raises(ArtifactError, match="disk full"):
        compiled.save(tmp_path / "out")
    assert os.listdir(tmp_path) == []     # neither the folder nor its temporary sibling

    # a failed overwrite keeps the previous artifact intact
    monkeypatch.setattr(type(compiled), "save_artifacts", original)
    path = compiled.save(tmp_path / "out")
    before = open(os.path.join(path, "manifest.json")).read()
    monkeypatch.setattr(type(compiled), "save_artifacts", half_written)
    with pytest.raises(ArtifactError):
        compiled.save(path)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert open(os.path.join(path, "manifest.json")).read() == before
    optc.load(path)


def test_save_refuses_to_overwrite_other_folders(saved, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ArtifactError, match="is not an optc artifact folder"):
        saved[1].save(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_inputs_are_validated(saved):
    _, compiled, _ = saved
    x, bias = torch.randn(3, 8), torch.randn(3, 4)
    with pytest.raises(InputSpecError, match="do not match the compiled signature"):
        compiled(x, bias)                                   # keyword passed positionally
    with pytest.raises(InputSpecError, match=r"input 'x' expects dtype torch.float32"):
        compiled(x.double(), bias=bias)
    with pytest.raises(InputSpecError, match=r"input 'x' expects shape \[3, 8\], got \[4, 8\]"):
        compiled(torch.randn(4, 8), bias=bias)
    with pytest.raises(InputSpecError, match="must be a tensor"):
        compiled(3.0, bias=bias)


def test_dynamic_dims_must_agree(captured_structured):
    _, program = captured_structured(dynamic=True)
    compiled = lower(program, "cpu", "torchscript")
    with pytest.raises(InputSpecError, match=r"dynamic dim \w+ is 2 in input 'x' but 3 in input 'bias'"):
        compiled(torch.randn(2, 8), bias=torch.randn(3, 4))


def test_specialised_constants_are_checked_and_saved(tmp_path):
    class Scaled(torch.nn.Module):
        def forward(self, x, factor=2.0, mode="mul"):
            return x * factor if mode == "mul" else x + factor

    model = Scaled()
    compiled, _ = optc.compile(model, (torch.randn(2, 2), 3.0), example_kwargs={"mode": "add"},
                               backend="torchscript", pipeline="dce")
    x = torch.randn(2, 2)
    check_close(model(x, 3.0, mode="add"), compiled(x, 3.0, mode="add"))
    with pytest.raises(InputSpecError, match=r"captured as 3.0 and specialised; got 4.0"):
        compiled(x, 4.0, mode="add")
    loaded = optc.load(compiled.save(tmp_path / "c"))
    check_close(model(x, 3.0, mode="add"), loaded(x, 3.0, mode="add"))
    with pytest.raises(InputSpecError, match="captured as 'add'"):
        loaded(x, 3.0, mode="mul")


def test_openvino_missing_package_or_cuda_is_one_line(monkeypatch):
    from optc.backends import get_backend
    monkeypatch.setitem(sys.modules, "openvino", None)   # makes `import openvino` fail, installed or not
    with pytest.raises(BackendUnavailableError) as info:
        optc.compile(torch.nn.Linear(2, 2), (torch.randn(1, 2),), backend="openvino")
    msg = str(info.value)
    assert "\n" not in msg and "pip install openvino" in msg
    monkeypatch.delitem(sys.modules, "openvino")
    try:
        import openvino  # noqa: F401
    except ImportError:
        return
    with pytest.raises(BackendUnavailableError, match="OpenVINO's GPU device is Intel's"):
        get_backend("openvino").check_available(optc.resolve_target("cuda", "openvino"))


def test_compile_reports_memory_against_the_weights():
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8))
    _, report = optc.compile(model, (torch.randn(2, 256),), backend="torchscript")
    assert report.weight_bytes == sum(p.numel() * 4 for p in model.parameters())
    if report.peak_rss_bytes is None:
        pytest.skip("no /proc here")
    assert report.peak_rss_bytes > report.weight_bytes and 0 <= report.rss_growth_bytes <= report.peak_rss_bytes
    line = next(l for l in report.format().splitlines() if l.strip().startswith("memory"))
    assert f"{report.peak_rss_bytes / report.weight_bytes:.2f}x the weights" in line
