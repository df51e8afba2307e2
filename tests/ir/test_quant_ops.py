"""optc:: quantize / dequantize: reference kernels against hand calculations, fake kernels,
decompositions, bad arguments, and the ops surviving capture."""

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

import optc
from optc.ir import ops
from optc.ir import quant_ops
from optc.ir.printer import format_text

Q = torch.ops.optc


def test_quantize_per_tensor_rounds_half_to_even_and_saturates():
    # x / 0.5 = [-2, 0, 0.5, 1, 1.5, 2.5, 3, -0.5, 200, -200, 2000]
    x = torch.tensor([-1.0, 0.0, 0.25, 0.5, 0.75, 1.25, 1.5, -0.25, 100.0, -100.0, 1000.0])
    q = Q.quantize_per_tensor(x, 0.5, 10, 0, 255, torch.uint8)
    # round half even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -0.5 -> -0; then + 10, saturate to [0, 255]
    assert q.dtype == torch.uint8
    assert q.tolist() == [8, 10, 10, 11, 12, 12, 13, 10, 210, 0, 255]


def test_dequantize_per_tensor_hand_calculation():
    q = torch.tensor([0, 10, 11, 255], dtype=torch.uint8)
    x = Q.dequantize_per_tensor(q, 0.5, 10, 0, 255, torch.uint8)
    assert x.dtype == torch.float32
    assert x.tolist() == [-5.0, 0.0, 0.5, 122.5]


def test_int8_narrow_range_saturates_to_quant_min_and_max():
    x = torch.tensor([-10.0, -1.0, 1.0, 10.0])
    q = Q.quantize_per_tensor(x, 0.01, 0, -127, 127, torch.int8)
    assert q.tolist() == [-127, -100, 100, 127]          # -128 is never produced in [-127, 127]


def test_per_channel_along_axis_1():
    x = torch.tensor([[1.4, 1.0, -0.3], [-200.0, 0.25, 40.0]])
    scales = torch.tensor([1.0, 0.5, 0.25])
    zps = torch.tensor([0, 1, -1], dtype=torch.int8)
    q = Q.quantize_per_channel(x, scales, zps, 1, -128, 127, torch.int8)
    # col 0: 1.4 -> 1, -200 -> -128 (saturated); col 1: 2 + 1 = 3, 0.5 -> 0 (half even) + 1 = 1;
    # col 2: -1.2 -> -1, -1 = -2; 160 - 1 = 159 -> 127 (saturated)
    assert q.tolist() == [[1, 3, -2], [-128, 1, 127]]
    back = Q.dequantize_per_channel(q, scales, zps, 1, -128, 127, torch.int8)
    assert back.tolist() == [[1.0, 1.0, -0.25], [-128.0, 0.0, 32.0]]
    # a negative axis names the same dim
    assert torch.equal(Q.quantize_per_channel(x, scales, zps, -1, -128, 127, torch.int8), q)


def test_int32_bias_dequantizes_with_scale_s_x_times_s_w():
    qb = torch.tensor([1000, -3, 2 ** 31 - 1], dtype=torch.int32)
    scales = torch.tensor([1e-3, 0.5, 2.0 ** -20])
    b = Q.dequantize_per_channel(qb, scales, torch.zeros(3, dtype=torch.int32), 0, -(2 ** 31), 2 ** 31 - 1,
                                 torch.int32)
    assert b.tolist() == pytest.approx([1.0, -1.5, (2 ** 31 - 1) * 2.0 ** -20], rel=1e-6)


def test_dynamic_quantize_dequantize_uses_the_input_range():
    # range [-1, 2] -> scale 3/255, zero point 85; -1, 0 and 2 are exact, 0.31 is 26.35 steps -> 26
    x = torch.tensor([-1.0, 0.0, 0.31, 2.0])
    y = Q.quantize_dequantize_dynamic(x, torch.uint8)
    scale = 3.0 / 255
    expected = torch.tensor([-85 * scale, 0.0, 26 * scale, 170 * scale])
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    # all-positive input: the range still includes 0, so the zero point is 0
    y = Q.quantize_dequantize_dynamic(torch.tensor([0.6, 1.0]), torch.uint8)
    torch.testing.assert_close(y, torch.tensor([153 / 255, 1.0]), rtol=0, atol=1e-6)


def test_linear_dynamic_hand_calculation():
    # x's range [-1, 2]: scale 3/255, zero point 85, so -1, 0 and 2 quantize exactly
    x = torch.tensor([[-1.0, 0.0, 2.0]])
    w = torch.tensor([[1, 2, 3], [-127, 0, 127]], dtype=torch.int8)
    scales = torch.tensor([0.5, 0.01])              # W = [[0.5, 1, 1.5], [-1.27, 0, 1.27]]
    y = Q.linear_dynamic(x, w, scales, torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(y, torch.tensor([[-0.5 + 3.0 + 1.0, 1.27 + 2.54 - 1.0]]), rtol=0, atol=1e-5)
    assert Q.linear_dynamic(torch.randn(2, 4, 3), w, scales, None).shape == (2, 4, 2)
    with pytest.raises(ValueError, match="weight must be a 2-d int8 tensor"):
        Q.linear_dynamic(x, w.float(), scales, None)
    with pytest.raises(ValueError, match="must be floating point with 3 features"):
        Q.linear_dynamic(torch.randn(1, 4), w, scales, None)
    with pytest.raises(ValueError, match="scales must be 2 positive float32 values"):
        Q.linear_dynamic(x, w, torch.tensor([0.5, 0.0]), None)


def test_round_trip_error_is_at_most_half_a_step_inside_the_range():
    x = torch.empty(10000).uniform_(-3, 5)
    scale, zp = quant_ops.choose_qparams(-3.0, 5.0, torch.uint8, symmetric=False)
    q = Q.quantize_per_tensor(x, scale, zp, 0, 255, torch.uint8)
    err = (Q.dequantize_per_tensor(q, scale, zp, 0, 255, torch.uint8) - x).abs().max()
    assert float(err) <= scale / 2 * (1 + 1e-5)


def test_choose_qparams_hand_calculation():
    # [-1, 3] over 255 steps: scale 4/255, zero point round(0 - (-1) / scale) = round(63.75) = 64
    scale, zp = quant_ops.choose_qparams(-1.0, 3.0, torch.uint8, symmetric=False)
    assert scale == pytest.approx(4 / 255) and zp == 64
    # non-negative ranges are widened to include 0: zero point 0 (ReLU outputs keep 0 exact)
    assert quant_ops.choose_qparams(0.5, 2.55, torch.uint8, symmetric=False) == (pytest.approx(0.01), 0)
    # symmetric int8: [-127, 127] steps, zero point 0; symmetric uint8: zero point 128
    assert quant_ops.choose_qparams(-2.0, 1.0, torch.int8, symmetric=True) == (pytest.approx(2 / 127), 0)
    assert quant_ops.choose_qparams(-2.0, 1.0, torch.uint8, symmetric=True)[1] == 128
    # an empty range does not divide by zero
    assert quant_ops.choose_qparams(0.0, 0.0, torch.uint8, symmetric=False) == (1.0, 0)


def test_decompositions_equal_the_reference_kernels_bit_for_bit():
    x = torch.randn(2, 4, 3, 3) * 3
    s, z = 0.037, 121
    ref = Q.quantize_per_tensor(x, s, z, 0, 255, torch.uint8)
    assert torch.equal(ops.OPS["quantize_per_tensor"].decomposition(x, s, z, 0, 255, torch.uint8), ref)
    assert torch.equal(ops.OPS["dequantize_per_tensor"].decomposition(ref, s, z, 0, 255, torch.uint8),
                       Q.dequantize_per_tensor(ref, s, z, 0, 255, torch.uint8))
    scales, zps = torch.rand(4) * 0.05 + 0.01, torch.zeros(4, dtype=torch.int8)
    qc = Q.quantize_per_channel(x, scales, zps, 1, -127, 127, torch.int8)
    assert torch.equal(ops.OPS["quantize_per_channel"].decomposition(x, scales, zps, 1, -127, 127, torch.int8), qc)
    assert torch.equal(ops.OPS["dequantize_per_channel"].decomposition(qc, scales, zps, 1, -127, 127, torch.int8),
                       Q.dequantize_per_channel(qc, scales, zps, 1, -127, 127, torch.int8))
    assert torch.equal(ops.OPS["quantize_dequantize_dynamic"].decomposition(x, torch.uint8),
                       Q.quantize_dequantize_dynamic(x, torch.uint8))
    w, ws, b = torch.randint(-127, 128, (5, 3), dtype=torch.int8), torch.rand(5) + 0.01, torch.randn(5)
    assert torch.equal(ops.OPS["linear_dynamic"].decomposition(x, w, ws, b),
                       Q.linear_dynamic(x, w, ws, b))


def test_fake_kernels_give_shape_and_dtype():
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(2, 3))
        q = Q.quantize_per_tensor(x, 0.1, 0, -128, 127, torch.int8)
        assert q.shape == (2, 3) and q.dtype == torch.int8
        assert Q.dequantize_per_tensor(q, 0.1, 0, -128, 127, torch.int8).dtype == torch.float32
        qc = Q.quantize_per_channel(x, mode.from_tensor(torch.ones(3)), mode.from_tensor(torch.zeros(3, dtype=torch.uint8)),
                                    1, 0, 255, torch.uint8)
        assert qc.dtype == torch.uint8 and qc.shape == (2, 3)
        assert Q.quantize_dequantize_dynamic(x, torch.uint8).dtype == torch.float32


@pytest.mark.parametrize("call,match", [
    (lambda: Q.quantize_per_tensor(torch.randn(3), 0.1, 0, 0, 255, torch.int16), "unsupported quantized dtype"),
    (lambda: Q.quantize_per_tensor(torch.randn(3), 0.1, 0, 10, 5, torch.uint8), r"\[quant_min, quant_max\] = \[10, 5\]"),
    (lambda: Q.quantize_per_tensor(torch.randn(3), 0.1, 0, -1, 255, torch.uint8), r"within \[0, 255\]"),
    (lambda: Q.quantize_per_tensor(torch.randn(3), 0.0, 0, 0, 255, torch.uint8), "scale must be a positive finite"),
    (lambda: Q.quantize_per_tensor(torch.randn(3), float("nan"), 0, 0, 255, torch.uint8), "positive finite"),
    (lambda: Q.quantize_per_tensor(torch.randn(3), 0.1, 300, 0, 255, torch.uint8), "zero_point 300 is outside"),
    (lambda: Q.quantize_per_tensor(torch.arange(3), 0.1, 0, 0, 255, torch.uint8), "must be floating point"),
    (lambda: Q.dequantize_per_tensor(torch.zeros(3, dtype=torch.int8), 0.1, 0, 0, 255, torch.uint8),
     "input has dtype torch.int8, expected torch.uint8"),
    (lambda: Q.quantize_per_channel(torch.randn(2, 3), torch.ones(2), torch.zeros(2, dtype=torch.int8), 1, -128, 127,
                                    torch.int8), r"must be 1-d with 3 entries"),
    (lambda: Q.quantize_per_channel(torch.randn(2, 3), torch.ones(3), torch.zeros(3, dtype=torch.int8), 2, -128, 127,
                                    torch.int8), "axis 2 is out of range"),
    (lambda: Q.quantize_per_channel(torch.randn(2, 3), -torch.ones(3), torch.zeros(3, dtype=torch.int8), 1, -128, 127,
                                    torch.int8), "every scale must be positive"),
    (lambda: Q.quantize_per_channel(torch.randn(2, 3), torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.int8),
                                    1, -128, 127, torch.int8), "scales must be float32"),
    (lambda: Q.quantize_dequantize_dynamic(torch.randn(3), torch.int8), "unsupported quantized dtype"),
])
def test_bad_arguments_are_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


class QDQModule(nn.Module):
    def forward(self, x):
        q = Q.quantize_per_tensor(x, 0.02, 128, 0, 255, torch.uint8)
        return Q.dequantize_per_tensor(q, 0.02, 128, 0, 255, torch.uint8).relu()


def test_ops_survive_capture_and_print():
    x = torch.randn(2, 5)
    program = optc.capture(QDQModule().eval(), (x,))
    text = format_text(program, with_source=False)
    assert "optc.quantize_per_tensor(%x, 0.02, 128, 0, 255, u8)" in text
    assert "u8[2,5]" in text
    torch.testing.assert_close(program(x), QDQModule()(x), rtol=0, atol=0)
    assert quant_ops.is_quantize(torch.ops.optc.quantize_per_tensor.default)
    assert quant_ops.is_dequantize(torch.ops.optc.dequantize_per_channel.default)
    assert not quant_ops.is_quantize(torch.ops.aten.add.Tensor)
