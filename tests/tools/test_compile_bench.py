"""``optc compile`` and ``optc bench`` on tiny models (in-process ``main([...])``; no timing asserts)."""

from __future__ import annotations

import json
import re

import pytest
import torch

import optc
from optc.tools import bench, cli
from optc.tools.models import load_model


def _run(capsys, argv):
    status = cli.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("optc: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---- optc compile --------------------------------------------------------------------------
def test_compile_onnx_writes_loadable_artifact(tmp_path, capsys):
    out_dir = tmp_path / "mlp"
    status, out, err = _run(capsys, ["compile", "zoo:mlp", "--tiny", "--backend", "onnx", "--out", str(out_dir),
                                     "--runs", "3", "--warmup", "1", "--threads", "1"])
    assert status == 0, err
    # the compile report: phases, per-pass table, artifact size
    for text in ("compiled", "capture", "pipeline", "lowering", "artifact", "total pass time", "canonicalize"):
        assert text in out
    assert f"saved to {out_dir}" in out
    assert "eager" in out and "optc onnx" in out and "x eager" in out
    assert "max relative error vs eager" in out

    compiled = optc.load(out_dir)
    loaded = load_model("zoo:mlp", tiny=True)
    with torch.no_grad():
        want = loaded.model(*loaded.args)
    torch.testing.assert_close(compiled(*loaded.args), want, rtol=1e-4, atol=1e-5)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["backend"] == "onnx" and manifest["options"]["threads"] == 1


def test_compile_torchscript_no_timing(tmp_path, capsys):
    status, out, err = _run(capsys, ["compile", "zoo:mlp", "--tiny", "--backend", "torchscript",
                                     "--out", str(tmp_path / "ts"), "--runs", "0", "--pipeline", "dce"])
    assert status == 0, err
    assert "pipeline: dce" in out and "interleaved" not in out
    assert optc.load(tmp_path / "ts").backend == "torchscript"


def test_compile_reports_parameters_flops_and_bytes(tmp_path, capsys):
    status, out, err = _run(capsys, ["compile", "zoo:small_cnn", "--tiny", "--backend", "torchscript", "--runs", "0",
                                     "--pipeline", "default,prune-channels{ratio=0.5}", "--stats",
                                     "--out", str(tmp_path / "p")])
    assert status == 0, err
    (model_line,) = [line for line in out.splitlines() if line.strip().startswith("model ")]
    assert re.search(r"params \S+ -> \S+ \(\d+\.\d+x fewer\), FLOPs \S+ -> \S+ \(\d+\.\d+x fewer\), weights", model_line)
    per_layer = out.split("per layer, before -> after the pipeline:")[1]
    assert "aten.conv2d" in per_layer and "(removed)" in per_layer   # folded BatchNorms
    assert re.search(r"^total\b.*->", per_layer, re.M)


def test_compile_tune_needs_tvm(tmp_path, capsys):
    status, out, err = _run(capsys, ["compile", "zoo:mlp", "--tiny", "--backend", "onnx", "--tune", "8",
                                     "--out", str(tmp_path / "x")])
    assert status == 2
    assert "--tune applies to the tvm backend only" in _one_error_line(err)
    assert not (tmp_path / "x").exists()


def test_compile_params_by_reference(tmp_path, capsys):
    """--params reference reaches the backend (the manifest records it); a mode the backend does not
    take, or a backend without the option, is one line before anything is loaded."""
    out_dir = tmp_path / "ref"
    status, out, err = _run(capsys, ["compile", "zoo:mlp", "--tiny", "--backend", "onnx", "--params", "reference",
                                     "--out", str(out_dir), "--runs", "0"])
    assert status == 0, err
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["options"]["params"] == "reference" and manifest["options"]["external_data"]
    assert re.search(r"  lowering .* ms  weights: params=reference\n", out)     # what the compile used, shown
    status, out, err = _run(capsys, ["compile", "zoo:mlp", "--tiny", "--backend", "onnx", "--params", "bound",
                                     "--out", str(tmp_path / "x")])
    assert status == 2 and "--params bound: the onnx backend takes auto, copy, reference" in _one_error_line(err)
    status, out, err = _run(capsys, ["compile", "zoo:mlp", "--tiny", "--backend", "torchscript", "--params", "bound",
                                     "--out", str(tmp_path / "x")])
    assert status == 2 and "--params bound: the torchscript backend takes auto, copy, reference" in _one_error_line(err)
    status, out, err = _run(capsys, ["compile", "zoo:mlp", "--tiny", "--backend", "openvino", "--params",
                                     "reference", "--out", str(tmp_path / "x")])
    assert status == 2 and "--params: the openvino backend has no params option" in _one_error_line(err)
    assert not (tmp_path / "x").exists()


def test_compile_unknown_backend(tmp_path, capsys):
    status, out, err = _run(capsys, ["compile", "zoo:mlp", "--tiny", "--backend", "nope", "--out", str(tmp_path / "x")])
    assert status == 2
    line = _one_error_line(err)
    assert "unknown backend 'nope'" in line and "onnx" in line


def test_compile_out_is_required(capsys):
    status, out, err = _run(capsys, ["compile", "zoo:mlp", "--tiny"])
    assert status == 2
    assert "--out" in _one_error_line(err)


def test_compile_refuses_foreign_out_folder(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    status, out, err = _run(capsys, ["compile", "zoo:mlp", "--tiny", "--out", str(tmp_path)])
    assert status == 2
    assert "not an optc artifact folder" in _one_error_line(err)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_compile_bad_pipeline_before_load(tmp_path, capsys):
    status, out, err = _run(capsys, ["compile", "zoo:nosuchmodel", "--pipeline", "dce,nosuchpass",
                                     "--out", str(tmp_path / "x")])
    assert status == 2
    assert "nosuchpass" in _one_error_line(err)


def test_compile_unavailable_backend_is_one_line(tmp_path, capsys, monkeypatch):
    from optc.backends import base
    monkeypatch.setitem(base._BACKENDS, "tvm", "optc.backends.no_such_module:Nothing")
    monkeypatch.delitem(base._INSTANCES, "tvm", raising=False)
    status, out, err = _run(capsys, ["compile", "zoo:mlp", "--tiny", "--backend", "tvm", "--out", str(tmp_path / "x")])
    assert status == 2
    assert "tvm" in _one_error_line(err)


# ---- optc bench ----------------------------------------------------------------------------
def test_bench_table(tmp_path, capsys):
    json_path = tmp_path / "b.json"
    status, out, err = _run(capsys, ["bench", "zoo:mlp", "--tiny", "--runs", "3", "--warmup", "1",
                                     "--backends", "onnx,torchscript", "--baselines", "eager", "--threads", "1",
                                     "--pause-ms", "0", "--json", str(json_path)])
    assert status == 0, err
    assert "optc bench zoo:mlp --tiny --backends onnx,torchscript --baselines eager" in out
    assert "machine:" in out and "versions:" in out and "torch" in out
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("candidate "))
    end = lines.index("", start)
    rows = {" ".join(line.split()[:2 if line.startswith("optc ") else 1]): line for line in lines[start + 1:end]}
    assert set(rows) == {"eager", "optc onnx", "optc torchscript"}, out
    assert "1.00x" in rows["eager"]
    for name in ("optc onnx", "optc torchscript"):
        assert re.search(r" \d+\.\d\dx ", rows[name]), rows[name]   # a ratio against eager, not '-'
    assert "optc onnx / onnxruntime = -; bar <= 1x: not measured (no onnxruntime row)" in out
    data = json.loads(json_path.read_text())
    names = [c["name"] for c in data["candidates"]]
    assert names == ["eager", "optc onnx", "optc torchscript"]
    for c in data["candidates"]:
        assert len(c["times_s"]) == 3 and c["error"] is None and c["max_rel_err"] < 1e-4


def test_bench_markdown_and_skipped_backend(capsys, monkeypatch):
    from optc.backends import base
    monkeypatch.setitem(base._BACKENDS, "tvm", "optc.backends.no_such_module:Nothing")
    monkeypatch.delitem(base._INSTANCES, "tvm", raising=False)
    status, out, err = _run(capsys, ["bench", "zoo:mlp", "--tiny", "--runs", "2", "--warmup", "0",
                                     "--backends", "tvm", "--baselines", "eager", "--markdown", "--pause-ms", "0"])
    assert status == 0, err
    assert "| candidate | median ms | x eager |" in out
    tvm_row = next(line for line in out.splitlines() if line.startswith("| optc tvm"))
    assert "skipped" in tvm_row
    assert "optc tvm / onnxruntime" in out and "not measured" in out


@pytest.mark.skipif(not all(__import__("importlib").util.find_spec(m) for m in ("xgboost", "psutil")),
                    reason="needs the tune extra")
def test_bench_tvm_tuned_candidate(capsys, tmp_path):
    status, out, err = _run(capsys, ["bench", "zoo:mlp", "--tiny", "--runs", "2", "--warmup", "0", "--backends", "",
                                     "--baselines", "eager,ort", "--tvm-tune", "2", "--tuning-db", str(tmp_path / "db"),
                                     "--pause-ms", "0", "--json", str(tmp_path / "r.json")])
    assert status == 0, err
    assert "--tvm-tune 2" in out and "optc tvm tuned / onnxruntime" in out and "bar <= 1.5x" in out
    (row,) = [c for c in json.loads((tmp_path / "r.json").read_text())["candidates"] if c["name"] == "optc tvm tuned"]
    assert row["error"] is None and row["max_rel_err"] < 1e-4 and "tune=2: 3 kernels" in row["note"]
    assert (tmp_path / "db" / "decisions.json").exists()
    # without --tvm-tune the tuned bar is not part of the verdicts
    status, out, err = _run(capsys, ["bench", "zoo:mlp", "--tiny", "--runs", "2", "--warmup", "0", "--backends", "",
                                     "--baselines", "eager", "--pause-ms", "0"])
    assert status == 0 and "optc tvm tuned" not in out


def test_bench_bad_arguments(capsys):
    status, out, err = _run(capsys, ["bench", "zoo:mlp", "--tiny", "--backends", "onnx,nope"])
    assert status == 2 and "unknown backend 'nope'" in _one_error_line(err)
    status, out, err = _run(capsys, ["bench", "zoo:mlp", "--tiny", "--baselines", "eager,tensorrt"])
    assert status == 2 and "unknown baseline 'tensorrt'" in _one_error_line(err)
    status, out, err = _run(capsys, ["bench", "zoo:mlp", "--tiny", "--runs", "0"])
    assert status == 2 and "--runs" in _one_error_line(err)


# ---- the harness's pieces ------------------------------------------------------------------
def test_interleaved_random_order_and_failures():
    calls = []

    def make(name, fail_at=None):
        def fn():
            calls.append(name)
            if fail_at is not None and calls.count(name) >= fail_at:
                raise RuntimeError("boom")
        return fn

    names = ["a", "b", "c", "d"]
    times = bench.interleaved({n: make(n) for n in names}, runs=20, warmup=1, seed=3)
    assert all(len(times[n]) == 20 for n in names)
    rounds = [calls[i:i + 4] for i in range(4, len(calls), 4)]
    assert all(sorted(r) == names for r in rounds)          # each candidate once per round
    assert len({tuple(r) for r in rounds}) > 1               # in varying order
    assert len({r[0] for r in rounds}) > 1
    first = list(calls)
    calls.clear()
    bench.interleaved({n: make(n) for n in names}, runs=20, warmup=1, seed=3)
    assert calls == first                                    # seeded: reproducible

    calls.clear()
    errors = {}
    times = bench.interleaved({"a": make("a"), "b": make("b"), "c": make("c", fail_at=3)}, runs=4, warmup=1,
                              errors=errors)
    assert len(times["a"]) == len(times["b"]) == 4
    assert times["c"] == [] and "boom" in str(errors["c"])
    with pytest.raises(RuntimeError):
        bench.interleaved({"c": make("c", fail_at=1)}, runs=1)


def test_max_rel_error_and_percentile():
    y = {"a": torch.tensor([1.0, -4.0]), "b": torch.ones(2)}
    assert bench.max_rel_error(y, y) == 0.0
    z = {"a": torch.tensor([1.0, -4.4]), "b": torch.ones(2)}
    assert bench.max_rel_error(z, y) == pytest.approx(0.1)
    assert bench.max_rel_error([torch.ones(2)], [torch.ones(3)]) is None
    assert bench.percentile([1, 2, 3, 4, 5], 50) == 3
    assert bench.percentile([1, 2], 25) == pytest.approx(1.25)


def test_median_ci():
    xs = list(range(1, 101))
    lo, hi = bench.median_ci(xs)
    assert lo < 50.5 < hi and 38 <= lo <= 44 and 57 <= hi <= 63
    assert bench.median_ci([3.0]) == (3.0, 3.0)
    assert bench.median_ci([1.0, 2.0, 3.0]) == (1.0, 3.0)


def test_bench_result_json_round_trip(capsys):
    cands = [bench.Candidate("eager", "baseline", times=[1.0, 1.2, 0.9]),
             bench.Candidate("optc onnx", "optc", times=[0.5, 0.7, 0.4], compile_s=2.0, max_rel_err=1e-7)]
    r = bench.BenchResult(model="zoo:x", inputs="(f32[1])", command="optc bench zoo:x", threads=1, runs=3, warmup=0,
                          machine={"cpu": "cpu", "cores": 2, "versions": {}, "loadavg_start": "1", "loadavg_end": "1"},
                          candidates=cands, date="today", pause_ms=0)
    again = bench.BenchResult.from_json(json.loads(json.dumps(r.to_json())))
    assert again.format(markdown=True) == r.format(markdown=True)
    assert "optc onnx / onnxruntime = -" in r.format()


def test_peak_rss_counts_native_allocations():
    with bench.PeakRSS() as mem:
        x = torch.ones(64 * 2 ** 20 // 4)   # 64 MiB, touched
        del x
    if mem.growth is None:
        pytest.skip("the kernel does not let this process reset VmHWM")
    assert mem.growth >= 60 * 2 ** 20
