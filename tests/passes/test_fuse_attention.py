import math

import torch
import torch.nn as nn

from optc.testing import check_pass, run_pass

B, H, L, E = 2, 2, 8, 4


def heads(x):
    return x.view(B, L, H, E).transpose(1, 2)


class Attention(nn.Module):
    """softmax(q @ k^T / sqrt(E) + mask) @ v with eval dropout, as BERT writes it."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, q, k, v, mask):
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(E)
        probs = self.drop(torch.softmax(scores + mask, dim=-1))
        return torch.matmul(probs, v)


def qkv():
    return torch.randn(B, H, L, E), torch.randn(B, H, L, E), torch.randn(B, H, L, E)


def test_fuse_attention_divide_additive_mask_eval_dropout():
    check_pass("fuse-attention", Attention(), (*qkv(), torch.randn(B, 1, 1, L)), """\
graph(%q : f32[2,2,8,4], %k : f32[2,2,8,4], %v : f32[2,2,8,4], %mask : f32[2,1,1,8]):
  %scaled_dot_product_attention : f32[2,2,8,4] = aten.scaled_dot_product_attention(%q, %k, %v, attn_mask=%mask, scale=0.5)
  return (%scaled_dot_product_attention)
""", modified=True, stats={"fuse-attention": {"fused": 1}})


class ScaledAttention(nn.Module):
    """``scale`` multiplies the scores; ``prescale`` multiplies q instead; no mask."""

    def __init__(self, prescale: bool):
        super().__init__()
        self.prescale = prescale

    def forward(self, q, k, v):
        if self.prescale:
            scores = (q * 0.3) @ k.transpose(-2, -1)
        else:
            scores = (q @ k.transpose(-2, -1)) * 0.3
        return torch.softmax(scores, -1) @ v


def test_fuse_attention_multiply_by_scale():
    check_pass("fuse-attention", ScaledAttention(prescale=False), qkv(), """\
graph(%q : f32[2,2,8,4], %k : f32[2,2,8,4], %v : f32[2,2,8,4]):
  %scaled_dot_product_attention : f32[2,2,8,4] = aten.scaled_dot_product_attention(%q, %k, %v, scale=0.3)
  return (%scaled_dot_product_attention)
""", modified=True, stats={"fuse-attention": {"fused": 1}})


def test_fuse_attention_prescaled_q():
    check_pass("fuse-attention", ScaledAttention(prescale=True), qkv(), """\
graph(%q : f32[2,2,8,4], %k : f32[2,2,8,4], %v : f32[2,2,8,4]):
  %scaled_dot_product_attention : f32[2,2,8,4] = aten.scaled_dot_product_attention(%q, %k, %v, scale=0.3)
  return (%scaled_dot_product_attention)
""", modified=True, stats={"fuse-attention": {"fused": 1}})


class CausalSelfAttention(nn.Module):
    """GPT style: projections, a tril buffer, masked_fill(~mask, finfo.min)."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.ModuleList(nn.Linear(H * E, H * E) for _ in range(3))
        self.register_buffer("bias", torch.tril(torch.ones(16, 16, dtype=torch.bool)))

    def forward(self, x):
        q, k, v = (heads(p(x)) for p in self.qkv)
        scores = q @ k.transpose(-1, -2) / math.sqrt(E)
        scores = scores.masked_fill(~self.bias[:L, :L], torch.finfo(scores.dtype).min)
        return torch.softmax(scores, -1) @ v


def test_fuse_attention_causal_mask_from_tril_becomes_is_causal():
    check_pass("fuse-attention", CausalSelfAttention(), (torch.randn(B, L, H * E),), """\
graph(%x : f32[2,8,8]):
  %qkv_0_weight : f32[8,8] = get_attr qkv.0.weight
  %qkv_0_bias : f32[8] = get_attr qkv.0.bias
  %qkv_1_weight : f32[8,8] = get_attr qkv.1.weight
  %qkv_1_bias : f32[8] = get_attr qkv.1.bias
  %qkv_2_weight : f32[8,8] = get_attr qkv.2.weight
  %qkv_2_bias : f32[8] = get_attr qkv.2.bias
  %linear : f32[2,8,8] = aten.linear(%x, %qkv_0_weight, %qkv_0_bias)
  %view : f32[2,8,2,4] = aten.view(%linear, [2, 8, 2, 4])
  %transpose : f32[2,2,8,4] = aten.transpose.int(%view, 1, 2)
  %linear_1 : f32[2,8,8] = aten.linear(%x, %qkv_1_weight, %qkv_1_bias)
  %view_1 : f32[2,8,2,4] = aten.view(%linear_1, [2, 8, 2, 4])
  %transpose_1 : f32[2,2,8,4] = aten.transpose.int(%view_1, 1, 2)
  %linear_2 : f32[2,8,8] = aten.linear(%x, %qkv_2_weight, %qkv_2_bias)
  %view_2 : f32[2,8,2,4] = aten.view(%linear_2, [2, 8, 2, 4])
  %transpose_2 : f32[2,2,8,4] = aten.transpose.int(%view_2, 1, 2)
  %scaled_dot_product_attention : f32[2,2,8,4] = aten.scaled_dot_product_attention(%transpose, %transpose_1, %transpose_2, is_causal=True, scale=0.5)
  return (%scaled_dot_product_attention)
""", modified=True, stats={"fuse-attention": {"fused": 1}})


class MaskedFillAttention(nn.Module):
    """A bool mask given at run time (every row keeps its diagonal), filled with ``fill``."""

    def __init__(self, fill: float):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, keep):
        keep = keep | torch.eye(L, dtype=torch.bool)
        scores = (q @ k.transpose(-1, -2)) / 2.0
        return torch.softmax(scores.masked_fill(keep == 0, self.fill), -1) @ v


def test_fuse_attention_masked_fill_minus_inf_becomes_bool_mask():
    check_pass("fuse-attention", MaskedFillAttention(float("-inf")), (*qkv(), torch.rand(B, 1, L, L) > 0.5), """\
graph(%q : f32[2,2,8,4], %k : f32[2,2,8,4], %v : f32[2,2,8,4], %keep : bool[2,1,8,8]):
  %eye : bool[8,8] = aten.eye(8, dtype=bool, device=device(cpu), pin_memory=False)
  %or_1 : bool[2,1,8,8] = aten.__or__.Tensor(%keep, %eye)
  %scaled_dot_product_attention : f32[2,2,8,4] = aten.scaled_dot_product_attention(%q, %k, %v, attn_mask=%or_1, scale=0.5)
  return (%scaled_dot_product_attention)
""", modified=True, stats={"fuse-attention": {"fused": 1}})


def test_fuse_attention_masked_fill_finfo_min_becomes_additive_mask():
    # finfo.min absorbs every score (min + s == min in fp32), so the additive mask reproduces
    # masked_fill exactly, fully-masked rows included
    out = check_pass("fuse-attention", MaskedFillAttention(torch.finfo(torch.float32).min),
                     (*qkv(), torch.rand(B, 1, L, L) > 0.5), """\
graph(%q : f32[2,2,8,4], %k : f32[2,2,8,4], %v : f32[2,2,8,4], %keep : bool[2,1,8,8]):
  %eye : bool[8,8] = aten.eye(8, dtype=bool, device=device(cpu), pin_memory=False)
  %or_1 : bool[2,1,8,8] = aten.__or__.Tensor(%keep, %eye)
  %eq : bool[2,1,8,8] = aten.eq.Scalar(%or_1, 0)
  %zeros_like : f32[2,1,8,8] = aten.zeros_like(%eq, dtype=f32)
  %masked_fill_1 : f32[2,1,8,8] = aten.masked_fill.Scalar(%zeros_like, %eq, -3.4028234663852886e+38)
  %scaled_dot_product_attention : f32[2,2,8,4] = aten.scaled_dot_product_attention(%q, %k, %v, attn_mask=%masked_fill_1, scale=0.5)
  return (%scaled_dot_product_attention)
""", modified=True, stats={"fuse-attention": {"fused": 1}})
    assert out.rejections("fuse-attention") == []


class BandAttention(nn.Module):
    """HF style ``where(keep, scores, full([], finfo.min))`` with a constant band mask."""

    def __init__(self):
        super().__init__()
        i = torch.arange(L)
        self.register_buffer("band", (i[:, None] - i[None, :]).abs() <= 2)

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2)
        scores = torch.where(self.band, scores, torch.full([], torch.finfo(scores.dtype).min))
        return torch.softmax(scores, -1) @ v


def test_fuse_attention_where_with_constant_mask_becomes_bool_mask():
    # every row of the constant mask keeps a position: finfo.min gives those weights exactly 0,
    # as SDPA's bool mask does (no scale found: scale=1.0 is passed explicitly)
    check_pass("fuse-attention", BandAttention(), qkv(), """\
graph(%q : f32[2,2,8,4], %k : f32[2,2,8,4], %v : f32[2,2,8,4]):
  %band : bool[8,8] = get_attr band
  %scaled_dot_product_attention : f32[2,2,8,4] = aten.scaled_dot_product_attention(%q, %k, %v, attn_mask=%band, scale=1.0)
  return (%scaled_dot_product_attention)
""", modified=True, stats={"fuse-attention": {"fused": 1}})


class KeyFirstAttention(nn.Module):
    """Keys projected to (B, L, H, E) and read as (B, H, E, S) through one permute."""

    def __init__(self):
        super().__init__()
        self.k = nn.Linear(H * E, H * E)

    def forward(self, q, x, v):
        kT = self.k(x).view(B, L, H, E).permute(0, 2, 3, 1)
        return torch.softmax(q @ kT * E ** -0.5, dim=-1) @ v


def test_fuse_attention_keys_transposed_by_permute():
    check_pass("fuse-attention", KeyFirstAttention(), (torch.randn(B, H, L, E), torch.randn(B, L, H * E),
                                                       torch.randn(B, H, L, E)), """\
graph(%q : f32[2,2,8,4], %x : f32[2,8,8], %v : f32[2,2,8,4]):
  %k_weight : f32[8,8] = get_attr k.weight
  %k_bias : f32[8] = get_attr k.bias
  %linear : f32[2,8,8] = aten.linear(%x, %k_weight, %k_bias)
  %view : f32[2,8,2,4] = aten.view(%linear, [2, 8, 2, 4])
  %transpose : f32[2,2,8,4] = aten.transpose.int(%view, 1, 2)
  %scaled_dot_product_attention : f32[2,2,8,4] = aten.scaled_dot_product_attention(%q, %transpose, %v, scale=0.5)
  return (%scaled_dot_product_attention)
""", modified=True, stats={"fuse-attention": {"fused": 1}})


class NotAttention(nn.Module):
    """Look-alikes: softmax over the wrong axis; masked_fill(-1e9) with a run-time mask."""

    def forward(self, q, k, v, keep):
        wrong_axis = torch.softmax(q @ k.transpose(-1, -2), dim=2) @ v
        scores = (q @ k.transpose(-1, -2)).masked_fill(~keep, -1e9)
        return wrong_axis, torch.softmax(scores, -1) @ v


def test_fuse_attention_must_not_fire_on_lookalikes():
    out = run_pass("fuse-attention", NotAttention(), (*qkv(), torch.rand(B, 1, L, L) > 0.5))
    assert not out.report.record("fuse-attention").modified
    assert out.stats("fuse-attention") == {"fused": 0, "not-fired": 2}
    assert out.rejections("fuse-attention") == [
        ("fuse-attention", "softmax", "softmax over dim 2, attention needs the last dim (3)"),
        ("fuse-attention", "softmax_1",
         "masked_fill with -1000000000.0 cannot be written as an SDPA mask: a fully-masked row gives uniform "
         "weights here, and -1000000000.0 + score is not -1000000000.0 in torch.float32 (use -inf or finfo.min, "
         "or a constant mask whose every row keeps a position)"),
    ]
