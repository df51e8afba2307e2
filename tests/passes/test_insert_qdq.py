"""insert-qdq: placement goldens, numerics of a lossy pass, statistics, the per-layer report,
must-not-fire cases and bad input."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import optc
from optc.errors import InputSpecError, PassError, PipelineError
from optc.ir import quant_ops
from optc.ir.verifier import compare_outputs, random_inputs_like
from optc.passes.insert_qdq import quant_report
from optc.testing import check_pass, run_pass

Q = torch.ops.optc


# Tolerance of a lossy pass. uint8 activations carry up to half a step (1/510 of their range) of
# rounding error, int8 weights 1/254 of theirs; through the three quantized layers of these models
# that compounds to a few steps of the output's range: about 1% of the output scale. 3% leaves room
# for an output value that sits where several errors add up; a wrong scale, a dropped zero point or
# a misplaced Q is off by far more (tens of percent). The inputs checked are inside the calibrated
# range (calibration runs on the same inputs), so no error comes from saturation.
INT8_RTOL = 0.03


def calib_with_checked_inputs(model, inputs, n=8):
    """Calibration samples that include the inputs check_pass verifies on (the example and seeds
    1, 2 of random_inputs_like) plus more random ones."""
    program = optc.capture(model.eval(), inputs)
    samples = [inputs] + [random_inputs_like(program, seed=s)[0] for s in range(1, n)]
    return {"extra": {"calibration_data": samples}}


class ResBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        y = F.relu(self.conv2(h) + h)
        return self.fc(y.mean((2, 3)))


def test_resblock_golden():
    model, x = ResBlock(), torch.randn(1, 4, 6, 6)
    out = check_pass("insert-qdq", model, x, """\
graph(%x : f32[1,4,6,6]):
  %x_q : u8[1,4,6,6] = optc.quantize_per_tensor(%x, 0.024482445791363716, 136, 0, 255, u8)
  %x_dq : f32[1,4,6,6] = optc.dequantize_per_tensor(%x_q, 0.024482445791363716, 136, 0, 255, u8)
  %conv1_weight_q : i8[8,4,3,3] = get_attr conv1_weight_q
  %conv1_weight_scale : f32[8] = get_attr conv1_weight_scale
  %conv1_weight_zero_point : i8[8] = get_attr conv1_weight_zero_point
  %conv1_weight_dq : f32[8,4,3,3] = optc.dequantize_per_channel(%conv1_weight_q, %conv1_weight_scale, %conv1_weight_zero_point, 0, -127, 127, i8)
  %conv1_bias_q : i32[8] = get_attr conv1_bias_q
  %conv1_bias_scale : f32[8] = get_attr conv1_bias_scale
  %conv1_bias_zero_point : i32[8] = get_attr conv1_bias_zero_point
  %conv1_bias_dq : f32[8] = optc.dequantize_per_channel(%conv1_bias_q, %conv1_bias_scale, %conv1_bias_zero_point, 0, -2147483648, 2147483647, i32)
  %conv2d : f32[1,8,6,6] = aten.conv2d(%x_dq, %conv1_weight_dq, %conv1_bias_dq, [1, 1], [1, 1])
  %relu : f32[1,8,6,6] = aten.relu(%conv2d)
  %relu_q : u8[1,8,6,6] = optc.quantize_per_tensor(%relu, 0.0071227336302399635, 0, 0, 255, u8)
  %relu_dq : f32[1,8,6,6] = optc.dequantize_per_tensor(%relu_q, 0.0071227336302399635, 0, 0, 255, u8)
  %conv2_weight_q : i8[8,8,3,3] = get_attr conv2_weight_q
  %conv2_weight_scale : f32[8] = get_attr conv2_weight_scale
  %conv2_weight_zero_point : i8[8] = get_attr conv2_weight_zero_point
  %conv2_weight_dq : f32[8,8,3,3] = optc.dequantize_per_channel(%conv2_weight_q, %conv2_weight_scale, %conv2_weight_zero_point, 0, -127, 127, i8)
  %conv2_bias_q : i32[8] = get_attr conv2_bias_q
  %conv2_bias_scale : f32[8] = get_attr conv2_bias_scale
  %conv2_bias_zero_point : i32[8] = get_attr conv2_bias_zero_point
  %conv2_bias_dq : f32[8] = optc.dequantize_per_channel(%conv2_bias_q, %conv2_bias_scale, %conv2_bias_zero_point, 0, -2147483648, 2147483647, i32)
  %conv2d_1 : f32[1,8,6,6] = aten.conv2d(%relu_dq, %conv2_weight_dq, %conv2_bias_dq, [1, 1], [1, 1])
  %conv2d_1_q : u8[1,8,6,6] = optc.quantize_per_tensor(%conv2d_1, 0.0071227336302399635, 96, 0, 255, u8)
  %conv2d_1_dq : f32[1,8,6,6] = optc.dequantize_per_tensor(%conv2d_1_q, 0.0071227336302399635, 96, 0, 255, u8)
  %add : f32[1,8,6,6] = aten.add.Tensor(%conv2d_1_dq, %relu_dq)
  %relu_1 : f32[1,8,6,6] = aten.relu(%add)
  %relu_1_q : u8[1,8,6,6] = optc.quantize_per_tensor(%relu_1, 0.007855026051402092, 0, 0, 255, u8)
  %relu_1_dq : f32[1,8,6,6] = optc.dequantize_per_tensor(%relu_1_q, 0.007855026051402092, 0, 0, 255, u8)
  %mean : f32[1,8] = aten.mean.dim(%relu_1_dq, [2, 3])
  %mean_q : u8[1,8] = optc.quantize_per_tensor(%mean, 0.00204109912738204, 0, 0, 255, u8)
  %mean_dq : f32[1,8] = optc.dequantize_per_tensor(%mean_q, 0.00204109912738204, 0, 0, 255, u8)
  %fc_weight_q : i8[3,8] = get_attr fc_weight_q
  %fc_weight_scale : f32[3] = get_attr fc_weight_scale
  %fc_weight_zero_point : i8[3] = get_attr fc_weight_zero_point
  %fc_weight_dq : f32[3,8] = optc.dequantize_per_channel(%fc_weight_q, %fc_weight_scale, %fc_weight_zero_point, 0, -127, 127, i8)
  %fc_bias_q : i32[3] = get_attr fc_bias_q
  %fc_bias_scale : f32[3] = get_attr fc_bias_scale
  %fc_bias_zero_point : i32[3] = get_attr fc_bias_zero_point
  %fc_bias_dq : f32[3] = optc.dequantize_per_channel(%fc_bias_q, %fc_bias_scale, %fc_bias_zero_point, 0, -2147483648, 2147483647, i32)
  %linear : f32[1,3] = aten.linear(%mean_dq, %fc_weight_dq, %fc_bias_dq)
  return (%linear)
""", modified=True, rtol=INT8_RTOL, pm_options=calib_with_checked_inputs(model, (x,)), golden_digits=6,
        stats={"insert-qdq": {"layers": 3, "qdq": 5, "integer_adds": 1, "calibration": "minmax", "samples": 8}})
    rec = out.report.record("insert-qdq")
    assert not rec.exact and 0 < rec.error.max_rel_error < INT8_RTOL and rec.error.cosine > 0.999


def test_residual_add_inputs_share_one_scale_and_keep_their_zero_points():
    model, x = ResBlock(), torch.randn(1, 4, 6, 6)
    out = run_pass("insert-qdq", model, (x,), **calib_with_checked_inputs(model, (x,)))
    nodes = {n.name: n for n in out.program.graph.nodes}
    add = nodes["add"]
    a, b = (n.args[0] for n in add.args)          # the Q nodes behind both DQ inputs
    (sa, za), (sb, zb) = a.args[1:3], b.args[1:3]
    assert sa == sb                                # one scale: an integer add needs no rescale
    assert zb == 0 and za > 0                      # the ReLU output keeps zero point 0; the conv output does not


def test_report_has_scale_zero_point_and_sqnr_per_layer():
    model, x = ResBlock(), torch.randn(1, 4, 6, 6)
    out = run_pass("insert-qdq{report_samples=4}", model, (x,), **calib_with_checked_inputs(model, (x,)))
    rep = quant_report(out.program)
    assert [la.module for la in rep.layers] == ["conv1", "conv2", "fc"]
    q_of = {n.args[0].name: n for n in out.program.graph.nodes if n.target is Q.quantize_per_tensor.default}
    assert rep.layers[0].input_scale == q_of["x"].args[1] and rep.layers[0].input_zero_point == q_of["x"].args[2]
    for la in rep.layers:
        assert la.kind in ("conv", "linear")
        assert 20 < la.sqnr_db < 80 and 20 < la.input_sqnr_db and 30 < la.weight_sqnr_db < 60
        assert la.weight_scale_min <= la.weight_scale_max
    assert rep.layers[0].sqnr_db >= rep.layers[-1].sqnr_db - 10      # error accumulates, never by much here
    assert rep.worst(1)[0].sqnr_db == min(la.sqnr_db for la in rep.layers)
    text = rep.format()
    assert "calibration=minmax on 8 samples, 3 quantized layers" in text and "conv2" in text
    assert math.isfinite(rep.output_sqnr_db) and 20 < rep.output_sqnr_db
    stats = out.report.stats("insert-qdq")
    assert stats["worst_layer"] == rep.worst(1)[0].node and stats["min_sqnr_db"] == round(rep.worst(1)[0].sqnr_db, 2)


def test_sqnr_matches_a_hand_computation():
    ref = torch.tensor([3.0, 4.0])
    got = torch.tensor([3.0, 4.5])        # signal 25, noise 0.25 -> 10 log10(100) = 20 dB
    from optc.passes.insert_qdq import sqnr_db
    assert sqnr_db(ref, got) == pytest.approx(20.0)
    assert sqnr_db(ref, ref) == math.inf


class FloatOps(nn.Module):
    """Layer norm, GELU, softmax: no integer kernel, they must read floats."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x):
        h = self.fc2(F.gelu(self.fc1(self.ln(x))))
        return torch.softmax(h + x, -1)


def test_ops_without_integer_kernels_stay_float_golden():
    model, x = FloatOps(), torch.randn(2, 5, 8)
    check_pass("insert-qdq", model, x, """\
graph(%x : f32[2,5,8]):
  %ln_weight : f32[8] = get_attr ln.weight
  %ln_bias : f32[8] = get_attr ln.bias
  %layer_norm : f32[2,5,8] = aten.layer_norm(%x, [8], %ln_weight, %ln_bias, 1e-05, False)
  %layer_norm_q : u8[2,5,8] = optc.quantize_per_tensor(%layer_norm, 0.01854652166366577, 127, 0, 255, u8)
  %layer_norm_dq : f32[2,5,8] = optc.dequantize_per_tensor(%layer_norm_q, 0.01854652166366577, 127, 0, 255, u8)
  %fc1_weight_q : i8[16,8] = get_attr fc1_weight_q
  %fc1_weight_scale : f32[16] = get_attr fc1_weight_scale
  %fc1_weight_zero_point : i8[16] = get_attr fc1_weight_zero_point
  %fc1_weight_dq : f32[16,8] = optc.dequantize_per_channel(%fc1_weight_q, %fc1_weight_scale, %fc1_weight_zero_point, 0, -127, 127, i8)
  %fc1_bias_q : i32[16] = get_attr fc1_bias_q
  %fc1_bias_scale : f32[16] = get_attr fc1_bias_scale
  %fc1_bias_zero_point : i32[16] = get_attr fc1_bias_zero_point
  %fc1_bias_dq : f32[16] = optc.dequantize_per_channel(%fc1_bias_q, %fc1_bias_scale, %fc1_bias_zero_point, 0, -2147483648, 2147483647, i32)
  %linear : f32[2,5,16] = aten.linear(%layer_norm_dq, %fc1_weight_dq, %fc1_bias_dq)
  %gelu : f32[2,5,16] = aten.gelu(%linear)
  %gelu_q : u8[2,5,16] = optc.quantize_per_tensor(%gelu, 0.007634176407009363, 22, 0, 255, u8)
  %gelu_dq : f32[2,5,16] = optc.dequantize_per_tensor(%gelu_q, 0.007634176407009363, 22, 0, 255, u8)
  %fc2_weight_q : i8[8,16] = get_attr fc2_weight_q
  %fc2_weight_scale : f32[8] = get_attr fc2_weight_scale
  %fc2_weight_zero_point : i8[8] = get_attr fc2_weight_zero_point
  %fc2_weight_dq : f32[8,16] = optc.dequantize_per_channel(%fc2_weight_q, %fc2_weight_scale, %fc2_weight_zero_point, 0, -127, 127, i8)
  %fc2_bias_q : i32[8] = get_attr fc2_bias_q
  %fc2_bias_scale : f32[8] = get_attr fc2_bias_scale
  %fc2_bias_zero_point : i32[8] = get_attr fc2_bias_zero_point
  %fc2_bias_dq : f32[8] = optc.dequantize_per_channel(%fc2_bias_q, %fc2_bias_scale, %fc2_bias_zero_point, 0, -2147483648, 2147483647, i32)
  %linear_1 : f32[2,5,8] = aten.linear(%gelu_dq, %fc2_weight_dq, %fc2_bias_dq)
  %add : f32[2,5,8] = aten.add.Tensor(%linear_1, %x)
  %softmax : f32[2,5,8] = aten.softmax.int(%add, -1)
  return (%softmax)
""", modified=True, rtol=INT8_RTOL, pm_options=calib_with_checked_inputs(model, (x,)), golden_digits=6,
        stats={"insert-qdq": {"layers": 2, "qdq": 2, "integer_adds": 0}})


class CatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c(torch.cat([F.relu(self.a(x)), self.b(x)], 1))


def test_cat_inputs_and_output_share_scale_and_zero_point():
    model, x = CatNet(), torch.randn(1, 3, 5, 5)
    out = check_pass("insert-qdq", model, x, """\
graph(%x : f32[1,3,5,5]):
  %x_q : u8[1,3,5,5] = optc.quantize_per_tensor(%x, 0.022533463314175606, 132, 0, 255, u8)
  %x_dq : f32[1,3,5,5] = optc.dequantize_per_tensor(%x_q, 0.022533463314175606, 132, 0, 255, u8)
  %a_weight_q : i8[4,3,1,1] = get_attr a_weight_q
  %a_weight_scale : f32[4] = get_attr a_weight_scale
  %a_weight_zero_point : i8[4] = get_attr a_weight_zero_point
  %a_weight_dq : f32[4,3,1,1] = optc.dequantize_per_channel(%a_weight_q, %a_weight_scale, %a_weight_zero_point, 0, -127, 127, i8)
  %a_bias_q : i32[4] = get_attr a_bias_q
  %a_bias_scale : f32[4] = get_attr a_bias_scale
  %a_bias_zero_point : i32[4] = get_attr a_bias_zero_point
  %a_bias_dq : f32[4] = optc.dequantize_per_channel(%a_bias_q, %a_bias_scale, %a_bias_zero_point, 0, -2147483648, 2147483647, i32)
  %conv2d : f32[1,4,5,5] = aten.conv2d(%x_dq, %a_weight_dq, %a_bias_dq)
  %relu : f32[1,4,5,5] = aten.relu(%conv2d)
  %relu_q : u8[1,4,5,5] = optc.quantize_per_tensor(%relu, 0.016691481694579124, 136, 0, 255, u8)
  %relu_dq : f32[1,4,5,5] = optc.dequantize_per_tensor(%relu_q, 0.016691481694579124, 136, 0, 255, u8)
  %b_weight_q : i8[4,3,3,3] = get_attr b_weight_q
  %b_weight_scale : f32[4] = get_attr b_weight_scale
  %b_weight_zero_point : i8[4] = get_attr b_weight_zero_point
  %b_weight_dq : f32[4,3,3,3] = optc.dequantize_per_channel(%b_weight_q, %b_weight_scale, %b_weight_zero_point, 0, -127, 127, i8)
  %b_bias_q : i32[4] = get_attr b_bias_q
  %b_bias_scale : f32[4] = get_attr b_bias_scale
  %b_bias_zero_point : i32[4] = get_attr b_bias_zero_point
  %b_bias_dq : f32[4] = optc.dequantize_per_channel(%b_bias_q, %b_bias_scale, %b_bias_zero_point, 0, -2147483648, 2147483647, i32)
  %conv2d_1 : f32[1,4,5,5] = aten.conv2d(%x_dq, %b_weight_dq, %b_bias_dq, [1, 1], [1, 1])
  %conv2d_1_q : u8[1,4,5,5] = optc.quantize_per_tensor(%conv2d_1, 0.016691481694579124, 136, 0, 255, u8)
  %conv2d_1_dq : f32[1,4,5,5] = optc.dequantize_per_tensor(%conv2d_1_q, 0.016691481694579124, 136, 0, 255, u8)
  %cat : f32[1,8,5,5] = aten.cat([%relu_dq, %conv2d_1_dq], 1)
  %cat_q : u8[1,8,5,5] = optc.quantize_per_tensor(%cat, 0.016691481694579124, 136, 0, 255, u8)
  %cat_dq : f32[1,8,5,5] = optc.dequantize_per_tensor(%cat_q, 0.016691481694579124, 136, 0, 255, u8)
  %c_weight_q : i8[2,8,1,1] = get_attr c_weight_q
  %c_weight_scale : f32[2] = get_attr c_weight_scale
  %c_weight_zero_point : i8[2] = get_attr c_weight_zero_point
  %c_weight_dq : f32[2,8,1,1] = optc.dequantize_per_channel(%c_weight_q, %c_weight_scale, %c_weight_zero_point, 0, -127, 127, i8)
  %c_bias_q : i32[2] = get_attr c_bias_q
  %c_bias_scale : f32[2] = get_attr c_bias_scale
  %c_bias_zero_point : i32[2] = get_attr c_bias_zero_point
  %c_bias_dq : f32[2] = optc.dequantize_per_channel(%c_bias_q, %c_bias_scale, %c_bias_zero_point, 0, -2147483648, 2147483647, i32)
  %conv2d_2 : f32[1,2,5,5] = aten.conv2d(%cat_dq, %c_weight_dq, %c_bias_dq)
  %conv2d_2_q : u8[1,2,5,5] = optc.quantize_per_tensor(%conv2d_2, 0.007647772319614887, 154, 0, 255, u8)
  %conv2d_2_dq : f32[1,2,5,5] = optc.dequantize_per_tensor(%conv2d_2_q, 0.007647772319614887, 154, 0, 255, u8)
  return (%conv2d_2_dq)
""", modified=True, rtol=INT8_RTOL, pm_options=calib_with_checked_inputs(model, (x,)), golden_digits=6,
        stats={"insert-qdq": {"layers": 3, "qdq": 5, "integer_adds": 1}})
    q_of = {n.args[0].name: n for n in out.program.graph.nodes if n.target is Q.quantize_per_tensor.default}
    assert set(q_of) == {"x", "relu", "conv2d_1", "cat", "conv2d_2"}   # conv c's output too: QLinearConv
    assert len({q_of[v].args[1:] for v in ("relu", "conv2d_1", "cat")}) == 1   # one (scale, zero point)
    assert q_of["x"].args[1:] != q_of["cat"].args[1:]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def test_dynamic_scheme_golden():
    # dynamic: scale and zero point from each input's own range, so no calibration and no
    # saturation: the only error is rounding (half a step of each input's range)
    check_pass("insert-qdq{scheme=dynamic}", MLP(), torch.randn(3, 6), """\
graph(%x : f32[3,6]):
  %fc1_bias : f32[8] = get_attr fc1.bias
  %fc2_bias : f32[4] = get_attr fc2.bias
  %fc1_weight_q : i8[8,6] = get_attr fc1_weight_q
  %fc1_weight_scale : f32[8] = get_attr fc1_weight_scale
  %linear_dynamic : f32[3,8] = optc.linear_dynamic(%x, %fc1_weight_q, %fc1_weight_scale, %fc1_bias)
  %relu : f32[3,8] = aten.relu(%linear_dynamic)
  %fc2_weight_q : i8[4,8] = get_attr fc2_weight_q
  %fc2_weight_scale : f32[4] = get_attr fc2_weight_scale
  %linear_1_dynamic : f32[3,4] = optc.linear_dynamic(%relu, %fc2_weight_q, %fc2_weight_scale, %fc2_bias)
  return (%linear_1_dynamic)
""", modified=True, rtol=INT8_RTOL, stats={"insert-qdq": {"layers": 2, "dynamic": 2}})


def test_per_tensor_weights_and_symmetric_activations():
    model, x = MLP(), torch.randn(3, 6)
    out = run_pass("insert-qdq{per_channel=false,symmetric=true}", model, (x,), **calib_with_checked_inputs(model, (x,)))
    g = out.program.graph
    assert not any(n.target is Q.dequantize_per_channel.default and n.args[-1] == torch.int8 for n in g.nodes)
    w = [n for n in g.nodes if n.target is Q.dequantize_per_tensor.default and n.args[-1] == torch.int8]
    assert len(w) == 2 and all(n.args[2:5] == (0, -127, 127) for n in w)
    acts = [n for n in g.nodes if n.target is Q.quantize_per_tensor.default]
    assert acts and all(n.args[2] == 128 for n in acts)      # symmetric uint8: zero point 128
    with torch.no_grad():
        rep = compare_outputs(model.eval()(x), out.program(x))
    assert rep.max_rel_error < INT8_RTOL


@pytest.mark.parametrize("method,max_rel", [
    ("minmax", INT8_RTOL),
    # percentile (99.99) clips a few of these few thousand values: at most a little saturation
    ("percentile", 2 * INT8_RTOL),
    # entropy minimises the KL divergence of the histogram, not the error of the largest values:
    # on this little data it clips the top of the range, which costs the worst output element
    # about 0.1 of the output scale while the cosine barely moves
    ("entropy", 0.15),
])
def test_calibration_methods_run_and_stay_accurate(method, max_rel):
    model, x = ResBlock(), torch.randn(1, 4, 6, 6)
    opts = calib_with_checked_inputs(model, (x,), n=16)
    out = run_pass(f"insert-qdq{{calibration={method}}}", model, (x,), **opts)
    assert out.report.stats("insert-qdq")["calibration"] == method
    args, _ = random_inputs_like(out.program, seed=1)
    with torch.no_grad():
        rep = compare_outputs(model.eval()(*args), out.program(*args))
    assert rep.cosine > 0.995 and rep.max_rel_error < max_rel


def test_fresh_inputs_outside_the_calibration_data():
    # numerics on inputs the calibration never saw: values past the calibrated range saturate,
    # so the bound is a cosine, not the in-range step bound
    model, x = ResBlock(), torch.randn(1, 4, 6, 6)
    out = run_pass("insert-qdq", model, (x,), **calib_with_checked_inputs(model, (x,), n=16))
    for seed in (50, 51, 52):
        args, _ = random_inputs_like(out.program, seed=seed)
        with torch.no_grad():
            rep = compare_outputs(model.eval()(*args), out.program(*args))
        assert rep.cosine > 0.995, rep


def test_no_calibration_data_warns_and_uses_random_inputs():
    with pytest.warns(UserWarning, match="no calibration_data given: calibrating on the example inputs and 3 random"):
        out = run_pass("insert-qdq{samples=4}", MLP(), (torch.randn(3, 6),))
    assert out.report.stats("insert-qdq")["samples"] == 4


# ---- must not fire -------------------------------------------------------------------------------
def test_excluded_layers_stay_float():
    model, x = ResBlock(), torch.randn(1, 4, 6, 6)
    out = run_pass("insert-qdq{exclude=fc|conv2}", model, (x,), **calib_with_checked_inputs(model, (x,)))
    assert out.report.stats("insert-qdq")["layers"] == 1
    assert ("site", "linear", "excluded by 'fc'") in out.rejections("insert-qdq")
    assert ("site", "conv2d_1", "excluded by 'conv2'") in out.rejections("insert-qdq")
    linear = next(n for n in out.program.graph.nodes if n.name == "linear")
    assert linear.args[1].op == "get_attr" and linear.args[1].target == "fc.weight"      # float weight kept
    assert linear.args[0].target is torch.ops.aten.mean.dim                             # float input kept


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2)

    def forward(self, x, w):
        return self.up(x) + F.conv2d(x, w).sum()


def test_no_integer_kernel_targeted_is_refused_with_reasons():
    out = run_pass("insert-qdq", Transposed(), (torch.randn(1, 4, 3, 3), torch.randn(2, 4, 1, 1)))
    rec = out.report.record("insert-qdq")
    assert not rec.modified and rec.stats["layers"] == 0
    reasons = {r[2] for r in out.rejections("insert-qdq")}
    assert "transposed or generic convolution: no integer kernel is targeted" in reasons
    assert any("weight %w is not a float32 constant" in r for r in reasons)


class Float64Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.fc64 = nn.Linear(4, 4).double()

    def forward(self, x):
        return self.fc64(self.fc(x).double())


def test_non_float32_layers_are_refused_and_the_float32_ones_quantized():
    model, x = Float64Net(), torch.randn(2, 4)
    out = run_pass("insert-qdq", model, (x,), **calib_with_checked_inputs(model, (x,)))
    assert out.report.stats("insert-qdq")["layers"] == 1
    assert ("site", "linear_1", "linear computes in torch.float64, not float32") in out.rejections("insert-qdq")


# ---- bad input -----------------------------------------------------------------------------------
class NoLayers(nn.Module):
    def forward(self, x):
        return torch.softmax(x.relu() * 2, -1)


def test_model_with_no_quantizable_op_is_a_clear_error():
    with pytest.raises(PassError, match="the model has no quantizable op \\(conv, linear or matmul\\)"):
        run_pass("insert-qdq", NoLayers(), (torch.randn(3, 4),))


def test_unsupported_dtype_is_a_clear_error():
    model = nn.Linear(4, 2).double()
    with pytest.raises(PassError, match="unsupported dtype float64: quantization starts from a float32 model"):
        run_pass("insert-qdq", model, (torch.randn(3, 4, dtype=torch.float64),))
    with pytest.raises(PipelineError, match="activation_dtype='int4' is not a valid choice"):
        run_pass("insert-qdq{activation_dtype=int4}", MLP(), (torch.randn(3, 6),))


@pytest.mark.parametrize("data,match", [
    ([torch.randn(3, 7)], r"calibration sample 0 does not match the program's inputs: .*expects shape \[3, 6\], got \[3, 7\]"),
    ([torch.randn(3, 6), torch.randn(3, 6).double()], r"calibration sample 1 .*expects dtype torch.float32"),
    ([(torch.randn(3, 6), torch.randn(3, 6))], r"calibration sample 0 does not match"),
    (torch.randn(10, 3, 6), r"calibration_data is a single tensor \[10, 3, 6\]; pass an iterable of samples"),
    ([], r"calibration_data is empty"),
    (42, r"calibration_data must be an iterable of samples, got int"),
    (["text"], r"a calibration sample must be a tensor, a tuple/list"),
])
def test_bad_calibration_data_is_a_clear_error(data, match):
    with pytest.raises(PassError, match=match) as info:
        run_pass("insert-qdq", MLP(), (torch.randn(3, 6),), extra={"calibration_data": data})
    assert isinstance(info.value.__cause__, InputSpecError)


def test_optimize_checks_calibration_data_before_running_the_pipeline():
    program = optc.capture(MLP().eval(), (torch.randn(3, 6),))
    with pytest.raises(InputSpecError, match=r"calibration sample 0 .*expects shape \[3, 6\], got \[2, 6\]"):
        optc.optimize(program, "canonicalize,insert-qdq", calibration_data=[torch.randn(2, 6)])


def test_the_users_model_and_program_are_untouched():
    model, x = ResBlock(), torch.randn(1, 4, 6, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    program = optc.capture(model.eval(), (x,))
    text = str(program)
    optc.optimize(program, "insert-qdq", calibration_data=[x])
    assert str(program) == text
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_quantized_weights_are_exact_int8_of_the_float_weights():
    model, x = MLP(), torch.randn(3, 6)
    out = run_pass("insert-qdq", model, (x,), **calib_with_checked_inputs(model, (x,)))
    gm = out.program.graph_module
    w_q, scales = gm.fc1_weight_q, gm.fc1_weight_scale
    assert w_q.dtype == torch.int8 and int(w_q.abs().max()) == 127 and int(w_q.min()) >= -127
    torch.testing.assert_close(scales, model.fc1.weight.detach().abs().amax(1) / 127)
    assert float((w_q.float() * scales[:, None] - model.fc1.weight.detach()).abs().max()) <= float(scales.max()) / 2 + 1e-7
    b_q = gm.fc1_bias_q
    x_scale = next(n for n in out.program.graph.nodes if n.name == "x_q").args[1]
    assert b_q.dtype == torch.int32
    torch.testing.assert_close(gm.fc1_bias_scale, scales * x_scale)
    assert float((b_q.double() * gm.fc1_bias_scale.double() - model.fc1.bias.detach().double()).abs().max()) \
        <= float(gm.fc1_bias_scale.max()) / 2 + 1e-9


def test_quant_helpers():
    assert quant_ops.qrange(torch.int8, symmetric=True) == (-127, 127)
    assert quant_ops.qrange(torch.uint8) == (0, 255)


def test_a_later_default_pipeline_keeps_the_int8_weights():
    # constant-fold must not fold dequantize(int8 weight) into a float weight: ONNX Runtime would
    # then quantize that float weight again its own way (per tensor), not with insert-qdq's scales
    model, x = ResBlock(), torch.randn(1, 4, 6, 6)
    out = run_pass("insert-qdq", model, (x,), **calib_with_checked_inputs(model, (x,)))
    again, report = optc.optimize(out.program, "default")
    convs = [n for n in again.graph.nodes if n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)]
    assert len(convs) == 3
    for n in convs:
        assert n.args[1].target is Q.dequantize_per_channel.default and n.args[1].args[0].meta["val"].dtype == torch.int8
    assert report.stats("constant-fold")["folded"] == 0


def test_nhwc_convolutions_are_sites_too():
    # what tvm:cpu's default pipeline gives: convert-layout first, then insert-qdq sees optc.conv2d_nhwc
    model, x = CatNet(), torch.randn(1, 3, 5, 5)
    opts = calib_with_checked_inputs(model, (x,))
    nchw = run_pass("insert-qdq", model, (x,), **opts)
    nhwc = run_pass("convert-layout{layout=NHWC},insert-qdq", model, (x,), **opts)
    assert nhwc.report.stats("insert-qdq")["layers"] == nchw.report.stats("insert-qdq")["layers"] == 3
    convs = [n for n in nhwc.program.graph.nodes if n.target is torch.ops.optc.conv2d_nhwc.default]
    assert len(convs) == 3 and all(c.args[1].target is Q.dequantize_per_channel.default for c in convs)
    with torch.no_grad():
        # the same integers: only the convs' float summation order differs
        assert compare_outputs(nchw.program(x), nhwc.program(x)).max_rel_error < 1e-5
