import torch
import torch.nn as nn

from optc.testing import check_pass, run_pass


class DecomposedLayerNorm(nn.Module):
    """As the zoo writes it: mean, sub, pow, mean, add eps, rsqrt, mul, * weight + bias."""

    def __init__(self, n=8, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.rand(n) + 0.5)
        self.bias = nn.Parameter(torch.randn(n) * 0.1)

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        centered = x - mean
        var = centered.pow(2).mean(-1, keepdim=True)
        return centered * torch.rsqrt(var + self.eps) * self.weight + self.bias


def test_fuse_layer_norm_decomposed_with_affine():
    check_pass("fuse-layer-norm", DecomposedLayerNorm(), (torch.randn(2, 3, 8),), """\
graph(%x : f32[2,3,8]):
  %weight : f32[8] = get_attr weight
  %bias : f32[8] = get_attr bias
  %layer_norm : f32[2,3,8] = aten.layer_norm(%x, [8], %weight, %bias, 1e-05)
  return (%layer_norm)
""", modified=True, stats={"fuse-layer-norm": {"fused": 1}})


class Variants(nn.Module):
    """var_mean over the last two dims with d / sqrt(var + eps); d * d with a bias only."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(8))

    def forward(self, x):
        var, mean = torch.var_mean(x, (-2, -1), keepdim=True, unbiased=False)
        a = (x - mean) / torch.sqrt(var + 1e-6)
        d = x - x.mean(-1, keepdim=True)
        b = d * torch.rsqrt((d * d).mean(-1, keepdim=True) + 1e-5) + self.bias
        return a, b


def test_fuse_layer_norm_var_mean_sqrt_and_bias_only():
    out = check_pass("fuse-layer-norm", Variants(), (torch.randn(2, 3, 8),), """\
graph(%x : f32[2,3,8]):
  %bias : f32[8] = get_attr bias
  %layer_norm : f32[2,3,8] = aten.layer_norm(%x, [3, 8], None, None, 1e-06)
  %layer_norm_1 : f32[2,3,8] = aten.layer_norm(%x, [8], None, %bias, 1e-05)
  return (%layer_norm, %layer_norm_1)
""", modified=True, stats={"fuse-layer-norm": {"fused": 2}})
    assert out.rejections("fuse-layer-norm") == []     # d * d is a square, not a candidate


class LookAlikes(nn.Module):
    """eps outside the sqrt; unbiased variance; mean and variance over different dims."""

    def forward(self, x):
        d = x - x.mean(-1, keepdim=True)
        eps_outside = d / (torch.sqrt(d.pow(2).mean(-1, keepdim=True)) + 1e-5)
        unbiased = (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, keepdim=True) + 1e-5)
        d2 = x - x.mean(-1, keepdim=True)
        other_axis = d2 * torch.rsqrt(d2.pow(2).mean(-2, keepdim=True) + 1e-5)
        return eps_outside, unbiased, other_axis


def test_fuse_layer_norm_must_not_fire_on_lookalikes():
    out = run_pass("fuse-layer-norm", LookAlikes(), (torch.randn(2, 3, 8),))
    assert not out.report.record("fuse-layer-norm").modified
    assert out.stats("fuse-layer-norm") == {"fused": 0, "not-fired": 3}
    assert out.rejections("fuse-layer-norm") == [
        ("fuse-layer-norm", "div", "eps added outside the sqrt: d / (sqrt(var) + eps)"),
        ("fuse-layer-norm", "mul", "unbiased variance (correction=1); layer norm uses the biased one"),
        ("fuse-layer-norm", "mul_1", "mean over dims [2] but variance over dims [1]"),
    ]
