"""The ONNX backend's ort-contrib-ops stage: attention as ONNX Runtime's MultiHeadAttention and
GroupQueryAttention kernels.

Each case compiles a module whose attention the default pipeline fuses to
``scaled_dot_product_attention`` and checks the ONNX model ONNX Runtime receives: how many
``com.microsoft.MultiHeadAttention`` nodes it has, that the result matches eager within float32
rounding (also on inputs other than the example), and, where the kernel cannot take the
attention, that the stage refused with the reason in its report.
"""

from __future__ import annotations

import math
import os

import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import optc
from optc.ir.verifier import check_close

pytest.importorskip("onnxruntime")


def _proto(compiled) -> onnx.ModelProto:
    if compiled.model_bytes is not None:
        return onnx.load_from_string(compiled.model_bytes)
    return onnx.load(os.path.join(compiled.model_dir, "model.onnx"), load_external_data=False)


def _count(compiled, op_type: str) -> int:
    return sum(n.op_type == op_type for n in _proto(compiled).graph.node)


def _stage_record(report):
    return next(r for r in report.backend_stage.records if r.name == "ort-contrib-ops")


class Attn(nn.Module):
    """Self-attention as models write it: projections, heads split with view + transpose, explicit
    scores, a mask, softmax, heads merged back."""

    def __init__(self, d=32, heads=4, mask="padding", kv_heads=None):
        super().__init__()
        self.h, self.kvh, self.dh, self.mask = heads, kv_heads or heads, d // heads, mask
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, self.kvh * self.dh)
        self.v = nn.Linear(d, self.kvh * self.dh)
        self.o = nn.Linear(d, d)

    def forward(self, x, pad):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.h, self.dh).transpose(1, 2)
        k = self.k(x).view(b, s, self.kvh, self.dh).transpose(1, 2)
        v = self.v(x).view(b, s, self.kvh, self.dh).transpose(1, 2)
        if self.kvh != self.h:    # Llama's repeat_kv
            rep = self.h // self.kvh
            k = k[:, :, None].expand(b, self.kvh, rep, s, self.dh).reshape(b, self.h, s, self.dh)
            v = v[:, :, None].expand(b, self.kvh, rep, s, self.dh).reshape(b, self.h, s, self.dh)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.dh)
        if self.mask == "padding":        # HF's additive padding mask, [B, 1, 1, T]
            scores = scores + (1.0 - pad[:, None, None, :]) * torch.finfo(torch.float32).min
        elif self.mask == "causal":       # built at run time from arange, [1, 1, S, S]
            i = torch.arange(s, device=x.device)
            scores = scores.masked_fill((i[None, :] > i[:, None])[None, None], float("-inf"))
        elif self.mask == "bool_sdpa":    # a boolean mask straight into SDPA
            keep = (pad > 0.5)[:, None, None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            return self.o(out.transpose(1, 2).reshape(b, s, -1))
        p = scores.softmax(-1)
        return self.o((p @ v).transpose(1, 2).reshape(b, s, -1))


def _inputs(b=2, s=7, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pad = torch.ones(b, s)
    pad[0, -2:] = 0.0
    return torch.randn(b, s, d, generator=g), pad


@pytest.mark.parametrize("mask", ["padding", "causal", "none"])
def test_attention_runs_as_multihead_attention(mask):
    torch.manual_seed(0)
    model = Attn(mask=mask).eval()
    inputs = _inputs()
    compiled, report = optc.compile(model, inputs, backend="onnx")
    assert _stage_record(report).stats == {"ort-multihead-attention": 1}
    assert _count(compiled, "MultiHeadAttention") == 1
    assert _count(compiled, "Softmax") == 0
    with torch.no_grad():
        check_close(model(*inputs), compiled(*inputs), rtol=1e-5)
        other = _inputs(seed=3)
        check_close(model(*other), compiled(*other), rtol=1e-5)


def test_dynamic_batch_and_padding_mask_expanded_per_query():
    torch.manual_seed(0)
    model = Attn(mask="padding").eval()
    compiled, _ = optc.compile(model, _inputs(), backend="onnx", dynamic_shapes="batch")
    assert _count(compiled, "MultiHeadAttention") == 1
    with torch.no_grad():
        for b in (1, 3):
            inputs = _inputs(b=b, seed=b)
            check_close(model(*inputs), compiled(*inputs), rtol=1e-5)


@pytest.mark.parametrize("mask", ["causal", "padding", "none"])
def test_grouped_heads_run_group_query_attention_on_the_unrepeated_heads(mask):
    """Llama's repeat_kv expands key/value to every query head before the product: the stage
    gives GroupQueryAttention the key/value heads before the repeat (the repeat is gone)."""
    torch.manual_seed(0)
    model = Attn(mask=mask, kv_heads=2).eval()
    inputs = _inputs()
    compiled, report = optc.compile(model, inputs, backend="onnx")
    assert _stage_record(report).stats == {"ort-group-query-attention": 1}
    assert _count(compiled, "GroupQueryAttention") == 1 and _count(compiled, "MultiHeadAttention") == 0
    # no repeat left (the padding mask's one Expand gives it a row per query)
    assert _count(compiled, "Expand") == (1 if mask == "padding" else 0) and _count(compiled, "Softmax") == 0
    gqa = next(n for n in _proto(compiled).graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert attrs["num_heads"] == 4 and attrs["kv_num_heads"] == 2
    with torch.no_grad():
        check_close(model(*inputs), compiled(*inputs), rtol=1e-5)
        other = _inputs(seed=3)
        check_close(model(*other), compiled(*other), rtol=1e-5)


def test_grouped_heads_with_a_dynamic_sequence_length():
    # total_sequence_length and seqlens_k come from the key's shape at run time
    # (with a dynamic length the run-time causal mask stays boolean: refused by both kernels, a
    # boolean mask's fully masked rows are NaN in ONNX Runtime and 0 in torch; no mask here)
    torch.manual_seed(0)
    model = Attn(mask="none", kv_heads=2).eval()
    s = torch.export.Dim("s", min=2, max=64)
    compiled, _ = optc.compile(model, _inputs(), backend="onnx", dynamic_shapes=({1: s}, {1: s}))
    assert _count(compiled, "GroupQueryAttention") == 1
    with torch.no_grad():
        for length in (3, 7, 12):
            inputs = _inputs(s=length, seed=length)
            check_close(model(*inputs), compiled(*inputs), rtol=1e-5)


class _Gqa(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def test_enable_gqa_runs_group_query_attention():
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    compiled, report = optc.compile(_Gqa(), (q, k, v), backend="onnx")
    assert _stage_record(report).stats == {"ort-group-query-attention": 1}
    assert _count(compiled, "GroupQueryAttention") == 1
    check_close(_Gqa()(q, k, v), compiled(q, k, v), rtol=1e-5)


def test_grouped_cross_attention_falls_back_to_multihead_attention_with_the_reason():
    # GroupQueryAttention without a cache attends a prefill to itself: a key of another length is
    # refused by that rule and the repeated operands run MultiHeadAttention
    class Cross(nn.Module):
        def forward(self, q, k, v):
            b, n, t, h = k.shape
            k = k[:, :, None].expand(b, n, 2, t, h).reshape(b, 2 * n, t, h)
            v = v[:, :, None].expand(b, n, 2, t, h).reshape(b, 2 * n, t, h)
            return F.scaled_dot_product_attention(q, k, v)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    compiled, report = optc.compile(Cross(), (q, k, v), backend="onnx")
    rec = _stage_record(report)
    assert any(rule == "ort-group-query-attention" and "lengths differ" in why for rule, _, why in rec.rejections)
    assert rec.stats.get("ort-multihead-attention") == 1 and _count(compiled, "GroupQueryAttention") == 0
    check_close(Cross()(q, k, v), compiled(q, k, v), rtol=1e-5)


def test_grouped_heads_of_a_size_not_a_multiple_of_8_run_multihead_attention():
    # ONNX Runtime's GroupQueryAttention fails at run time on them (found by optc fuzz's idioms)
    q, k, v = torch.randn(1, 4, 5, 6), torch.randn(1, 2, 5, 6), torch.randn(1, 2, 5, 6)
    compiled, report = optc.compile(_Gqa(), (q, k, v), backend="onnx")
    rec = _stage_record(report)
    assert any(rule == "ort-group-query-attention" and "multiple of 8" in why for rule, _, why in rec.rejections)
    assert _count(compiled, "GroupQueryAttention") == 0
    check_close(_Gqa()(q, k, v), compiled(q, k, v), rtol=1e-5)


def test_gqa_reference_kernel_is_sdpa_on_repeated_heads():
    q, k, v = torch.randn(2, 6, 5, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    bias = torch.randn(2, 1, 5, 5)
    flat = [x.transpose(1, 2).flatten(2) for x in (q, k, v)]
    got = torch.ops.optc.ort_group_query_attention(*flat, bias, 6, 2, 0.3, False)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=bias,
                                          scale=0.3).transpose(1, 2).flatten(2)
    torch.testing.assert_close(got, want)
    got = torch.ops.optc.ort_group_query_attention(*flat, None, 6, 2, 0.5, True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5, enable_gqa=True).transpose(1, 2).flatten(2)
    torch.testing.assert_close(got, want)


def test_boolean_mask_is_refused_with_the_reason():
    torch.manual_seed(0)
    model = Attn(mask="bool_sdpa").eval()
    inputs = _inputs()
    compiled, report = optc.compile(model, inputs, backend="onnx")
    rec = _stage_record(report)
    assert "ort-multihead-attention" not in rec.stats
    assert any(rule == "ort-multihead-attention" and "boolean mask" in why for rule, _, why in rec.rejections)
    assert _count(compiled, "MultiHeadAttention") == 0
    with torch.no_grad():
        check_close(model(*inputs), compiled(*inputs), rtol=1e-5)


def test_cross_attention_with_causal_and_different_lengths_is_refused():
    class Cross(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    compiled, report = optc.compile(Cross(), (q, k, v), backend="onnx")
    assert any("different lengths" in why for _, _, why in _stage_record(report).rejections)
    assert _count(compiled, "MultiHeadAttention") == 0
    check_close(Cross()(q, k, v), compiled(q, k, v), rtol=1e-5)


def test_reference_kernel_is_sdpa():
    """optc::ort_multihead_attention's own kernel (what the stage's program computes) against SDPA."""
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 6)
    bias = torch.randn(2, 1, 5, 5)
    got = torch.ops.optc.ort_multihead_attention(q.transpose(1, 2).flatten(2), k, v, bias, 3, 0.3, False)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3).transpose(1, 2).flatten(2)
    torch.testing.assert_close(got, want)
    flat = [x.transpose(1, 2).flatten(2) for x in (q, k, v)]     # every operand as [B, L, N*H]
    torch.testing.assert_close(torch.ops.optc.ort_multihead_attention(*flat, bias, 3, 0.3, False), want)
    got = torch.ops.optc.ort_multihead_attention(q.transpose(1, 2).flatten(2), k, v, None, 3, 0.5, True)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.5).transpose(1, 2).flatten(2)
    torch.testing.assert_close(got, want)


def test_saved_artifact_keeps_the_kernel(tmp_path):
    torch.manual_seed(0)
    model = Attn(mask="padding").eval()
    inputs = _inputs()
    compiled, _ = optc.compile(model, inputs, backend="onnx")
    compiled.save(str(tmp_path / "m"))
    loaded = optc.load(str(tmp_path / "m"))
    assert _count(loaded, "MultiHeadAttention") == 1
    with torch.no_grad():
        check_close(model(*inputs), loaded(*inputs), rtol=1e-5)
