"""fuse-rms-norm on RMSNorm as transformers' model files write it, and the look-alikes it must
leave alone."""

import torch
import torch.nn as nn

from optc.testing import check_pass, run_pass


class LlamaRMSNorm(nn.Module):
    """Llama, Mistral, Qwen2/3, Phi-3, Mixtral (``modeling_llama.py``)."""

    def __init__(self, d=8, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.2 * torch.randn(d))
        self.eps = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        return self.weight * hidden_states.to(input_dtype)


class GemmaRMSNorm(nn.Module):
    """Gemma: zero-centred weight applied as ``(1 + w)``, in float32."""

    def __init__(self, d=8, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(0.2 * torch.randn(d))
        self.eps = eps

    def forward(self, x):
        output = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class T5LayerNorm(nn.Module):
    """T5: ``weight * hidden`` after ``hidden * rsqrt(variance + eps)``; no bias, no mean."""

    def __init__(self, d=8, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.2 * torch.randn(d))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states


def x(dtype=torch.float32):
    return (torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0)) * 3 + 1).to(dtype)


def test_llama_rms_norm():
    check_pass("canonicalize,fuse-rms-norm", LlamaRMSNorm(), (x(),), """\
graph(%hidden_states : f32[2,5,8]):
  %weight : f32[8] = get_attr weight
  %rms_norm : f32[2,5,8] = aten.rms_norm(%hidden_states, [8], %weight, 1e-06)
  return (%rms_norm)
""", modified=True, stats={"fuse-rms-norm": {"fused": 1}})


def test_gemma_one_plus_weight_rms_norm():
    check_pass("canonicalize,constant-fold,fuse-rms-norm", GemmaRMSNorm(), (x(),), """\
graph(%x : f32[2,5,8]):
  %weight_add_1 : f32[8] = get_attr weight_add_1
  %rms_norm : f32[2,5,8] = aten.rms_norm(%x, [8], %weight_add_1, 1e-06)
  return (%rms_norm)
""", modified=True, stats={"fuse-rms-norm": {"fused": 1}})


def test_t5_layer_norm_is_rms_norm():
    check_pass("canonicalize,fuse-rms-norm", T5LayerNorm(), (x(),), """\
graph(%hidden_states : f32[2,5,8]):
  %weight : f32[8] = get_attr weight
  %rms_norm : f32[2,5,8] = aten.rms_norm(%hidden_states, [8], %weight, 1e-06)
  return (%rms_norm)
""", modified=True, stats={"fuse-rms-norm": {"fused": 1}})


def test_upcast_in_a_bfloat16_program_fuses_in_float32_and_keeps_the_casts():
    # the rounding points stay where the model put them: normalised in float32, cast, then weighted
    check_pass("canonicalize,fuse-rms-norm", LlamaRMSNorm().to(torch.bfloat16), (x(torch.bfloat16),), """\
graph(%hidden_states : bf16[2,5,8]):
  %weight : bf16[8] = get_attr weight
  %to : f32[2,5,8] = aten.to.dtype(%hidden_states, f32)
  %rms_norm : f32[2,5,8] = aten.rms_norm(%to, [8], None, 1e-06)
  %to_1 : bf16[2,5,8] = aten.to.dtype(%rms_norm, bf16)
  %mul_1 : bf16[2,5,8] = aten.mul.Tensor(%weight, %to_1)
  return (%mul_1)
""", modified=True, stats={"fuse-rms-norm": {"fused": 1}})


class Lookalikes(nn.Module):
    """eps outside the root; a mean over another dim; the inverse root read twice; a cube."""

    def forward(self, x):
        outside = x / (x.pow(2).mean(-1, keepdim=True).sqrt() + 1e-6)
        other_dim = x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        twice = x * r + r
        cube = x * torch.rsqrt(x.pow(3).mean(-1, keepdim=True).abs() + 1e-6)
        return outside, other_dim, twice, cube


def test_must_not_fire_on_lookalikes():
    out = run_pass("fuse-rms-norm", Lookalikes(), (x(),))
    assert out.stats("fuse-rms-norm")["fused"] == 0
    reasons = sorted(r[2] for r in out.rejections("fuse-rms-norm"))
    assert reasons == [
        "the inverse root %rsqrt_1 (aten.rsqrt) has 2 users, not one multiply by %x (placeholder)",
        "the mean square reduces dims [1], not the last dims of %x (placeholder)",
    ]
