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

Both take float masks only: a boolean mask is refused (a fully masked row is NaN in ONNX
Runtime's kernels and zeros in torch's SDPA, so converting it to ``-inf`` would not be exact).
An additive mask that is ``-inf`` on a whole row has the same difference; HF's masks use the
dtype's minimum, which is finite.

Left as standard ONNX (measured, same section): ``rms_norm`` already becomes ONNX Runtime's
SimplifiedLayerNormalization in the session (``backends/onnx.py``); ``SkipLayerNormalization`` is
slower than what it replaces on CPU; ``RotaryEmbedding`` is faster as a kernel but not lowered
(it needs cos/sin proven to hold each angle twice, which ``fuse-rotary`` does not record).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx

from optc.backends.legalize.common import GraphFacts, Legalization, arg, val
from optc.ir.rewrite import MatchResult, apply_rules, is_op
from optc.passes.base import PassContext, PassResult, register_pass

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


@register_pass("ort-contrib-ops", exact=True,
               description="ONNX: fused ops as ONNX Runtime's com.microsoft kernels, where they measured faster")
def ort_contrib_ops(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    facts = GraphFacts(gm)
    rules = [SdpaAsOrtGroupQueryAttention(facts), SdpaAsOrtMultiHeadAttention(facts)]
    n = apply_rules(gm, rules, ctx)
    if n:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(gm, n > 0, dict(ctx.stats))


__all__ = ["ort_multihead_attention", "ort_group_query_attention", "ort_contrib_ops", "SdpaAsOrtMultiHeadAttention",
           "SdpaAsOrtGroupQueryAttention"]
