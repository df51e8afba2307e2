import math

import torch
import torch.nn as nn

from optc.testing import check_pass, run_pass


class ErfGelus(nn.Module):
    """x * 0.5 * (1 + erf(x / sqrt(2))) as BERT writes it; 0.5 * x * (...) with x * (1/sqrt(2))."""

    def forward(self, x):
        a = x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
        y = x + 1
        b = 0.5 * y * (1.0 + torch.erf(y * 0.7071067811865476))
        return a, b


def test_fuse_gelu_erf_forms():
    check_pass("fuse-gelu", ErfGelus(), (torch.randn(4, 16),), """\
graph(%x : f32[4,16]):
  %gelu : f32[4,16] = aten.gelu(%x)
  %add_1 : f32[4,16] = aten.add.Tensor(%x, 1)
  %gelu_1 : f32[4,16] = aten.gelu(%add_1)
  return (%gelu, %gelu_1)
""", modified=True, stats={"fuse-gelu": {"fused": 2}})


class TanhGelus(nn.Module):
    """GPT-2's pow(x, 3) form; x*x*x; and the factored x * (1 + 0.044715 * x * x) form."""

    def forward(self, x):
        c = math.sqrt(2.0 / math.pi)
        a = 0.5 * x * (1.0 + torch.tanh(c * (x + 0.044715 * torch.pow(x, 3.0))))
        b = 0.5 * x * (1.0 + torch.tanh(c * (x + 0.044715 * (x * x * x))))
        c = 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))
        return a, b, c


def test_fuse_gelu_tanh_forms():
    out = check_pass("fuse-gelu", TanhGelus(), (torch.randn(4, 16),), """\
graph(%x : f32[4,16]):
  %gelu : f32[4,16] = aten.gelu(%x, approximate='tanh')
  %gelu_1 : f32[4,16] = aten.gelu(%x, approximate='tanh')
  %gelu_2 : f32[4,16] = aten.gelu(%x, approximate='tanh')
  return (%gelu, %gelu_1, %gelu_2)
""", modified=True, stats={"fuse-gelu": {"fused": 3}})
    assert out.rejections("fuse-gelu") == []     # inner products are judged at the root only


class WrongConstants(nn.Module):
    """erf(x / 1.5); tanh with 0.05 for 0.044715; no 0.5 in front."""

    def forward(self, x):
        a = 0.5 * x * (1.0 + torch.erf(x / 1.5))
        b = 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.05 * x ** 3)))
        c = x * (1.0 + torch.erf(x / math.sqrt(2.0)))
        return a, b, c


def test_fuse_gelu_must_not_fire_with_wrong_constants():
    out = run_pass("fuse-gelu", WrongConstants(), (torch.randn(4, 16),))
    assert not out.report.record("fuse-gelu").modified
    assert out.stats("fuse-gelu") == {"fused": 0, "not-fired": 3}
    assert out.rejections("fuse-gelu") == [
        ("fuse-gelu", "mul_1", "erf argument is 0.6666666667*x; GELU needs 0.7071067812*x"),
        ("fuse-gelu", "mul_5", "tanh argument is 0.7978845608*(x + 0.05*x^3); "
                               "GELU needs 0.7978845608*(x + 0.044715*x^3)"),
        ("fuse-gelu", "mul_6", "x * (1 + 1*erf) is not GELU's 0.5*x*(1 + erf(..))"),
    ]
