"""``optc compile --precision``: fixed precisions map to pipelines; ``auto`` compiles each precision
the backend takes and keeps the fastest within the accuracy budget."""

from __future__ import annotations

import pytest
import torch

from optc.tools import zoo
from optc.tools.cli import main
from optc.tools.precision import choose, format_choice


def _small_cnn():
    torch.manual_seed(0)
    return zoo.load("small_cnn", **zoo.tiny_config("small_cnn"))


def test_auto_skips_what_the_target_refuses_and_keeps_the_budget():
    model, inputs = _small_cnn()
    calib = [(torch.randn_like(inputs[0]),) for _ in range(3)]
    compiled, report, best, tried = choose(model, inputs, {}, backend="onnx", calibration_data=calib, runs=3)
    by = {t.precision: t for t in tried}
    assert "refused for target onnx:cpu" in by["bf16"].skipped           # no bf16 kernels in ORT on CPU
    assert by["fp32"].cosine > 0.99999 and by["int8"].cosine is not None
    assert best.cosine >= 0.999 and best.ms == min(t.ms for t in tried if not t.skipped and t.cosine >= 0.999)
    assert (report.quantization is not None) == (best.precision == "int8")
    text = format_choice(tried, best, 0.999)
    assert f"chosen: {best.precision}" in text and "skipped: " in text


def test_a_budget_nothing_quantized_meets_keeps_float32():
    model, inputs = _small_cnn()
    _, report, best, tried = choose(model, inputs, {}, backend="torchscript", min_cosine=0.9999999, runs=2)
    assert best.precision == "fp32" and report.quantization is None
    assert {t.precision for t in tried} == {"fp32", "bf16", "int8"}


def test_precision_and_pipeline_are_exclusive(tmp_path, capsys):
    rc = main(["compile", "zoo:mlp", "--tiny", "--precision", "int8", "--pipeline", "dce", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "give --precision or --pipeline, not both" in capsys.readouterr().err


@pytest.mark.parametrize("precision,pass_name", [("int8", "insert-qdq"), ("fp32", "fuse-attention")])
def test_a_fixed_precision_is_its_pipeline(precision, pass_name, tmp_path, capsys):
    rc = main(["compile", "zoo:mlp", "--tiny", "--backend", "torchscript", "--precision", precision,
               "--out", str(tmp_path / "x"), "--runs", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert pass_name in out and (("insert-qdq" in out) == (precision == "int8"))
