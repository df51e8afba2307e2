"""``optc dump FILE.optc``: a dump written with ``--out FILE.optc`` replays as the MODEL, names and all;
a broken text is one line naming file:line:column (status 2)."""

from __future__ import annotations

import os

from optc.tools.cli import main


def _dump(capsys, *argv) -> tuple[int, str, str]:
    status = main(["dump", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_a_dump_written_as_optc_replays(tmp_path, capsys):
    path = str(tmp_path / "mlp.optc")
    assert _dump(capsys, "zoo:mlp", "--tiny", "--out", path)[0] == 0
    assert sorted(os.listdir(tmp_path)) == ["mlp.optc", "mlp.optc.weights"]
    status, captured, _ = _dump(capsys, "zoo:mlp", "--tiny")
    assert status == 0 and open(path).read() == captured
    status, replayed, _ = _dump(capsys, path)
    assert status == 0 and replayed == captured
    # the pipeline on the replayed text gives what it gives on the model
    status, want, report = _dump(capsys, "zoo:mlp", "--tiny", "--pipeline", "default")
    status, got, replay_report = _dump(capsys, path, "--pipeline", "default", "--check-numerics", "--verify-each")
    assert status == 0 and got == want and want != captured
    assert "drop-eval-dropout=2" in replay_report and "error: max abs err 0 " in replay_report


def test_an_optimized_dump_replays_with_provenance(tmp_path, capsys):
    path = str(tmp_path / "cnn.optc")
    assert _dump(capsys, "zoo:small_cnn", "--tiny", "--pipeline", "default", "--provenance", "--out", path)[0] == 0
    text = open(path).read()
    assert " by fold-conv-bn" in text
    status, out, _ = _dump(capsys, path, "--provenance")
    assert status == 0 and out == text


def test_optc_out_takes_the_text_format(tmp_path, capsys):
    status, _, err = _dump(capsys, "zoo:mlp", "--tiny", "--format", "json", "--out", str(tmp_path / "m.optc"))
    assert status == 2
    assert err == f"optc: error: --out '{tmp_path / 'm.optc'}' is an .optc program text: it takes --format text, " \
                  "not json\n"
    assert not os.listdir(tmp_path)


def test_a_broken_text_is_one_line_with_file_line_column(tmp_path, capsys):
    path = tmp_path / "bad.optc"
    path.write_text("graph(%x : f32[2]):\n  %relu : f32[2] = aten.relu(%x\n  return (%relu)\n")
    status, out, err = _dump(capsys, str(path))
    assert status == 2 and out == ""
    assert err == f"optc: error: {path}:2:32: expected ',' or ')' in the argument list, found end of line\n"
    path.write_text("graph(%x : f32[2]):\n  %y : f32[2] = aten.frob(%x)\n  return (%y)\n")
    status, _, err = _dump(capsys, str(path))
    assert status == 2 and err.startswith(f"optc: error: {path}:2:17: unknown op 'aten.frob'")


def test_inputs_and_dynamic_batch_for_an_optc_text(tmp_path, capsys):
    path = str(tmp_path / "mlp.optc")
    assert _dump(capsys, "zoo:mlp", "--tiny", "--out", path)[0] == 0
    first = open(path).read().splitlines()[0]
    assert first == "graph(%x : f32[1,64]):"
    status, _, err = _dump(capsys, path, "--input", "2x64")
    assert status == 2 and err == f"optc: error: --input 2x64:f32 does not fit input %x of '{path}' (f32[1,64])\n"
    assert _dump(capsys, path, "--input", "1x64", "--check-numerics", "--pipeline", "default")[0] == 0
    status, _, err = _dump(capsys, path, "--dynamic-batch")
    assert status == 2 and "--dynamic-batch does not apply" in err


def test_a_text_without_its_side_file(tmp_path, capsys):
    path = str(tmp_path / "mlp.optc")
    assert _dump(capsys, "zoo:mlp", "--tiny", "--out", path)[0] == 0
    os.remove(path + ".weights")
    status, _, err = _dump(capsys, path)
    assert status == 2 and err.startswith(f"optc: error: {path}:2: no weight ")
    assert err.rstrip().endswith(f"(the side file '{path}.weights' does not exist)")
