"""Tests of the ``optc`` command line: ``main([...])`` in-process, one run of the installed tool."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import optc
from optc.passes import base as passes_base
from optc.passes.base import Option, PassInfo, PassResult
from optc.tools import cli
from optc.tools.models import ModelLoadError, make_inputs, parse_config, parse_input_spec

MODEL_FILE = textwrap.dedent('''\
    import torch
    import torch.nn as nn


    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            unused = torch.relu(x) * 2  # noqa: F841  (dead: dce removes it)
            return torch.relu(self.fc(x)) + 1


    class Embed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 4)

        def forward(self, ids):
            return self.emb(ids).sum(-1)


    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # DATA-DEPENDENT
                return x * 2
            return x - 1


    def make():
        return Tiny().eval(), (torch.randn(2, 4),)


    def bare():
        return Tiny().eval()


    def embed():
        return Embed().eval()


    def broken():
        raise ValueError("weights not found")  # BROKEN


    def data_dependent():
        return DataDependent().eval(), (torch.randn(2, 3),)
    ''')


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "cli_models.py"
    path.write_text(MODEL_FILE)
    return str(path)


def line_of(marker: str) -> int:
    return next(i for i, s in enumerate(MODEL_FILE.splitlines(), start=1) if marker in s)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_error_line(err: str, *names: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("optc: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# ---- optc --version / passes / help ------------------------------------------------------
def test_version(capsys):
    assert run(capsys, "--version") == (0, f"optc {optc.__version__}\n", "")


def test_no_command_is_a_usage_error(capsys):
    status, _, err = run(capsys)
    assert status == 2
    assert_one_error_line(err, "COMMAND")


def test_dump_help_warns_that_loading_runs_code(capsys):
    status, out, _ = run(capsys, "dump", "--help")
    assert status == 0
    assert "runs code from it" in " ".join(out.split())


def test_passes_lists_each_pass_and_the_default_pipeline(capsys, monkeypatch):
    monkeypatch.setitem(passes_base._REGISTRY, "test-prune", PassInfo(
        "test-prune", lambda gm, ctx: PassResult(gm, False), exact=False, description="a lossy test pass",
        options={"ratio": Option(float, 0.5), "structured": Option(bool, False)}))
    status, out, _ = run(capsys, "passes", "--target", "cuda")
    assert status == 0
    lines = out.splitlines()
    dce = next(line for line in lines if line.startswith("dce "))
    assert dce.split()[:3] == ["dce", "exact", "-"] and "remove nodes whose results are unused" in dce
    prune = next(line for line in lines if line.startswith("test-prune "))
    assert prune.split()[:3] == ["test-prune", "lossy", "{ratio:float=0.5,structured:bool=false}"]
    assert prune.endswith("a lossy test pass")
    # the pipeline comes last, wrapped at its commas (continuation lines aligned under it)
    head = next(i for i, line in enumerate(lines) if line.startswith("default pipeline for cuda: "))
    shown = "".join(line.strip() for line in lines[head:]).removeprefix("default pipeline for cuda: ")
    assert shown == optc.resolve_target("cuda").default_pipeline


@pytest.mark.parametrize("target", ["cpu", "tvm:cpu"])
def test_passes_fits_100_columns(capsys, target):
    status, out, _ = run(capsys, "passes", "--target", target)
    assert status == 0
    assert all(len(line) <= 100 for line in out.splitlines()), max(out.splitlines(), key=len)
    qdq = out[out.index("insert-qdq "):]    # the widest options are wrapped, none dropped
    assert "report_samples:int=2}" in qdq.split("merge-parallel-linear")[0]


def test_passes_name_shows_one_pass_in_full(capsys, monkeypatch):
    monkeypatch.setitem(passes_base._REGISTRY, "test-prune", PassInfo(
        "test-prune", lambda gm, ctx: PassResult(gm, False), exact=False, description="a lossy test pass",
        options={"ratio": Option(float, 0.5, "fraction of the channels to remove"),
                 "mode": Option(("l1", "l2"), "l1", "how channels are ranked")},
        after=("fold-conv-bn",), lossy_tolerance=0.01))
    status, out, err = run(capsys, "passes", "test-prune")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "test-prune: a lossy test pass"
    assert all(len(line) <= 100 for line in lines)
    text = " ".join(out.split())
    assert "ratio: float = 0.5 fraction of the channels to remove" in text
    assert "mode: l1|l2 = l1 how channels are ranked" in text
    assert "lossy: outputs may differ from the input program's by up to 0.01" in text
    assert "runs after: fold-conv-bn, where a pipeline has both" in text
    assert "default pipeline for cpu: not in it" in text
    status, out, _ = run(capsys, "passes", "fold-conv-bn")     # the reverse constraint, a pipeline position
    text = " ".join(out.split())
    assert status == 0 and "runs before: " in text and "insert-qdq" in text.split("runs before: ")[1]
    assert "options: none" in text and "default pipeline for cpu: position 4 of 14" in text


def test_passes_unknown_name_is_one_line_listing_the_valid_names(capsys):
    status, out, err = run(capsys, "passes", "fold")
    assert status == 2 and out == ""
    assert_one_error_line(err, "unknown pass 'fold'", "fold-conv-bn", "dce", "insert-qdq")


# ---- optc dump ---------------------------------------------------------------------------
def test_dump_prints_the_captured_graph_identically_twice(capsys, model_file):
    status, first, err = run(capsys, "dump", f"{model_file}:make")
    assert status == 0 and err == ""   # no pipeline: no report
    assert first.startswith("graph(%x : f32[2,4]):\n")
    assert "aten.mul.Tensor(%relu, 2)  # cli_models.py:11" in first   # the dead branch, with its source line
    assert run(capsys, "dump", f"{model_file}:make") == (0, first, "")


@pytest.mark.parametrize("fmt", ["text", "json", "dot"])
def test_dump_formats_with_a_pipeline(capsys, model_file, fmt):
    status, out, err = run(capsys, "dump", f"{model_file}:make", "--pipeline", "dce", "--format", fmt)
    assert status == 0
    if fmt == "json":
        nodes = {n["name"]: n for n in json.loads(out)["nodes"]}
        assert "mul" not in nodes and nodes["linear"]["shape"] == [2, 3]
    elif fmt == "dot":
        assert out.startswith("digraph") and '"linear" -> "relu_1";' in out
    else:
        assert "aten.mul" not in out and "aten.linear" in out
    assert err.startswith("pipeline: dce\n")
    assert "removed=2" in err


def test_dump_out_writes_the_file(capsys, model_file, tmp_path):
    out_file = tmp_path / "graph.txt"
    status, out, _ = run(capsys, "dump", f"{model_file}:make", "--out", str(out_file))
    assert status == 0 and out == ""
    assert out_file.read_text().startswith("graph(%x : f32[2,4]):")
    assert os.listdir(tmp_path) == ["graph.txt"]   # no temporary file left behind


def test_print_after_all_writes_one_file_per_pass_identically_twice(capsys, model_file, tmp_path):
    dumps = []
    for run_dir in ("a", "b"):
        d = tmp_path / run_dir
        d.mkdir()
        (d / "07_stale.txt").write_text("from an earlier dump")
        status, _, err = run(capsys, "dump", f"{model_file}:make", "--pipeline", "dce,dce",
                             "--print-after-all", str(d))
        assert status == 0, err
        assert sorted(os.listdir(d)) == ["00_input.txt", "01_dce.txt", "02_dce.txt", "pipeline.txt"]
        dumps.append({name: (d / name).read_text() for name in os.listdir(d)})
    assert dumps[0] == dumps[1]
    assert "aten.mul" in dumps[0]["00_input.txt"]
    assert dumps[0]["01_dce.txt"].startswith("// after dce (changed: yes)\ngraph(")
    assert "aten.mul" not in dumps[0]["01_dce.txt"]


def test_print_after_all_without_pipeline_runs_the_default(capsys, model_file, tmp_path, monkeypatch):
    monkeypatch.setitem(optc.target.DEFAULT_PIPELINES, ("cpu", None), "dce")
    status, _, err = run(capsys, "dump", f"{model_file}:make", "--print-after-all", str(tmp_path))
    assert status == 0, err
    assert (tmp_path / "pipeline.txt").read_text() == "dce\n"
    assert (tmp_path / "01_dce.txt").exists()


def test_print_changed_writes_diffs_of_changed_passes_only(capsys, model_file, tmp_path):
    status, _, err = run(capsys, "dump", f"{model_file}:make", "--pipeline", "dce,dce", "--verify-each",
                         "--check-numerics", "--print-changed", str(tmp_path))
    assert status == 0, err
    assert sorted(os.listdir(tmp_path)) == ["00_input.txt", "01_dce.txt", "pipeline.txt"]
    diff = (tmp_path / "01_dce.txt").read_text().splitlines()
    assert diff[:2] == ["--- before dce", "+++ after dce"]
    assert [line for line in diff if line.startswith("-  ")] == [
        "-  %relu : f32[2,4] = aten.relu(%x)  # cli_models.py:11",
        "-  %mul : f32[2,4] = aten.mul.Tensor(%relu, 2)  # cli_models.py:11"]


def test_bisect_limit_and_disable_pass_show_in_the_report(capsys, model_file):
    status, out, err = run(capsys, "dump", f"{model_file}:make", "--pipeline", "dce,dce",
                           "--bisect-limit", "0")
    assert status == 0 and "aten.mul" in out
    assert err.count("bisected") == 2
    status, out, err = run(capsys, "dump", f"{model_file}:make", "--pipeline", "dce", "--disable-pass", "dce")
    assert status == 0 and "aten.mul" in out and "disabled" in err


def test_input_specs_replace_the_example_inputs(capsys, model_file):
    status, out, _ = run(capsys, "dump", f"{model_file}:make", "--input", "5x4")
    assert status == 0 and out.startswith("graph(%x : f32[5,4]):")
    status, out, _ = run(capsys, "dump", f"{model_file}:embed", "--input", "2x7:int64", "--dynamic-batch")
    assert status == 0 and out.startswith("graph(%ids : i64[s")   # dim 0 symbolic


def test_module_factory(capsys, model_file, tmp_path, monkeypatch):
    pkg = tmp_path / "optc_cli_test_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    shutil.copy(model_file, pkg / "models.py")
    monkeypatch.chdir(tmp_path)   # `optc dump pkg.mod:factory` finds packages in the working directory
    monkeypatch.delitem(sys.modules, "optc_cli_test_pkg", raising=False)
    status, out, err = run(capsys, "dump", "optc_cli_test_pkg.models:make")
    assert status == 0, err
    assert "aten.linear" in out
    assert str(tmp_path) not in sys.path


def test_pt2_file(capsys, tmp_path):
    class Add(torch.nn.Module):
        def forward(self, x):
            return x + 1

    path = str(tmp_path / "add.pt2")
    torch.export.save(torch.export.export(Add(), (torch.randn(3, 2),)), path)
    status, out, err = run(capsys, "dump", path)
    assert status == 0, err
    assert out.startswith("graph(%x : f32[3,2]):") and "aten.add.Tensor(%x, 1)" in out


@pytest.mark.parametrize("name,args,shape", [
    ("mlp", ["--config", "hidden=8", "--batch", "3"], "graph(%x : f32[3,64]):"),
    ("small_cnn", ["--tiny"], "graph(%x : f32[1,1,8,8]):"),
])
def test_zoo_models(capsys, name, args, shape):
    from optc.tools import zoo  # noqa: F401  (optc's own module: if it cannot be imported, fail here, loudly)
    status, out, err = run(capsys, "dump", f"zoo:{name}", *args, "--pipeline", "dce")
    assert status == 0, err
    assert out.startswith(shape)
    assert "# cnn.py:" in out     # the source line in optc's zoo (tools/zoo/cnn.py, tools/zoo.py before the split)


# ---- errors: one line, status 2 ------------------------------------------------------------
@pytest.mark.parametrize("argv,names", [
    (["zoo:no_such_model"], ["no_such_model", "mlp"]),
    (["missing_model.py:make"], ["missing_model.py"]),
    (["{file}:no_factory"], ["no_factory", "cli_models.py"]),
    (["{file}:broken"], ["'{file}:broken'", "ValueError: weights not found", "cli_models.py:{BROKEN}"]),
    (["{file}"], ["names no factory"]),
    (["{file}:bare"], ["no example inputs", "--input"]),
    (["no_such_pkg_xyz.models:make"], ["no_such_pkg_xyz.models"]),
    (["missing.pt2"], ["missing.pt2"]),
    (["{file}:make", "--input", "2xax4"], ["2xax4", "'a'"]),
    (["{file}:make", "--input", "2x4:float99"], ["2x4:float99", "float99"]),
    (["{file}:make", "--pipeline", "no-such-pass"], ["no-such-pass", "dce"]),
    (["{file}:make", "--pipeline", "dce,,dce"], ["malformed pipeline"]),
    (["{file}:make", "--pipeline", "dce{x=1}"], ["dce", "'x'"]),
    (["{file}:make", "--disable-pass", "no-such-pass"], ["no-such-pass", "dce"]),
    (["{file}:make", "--format", "xml"], ["xml", "text"]),
    (["{file}:make", "--target", "tpu"], ["tpu"]),
    (["{file}:make", "--config", "hidden=8"], ["zoo"]),
    (["{file}:make", "--out", "/no/such/dir/g.txt"], ["/no/such/dir"]),
    (["{file}:make", "--bisect-limit", "-1"], ["--bisect-limit"]),
    (["{file}:make", "--print-after-all", "d", "--print-changed", "d"], ["different directories"]),
    (["zoo:mlp", "--config", "no_such_key=1"], ["no_such_key", "hidden"]),
    (["zoo:mlp", "--config", "hidden"], ["'hidden'", "key=value"]),
])
def test_user_errors_are_one_line_with_status_2(capsys, model_file, argv, names):
    argv = [a.replace("{file}", model_file) for a in argv]
    status, out, err = run(capsys, "dump", *argv)
    assert status == 2
    assert out == ""
    names = [n.replace("{file}", model_file).replace("{BROKEN}", str(line_of("BROKEN"))) for n in names]
    assert_one_error_line(err, *names)


def test_data_dependent_control_flow_names_the_reason_and_the_line(capsys, model_file):
    status, _, err = run(capsys, "dump", f"{model_file}:data_dependent")
    assert status == 2
    assert_one_error_line(err, "data-dependent", f"cli_models.py:{line_of('DATA-DEPENDENT')}", "hint:")


# ---- failures of optc itself: status 1 -----------------------------------------------------
def _crash(gm, ctx):
    raise RuntimeError("pass bug")


def test_a_failing_pass_is_status_1_with_context_and_a_reproducer(capsys, model_file, tmp_path, monkeypatch):
    monkeypatch.setitem(passes_base._REGISTRY, "test-crash", PassInfo("test-crash", _crash, True, "crashes"))
    status, out, err = run(capsys, "dump", f"{model_file}:make", "--pipeline", "dce,test-crash",
                           "--print-after-all", str(tmp_path))
    assert status == 1 and out == ""
    line = assert_one_error_line(err, "while running 'test-crash' after [dce]", "RuntimeError: pass bug",
                                 "failure_reproducer.txt", "run with -v")
    assert "Traceback" not in line
    assert (tmp_path / "failure_reproducer.txt").exists()


def test_internal_error_is_status_1_and_verbose_shows_the_traceback(capsys, monkeypatch):
    def boom(args):
        raise KeyError("oops")
    monkeypatch.setattr(cli, "cmd_passes", boom)
    status, _, err = run(capsys, "passes")
    assert status == 1
    assert_one_error_line(err, "internal error: KeyError", "(run with -v for the traceback)")
    monkeypatch.setattr(cli, "cmd_dump", boom)
    status, _, err = run(capsys, "dump", "-v", "zoo:mlp")
    assert status == 1
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("optc: error: internal error")


def test_verbose_logs_optc_debug_and_restores_logging(capsys, model_file):
    before = logging.getLogger("optc").level, logging.getLogger("torch").level
    status, _, err = run(capsys, "dump", f"{model_file}:make", "--pipeline", "dce", "-v")
    assert status == 0
    assert "optc: INFO: optc.passes: dce:" in err
    status, _, err = run(capsys, "dump", f"{model_file}:make", "--pipeline", "dce")
    assert "optc: INFO" not in err
    assert (logging.getLogger("optc").level, logging.getLogger("torch").level) == before


# ---- the helpers in optc.tools.models ------------------------------------------------------
def test_input_specs_and_config_values():
    assert parse_input_spec("1x3x224x224") == parse_input_spec("1,3,224,224:f32")
    assert str(parse_input_spec("4x128:int64")) == "4x128:i64"
    (ids,) = make_inputs(["64x64:int64"])
    assert ids.dtype == torch.int64 and 0 <= ids.min() and ids.max() < 100
    assert torch.equal(make_inputs(["2x3"])[0], make_inputs(["2x3"])[0])   # seeded
    for bad in ("", "2x0", "2x-1", "2x3:", "x3"):
        with pytest.raises(ModelLoadError, match="malformed input spec"):
            parse_input_spec(bad)
    assert parse_config(["a=2", "b=0.5", "c=true", "d=sdpa", "e=8,16,16", "f=none"]) == {
        "a": 2, "b": 0.5, "c": True, "d": "sdpa", "e": (8, 16, 16), "f": None}


# ---- the installed entry point ----------------------------------------------------------------
def test_installed_optc_exits_2_with_one_line_and_no_traceback(tmp_path):
    exe = shutil.which("optc") or shutil.which("optc", path=os.path.dirname(sys.executable))
    cmd = [exe] if exe else [sys.executable, "-m", "optc.tools.cli"]
    proc = subprocess.run(cmd + ["dump", "missing_model.py:make"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert_one_error_line(proc.stderr, "missing_model.py")
