import torch
import torch.nn as nn

from optc.testing import check_pass, run_pass


def _randomize(bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """Non-trivial statistics and affine parameters, so the fold really changes the weights."""
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.25, 4)
        if bn.affine:
            bn.weight.uniform_(-2, 2)
            bn.bias.uniform_(-1, 1)
    return bn


class LinearBN(nn.Module):
    def __init__(self, fc: nn.Linear, bn: nn.BatchNorm1d):
        super().__init__()
        self.fc = fc
        self.bn = _randomize(bn)

    def forward(self, x):
        return torch.relu(self.bn(self.fc(x)))


def test_fold_linear_bn():
    before = LinearBN(nn.Linear(6, 4), nn.BatchNorm1d(4))
    check_pass("fold-linear-bn", before, (torch.randn(3, 6),), """\
graph(%x : f32[3,6]):
  %fc_weight_folded : f32[4,6] = get_attr fc_weight_folded
  %fc_bias_folded : f32[4] = get_attr fc_bias_folded
  %bn_num_batches_tracked : i64[] = get_attr bn.num_batches_tracked
  %linear : f32[3,4] = aten.linear(%x, %fc_weight_folded, %fc_bias_folded)
  %relu : f32[3,4] = aten.relu(%linear)
  return (%relu)
""", modified=True, stats={"fold-linear-bn": {"folded": 1}}, reference="fp64")


def test_fold_linear_without_bias_into_bn_without_affine():
    before = LinearBN(nn.Linear(6, 4, bias=False), nn.BatchNorm1d(4, affine=False))
    check_pass("fold-linear-bn", before, (torch.randn(3, 6),), """\
graph(%x : f32[3,6]):
  %fc_weight_folded : f32[4,6] = get_attr fc_weight_folded
  %fc_bias_folded : f32[4] = get_attr fc_bias_folded
  %bn_num_batches_tracked : i64[] = get_attr bn.num_batches_tracked
  %linear : f32[3,4] = aten.linear(%x, %fc_weight_folded, %fc_bias_folded)
  %relu : f32[3,4] = aten.relu(%linear)
  return (%relu)
""", modified=True, stats={"fold-linear-bn": {"folded": 1}}, reference="fp64")


# ---- must not fire ---------------------------------------------------------------------------
def test_must_not_fire_when_bn_normalises_the_sequence_axis():
    # linear on (N, L, C) has its features on dim 2; BatchNorm1d(L) normalises dim 1
    out = run_pass("fold-linear-bn", LinearBN(nn.Linear(6, 4), nn.BatchNorm1d(5)), (torch.randn(2, 5, 6),))
    assert not out.report.record("fold-linear-bn").modified
    assert out.rejections("fold-linear-bn") == [
        ("linear-bn", "batch_norm", "bn normalises dim 1 of the linear output, but its channels are dim 2")]


def test_must_not_fire_after_a_convolution():
    # conv + bn is fold-conv-bn's pattern: not a candidate here, so no refusal either
    out = run_pass("fold-linear-bn", nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4)), (torch.randn(2, 3, 5),))
    assert not out.report.record("fold-linear-bn").modified
    assert out.rejections("fold-linear-bn") == []


class TiedLinearBN(nn.Module):
    """The same linear twice, each followed by its own BatchNorm."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bn1 = _randomize(nn.BatchNorm1d(4))
        self.bn2 = _randomize(nn.BatchNorm1d(4))

    def forward(self, x):
        return self.bn2(self.fc(self.bn1(self.fc(x))))


def test_must_not_fire_on_shared_linear_weight():
    out = run_pass("fold-linear-bn", TiedLinearBN(), (torch.randn(3, 4),))
    assert not out.report.record("fold-linear-bn").modified
    assert {r[2] for r in out.rejections("fold-linear-bn")} == {"linear weight is shared with another node"}
