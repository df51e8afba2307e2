"""The ONNX backend's ort-contrib-ops stage: attention as ONNX Runtime's MultiHeadAttention and
GroupQueryAttention kernels, rotary embeddings as its RotaryEmbedding kernel.

Each case compiles a module whose attention (or rotary embedding) the default pipeline fuses and
checks the ONNX model ONNX Runtime receives: how many ``com.microsoft`` nodes of the kernel it
has, that the result matches eager within float32 rounding (also on inputs other than the
example), and, where the kernel cannot take the op, that the stage refused with the reason in its
report. The rotary rule needs cos/sin proven to hold each angle twice: that proof is tested on its
own too.
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


def test_boolean_mask_reaches_the_kernel_as_a_float_bias():
    """The ONNX legalization writes a boolean mask as a float bias and zeros the rows it masks out
    entirely (torch's SDPA does; ONNX Runtime's kernel would average the values there), so
    MultiHeadAttention takes it: here a whole batch row is padding."""
    torch.manual_seed(0)
    model = Attn(mask="bool_sdpa").eval()
    x, pad = _inputs()
    pad[1] = 0.0
    compiled, report = optc.compile(model, (x, pad), backend="onnx")
    assert report.backend_stage.stats("legalize") == {"sdpa-masked-rows-as-zeros": 1}
    assert _stage_record(report).stats == {"ort-multihead-attention": 1}
    assert _count(compiled, "MultiHeadAttention") == 1
    with torch.no_grad():
        ref = model(x, pad)
        check_close(ref, compiled(x, pad), rtol=1e-5)
    assert torch.allclose(ref[1], model.o.bias.expand_as(ref[1]))       # the masked row: zeros through o


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


# ---- ort-rotary-embedding ------------------------------------------------------------------------
class Rope(nn.Module):
    """A query projection rotated by angles computed from position ids as transformers computes
    them (``form``): ``half`` -- Llama's ``cat((f, f))`` and ``rotate_half`` on ``[B, N, S, H]``;
    ``interleaved`` -- GPT-J's ``repeat_interleave(2)`` and ``rotate_every_two`` on ``[B, S, N, H]``;
    and lookalikes the kernel cannot take: ``different halves`` (``cat((f, 2 f))``), ``per head``
    (angles scaled per head), ``table`` (a constant cos/sin table whose halves differ)."""

    def __init__(self, form="half", d=32, heads=4):
        super().__init__()
        self.form, self.n, self.dh = form, heads, d // heads
        self.q = nn.Linear(d, d)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, self.dh, 2).float() / self.dh))
        f = torch.arange(16).float()[:, None] * self.inv_freq
        self.register_buffer("cos_table", torch.cat((f, 2 * f), -1).cos())
        self.register_buffer("sin_table", torch.cat((f, 2 * f), -1).sin())

    def forward(self, x, pos):
        b, s, _ = x.shape
        f = pos[:, :, None].float() * self.inv_freq                     # [B, S, H/2]
        q = self.q(x).view(b, s, self.n, self.dh)
        if self.form == "interleaved":
            cos, sin = (t.repeat_interleave(2, -1)[:, :, None] for t in (f.cos(), f.sin()))
            rot = torch.stack((-q[..., 1::2], q[..., 0::2]), -1).flatten(-2)
            return (q * cos + rot * sin).flatten(2)
        if self.form == "table":
            cos, sin = self.cos_table[None, None, :s], self.sin_table[None, None, :s]
        else:
            emb = torch.cat((f, 2 * f if self.form == "different halves" else f), -1)[:, None]
            if self.form == "per head":
                emb = emb * torch.arange(1, self.n + 1, dtype=emb.dtype)[None, :, None, None]
            cos, sin = emb.cos() * 1.0, emb.sin() * 1.0                   # HF's attention_scaling
        q = q.transpose(1, 2)
        h = self.dh // 2
        rot = torch.cat((-q[..., h:], q[..., :h]), -1)
        return (q * cos + rot * sin).transpose(1, 2).flatten(2)


def _rope_inputs(b=2, s=7, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # every batch row its own positions
    pos = torch.stack([torch.randperm(16, generator=g)[:s] for _ in range(b)])
    return torch.randn(b, s, d, generator=g), pos


def _attrs(compiled, op_type):
    node = next(n for n in _proto(compiled).graph.node if n.op_type == op_type)
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("form", ["half", "interleaved"])
def test_rotary_runs_as_rotary_embedding_with_positions_per_batch_row(form):
    torch.manual_seed(0)
    model = Rope(form).eval()
    inputs = _rope_inputs()
    compiled, report = optc.compile(model, inputs, backend="onnx")
    rec = _stage_record(report)
    assert rec.stats == {"ort-rotary-embedding": 1} and rec.rejections == []
    assert _count(compiled, "RotaryEmbedding") == 1 and _count(compiled, "Neg") == 0
    assert _attrs(compiled, "RotaryEmbedding")["interleaved"] == (form == "interleaved")
    with torch.no_grad():
        for seed in (0, 3):
            inputs = _rope_inputs(seed=seed)
            check_close(model(*inputs), compiled(*inputs), rtol=1e-5)


def test_interleaved_rotary_with_a_dynamic_sequence_length():
    # the angles' proof and the position ids with a symbolic length (GPT-J's form, [B, S, N*H])
    torch.manual_seed(0)
    model = Rope("interleaved").eval()
    s = torch.export.Dim("s", min=2, max=16)
    compiled, _ = optc.compile(model, _rope_inputs(), backend="onnx", dynamic_shapes=({1: s}, {1: s}))
    assert _count(compiled, "RotaryEmbedding") == 1
    with torch.no_grad():
        for length in (3, 12):
            inputs = _rope_inputs(s=length, seed=length)
            check_close(model(*inputs), compiled(*inputs), rtol=1e-5)


@pytest.mark.parametrize("form, why", [
    ("different halves", "cos %cos is not proven to hold each angle twice: %cat (aten.cat) joins [%mul (aten.mul.Tensor), "
                         "%mul_1 (aten.mul.Tensor)] along the last dim, not one tensor twice"),
    ("table", "holds different halves"),
    ("per head", "vary over the heads")])
def test_rotary_lookalikes_stay_unlowered_with_the_reason(form, why):
    torch.manual_seed(0)
    model = Rope(form).eval()
    inputs = _rope_inputs()
    compiled, report = optc.compile(model, inputs, backend="onnx")
    rec = _stage_record(report)
    assert "ort-rotary-embedding" not in rec.stats
    reasons = [r for rule, _, r in rec.rejections if rule == "ort-rotary-embedding"]
    assert len(reasons) == 1 and why in reasons[0], rec.rejections
    assert _count(compiled, "RotaryEmbedding") == 0
    with torch.no_grad():
        for seed in (0, 3):
            inputs = _rope_inputs(seed=seed)
            check_close(model(*inputs), compiled(*inputs), rtol=1e-5)


def test_the_rotary_option_turns_the_rule_off():
    # ort-contrib-ops{rotary=false}: what benchmarks/bench_ort_contrib.py --rotary compares against
    from optc.backends.lowering import resolve
    from optc.backends.stage import run_stage
    torch.manual_seed(0)
    program = optc.optimize(optc.capture(Rope().eval(), _rope_inputs()))[0]
    tgt, be = resolve("cpu", "onnx", {})
    for on in (True, False):
        passes = [f"ort-contrib-ops{{rotary={str(on).lower()}}}" if p == "ort-contrib-ops" else p
                  for p in be.stage(program, tgt)]
        staged, report = run_stage(program, passes, tgt, native_ops=be.native_ops(tgt))
        rec = next(r for r in report.records if r.name.startswith("ort-contrib-ops"))
        assert rec.stats.get("ort-rotary-embedding", 0) == int(on)
        assert sum(n.target is torch.ops.optc.ort_rotary_embedding.default for n in staged.graph.nodes) == int(on)


class _Llama(nn.Module):
    """HF's LlamaModel (small config, random weights) returning its hidden state; ``pos``, when
    given, its position ids."""

    def __init__(self):
        super().__init__()
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
                                       attn_implementation="eager")
        self.model = transformers.LlamaModel(cfg).eval()

    def forward(self, ids, *pos):
        return self.model(input_ids=ids, position_ids=pos[0] if pos else None, use_cache=False).last_hidden_state


@pytest.mark.parametrize("positions", [False, True], ids=["folded cos/sin", "position ids per batch row"])
def test_llama_rotary_runs_as_rotary_embedding(positions, tmp_path):
    """HF Llama: without position ids the pipeline folds cos/sin to constants (proven by value);
    with them, batch 2 with different positions per row, the angles are computed in the graph
    (``cat((freqs, freqs))``, ``cos``, the attention scaling, ``unsqueeze``: proven from it)."""
    model = _Llama().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 7), generator=g)
    pos = torch.stack([torch.arange(7), torch.arange(20, 27)])
    inputs = (ids, pos) if positions else (ids,)
    compiled, report = optc.compile(model, inputs, backend="onnx")
    rec = _stage_record(report)
    assert rec.stats == {"ort-rotary-embedding": 4, "ort-group-query-attention": 2} and rec.rejections == []
    compiled.save(str(tmp_path / "m"))
    loaded = optc.load(str(tmp_path / "m"))
    assert _count(loaded, "RotaryEmbedding") == 4 and _count(loaded, "Neg") == 0
    with torch.no_grad():
        check_close(model(*inputs), loaded(*inputs), rtol=1e-5)
        if positions:
            other = (ids, torch.tensor([[5, 3, 0, 40, 2, 9, 9], [63, 1, 2, 3, 4, 5, 6]]))
            check_close(model(*other), loaded(*other), rtol=1e-5)


def test_rotary_reference_kernel_is_the_rotary_embedding():
    """optc::ort_rotary_embedding's own kernel (what the stage's program computes) against
    optc::rotary_embedding, on [B, N, S, H] and [B, S, N*H], caches indexed by position ids."""
    g = torch.Generator().manual_seed(0)
    b, n, s, h = 2, 3, 5, 8
    cache = torch.randn(20, h // 2, generator=g)
    cos_cache, sin_cache = cache.cos(), cache.sin()
    pos = torch.randint(0, 20, (b, s), generator=g)
    x = torch.randn(b, n, s, h, generator=g)
    for interleaved in (False, True):
        def full(c):
            c = c[pos]
            return (c.repeat_interleave(2, -1) if interleaved else torch.cat((c, c), -1))[:, None]
        want = torch.ops.optc.rotary_embedding(x, full(cos_cache), full(sin_cache), interleaved)
        got = torch.ops.optc.ort_rotary_embedding(x, pos, cos_cache, sin_cache, interleaved, 0)
        torch.testing.assert_close(got, want)
        got = torch.ops.optc.ort_rotary_embedding(x.transpose(1, 2).flatten(2), pos, cos_cache, sin_cache,
                                                  interleaved, n)
        torch.testing.assert_close(got, want.transpose(1, 2).flatten(2))


class _Angles(nn.Module):
    """cos/sin-like operands (``f`` ``[S, H/2]``, an input: nothing is known of its values)."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        self.w = nn.Parameter(torch.randn(8))

    def forward(self, f):
        twice = torch.cat((f, f), -1)                                       # [S, H]
        forms = {"scaled": lambda: (twice.cos() * 0.5 / twice.sum(-1, keepdim=True))[None, None],
                 "repeat_interleave": lambda: f.sin().repeat_interleave(2, -1).to(torch.float32),
                 "cat of different": lambda: torch.cat((f, 2 * f), -1),
                 "cat along rows": lambda: torch.cat((f, f), 0),
                 "transposed": lambda: twice.transpose(0, 1),                  # S == H: same width
                 "times a weight": lambda: twice * self.w}
        return forms[self.form]()


@pytest.mark.parametrize("form, interleaved, why", [
    ("scaled", False, None),
    ("repeat_interleave", True, None),
    ("repeat_interleave", False, "%repeat_interleave (aten.repeat_interleave.self_int) is not a step the proof knows"),
    ("scaled", True, "%cat (aten.cat) joins [%f (placeholder), %f (placeholder)] along the last dim"),
    ("cat of different", False, "joins [%f (placeholder), %mul (aten.mul.Tensor)] along the last dim"),
    ("cat along rows", False, "%f (placeholder) is an input"),
    ("transposed", False, "%transpose (aten.transpose.int) acts on the last dim"),
    ("times a weight", False, "holds different halves")])
def test_the_proof_that_cos_sin_hold_each_angle_twice(form, interleaved, why):
    from optc.backends.onnx_contrib import holds_each_angle_twice
    program = optc.capture(_Angles(form), (torch.randn(8, 4),))       # S = 8, H = 8
    out = next(n for n in program.graph.nodes if n.op == "output").args[0][0]
    got = holds_each_angle_twice(out, interleaved)
    assert got is None if why is None else (got is not None and why in got), got
