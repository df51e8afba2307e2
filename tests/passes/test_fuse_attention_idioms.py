"""fuse-attention on the idioms of real models (HF transformers, Inductor's SFDP patterns), each
as a small module, with goldens; and the must-not-fire cases. The architectures themselves run in
``tests/integration/test_hf_corpus.py``; Inductor's own patterns in ``test_sfdp_patterns.py``."""

import math

import torch
import torch.nn as nn

from optc.testing import check_pass, run_pass

B, H, L, E = 2, 2, 8, 4
MIN = torch.finfo(torch.float32).min


def qkv(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(B, H, L, E, generator=g).to(dtype) for _ in range(3))


class BiasAndMask(nn.Module):
    """T5 / MPNet: a position bias and a padding mask, two additive terms, no scaling."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, H, L, L))

    def forward(self, q, k, v, mask):
        scores = q @ k.transpose(-1, -2)
        scores = scores + self.bias
        scores = scores + mask
        return torch.softmax(scores.float(), dim=-1).type_as(scores) @ v


def test_two_additive_terms_become_one_mask():
    mask = torch.zeros(B, 1, 1, L)
    mask[0, ..., -2:] = MIN
    check_pass("canonicalize,fuse-attention", BiasAndMask(), (*qkv(), mask), """\
graph(%q : f32[2,2,8,4], %k : f32[2,2,8,4], %v : f32[2,2,8,4], %mask : f32[2,1,1,8]):
  %bias : f32[1,2,8,8] = get_attr bias
  %add_2 : f32[2,2,8,8] = aten.add.Tensor(%bias, %mask)
  %scaled_dot_product_attention : f32[2,2,8,4] = aten.scaled_dot_product_attention(%q, %k, %v, attn_mask=%add_2, scale=1.0)
  return (%scaled_dot_product_attention)
""", modified=True, stats={"fuse-attention": {"fused": 1}})


class WhereThenAdd(nn.Module):
    """GPT-Neo / Inductor pattern 19: ``where(causal, scores, finfo.min)`` then ``+ padding mask``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("causal", torch.tril(torch.ones(L, L, dtype=torch.bool)))

    def forward(self, q, k, v, mask):
        scores = q @ k.transpose(-1, -2)
        scores = torch.where(self.causal, scores, torch.full([], MIN))
        return torch.softmax(scores + mask, dim=-1) @ v


def test_fill_then_additive_mask_are_combined():
    mask = torch.zeros(B, 1, 1, L)
    mask[1, ..., :3] = MIN
    check_pass("canonicalize,constant-fold,fuse-attention", WhereThenAdd(), (*qkv(), mask), """\
graph(%q : f32[2,2,8,4], %k : f32[2,2,8,4], %v : f32[2,2,8,4], %mask : f32[2,1,1,8]):
  %causal : bool[8,8] = get_attr causal
  %logical_not : bool[8,8] = aten.logical_not(%causal)
  %zeros_like : f32[8,8] = aten.zeros_like(%logical_not, dtype=f32)
  %masked_fill : f32[8,8] = aten.masked_fill.Scalar(%zeros_like, %logical_not, -3.4028234663852886e+38)
  %add_1 : f32[2,1,8,8] = aten.add.Tensor(%masked_fill, %mask)
  %scaled_dot_product_attention : f32[2,2,8,4] = aten.scaled_dot_product_attention(%q, %k, %v, attn_mask=%add_1, scale=1.0)
  return (%scaled_dot_product_attention)
""", modified=True, stats={"fuse-attention": {"fused": 1}})


class BmmWithViews(nn.Module):
    """MBart / BLOOM: heads folded into the batch for ``bmm`` (BLOOM's ``baddbmm`` adds ALiBi and
    scales), viewed to 4-d for the mask, viewed back for the second ``bmm``."""

    def __init__(self, baddbmm: bool):
        super().__init__()
        self.baddbmm = baddbmm
        self.alibi = nn.Parameter(torch.randn(B * H, 1, L))

    def forward(self, q, k, v, mask):
        q, k, v = (t.reshape(B * H, L, E) for t in (q, k, v))
        if self.baddbmm:
            scores = torch.baddbmm(self.alibi, q, k.transpose(1, 2), beta=1.0, alpha=E ** -0.5)
        else:
            scores = torch.bmm(q, k.transpose(1, 2))
        scores = scores.view(B, H, L, L) + mask
        probs = torch.softmax(scores.view(B * H, L, L), dim=-1)
        return torch.bmm(probs, v).view(B, H, L, E)


def test_bmm_with_views_around_the_mask():
    mask = torch.zeros(B, 1, L, L)
    mask[..., -1] = MIN
    check_pass("canonicalize,fuse-attention", BmmWithViews(baddbmm=False), (*qkv(), mask), """\
graph(%q : f32[2,2,8,4], %k : f32[2,2,8,4], %v : f32[2,2,8,4], %mask : f32[2,1,8,8]):
  %alibi : f32[4,1,8] = get_attr alibi
  %reshape : f32[4,8,4] = aten.reshape(%q, [4, 8, 4])
  %reshape_1 : f32[4,8,4] = aten.reshape(%k, [4, 8, 4])
  %reshape_2 : f32[4,8,4] = aten.reshape(%v, [4, 8, 4])
  %reshape_3 : f32[2,2,8,4] = aten.reshape(%q, [2, 2, 8, 4])
  %reshape_4 : f32[2,2,8,4] = aten.reshape(%k, [2, 2, 8, 4])
  %reshape_5 : f32[2,2,8,4] = aten.reshape(%v, [2, 2, 8, 4])
  %scaled_dot_product_attention : f32[2,2,8,4] = aten.scaled_dot_product_attention(%reshape_3, %reshape_4, %reshape_5, attn_mask=%mask, scale=1.0)
  %reshape_6 : f32[4,8,4] = aten.reshape(%scaled_dot_product_attention, [4, 8, 4])
  %view_2 : f32[2,2,8,4] = aten.view(%reshape_6, [2, 2, 8, 4])
  return (%view_2)
""", modified=True, stats={"fuse-attention": {"fused": 1}})


def test_baddbmm_alibi_and_scale():
    mask = torch.zeros(B, 1, L, L)
    mask[..., -1] = MIN
    check_pass("canonicalize,fuse-attention", BmmWithViews(baddbmm=True), (*qkv(), mask), """\
graph(%q : f32[2,2,8,4], %k : f32[2,2,8,4], %v : f32[2,2,8,4], %mask : f32[2,1,8,8]):
  %alibi : f32[4,1,8] = get_attr alibi
  %reshape : f32[4,8,4] = aten.reshape(%q, [4, 8, 4])
  %reshape_1 : f32[4,8,4] = aten.reshape(%k, [4, 8, 4])
  %reshape_2 : f32[4,8,4] = aten.reshape(%v, [4, 8, 4])
  %reshape_3 : f32[2,2,8,4] = aten.reshape(%q, [2, 2, 8, 4])
  %reshape_4 : f32[2,2,8,4] = aten.reshape(%k, [2, 2, 8, 4])
  %reshape_5 : f32[2,2,8,4] = aten.reshape(%v, [2, 2, 8, 4])
  %reshape_6 : f32[2,2,1,8] = aten.reshape(%alibi, [2, 2, 1, 8])
  %add_1 : f32[2,2,8,8] = aten.add.Tensor(%reshape_6, %mask)
  %scaled_dot_product_attention : f32[2,2,8,4] = aten.scaled_dot_product_attention(%reshape_3, %reshape_4, %reshape_5, attn_mask=%add_1, scale=0.5)
  %reshape_7 : f32[4,8,4] = aten.reshape(%scaled_dot_product_attention, [4, 8, 4])
  %view_2 : f32[2,2,8,4] = aten.view(%reshape_7, [2, 2, 8, 4])
  return (%view_2)
""", modified=True, stats={"fuse-attention": {"fused": 1}})


class MultiQuery(nn.Module):
    """Falcon: one key/value head shared by every query head through matmul broadcasting."""

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) / math.sqrt(E)
        return torch.softmax(scores, dim=-1) @ v


def test_multi_query_keys_and_values_are_expanded():
    q, k, v = qkv()
    check_pass("fuse-attention", MultiQuery(), (q, k[:, :1], v[:, :1]), """\
graph(%q : f32[2,2,8,4], %k : f32[2,1,8,4], %v : f32[2,1,8,4]):
  %expand : f32[2,2,8,4] = aten.expand(%k, [-1, 2, -1, -1])
  %expand_1 : f32[2,2,8,4] = aten.expand(%v, [-1, 2, -1, -1])
  %scaled_dot_product_attention : f32[2,2,8,4] = aten.scaled_dot_product_attention(%q, %expand, %expand_1, scale=0.5)
  return (%scaled_dot_product_attention)
""", modified=True, stats={"fuse-attention": {"fused": 1}})


class SafeSoftmax(nn.Module):
    """Inductor patterns 29-30: the scale split over q and k^T, ``_safe_softmax``."""

    def forward(self, q, k, v, mask):
        q = torch.ops.aten.mul.Scalar(q, 0.7)
        kT = torch.ops.aten.mul.Scalar(k.transpose(-2, -1), 0.7)
        return torch.ops.aten._safe_softmax(q @ kT + mask, -1) @ v


def test_safe_softmax_and_split_scale():
    check_pass("fuse-attention", SafeSoftmax(), (*qkv(), torch.randn(1, 1, L, L)), """\
graph(%q : f32[2,2,8,4], %k : f32[2,2,8,4], %v : f32[2,2,8,4], %mask : f32[1,1,8,8]):
  %scaled_dot_product_attention : f32[2,2,8,4] = aten.scaled_dot_product_attention(%q, %k, %v, attn_mask=%mask, scale=0.48999999999999994)
  return (%scaled_dot_product_attention)
""", modified=True, stats={"fuse-attention": {"fused": 1}})


class UpcastSoftmax(nn.Module):
    """transformers in a half-precision program: ``softmax(scores, dtype=float32).to(q.dtype)``."""

    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2) * E ** -0.5
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def test_float32_softmax_in_a_bfloat16_program_fuses():
    check_pass("canonicalize,fuse-attention", UpcastSoftmax(), qkv(torch.bfloat16), """\
graph(%q : bf16[2,2,8,4], %k : bf16[2,2,8,4], %v : bf16[2,2,8,4]):
  %scaled_dot_product_attention : bf16[2,2,8,4] = aten.scaled_dot_product_attention(%q, %k, %v, scale=0.5)
  return (%scaled_dot_product_attention)
""", modified=True, stats={"fuse-attention": {"fused": 1}})


# ---- must not fire ---------------------------------------------------------------------------------
class SecondUser(nn.Module):
    """The probabilities are also returned (a real second user of the softmax's value)."""

    def forward(self, q, k, v):
        probs = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return probs @ v, probs.sum(-1)


class SoftCap(nn.Module):
    """Gemma-2: ``tanh(scores / cap) * cap`` before the softmax."""

    def forward(self, q, k, v):
        scores = torch.tanh(q @ k.transpose(-1, -2) / 50.0) * 50.0
        return torch.softmax(scores, dim=-1) @ v


class RoundedProbabilities(nn.Module):
    """Inductor patterns 7-10 in a float32 program: probabilities and values rounded to float16."""

    def forward(self, q, k, v):
        probs = torch.softmax(q @ k.transpose(-1, -2), dim=-1).to(torch.float16)
        return (probs @ v.to(torch.float16)).float()


class ScaledAfterMask(nn.Module):
    """``(scores + mask) * c``: the mask is scaled too, SDPA adds it after scaling."""

    def forward(self, q, k, v, mask):
        return torch.softmax((q @ k.transpose(-1, -2) + mask) * 0.5, dim=-1) @ v


def test_must_not_fire_with_reasons():
    cases = [
        (SecondUser(), qkv(), "the attention probabilities %softmax (aten.softmax.int) have other users"),
        (SoftCap(), qkv(), "soft-caps the scores (tanh) before the softmax: SDPA has no soft-capping"),
        (RoundedProbabilities(), qkv(), "the probabilities are torch.float16 at the matmul with v, the scores "
                                        "torch.float32"),
        (ScaledAfterMask(), (*qkv(), torch.randn(B, 1, 1, L)), "the scores are scaled (%mul (aten.mul.Tensor)) "
                                                               "after the mask %add"),
    ]
    for model, inputs, reason in cases:
        out = run_pass("canonicalize,fuse-attention", model, inputs)
        assert out.stats("fuse-attention")["fused"] == 0, type(model).__name__
        reasons = [r[2] for r in out.rejections("fuse-attention")]
        assert len(reasons) == 1 and reason in reasons[0], (type(model).__name__, reasons)
