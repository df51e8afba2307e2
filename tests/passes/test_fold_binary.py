import torch
import torch.nn as nn

from optc.testing import check_pass, run_pass


class ConvScale(nn.Module):
    """conv2d without bias, then * 2 and + a per-channel constant: the add creates a bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.register_buffer("shift", torch.randn(4, 1, 1))

    def forward(self, x):
        return torch.relu(self.conv(x) * 2 + self.shift)


def test_fold_scale_and_per_channel_shift_into_conv():
    check_pass("fold-binary", ConvScale(), (torch.randn(2, 3, 6, 6),), """\
graph(%x : f32[2,3,6,6]):
  %conv_weight_folded : f32[4,3,3,3] = get_attr conv_weight_folded
  %conv_bias_folded : f32[4] = get_attr conv_bias_folded
  %conv2d : f32[2,4,4,4] = aten.conv2d(%x, %conv_weight_folded, %conv_bias_folded)
  %relu : f32[2,4,4,4] = aten.relu(%conv2d)
  return (%relu)
""", modified=True, stats={"fold-binary": {"folded": 2, "mul": 1, "add": 1}}, reference="fp64")


class ConstantOnTheLeft(nn.Module):
    """``c * y`` and ``c + y`` with a [C] constant on a linear, then a chain ``(.. - 1) / 4``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.register_buffer("scale", torch.rand(3) + 0.5)

    def forward(self, x):
        return (0.5 + self.scale * self.fc(x) - 1) / 4


def test_fold_constant_on_the_left_and_a_chain_into_linear():
    check_pass("fold-binary", ConstantOnTheLeft(), (torch.randn(2, 7, 5),), """\
graph(%x : f32[2,7,5]):
  %fc_weight_folded_1 : f32[3,5] = get_attr fc_weight_folded_1
  %fc_bias_folded_3 : f32[3] = get_attr fc_bias_folded_3
  %linear : f32[2,7,3] = aten.linear(%x, %fc_weight_folded_1, %fc_bias_folded_3)
  return (%linear)
""", modified=True, stats={"fold-binary": {"folded": 4, "mul": 1, "add": 1, "sub": 1, "div": 1}},
        reference="fp64")


class TransposedConvScale(nn.Module):
    """Per-channel scale of a grouped transposed conv: weight (in, out/groups, k)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.ConvTranspose1d(4, 6, 3, groups=2)
        self.register_buffer("scale", torch.randn(1, 6, 1))

    def forward(self, x):
        return self.conv(x) / self.scale


def test_fold_per_channel_divide_into_grouped_conv_transpose():
    check_pass("fold-binary", TransposedConvScale(), (torch.randn(2, 4, 5),), """\
graph(%x : f32[2,4,5]):
  %conv_weight_folded : f32[4,3,3] = get_attr conv_weight_folded
  %conv_bias_folded : f32[6] = get_attr conv_bias_folded
  %conv_transpose1d : f32[2,6,7] = aten.conv_transpose1d(%x, %conv_weight_folded, %conv_bias_folded, [1], [0], [0], 2)
  return (%conv_transpose1d)
""", modified=True, stats={"fold-binary": {"folded": 1, "div": 1}}, reference="fp64")


# ---- must not fire ---------------------------------------------------------------------------
class Refused(nn.Module):
    """Every operand here is refused: each conv/linear has one user, so refusals are per op."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, 4, 1) for _ in range(6))
        self.register_buffer("spatial", torch.rand(1, 1, 5, 5) + 0.5)     # varies along H and W
        self.register_buffer("per_channel", torch.rand(4, 1, 1) + 0.5)
        self.register_buffer("zero", torch.tensor([1.0, 0.0, 1.0, 1.0]).view(4, 1, 1))

    def forward(self, x):
        c = self.convs
        return (c[0](x) + x[:, :1],                # non-constant operand
                c[1](x) * self.spatial,            # constant varies along spatial axes
                2 - c[2](x),                       # c - y (aten.rsub)
                self.per_channel - c[3](x),        # c - y (aten.sub, conv on the right)
                self.per_channel / c[4](x),        # c / y
                c[5](x) / self.zero)               # division by zero


def test_must_not_fire():
    out = run_pass("fold-binary", Refused(), (torch.randn(2, 3, 5, 5),))
    assert not out.report.record("fold-binary").modified
    assert out.stats("fold-binary")["folded"] == 0
    assert sorted(out.rejections("fold-binary")) == sorted([
        ("add", "add", "operand %slice_1 is not a constant"),
        ("mul", "mul", "constant %spatial [1, 1, 5, 5] varies along axis 2 of the conv output "
                       "(only the channel axis 1 may vary)"),
        ("sub", "rsub", "conv output is the subtrahend (c - y): only y - c is folded"),
        ("sub", "sub", "conv output is the right operand (c - y): only y - c is folded"),
        ("div", "div", "conv output is the right operand (c / y): only y / c is folded"),
        ("div", "div_1", "division by a constant that contains zero (%zero)"),
    ])


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return y * 3, y


def test_must_not_fire_when_linear_output_has_two_users():
    out = run_pass("fold-binary", TwoUsers(), (torch.randn(2, 4),))
    assert not out.report.record("fold-binary").modified
    assert out.rejections("fold-binary") == [("mul", "mul", "linear output has 2 users")]
