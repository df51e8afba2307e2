"""optc dump / optc compile with --calibration-data and --quant-report."""

from __future__ import annotations

import os

import torch

from optc.tools import cli


def _calib(tmp_path, data, name="calib.pt"):
    path = tmp_path / name
    torch.save(data, path)
    return str(path)


def test_dump_calibrates_on_the_file_and_prints_the_report(tmp_path, capsys):
    path = _calib(tmp_path, [torch.rand(1, 1, 8, 8) for _ in range(6)])
    rc = cli.main(["dump", "zoo:small_cnn", "--tiny", "--pipeline", "default,insert-qdq", "--calibration-data", path,
                   "--quant-report", "--out", str(tmp_path / "g.txt")])
    err = capsys.readouterr().err
    assert rc == 0
    assert "calibration=minmax, samples=6" in err                     # the pass's statistics
    assert "insert-qdq: static, calibration=minmax on 6 samples, 4 quantized layers" in err
    assert "features.0.0" in err and "worst layers (lowest SQNR): " in err
    assert "no calibration_data given" not in err
    assert "optc.quantize_per_tensor" in (tmp_path / "g.txt").read_text()


def test_one_tensor_is_split_into_samples_of_the_models_batch(tmp_path, capsys):
    path = _calib(tmp_path, torch.rand(10, 1, 8, 8))
    rc = cli.main(["dump", "zoo:small_cnn", "--tiny", "--batch", "2", "--pipeline", "insert-qdq",
                   "--calibration-data", path, "--out", str(tmp_path / "g.txt")])
    assert rc == 0 and "samples=5" in capsys.readouterr().err


def test_bad_calibration_files_are_one_line_errors(tmp_path, capsys):
    base = ["dump", "zoo:small_cnn", "--tiny", "--pipeline", "insert-qdq", "--out", str(tmp_path / "g.txt")]
    cases = [
        (str(tmp_path / "missing.pt"), "no such file"),
        (_calib(tmp_path, [torch.rand(1, 1, 9, 8)], "shape.pt"),
         "calibration sample 0 does not match the program's inputs: small_cnn: input 'x' expects shape [1, 1, 8, 8]"),
    ]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    cases.append((str(garbage), "cannot read it with torch.load"))
    for path, message in cases:
        rc = cli.main(base + ["--calibration-data", path])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_without_data_the_warning_is_one_line(tmp_path, capsys):
    rc = cli.main(["dump", "zoo:small_cnn", "--tiny", "--pipeline", "insert-qdq{samples=2}", "--out",
                   str(tmp_path / "g.txt")])
    err = capsys.readouterr().err
    assert rc == 0
    assert "optc: warning: insert-qdq: no calibration_data given: calibrating on the example inputs and 1 random" in err


def test_compile_with_calibration_data_and_report(tmp_path, capsys):
    path = _calib(tmp_path, [torch.rand(1, 1, 8, 8) for _ in range(4)])
    out = tmp_path / "art"
    rc = cli.main(["compile", "zoo:small_cnn", "--tiny", "--backend", "onnx", "--pipeline", "default,insert-qdq",
                   "--calibration-data", path, "--quant-report", "--runs", "0", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and os.path.isfile(out / "model.onnx")
    assert "calibration=minmax on 4 samples" in text and "SQNR dB" in text


def test_quant_report_without_insert_qdq_says_so(tmp_path, capsys):
    rc = cli.main(["dump", "zoo:small_cnn", "--tiny", "--pipeline", "dce", "--quant-report", "--out",
                   str(tmp_path / "g.txt")])
    assert rc == 0 and "no quantization report: the pipeline has no insert-qdq" in capsys.readouterr().err
