import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from optc.ir.verifier import compare_outputs
from optc.testing import check_pass, run_pass

aten = torch.ops.aten


def _randomize(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """Non-trivial statistics and affine parameters, so the fold really changes the weights."""
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.25, 4)
        if bn.affine:
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
    return bn


class ConvBN(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module):
        super().__init__()
        self.conv = conv
        self.bn = _randomize(bn)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_fold_conv2d_bn():
    before = ConvBN(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    check_pass("fold-conv-bn", before, (torch.randn(2, 3, 6, 6),), """\
graph(%x : f32[2,3,6,6]):
  %conv_weight_folded : f32[4,3,3,3] = get_attr conv_weight_folded
  %conv_bias_folded : f32[4] = get_attr conv_bias_folded
  %bn_num_batches_tracked : i64[] = get_attr bn.num_batches_tracked
  %conv2d : f32[2,4,6,6] = aten.conv2d(%x, %conv_weight_folded, %conv_bias_folded, [1, 1], [1, 1])
  return (%conv2d)
""", modified=True, stats={"fold-conv-bn": {"folded": 1}}, reference="fp64")


def test_fold_conv1d_without_bias_adds_one():
    before = ConvBN(nn.Conv1d(3, 4, 3, stride=2, bias=False), nn.BatchNorm1d(4))
    check_pass("fold-conv-bn", before, (torch.randn(2, 3, 9),), """\
graph(%x : f32[2,3,9]):
  %conv_weight_folded : f32[4,3,3] = get_attr conv_weight_folded
  %conv_bias_folded : f32[4] = get_attr conv_bias_folded
  %bn_num_batches_tracked : i64[] = get_attr bn.num_batches_tracked
  %conv1d : f32[2,4,4] = aten.conv1d(%x, %conv_weight_folded, %conv_bias_folded, [2])
  return (%conv1d)
""", modified=True, stats={"fold-conv-bn": {"folded": 1}}, reference="fp64")


def test_fold_conv3d_bn():
    before = ConvBN(nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3))
    check_pass("fold-conv-bn", before, (torch.randn(1, 2, 4, 4, 4),), """\
graph(%x : f32[1,2,4,4,4]):
  %conv_weight_folded : f32[3,2,2,2,2] = get_attr conv_weight_folded
  %conv_bias_folded : f32[3] = get_attr conv_bias_folded
  %bn_num_batches_tracked : i64[] = get_attr bn.num_batches_tracked
  %conv3d : f32[1,3,3,3,3] = aten.conv3d(%x, %conv_weight_folded, %conv_bias_folded)
  return (%conv3d)
""", modified=True, stats={"fold-conv-bn": {"folded": 1}}, reference="fp64")


def test_fold_grouped_conv_bn():
    before = ConvBN(nn.Conv2d(4, 6, 3, groups=2, dilation=2), nn.BatchNorm2d(6))
    check_pass("fold-conv-bn", before, (torch.randn(2, 4, 7, 7),), """\
graph(%x : f32[2,4,7,7]):
  %conv_weight_folded : f32[6,2,3,3] = get_attr conv_weight_folded
  %conv_bias_folded : f32[6] = get_attr conv_bias_folded
  %bn_num_batches_tracked : i64[] = get_attr bn.num_batches_tracked
  %conv2d : f32[2,6,3,3] = aten.conv2d(%x, %conv_weight_folded, %conv_bias_folded, [1, 1], [0, 0], [2, 2], 2)
  return (%conv2d)
""", modified=True, stats={"fold-conv-bn": {"folded": 1}}, reference="fp64")


def test_fold_depthwise_conv_bn_without_affine():
    before = ConvBN(nn.Conv2d(4, 4, 3, groups=4, bias=False), nn.BatchNorm2d(4, affine=False))
    check_pass("fold-conv-bn", before, (torch.randn(2, 4, 5, 5),), """\
graph(%x : f32[2,4,5,5]):
  %conv_weight_folded : f32[4,1,3,3] = get_attr conv_weight_folded
  %conv_bias_folded : f32[4] = get_attr conv_bias_folded
  %bn_num_batches_tracked : i64[] = get_attr bn.num_batches_tracked
  %conv2d : f32[2,4,3,3] = aten.conv2d(%x, %conv_weight_folded, %conv_bias_folded, [1, 1], [0, 0], [1, 1], 4)
  return (%conv2d)
""", modified=True, stats={"fold-conv-bn": {"folded": 1}}, reference="fp64")


def test_fold_grouped_conv_transpose2d_bn():
    # weight (in, out/groups, kh, kw) = (4, 3, 3, 3): output channel g*3 + j is slice j of dim 1
    # within the input rows of group g
    before = ConvBN(nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1, groups=2), nn.BatchNorm2d(6))
    check_pass("fold-conv-bn", before, (torch.randn(2, 4, 4, 4),), """\
graph(%x : f32[2,4,4,4]):
  %conv_weight_folded : f32[4,3,3,3] = get_attr conv_weight_folded
  %conv_bias_folded : f32[6] = get_attr conv_bias_folded
  %bn_num_batches_tracked : i64[] = get_attr bn.num_batches_tracked
  %conv_transpose2d : f32[2,6,10,10] = aten.conv_transpose2d.input(%x, %conv_weight_folded, %conv_bias_folded, [2, 2], [0, 0], [1, 1], 2)
  return (%conv_transpose2d)
""", modified=True, stats={"fold-conv-bn": {"folded": 1}}, reference="fp64")


@pytest.mark.parametrize("dim, groups, bias, affine", [
    (1, 1, True, True), (1, 3, False, True), (2, 1, False, False), (2, 3, True, True), (3, 3, True, False)])
def test_fold_conv_transpose_bn_numerics(dim, groups, bias, affine):
    conv = getattr(nn, f"ConvTranspose{dim}d")(3, 6, 2, stride=2, groups=groups, bias=bias)
    bn = getattr(nn, f"BatchNorm{dim}d")(6, affine=affine)
    model = ConvBN(conv, bn).eval()
    out = run_pass("fold-conv-bn", model, (torch.randn(2, 3, *[3] * dim),))
    assert out.stats("fold-conv-bn") == {"folded": 1}
    assert "batch_norm" not in out.text and f"conv_transpose{dim}d" in out.text
    _check_fp64(model, out.program, torch.randn(2, 3, *[3] * dim))


class DecomposedConvBN(nn.Module):
    """The ops torch.export's decompositions produce: aten.convolution and
    aten._native_batch_norm_legit_no_training + getitem."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = _randomize(nn.BatchNorm2d(4))

    def forward(self, x):
        y = aten.convolution.default(x, self.conv.weight, self.conv.bias, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
        bn = self.bn
        return aten._native_batch_norm_legit_no_training.default(
            y, bn.weight, bn.bias, bn.running_mean, bn.running_var, 0.1, bn.eps)[0]


def test_fold_convolution_and_native_batch_norm():
    check_pass("fold-conv-bn", DecomposedConvBN(), (torch.randn(2, 3, 6, 6),), """\
graph(%x : f32[2,3,6,6]):
  %conv_weight_folded : f32[4,3,3,3] = get_attr conv_weight_folded
  %conv_bias_folded : f32[4] = get_attr conv_bias_folded
  %bn_num_batches_tracked : i64[] = get_attr bn.num_batches_tracked
  %convolution : f32[2,4,4,4] = aten.convolution(%x, %conv_weight_folded, %conv_bias_folded, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
  return (%convolution)
""", modified=True, stats={"fold-conv-bn": {"folded": 1}}, reference="fp64")


def _check_fp64(model, program, x):
    """The folded program is as close to the fp64 model as eager fp32 is (what check_pass's
    reference="fp64" checks, for cases without a golden)."""
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        eager_err = compare_outputs(ref, model(x)).max_rel_error
        err = compare_outputs(ref, program(x)).max_rel_error
    assert err <= 2e-6 + 4 * eager_err, (err, eager_err)


# ---- must not fire ---------------------------------------------------------------------------
class TrainingBN(ConvBN):
    """BatchNorm in training mode: normalises with the batch's statistics, not a constant map."""

    def __init__(self):
        super().__init__(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x):
        bn = self.bn
        return F.batch_norm(self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, training=True)


def test_must_not_fire_on_training_mode_bn():
    out = run_pass("fold-conv-bn", TrainingBN(), (torch.randn(2, 3, 6, 6),))
    assert "aten.batch_norm(%conv2d, %bn_weight, %bn_bias, %bn_running_mean, %bn_running_var, True" in out.text
    assert not out.report.record("fold-conv-bn").modified
    assert out.stats("fold-conv-bn")["folded"] == 0
    assert out.rejections("fold-conv-bn") == [("conv-bn", "batch_norm", "bn is in training mode")]


class ConvTwoUsers(ConvBN):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), y


def test_must_not_fire_when_conv_output_has_two_users():
    out = run_pass("fold-conv-bn", ConvTwoUsers(), (torch.randn(2, 3, 6, 6),))
    assert not out.report.record("fold-conv-bn").modified
    assert out.rejections("fold-conv-bn") == [("conv-bn", "batch_norm", "conv output has 2 users")]


class SharedConv(nn.Module):
    """One convolution applied twice, each followed by its own BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn1 = _randomize(nn.BatchNorm2d(4))
        self.bn2 = _randomize(nn.BatchNorm2d(4))

    def forward(self, x, y):
        return self.bn1(self.conv(x)) + self.bn2(self.conv(y))


def test_must_not_fire_on_shared_conv_weight():
    out = run_pass("fold-conv-bn", SharedConv(), (torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)))
    assert not out.report.record("fold-conv-bn").modified
    assert out.rejections("fold-conv-bn") == [
        ("conv-bn", "batch_norm", "conv weight is shared with another node"),
        ("conv-bn", "batch_norm_1", "conv weight is shared with another node")]
