"""``optc compare`` on quantized programs: the SQNR of every fake-quantized activation, ranked worst
first, against ONNX Runtime's ``qdq_loss_debug`` on the same model."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

import optc
from optc.ir.verifier import random_inputs_like
from optc.tools import zoo
from optc.tools.cli import main
from optc.tools.compare import compare, layer_sqnr, qdq_sqnr_db, quantized_activations

#: optc's SQNR against ORT's on the same two ONNX-exported programs: both sides compute the same
#: arithmetic (ORT with graph optimizations off: QuantizeLinear / DequantizeLinear and float convs
#: on dequantized values; optc: the reference kernels), so what is left is float32 rounding --
#: ORT's numpy norms accumulate in float32, optc's in float64, and MLAS and oneDNN sum a conv in
#: different orders, which can move a value across a rounding boundary of its quantization step.
#: Measured: at most 2e-5 dB apart on the tiny ResNet-18 (31 activations). The definitions next
#: to it are further: averaging per-sample SQNRs instead of ORT's norms over all samples moves the
#: values by up to 0.8 dB (median 0.03), taking ``x`` before its Q/DQ instead of after by up to
#: 12 dB (median 0.3; it also reorders the worst three).
SQNR_TOL_DB = 1e-2


def test_qdq_sqnr_db_is_onnxruntimes_formula():
    qld = pytest.importorskip("onnxruntime.quantization.qdq_loss_debug")
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((2, 5, 3)), rng.standard_normal((1, 7))]
    ys = [x + 0.01 * rng.standard_normal(x.shape) for x in xs]
    signal = sum(float((x ** 2).sum()) for x in xs)
    noise = sum(float(((x - y) ** 2).sum()) for x, y in zip(xs, ys))
    # ORT flattens and concatenates the samples: the norms are over all of them at once
    expected = qld.compute_signal_to_quantization_noice_ratio([x.reshape(-1) for x in xs], [y.reshape(-1) for y in ys])
    assert qdq_sqnr_db(signal, noise) == pytest.approx(expected, abs=1e-9)
    assert 34 < expected < 46            # noise ~1% of the signal's amplitude: ~40 dB (37 values)
    # no error: ORT floors the norm of the difference at numpy's float eps -- finite, not inf
    exact = qld.compute_signal_to_quantization_noice_ratio(xs[1].reshape(-1), xs[1].reshape(-1))
    assert qdq_sqnr_db(float((xs[1] ** 2).sum()), 0.0) == pytest.approx(exact, abs=1e-9)
    assert math.isfinite(exact) and exact > 300


def test_tiny_resnet_sqnr_ranking_agrees_with_onnxruntime_qdq_loss_debug(tmp_path):
    """ResNet-18 (tiny, 4 calibration samples): compare's ranking against ORT's ``qdq_loss_debug``
    run on optc's own float and QDQ ONNX exports (``optc.tools.ort_sqnr``): the same activations,
    the same worst three in the same order, every SQNR within ``SQNR_TOL_DB``."""
    pytest.importorskip("onnxruntime")
    from optc.tools.ort_sqnr import ort_layer_sqnr
    torch.manual_seed(0)
    model, inputs = zoo.load("resnet18", **zoo.tiny_config("resnet18"))
    captured = optc.capture(model, inputs)
    calib = [random_inputs_like(captured, seed=s) for s in range(1, 5)]

    result = compare(model, inputs, pipeline="default,insert-qdq", calibration_data=calib, top=3)
    assert result.sqnr_samples == 4
    ours = [(s.node, s.sqnr_db) for s in result.sqnr]
    assert [db for _, db in ours] == sorted(db for _, db in ours)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        float_program, _ = optc.optimize(captured, "default")     # what insert-qdq ran on
        quant_program, _ = optc.optimize(captured, "default,insert-qdq", calibration_data=calib)
    assert len(quantized_activations(quant_program)) == len(ours) == 31
    theirs = ort_layer_sqnr(float_program, quant_program, [captured.flatten_inputs(a, k) for a, k in calib],
                            workdir=str(tmp_path))
    assert set(theirs) == {name for name, _ in ours}
    ort_worst = sorted(theirs, key=theirs.get)[:3]
    assert [name for name, _ in ours[:3]] == ort_worst
    far = {name: (db, theirs[name]) for name, db in ours if abs(db - theirs[name]) > SQNR_TOL_DB}
    assert not far, far

    # the captured program as the float one: each fused conv (conv + BatchNorm) is matched with the
    # captured BatchNorm whose value it computes (provenance), not with the captured conv of its name
    samples = [captured.flatten_inputs(a, k) for a, k in calib]
    from_captured = {s.node: s.sqnr_db for s in layer_sqnr(captured, quant_program, samples)}
    assert from_captured.keys() == dict(ours).keys()
    assert all(abs(from_captured[name] - db) < 1e-3 for name, db in ours)
    node, op, source, db = result.sqnr[0]                      # a row reads as a tuple too
    assert (node, db) == ours[0] and result.sqnr[0][-1] == db

    # the worst three are the convs whose outputs feed a residual add (their Q shares the add's scale)
    worst = result.sqnr[0]
    assert worst.op == "aten.conv2d" and worst.layer == worst.node and worst.module.startswith("layer")
    assert 15 < worst.sqnr_db < 35
    text = result.format()
    assert "SQNR per quantized activation, worst 3 of 31 (qdq_loss_debug's definition, 4 samples):" in text
    assert f"%{worst.node} (aten.conv2d) {worst.module} at cnn.py:" in text
    # a conv's fused ReLU names the conv; the input and a residual add's ReLU name none
    relu = next(s for s in result.sqnr if s.op == "aten.relu" and s.layer)
    assert relu.layer.startswith("conv2d") and relu.layer != relu.node
    assert {s.layer for s in result.sqnr if s.node in ("x", "relu_2")} == {None}
    result.top = len(result.sqnr)
    assert f"dB  %{relu.node} (aten.relu, output of %{relu.layer}) {relu.module} at cnn.py:" in result.format()


def test_cli_json_lists_sqnr_worst_first_and_float_pipelines_none(tmp_path, capsys):
    calib = tmp_path / "calib.pt"
    torch.save([torch.rand(1, 1, 8, 8) for _ in range(3)], calib)
    out = tmp_path / "cmp.json"
    rc = main(["compare", "zoo:small_cnn", "--tiny", "--pipeline", "default,insert-qdq", "--calibration-data",
               str(calib), "--top", "2", "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    data = json.loads(out.read_text())
    rows = data["sqnr"]
    assert data["sqnr_samples"] == 3 and len(rows) >= 4
    assert [r["sqnr_db"] for r in rows] == sorted(r["sqnr_db"] for r in rows)
    assert set(rows[0]) == {"node", "op", "source", "sqnr_db", "layer", "module"}
    assert {(r["op"], r["layer"]) for r in rows if r["node"] == "x"} == {("placeholder", None)}   # the input
    assert f"SQNR per quantized activation, worst 2 of {len(rows)}" in printed
    assert f"{rows[0]['sqnr_db']:7.2f} dB  %{rows[0]['node']}" in printed

    rc = main(["compare", "zoo:small_cnn", "--tiny", "--json", str(out)])
    assert rc == 0 and "SQNR per quantized" not in capsys.readouterr().out
    assert json.loads(out.read_text())["sqnr"] == []
