"""fuse-rotary on rotary embeddings as transformers writes them, and the look-alikes it must
leave alone."""

import torch
import torch.nn as nn

from optc.testing import check_pass, run_pass

B, H, S, D = 1, 2, 5, 8


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rotate_every_two(x):
    x1 = x[:, :, :, ::2]
    x2 = x[:, :, :, 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def cos_sin(d=D, interleaved=False):
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.outer(torch.arange(S).float(), inv)
    emb = torch.repeat_interleave(freqs, 2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[None, None], emb.sin()[None, None]


class LlamaRotary(nn.Module):
    """``apply_rotary_pos_emb`` of modeling_llama.py, cos/sin as inputs (computed at run time)."""

    def forward(self, q, k, cos, sin):
        return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def qk(d=D):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, H, S, d, generator=g), torch.randn(B, H, S, d, generator=g)


def test_rotate_half():
    check_pass("fuse-rotary", LlamaRotary(), (*qk(), *cos_sin()), """\
graph(%q : f32[1,2,5,8], %k : f32[1,2,5,8], %cos : f32[1,1,5,8], %sin : f32[1,1,5,8]):
  %rotary_embedding : f32[1,2,5,8] = optc.rotary_embedding(%q, %cos, %sin, False)
  %rotary_embedding_1 : f32[1,2,5,8] = optc.rotary_embedding(%k, %cos, %sin, False)
  return (%rotary_embedding, %rotary_embedding_1)
""", modified=True, stats={"fuse-rotary": {"fused": 2}})


class PartialRotary(nn.Module):
    """Phi / StableLM / GPT-NeoX: only the first ``rot`` dims are rotated."""

    def forward(self, q, cos, sin):
        rot, keep = q[..., :4], q[..., 4:]
        return torch.cat(((rot * cos) + (rotate_half(rot) * sin), keep), dim=-1)


def test_partial_rotary():
    check_pass("fuse-rotary", PartialRotary(), (qk()[0], *cos_sin(4)), """\
graph(%q : f32[1,2,5,8], %cos : f32[1,1,5,4], %sin : f32[1,1,5,4]):
  %slice_1 : f32[1,2,5,4] = aten.slice.Tensor(%q, 3, 0, 4)
  %slice_2 : f32[1,2,5,4] = aten.slice.Tensor(%q, 3, 4, 9223372036854775807)
  %rotary_embedding : f32[1,2,5,4] = optc.rotary_embedding(%slice_1, %cos, %sin, False)
  %cat_1 : f32[1,2,5,8] = aten.cat([%rotary_embedding, %slice_2], -1)
  return (%cat_1)
""", modified=True, stats={"fuse-rotary": {"fused": 1}})


class GPTJRotary(nn.Module):
    """GPT-J / CodeGen: ``rotate_every_two`` with element-wise repeated angles."""

    def forward(self, q, cos, sin):
        return (q * cos) + (rotate_every_two(q) * sin)


def test_interleaved_rotary():
    check_pass("fuse-rotary", GPTJRotary(), (qk()[0], *cos_sin(interleaved=True)), """\
graph(%q : f32[1,2,5,8], %cos : f32[1,1,5,8], %sin : f32[1,1,5,8]):
  %rotary_embedding : f32[1,2,5,8] = optc.rotary_embedding(%q, %cos, %sin, True)
  return (%rotary_embedding)
""", modified=True, stats={"fuse-rotary": {"fused": 1}})


class Lookalikes(nn.Module):
    """Halves that do not split the dim in two ([5, 8) and [0, 5)), the halves swapped
    (cat(x2, -x1) rotates the other way), and cos that broadcasts x to more heads."""

    def forward(self, q, cos, sin, wide):
        a = q * cos + torch.cat((-q[..., 5:], q[..., :5]), dim=-1) * sin
        b = q * cos + torch.cat((q[..., 4:], -q[..., :4]), dim=-1) * sin
        one_head = q[:, :1]
        c = one_head * wide + rotate_half(one_head) * sin
        return a, b, c


def test_must_not_fire_on_lookalikes():
    cos, sin = cos_sin()
    out = run_pass("fuse-rotary", Lookalikes(), (qk()[0], cos, sin, torch.randn(1, H, S, D)))
    assert out.stats("fuse-rotary")["fused"] == 0
    reasons = sorted(r[2] for r in out.rejections("fuse-rotary"))
    assert reasons == [
        "%cat: the halves are [5, 8) and [0, 5) of a last dim of 8, not [4, 8) and [0, 4)",
        "%cat_1: the first half %slice_3 (aten.slice.Tensor) is not negated (rotate_half is cat(-x2, x1))",
        "cos/sin [1, 2, 5, 8]/[1, 1, 5, 8] broadcast x [1, 1, 5, 8] to [1, 2, 5, 8]",
    ], reasons
