"""ONNX Runtime's fused contrib kernels for what optc's fusions expose (the ONNX backend's stage).

``ort-contrib-ops`` rewrites ops the target pipeline fused into the ``optc::ort_*`` ops below, each
translated to one ``com.microsoft`` node of ONNX Runtime. A rule is here only where a benchmark on
CPU showed the kernel faster than the standard ONNX ops ONNX Runtime runs otherwise
(docs/backends.md, "ONNX Runtime's contrib kernels", with the figures and the command):

``ort-multihead-attention``
    ``scaled_dot_product_attention`` on ``[B, N, S, H]`` operands -> ``MultiHeadAttention``
    (query, key and value as ``[B, L, N*H]``, an additive float mask as its
    ``attention_bias``, ``is_causal`` as ``unidirectional``, the scale as its attribute). Refused,
    with the reason in the pass report, for what that kernel cannot take: a boolean mask, grouped
    key/value heads, dropout, a dtype other than float32, a causal mask over a query and key of
    different lengths (ONNX Runtime aligns it differently), dims unknown at compile time.

``ort-group-query-attention`` (tried first)
    ``scaled_dot_product_attention`` whose key and value are grouped -- ``enable_gqa=True``, or
    HF's ``repeat_kv`` (``x[:, :, None].expand(B, Nkv, n_rep, T, H).reshape(B, Nkv*n_rep, T, H)``)
    on both -> ``GroupQueryAttention`` on the heads before the repeat (the repeat is gone), no
    key/value cache (``total_sequence_length`` and ``seqlens_k`` from the key's length at run
    time), the float mask as ``attention_bias`` with ``causal=0``, or ``is_causal`` as ``causal=1``.
    Refused (the MultiHeadAttention rule then takes the repeated operands): a query and key of
    different lengths (the kernel without a cache attends a prefill to itself), head sizes that
    differ or are not a multiple of 8 (the CPU kernel fails at run time on those), the same
    conditions as above otherwise.

Both take float masks only. A boolean mask reaches them as a float bias: the ONNX backend's
legalization ``sdpa-masked-rows-as-zeros`` (``backends/legalize/onnx.py``, run before this
stage) writes it as ``(not M) * finfo.min`` and sets to zeros the rows it masks out entirely, as
torch's SDPA computes them (ONNX Runtime's kernels give such a row NaN or the values' mean). An
additive mask that may hold ``-inf`` gets the same zeroing of its fully masked rows (the kernels
give NaN there); HF's masks use the dtype's minimum, which is finite, and are left alone.

``ort-rotary-embedding`` (option ``rotary``, on by default)
    a rotary embedding ``x * cos + rotate(x) * sin`` (``fuse-rotary``'s ``optc::rotary_embedding``,
    which ``lower-optc-ops`` has written as its decomposition by the time this stage runs: the rule
    recognises it with fuse-rotary's own pattern) -> ``optc::ort_rotary_embedding``, one
    ``RotaryEmbedding`` node: ``x`` ``[B, N, S, H]`` as the kernel's 4D input, GPT-J's
    ``[B, S, N, H]`` as ``[B, S, N*H]``; the caches ``cos[..., :H/2]`` (interleaved:
    ``cos[..., 0::2]``) as ``[Bc*S, H/2]`` (``Bc``, cos/sin's batch, 1 or ``B``) and
    ``position_ids = arange(Bc*S).view(Bc, S)`` expanded to ``[B, S]``: row ``b``, position ``s``
    reads its own angles, exact for any batch and any positions. The kernel reads ONE angle per
    rotated pair, while ``optc::rotary_embedding`` takes any cos/sin; so the rule fires only where
    cos and sin are proven to hold each angle twice (:func:`holds_each_angle_twice`: from the
    graph -- ``cat([f, f], -1)``, or ``repeat_interleave(f, 2, -1)`` / ``flatten(stack([f, f],
    -1))`` for the interleaved form, through ``cos``/``sin``, casts, scalings by a scalar or by
    what broadcasts along the last dim, and shape ops that keep the last dim -- or a constant by
    value). Refused, with the reason naming the node where the proof stopped: cos/sin not proven
    (``cat([f, g], -1)``), a dtype other than float32, cos/sin that vary over the heads or hold one
    position for a whole sequence, a width or head count unknown at compile time. The kernel alone
    measured 0.3-0.7x the standard ops; the whole Llama 0.48 B at seq 128 (``python
    benchmarks/bench_ort_contrib.py --rotary``, docs/backends.md) 0.987x [0.982, 0.992] with the rule
    on in the quietest of three runs on a shared machine, inside the noise in the other two: on.

Left as standard ONNX (measured, same section): ``rms_norm`` already becomes ONNX Runtime's
SimplifiedLayerNormalization in the session (``backends/onnx.py``); ``SkipLayerNormalization`` is
slower than what it replaces on CPU.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx

from optc.backends.legalize.common import GraphFacts, Legalization, arg, val
from optc.ir.ops import _rotary_embedding_decomp
from optc.ir.pattern import describe
from optc.ir.rewrite import MatchResult, apply_rules, attr_value, is_op
from optc.passes.base import Option, PassContext, PassResult, register_pass

aten = torch.ops.aten


# ---- optc::ort_multihead_attention -----------------------------------------------------------------
@torch.library.custom_op("optc::ort_multihead_attention", mutates_args=())
def ort_multihead_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_bias: Optional[torch.Tensor], num_heads: int, scale: float,
                            unidirectional: bool) -> torch.Tensor:
    """Reference kernel of ONNX Runtime's ``com.microsoft.MultiHeadAttention`` in the forms optc
    writes: ``query`` ``[B, S, N*H]``; ``key``/``value`` ``[B, T, N*H]`` / ``[B, T, N*Hv]`` (or
    ``[B, N, T, H]``: the kernel takes both); ``attention_bias`` added to the scaled scores
    (broadcast to ``[B, N, S, T]``); ``unidirectional``: causal (top-left, ``S == T``).
    Returns ``[B, S, N*Hv]``."""
    b, s, _ = query.shape
    q = query.reshape(b, s, num_heads, -1).transpose(1, 2)
    if key.dim() == 3:
        key = key.reshape(b, key.shape[1], num_heads, -1).transpose(1, 2)
    if value.dim() == 3:
        value = value.reshape(b, value.shape[1], num_heads, -1).transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=attention_bias,
                                                           is_causal=unidirectional, scale=scale)
    return out.transpose(1, 2).flatten(2)


@ort_multihead_attention.register_fake
def _(query, key, value, attention_bias, num_heads, scale, unidirectional):
    width = value.shape[-1] if value.dim() == 3 else num_heads * value.shape[-1]
    return query.new_empty((query.shape[0], query.shape[1], width))


def _register_schema(name: str, doc: str, inputs, attributes, types) -> None:
    """``com.microsoft.<name>`` as an ONNX schema -- ``inputs`` ``(name, type, optional)``,
    ``attributes`` ``(name, "int" | "float", required)``, ``types`` ``(type, [allowed])``, one
    output -- so that onnxscript can build the node and ``onnx.checker`` can check it. Registered
    once per process, only if nobody has."""
    import onnx
    from onnx.defs import OpSchema
    try:
        onnx.defs.get_schema(name, 1, "com.microsoft")
        return
    except onnx.defs.SchemaError:
        pass
    option = {False: OpSchema.FormalParameterOption.Single, True: OpSchema.FormalParameterOption.Optional}
    kinds = {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT}
    schema = OpSchema(name, "com.microsoft", 1, doc=doc,
                      inputs=[OpSchema.FormalParameter(n, t, "", param_option=option[opt]) for n, t, opt in inputs],
                      outputs=[OpSchema.FormalParameter("output", "T", "")],
                      type_constraints=[(t, allowed, "") for t, allowed in types],
                      attributes=[OpSchema.Attribute(n, kinds[k], n, required=req) for n, k, req in attributes])
    onnx.defs.register_schema(schema)


def _register_onnx_schema() -> None:
    """``MultiHeadAttention``'s first six inputs and first output, as ONNX Runtime 1.32 declares them."""
    _register_schema("MultiHeadAttention", "ONNX Runtime's fused attention",
                     [("query", "T", False), ("key", "T", True), ("value", "T", True), ("bias", "T", True),
                      ("key_padding_mask", "M", True), ("attention_bias", "T", True)],
                     [("num_heads", "int", True), ("scale", "float", False), ("unidirectional", "int", False),
                      ("mask_filter_value", "float", False)],
                     [("T", ["tensor(float)", "tensor(float16)"]), ("M", ["tensor(int32)"])])


def _translate_mha(query, key, value, attention_bias=None, num_heads: int = 1, scale: float = 1.0,
                   unidirectional: bool = False):
    import onnxscript
    _register_onnx_schema()
    msft = onnxscript.values.Opset("com.microsoft", 1)
    return msft.MultiHeadAttention(query, key, value, None, None, attention_bias, num_heads=num_heads,
                                   scale=float(scale), unidirectional=int(bool(unidirectional)))


# ---- optc::ort_group_query_attention ---------------------------------------------------------------
@torch.library.custom_op("optc::ort_group_query_attention", mutates_args=())
def ort_group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_bias: Optional[torch.Tensor], num_heads: int, kv_num_heads: int,
                              scale: float, causal: bool) -> torch.Tensor:
    """Reference kernel of ONNX Runtime's ``com.microsoft.GroupQueryAttention`` as optc writes it
    (no key/value cache: a prefill): ``query`` ``[B, S, N*H]``, ``key``/``value`` ``[B, S, Nkv*H]``
    (query head ``i`` reads key/value head ``i // (N / Nkv)``), ``attention_bias`` added to the
    scaled scores (broadcast to ``[B, N, S, S]``), ``causal``: the causal mask. Returns
    ``[B, S, N*H]``."""
    b, s, _ = query.shape
    q = query.reshape(b, s, num_heads, -1).transpose(1, 2)
    k = key.reshape(b, key.shape[1], kv_num_heads, -1).transpose(1, 2)
    v = value.reshape(b, value.shape[1], kv_num_heads, -1).transpose(1, 2)
    rep = num_heads // kv_num_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias, is_causal=causal,
                                                           scale=scale)
    return out.transpose(1, 2).flatten(2)


@ort_group_query_attention.register_fake
def _(query, key, value, attention_bias, num_heads, kv_num_heads, scale, causal):
    return query.new_empty((query.shape[0], query.shape[1], num_heads * (value.shape[-1] // kv_num_heads)))


def _register_gqa_schema() -> None:
    """``GroupQueryAttention``'s first eleven inputs and first output, as ONNX Runtime 1.32 declares them."""
    _register_schema("GroupQueryAttention", "ONNX Runtime's grouped-query attention",
                     [("query", "T", False), ("key", "T", True), ("value", "T", True), ("past_key", "T", True),
                      ("past_value", "T", True), ("seqlens_k", "M", False), ("total_sequence_length", "M", False),
                      ("cos_cache", "T", True), ("sin_cache", "T", True), ("position_ids", "P", True),
                      ("attention_bias", "T", True)],
                     [("num_heads", "int", True), ("kv_num_heads", "int", True), ("scale", "float", False),
                      ("causal", "int", False)],
                     [("T", ["tensor(float)", "tensor(float16)"]), ("M", ["tensor(int32)"]), ("P", ["tensor(int64)"])])


def _translate_gqa(query, key, value, attention_bias=None, num_heads: int = 1, kv_num_heads: int = 1,
                   scale: float = 1.0, causal: bool = False):
    """No cache: ``total_sequence_length`` is the key's length and every row's ``seqlens_k`` that
    length minus one (all keys valid), both computed from the key's shape (dynamic lengths work)."""
    import onnx
    import onnxscript
    from optc.backends.onnx import onnx_opset
    _register_gqa_schema()
    op = onnx_opset()
    msft = onnxscript.values.Opset("com.microsoft", 1)
    total = op.Cast(op.Squeeze(op.Shape(key, start=1, end=2)), to=onnx.TensorProto.INT32)
    seqlens = op.Expand(op.Sub(total, op.CastLike(op.Constant(value_int=1), total)), op.Shape(key, start=0, end=1))
    return msft.GroupQueryAttention(query, key, value, None, None, seqlens,
                                    total, None, None, None, attention_bias, num_heads=num_heads,
                                    kv_num_heads=kv_num_heads, scale=float(scale), causal=int(bool(causal)))


def _int(d):
    """``d`` as an int, or None for a symbolic dim (never guards on it)."""
    if isinstance(d, torch.SymInt):
        return d.node.maybe_as_int()
    return int(d)


def _mask_refusal(mask, qv, n: int, kernel: str) -> str | None:
    """Why ``mask`` cannot be the kernel's additive ``attention_bias`` (None when it can)."""
    if mask is None:
        return None
    mv = val(mask)
    if not isinstance(mv, torch.Tensor):
        return "a mask without a shape"
    if mv.dtype == torch.bool:
        return f"a boolean mask ({kernel} adds a float bias)"
    if mv.dtype != torch.float32:
        return f"a {mv.dtype} mask"
    if mv.dim() > 4:
        return f"a mask of rank {mv.dim()}"
    full = mv.dim() >= 2 and (mv.shape[-2] is qv.shape[2] or mv.shape[-2] == qv.shape[2])
    if not full and not (mv.dim() >= 2 and mv.shape[-2] == 1):
        return "a mask whose query dim is neither the query length nor 1"
    lead = list(mv.shape[:-2])
    lead = [1] * (2 - len(lead)) + lead
    if not (lead[1] == 1 or lead[1] == n):
        return "a mask whose head dim is neither the head count nor 1"
    return None


def _as_bias(rule: Legalization, node: fx.Node, mask, q):
    """The mask as ``[B|1, N|1, S, T]``: padding masks ``[B, 1, 1, T]`` expanded to a row per query."""
    if mask is None:
        return None
    bias, mv = mask, val(mask)
    while mv.dim() < 4:
        bias = rule.emit(node, aten.unsqueeze.default, (bias, 0))
        mv = val(bias)
    if not (mv.shape[-2] is val(q).shape[2] or mv.shape[-2] == val(q).shape[2]):
        s = rule.emit(node, aten.sym_size.int, (q, 2))
        bias = rule.emit(node, aten.expand.default, (bias, [-1, -1, s, -1]))
    return bias


def _same(a, b) -> bool:
    return a is b or a == b


def _unrepeated(t) -> tuple[fx.Node, int] | None:
    """``(x, n_rep)`` when ``t`` is ``x`` ``[B, Nkv, T, H]`` with each head repeated ``n_rep`` times
    as HF's ``repeat_kv`` writes it: ``x[:, :, None].expand(B, Nkv, n_rep, T, H).reshape(B,
    Nkv * n_rep, T, H)`` (captured as ``view``/``reshape``, or as ``clone`` then ``_unsafe_view``)."""
    if not is_op(t, aten.reshape.default, aten.view.default, aten._unsafe_view.default):
        return None
    e = t.args[0]
    if is_op(e, aten.clone.default):     # reshape of an expanded (non-contiguous) tensor: a copy first
        e = e.args[0]
    if not is_op(e, aten.expand.default):
        return None
    u = e.args[0]
    if not (is_op(u, aten.unsqueeze.default) and u.args[1] in (2, -3)):
        return None
    x = u.args[0]
    xv, ev, tv = val(x), val(e), val(t)
    if not all(isinstance(v, torch.Tensor) for v in (xv, ev, tv)) or xv.dim() != 4 or ev.dim() != 5:
        return None
    rep = _int(ev.shape[2])
    if rep is None or not all(_same(ev.shape[i], xv.shape[j]) for i, j in ((0, 0), (1, 1), (3, 2), (4, 3))):
        return None
    nkv = _int(xv.shape[1])
    if nkv is None or _int(tv.shape[1]) != nkv * rep or not all(_same(tv.shape[i], xv.shape[i]) for i in (0, 2, 3)):
        return None
    return x, rep


class SdpaAsOrtGroupQueryAttention(Legalization):
    """Grouped-query attention -> ``GroupQueryAttention`` (module docstring). Not a candidate: an
    attention whose key and value are not grouped (the MultiHeadAttention rule takes it)."""

    name = "ort-group-query-attention"
    backends = ("onnx",)
    targets = (aten.scaled_dot_product_attention.default,)
    kernel = "GroupQueryAttention"

    def check(self, node):
        q, k, v = node.args[:3]
        gqa = bool(arg(node, 7, "enable_gqa", False))
        rk, rv = _unrepeated(k), _unrepeated(v)
        if gqa:
            k0, v0, rep = k, v, None
        elif rk is not None and rv is not None and rk[1] == rv[1]:
            (k0, rep), (v0, _) = rk, rv
        else:
            return None
        qv, kv, vv = val(q), val(k0), val(v0)
        if not all(isinstance(t, torch.Tensor) for t in (qv, kv, vv)) or not qv.dim() == kv.dim() == vv.dim() == 4:
            return MatchResult.fail("operands that are not [B, N, S, H]")
        if not (qv.dtype == kv.dtype == vv.dtype == torch.float32):
            return MatchResult.fail(f"{qv.dtype} operands (ONNX Runtime's CPU kernel is float32)")
        if float(arg(node, 4, "dropout_p", 0.0) or 0.0) != 0.0:
            return MatchResult.fail("dropout")
        if any(_int(t.shape[d]) is None for t in (qv, kv, vv) for d in (1, 3)):
            return MatchResult.fail("the head count or head size is not known at compile time")
        n, nkv = int(qv.shape[1]), int(kv.shape[1])
        if int(vv.shape[1]) != nkv or n % nkv or (rep is not None and n != nkv * rep):
            return MatchResult.fail(f"{n} query heads do not share {nkv} key/value heads evenly")
        if not int(qv.shape[-1]) == int(kv.shape[-1]) == int(vv.shape[-1]):
            return MatchResult.fail("query, key and value head sizes differ")
        if int(qv.shape[-1]) % 8:
            # ONNX Runtime 1.32's CPU kernel fails at run time otherwise (found by optc fuzz)
            return MatchResult.fail(f"head size {int(qv.shape[-1])} is not a multiple of 8 (GroupQueryAttention's "
                                    "CPU kernel requires it)")
        if not _same(qv.shape[2], kv.shape[2]):
            return MatchResult.fail("query and key lengths differ (GroupQueryAttention without a key/value "
                                    "cache attends a prefill to itself)")
        if not _same(kv.shape[0], qv.shape[0]):
            return MatchResult.fail("query and key batch sizes differ")
        mask = arg(node, 3, "attn_mask")
        why = _mask_refusal(mask, qv, n, self.kernel)
        if why:
            return MatchResult.fail(why)
        scale = arg(node, 6, "scale")
        scale = 1.0 / math.sqrt(int(qv.shape[-1])) if scale is None else float(scale)
        return MatchResult.success(q=q, k=k0, v=v0, mask=mask, n=n, nkv=nkv, h=int(qv.shape[-1]), scale=scale,
                                   causal=bool(arg(node, 5, "is_causal", False)))

    def apply(self, node, m):
        q3, k3, v3 = (self.emit(node, aten.flatten.using_ints, (self.emit(node, aten.transpose.int, (x, 1, 2)), 2, 3))
                      for x in (m["q"], m["k"], m["v"]))
        bias = _as_bias(self, node, m["mask"], m["q"])
        out = self.emit(node, torch.ops.optc.ort_group_query_attention.default,
                        (q3, k3, v3, bias, m["n"], m["nkv"], m["scale"], m["causal"]))
        out4 = self.emit(node, aten.unflatten.int, (out, 2, [m["n"], m["h"]]))
        self.replace(node, self.emit(node, aten.transpose.int, (out4, 1, 2)))


class SdpaAsOrtMultiHeadAttention(Legalization):
    """See the module docstring."""

    name = "ort-multihead-attention"
    backends = ("onnx",)
    targets = (aten.scaled_dot_product_attention.default,)
    kernel = "MultiHeadAttention"

    def check(self, node):
        q, k, v = node.args[:3]
        qv, kv, vv = val(q), val(k), val(v)
        if not all(isinstance(t, torch.Tensor) for t in (qv, kv, vv)):
            return MatchResult.fail("an operand without a shape")
        if not qv.dim() == kv.dim() == vv.dim() == 4:
            return MatchResult.fail(f"operands of rank {qv.dim()}, not [B, N, S, H]")
        if not (qv.dtype == kv.dtype == vv.dtype == torch.float32):
            return MatchResult.fail(f"{qv.dtype} operands (ONNX Runtime's CPU kernel is float32)")
        if float(arg(node, 4, "dropout_p", 0.0) or 0.0) != 0.0:
            return MatchResult.fail("dropout")
        if arg(node, 7, "enable_gqa", False):
            return MatchResult.fail("grouped key/value heads (enable_gqa)")
        if any(_int(t.shape[d]) is None for t in (qv, kv, vv) for d in (1, 3)):
            return MatchResult.fail("the head count or head size is not known at compile time")
        n, hq, hk = int(qv.shape[1]), int(qv.shape[-1]), int(kv.shape[-1])
        if int(kv.shape[1]) != n or int(vv.shape[1]) != n:
            return MatchResult.fail(f"{int(kv.shape[1])} key/value heads for {n} query heads (grouped)")
        if hq != hk:
            return MatchResult.fail(f"query head size {hq} != key head size {hk}")
        if kv.shape[0] is not qv.shape[0] and kv.shape[0] != qv.shape[0]:
            return MatchResult.fail("query and key batch sizes differ")
        causal = bool(arg(node, 5, "is_causal", False))
        if causal and not (qv.shape[2] is kv.shape[2] or qv.shape[2] == kv.shape[2]):
            return MatchResult.fail("a causal mask over a query and key of different lengths")
        mask = arg(node, 3, "attn_mask")
        why = _mask_refusal(mask, qv, n, self.kernel)
        if why:
            return MatchResult.fail(why)
        scale = arg(node, 6, "scale")
        scale = 1.0 / math.sqrt(hq) if scale is None else float(scale)
        return MatchResult.success(q=q, k=k, v=v, mask=mask, n=n, hv=int(vv.shape[-1]), scale=scale,
                                   causal=causal)

    def apply(self, node, m):
        # [B, N, L, H] -> [B, L, N*H]: the transpose cancels against the one that split the heads
        q3, k3, v3 = (self.emit(node, aten.flatten.using_ints, (self.emit(node, aten.transpose.int, (x, 1, 2)), 2, 3))
                      for x in (m["q"], m["k"], m["v"]))
        bias = _as_bias(self, node, m["mask"], m["q"])   # ONNX Runtime's bias holds a row per query
        out = self.emit(node, torch.ops.optc.ort_multihead_attention.default,
                        (q3, k3, v3, bias, m["n"], m["scale"], m["causal"]))
        out4 = self.emit(node, aten.unflatten.int, (out, 2, [m["n"], m["hv"]]))
        self.replace(node, self.emit(node, aten.transpose.int, (out4, 1, 2)))


# ---- optc::ort_rotary_embedding --------------------------------------------------------------------
@torch.library.custom_op("optc::ort_rotary_embedding", mutates_args=())
def ort_rotary_embedding(input: torch.Tensor, position_ids: torch.Tensor, cos_cache: torch.Tensor,
                         sin_cache: torch.Tensor, interleaved: bool, num_heads: int) -> torch.Tensor:
    """Reference kernel of ONNX Runtime's ``com.microsoft.RotaryEmbedding`` as optc writes it:
    ``input`` ``[B, S, N*H]`` or ``[B, N, S, H]``, ``position_ids`` ``[B, S]`` (int64),
    ``cos_cache``/``sin_cache`` ``[M, H/2]``: position ``s`` of batch row ``b`` reads row
    ``position_ids[b, s]`` of the caches, one angle per rotated pair -- the halves ``[0, H/2)`` and
    ``[H/2, H)`` of the head (``interleaved``: elements ``2i`` and ``2i+1``) share angle ``i``.
    ``num_heads`` is the kernel's attribute (0: inferred); the head size is twice the caches'
    width. Returns ``input``'s shape."""
    c, s = cos_cache[position_ids], sin_cache[position_ids]          # [B, S, H/2]
    if interleaved:
        c, s = c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)
    else:
        c, s = torch.cat((c, c), -1), torch.cat((s, s), -1)
    if input.dim() == 4:
        return _rotary_embedding_decomp(input, c[:, None], s[:, None], interleaved)
    x = input.unflatten(-1, (-1, c.shape[-1]))
    return _rotary_embedding_decomp(x, c[:, :, None], s[:, :, None], interleaved).flatten(2)


@ort_rotary_embedding.register_fake
def _(input, position_ids, cos_cache, sin_cache, interleaved, num_heads):
    return input.new_empty(input.shape)


def _register_rotary_schema() -> None:
    """``RotaryEmbedding``'s inputs and attributes, as ONNX Runtime 1.32 declares them."""
    _register_schema("RotaryEmbedding", "ONNX Runtime's rotary position embedding",
                     [("input", "T", False), ("position_ids", "M", False), ("cos_cache", "T", False),
                      ("sin_cache", "T", False)],
                     [("interleaved", "int", False), ("num_heads", "int", False), ("rotary_embedding_dim", "int", False),
                      ("scale", "float", False), ("is_packed_batching", "int", False)],
                     [("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]), ("M", ["tensor(int64)"])])


def _translate_rotary(input, position_ids, cos_cache, sin_cache, interleaved: bool = False, num_heads: int = 0):
    import onnxscript
    _register_rotary_schema()
    msft = onnxscript.values.Opset("com.microsoft", 1)
    return msft.RotaryEmbedding(input, position_ids, cos_cache, sin_cache, interleaved=int(bool(interleaved)),
                                num_heads=int(num_heads))


# The proof that a cos/sin operand holds each angle twice along its last dim (``d`` wide): its
# halves are equal (rotate_half) or its even and odd elements are (interleaved). It holds at
#   cat([f, f], -1) and repeat(f, [..., 2])                    (rotate_half; f the same node)
#   repeat_interleave(f, 2, -1) and flatten(stack([f, f], -1))    (interleaved)
#   a constant whose halves (or even and odd elements) are equal (checked by value)
# and carries through what maps each row of the last dim to a row, element by element:
_ELEMENTWISE = (aten.cos.default, aten.sin.default, aten.neg.default, aten._to_copy.default, aten.to.dtype,
                aten.type_as.default, aten.clone.default, aten.alias.default, aten.detach.default,
                aten.contiguous.default, aten.exp.default, aten.reciprocal.default, aten.sqrt.default,
                aten.rsqrt.default)
#   binary arithmetic: every tensor operand proven too, or of last dim 1 (broadcast along it)
_ARITHMETIC = (aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.mul.Scalar, aten.div.Scalar)
#   shape ops whose result keeps the last dim (same width, not sliced, indexed or moved), and a cat
#   along another dim of parts proven each
_ROWS = (aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default,
         aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
         aten.slice.Tensor, aten.select.int, aten.index.Tensor)
_STEPS = 64


def _last(t) -> int | None:
    v = val(t)
    return v.dim() - 1 if isinstance(v, torch.Tensor) and v.dim() else None


def _dims_touched(node: fx.Node) -> tuple[int, ...] | None:
    """The dims (of the input, normalised) that the shape op ``node`` acts on; None if it moves
    the last dim."""
    x, r = node.args[0], _last(node.args[0])
    t = node.target
    if t is aten.unsqueeze.default:
        out = _last(node)
        return None if node.args[1] % (out + 1) == out else ()
    if t in (aten.squeeze.dim, aten.squeeze.dims):
        dims = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
        return tuple(d % (r + 1) for d in dims)
    if t is aten.transpose.int:
        return tuple(d % (r + 1) for d in node.args[1:3])
    if t is aten.permute.default:
        return None if node.args[1][-1] % (r + 1) != r else ()
    if t is aten.cat.default:
        dim = node.args[1] if len(node.args) > 1 else 0
        return (dim % (_last(x[0]) + 1),)
    if t in (aten.slice.Tensor, aten.select.int):
        return (arg(node, 1, "dim", 0) % (r + 1),)
    if t is aten.index.Tensor:
        idx = node.args[1]
        if any(val(i) is not None and val(i).dtype in (torch.bool, torch.uint8) for i in idx):
            return None        # a mask indexes several dims at once
        return (r,) if len(idx) > r and idx[r] is not None else ()
    return ()      # squeeze, expand, view, reshape: the width check below decides


def _constant_twice(node: fx.Node, interleaved: bool) -> str | None:
    v = attr_value(node)
    if v is None:
        return f"{describe(node)} is not a tensor attribute"
    a, b = (v[..., 0::2], v[..., 1::2]) if interleaved else v.chunk(2, -1)
    if a.shape != b.shape or not torch.equal(a, b):
        return f"the constant {describe(node)} holds different {'even and odd elements' if interleaved else 'halves'}"
    return None


def _doubling(node: fx.Node, interleaved: bool) -> bool:
    """``node`` itself doubles a tensor along its last dim in the way ``interleaved`` needs."""
    def last(n, d):
        return _last(n) is not None and d % (_last(n) + 1) == _last(n)
    if not interleaved:
        if is_op(node, aten.cat.default):
            parts = node.args[0]
            return len(parts) == 2 and parts[0] is parts[1] and last(node, node.args[1] if len(node.args) > 1 else 0)
        if is_op(node, aten.repeat.default):
            reps = list(node.args[1])
            return reps[-1] == 2 and len(reps) == _last(node) + 1 and len(reps) == _last(node.args[0]) + 1
        return False
    if is_op(node, aten.repeat_interleave.self_int):
        dim = arg(node, 2, "dim")
        return node.args[1] == 2 and dim is not None and last(node.args[0], dim)
    if is_op(node, aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default) \
            and is_op(node.args[0], aten.stack.default):
        st = node.args[0]
        parts, dim = st.args[0], (st.args[1] if len(st.args) > 1 else 0)
        sv, nv = val(st), val(node)
        return len(parts) == 2 and parts[0] is parts[1] and last(st, dim) and sv is not None and nv is not None \
            and list(nv.shape) == list(sv.shape[:-2]) + [sv.shape[-2] * 2]
    return False


def _twice(node, width, interleaved: bool, memo: dict, steps: list) -> str | None:
    """None when the last dim of ``node`` (``width`` wide) provably holds each angle twice; else
    why not, naming the node where the proof stopped."""
    if node in memo:
        return memo[node]
    steps[0] += 1
    if steps[0] > _STEPS:
        return f"the proof gave up after {_STEPS} nodes"
    v = val(node)
    if v is None or not v.dim() or not _same(v.shape[-1], width):
        why = f"{describe(node)} is not {width} wide in its last dim"
    elif node.op == "get_attr":
        why = _constant_twice(node, interleaved)
    elif node.op != "call_function":
        why = f"{describe(node)} is an input"
    elif _doubling(node, interleaved):
        why = None
    elif node.target in _ELEMENTWISE:
        why = _twice(node.args[0], width, interleaved, memo, steps)
    elif node.target in _ARITHMETIC:
        why = None
        for a in node.args[:2]:
            av = val(a)
            if isinstance(a, fx.Node) and (av is None or (av.dim() and av.shape[-1] != 1)):
                why = why or _twice(a, width, interleaved, memo, steps)
    elif node.target is aten.cat.default:
        parts = node.args[0]
        if _last(parts[0]) in _dims_touched(node):
            why = (f"{describe(node)} joins [{', '.join(describe(p) for p in parts)}] along the last dim, not one "
                   "tensor twice")
        else:         # along another dim: every part proven
            why = next(filter(None, (_twice(p, width, interleaved, memo, steps) for p in parts)), None)
    elif node.target in _ROWS:
        touched = _dims_touched(node)
        if touched is None or _last(node.args[0]) in touched:
            why = f"{describe(node)} acts on the last dim"
        else:
            why = _twice(node.args[0], width, interleaved, memo, steps)
    else:
        why = f"{describe(node)} is not a step the proof knows"
    memo[node] = why
    return why


def holds_each_angle_twice(node: fx.Node, interleaved: bool) -> str | None:
    """None when ``node`` (a rotary's cos or sin) is proven, from the graph, to hold each angle
    twice along its last dim -- the halves equal, or with ``interleaved`` the even and odd
    elements -- as transformers computes them (``cat((freqs, freqs), -1)``, then ``cos``/``sin``,
    a scaling, casts and ``unsqueeze``; GPT-J: ``repeat_interleave(2, -1)``); else why not."""
    v = val(node)
    if v is None or not v.dim():
        return f"{describe(node)} has no shape"
    return _twice(node, v.shape[-1], interleaved, {}, [0])


def _rotary_operands(node: fx.Node):
    """``(x, cos, sin, interleaved)`` of a rotary embedding in any of the forms the stage can hold
    (``optc::rotary_embedding``; ``lower-optc-ops`` wrote it as its decomposition, inlined -- the
    form fuse-rotary recognises -- or called), or None."""
    if node.target in (torch.ops.optc.rotary_embedding.default, _rotary_embedding_decomp):
        x, cos, sin = node.args[:3]
        return x, cos, sin, bool(arg(node, 3, "interleaved", False))
    from optc.passes.fuse_rotary import FuseRotary
    m = FuseRotary().match(node, None)
    if m is None or not m.ok:
        return None        # not a rotary (fuse-rotary's own report says why, where it ran)
    return m["x"], m["cos"], m["sin"], m["interleaved"]


class RotaryAsOrtRotaryEmbedding(Legalization):
    """A rotary embedding -> ``RotaryEmbedding`` where its cos/sin are proven to hold each angle
    twice (module docstring)."""

    name = "ort-rotary-embedding"
    backends = ("onnx",)
    # lower-optc-ops has written optc::rotary_embedding as its decomposition by now (inlined, or
    # called where tracing it captured a symbolic size); the op itself where a backend keeps it
    targets = (aten.add.Tensor, torch.ops.optc.rotary_embedding.default, _rotary_embedding_decomp)
    kernel = "RotaryEmbedding"

    def check(self, node):
        got = _rotary_operands(node)
        if got is None:
            return None
        x, cos, sin, interleaved = got
        xv, cv, sv = val(x), val(cos), val(sin)
        if not all(isinstance(t, torch.Tensor) for t in (xv, cv, sv)):
            return MatchResult.fail("an operand without a shape")
        if not (xv.dtype == cv.dtype == sv.dtype == torch.float32):
            return MatchResult.fail(f"{xv.dtype} operands (ONNX Runtime's CPU kernel is float32 here)")
        if xv.dim() not in (3, 4):
            return MatchResult.fail(f"x of rank {xv.dim()}, not [B, S, D], [B, N, S, H] or [B, S, N, H]")
        d = _int(xv.shape[-1])
        if d is None or d % 2:
            return MatchResult.fail("the rotated width is not known at compile time" if d is None else
                                    f"an odd rotated width {d}")
        if cv.dim() > xv.dim() or list(cv.shape) != list(sv.shape):
            return MatchResult.fail(f"cos {list(cv.shape)} and sin {list(sv.shape)} differ in shape or rank")
        cs = [1] * (xv.dim() - cv.dim()) + list(cv.shape)
        if not _same(cs[-1], xv.shape[-1]):
            return MatchResult.fail("cos/sin are broadcast along the rotated dim")
        if not (_int(cs[0]) == 1 or _same(cs[0], xv.shape[0])):
            return MatchResult.fail("cos/sin of another batch size")
        if xv.dim() == 3:
            seq, heads = 1, None
        elif _int(cs[1]) == 1 and _same(cs[2], xv.shape[2]):
            seq, heads = 2, 1          # [B, N, S, H]: the kernel's 4D form
        elif _int(cs[2]) == 1 and _same(cs[1], xv.shape[1]):
            seq, heads = 1, 2          # [B, S, N, H] (GPT-J's): as [B, S, N*H]
        elif _int(cs[1]) != 1 and _int(cs[2]) != 1:
            return MatchResult.fail(f"cos/sin {list(cv.shape)} vary over the heads of x {list(xv.shape)} (the kernel "
                                    "reads one angle per position)")
        else:
            seq, heads = None, None
        if seq is None or not _same(cs[seq], xv.shape[seq]):
            return MatchResult.fail("cos/sin of one position broadcast over the sequence (the kernel's cache needs a "
                                    "row per position)")
        n = 0 if heads != 2 else _int(xv.shape[2])
        if n is None:
            return MatchResult.fail("the head count is not known at compile time")
        for name, t in (("cos", cos), ("sin", sin)):
            why = holds_each_angle_twice(t, interleaved)
            if why:
                return MatchResult.fail(f"{name} %{t.name} is not proven to hold each angle twice: {why}")
        return MatchResult.success(x=x, cos=cos, sin=sin, interleaved=interleaved, rank=xv.dim(), heads=heads, n=n,
                                   d=d)

    def _size(self, node, t, dim):
        """Dim ``dim`` of ``t``: an int, or a ``sym_size`` node for a symbolic one."""
        s = _int(val(t).shape[dim])
        return s if s is not None else self.emit(node, aten.sym_size.int, (t, dim))

    def _cache(self, node, t, m):
        """``cos``/``sin`` ``[..., d]`` -> the kernel's cache ``[Bc * S, d/2]``: one angle per pair."""
        d = m["d"]
        half = self.emit(node, aten.slice.Tensor, (t, -1, 0, d, 2) if m["interleaved"] else (t, -1, 0, d // 2))
        while val(half).dim() < m["rank"]:
            half = self.emit(node, aten.unsqueeze.default, (half, 0))
        if m["heads"] is not None:
            half = self.emit(node, aten.squeeze.dim, (half, m["heads"]))          # [Bc, S, d/2]
        return half, self.emit(node, aten.flatten.using_ints, (half, 0, 1))

    def apply(self, node, m):
        x = m["x"]
        rows, cos_cache = self._cache(node, m["cos"], m)
        _, sin_cache = self._cache(node, m["sin"], m)
        # position_ids [B, S]: row b, position s reads cache row b * S + s (row s when cos/sin
        # have batch 1): arange(Bc * S).view(Bc, S), expanded over the batch
        bc, s = self._size(node, rows, 0), self._size(node, rows, 1)
        total = self._size(node, cos_cache, 0)
        ids = self.emit(node, aten.arange.default, (total,), {"dtype": torch.int64, "device": val(x).device})
        ids = self.emit(node, aten.view.default, (ids, [bc, s]))
        if not _same(val(rows).shape[0], val(x).shape[0]):
            ids = self.emit(node, aten.expand.default, (ids, [self._size(node, x, 0), -1]))
        if m["heads"] == 2:
            x3 = self.emit(node, aten.flatten.using_ints, (x, 2, 3))
            out = self.emit(node, torch.ops.optc.ort_rotary_embedding.default,
                            (x3, ids, cos_cache, sin_cache, m["interleaved"], m["n"]))
            out = self.emit(node, aten.unflatten.int, (out, 2, [m["n"], m["d"]]))
        else:
            out = self.emit(node, torch.ops.optc.ort_rotary_embedding.default,
                            (x, ids, cos_cache, sin_cache, m["interleaved"], 0))
        self.replace(node, out)


@register_pass("ort-contrib-ops", exact=True,
               description="ONNX: fused ops as ONNX Runtime's com.microsoft kernels, where they measured faster",
               options={"rotary": Option(bool, True, "rotary embeddings as RotaryEmbedding (ort-rotary-embedding)")})
def ort_contrib_ops(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    facts = GraphFacts(gm)
    rules = [SdpaAsOrtGroupQueryAttention(facts), SdpaAsOrtMultiHeadAttention(facts)]
    if ctx.options.get("rotary", True):
        rules.append(RotaryAsOrtRotaryEmbedding(facts))
    n = apply_rules(gm, rules, ctx)
    if n:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(gm, n > 0, dict(ctx.stats))


from optc.backends.onnx import register_onnx_translation  # noqa: E402  (onnx.py imports this module last)

register_onnx_translation(torch.ops.optc.ort_rotary_embedding.default, _translate_rotary)

__all__ = ["ort_multihead_attention", "ort_group_query_attention", "ort_rotary_embedding", "ort_contrib_ops",
           "SdpaAsOrtMultiHeadAttention", "SdpaAsOrtGroupQueryAttention", "RotaryAsOrtRotaryEmbedding",
           "holds_each_angle_twice"]
