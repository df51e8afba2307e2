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

Left as standard ONNX (measured, same section): ``rms_norm`` already becomes ONNX Runtime's
SimplifiedLayerNormalization in the session (``backends/onnx.py``); ``SkipLayerNormalization`` is
slower than what it replaces on CPU; ``GroupQueryAttention`` and ``RotaryEmbedding`` are not
written (not measured).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx

from optc.backends.legalize.common import GraphFacts, Legalization, arg, val
from optc.ir.rewrite import MatchResult, apply_rules
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


def _register_onnx_schema() -> None:
    """``com.microsoft.MultiHeadAttention`` as an ONNX schema (its first six inputs and first
    output, as ONNX Runtime 1.32 declares them), so that onnxscript can build the node and
    ``onnx.checker`` can check it. Registered once per process, only if nobody has."""
    import onnx
    from onnx.defs import OpSchema
    try:
        onnx.defs.get_schema("MultiHeadAttention", 1, "com.microsoft")
        return
    except onnx.defs.SchemaError:
        pass
    single, optional = OpSchema.FormalParameterOption.Single, OpSchema.FormalParameterOption.Optional
    inputs = [OpSchema.FormalParameter(name, t, "", param_option=option) for name, t, option in (
        ("query", "T", single), ("key", "T", optional), ("value", "T", optional), ("bias", "T", optional),
        ("key_padding_mask", "M", optional), ("attention_bias", "T", optional))]
    attrs = [OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, "number of attention heads"),
             OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "scale of Q*K'", required=False),
             OpSchema.Attribute("unidirectional", OpSchema.AttrType.INT, "causal", required=False),
             OpSchema.Attribute("mask_filter_value", OpSchema.AttrType.FLOAT, "fill of masked keys", required=False)]
    schema = OpSchema("MultiHeadAttention", "com.microsoft", 1, doc="ONNX Runtime's fused attention",
                      inputs=inputs, outputs=[OpSchema.FormalParameter("output", "T", "")],
                      type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""),
                                        ("M", ["tensor(int32)"], "")],
                      attributes=attrs)
    onnx.defs.register_schema(schema)


def _translate_mha(query, key, value, attention_bias=None, num_heads: int = 1, scale: float = 1.0,
                   unidirectional: bool = False):
    import onnxscript
    _register_onnx_schema()
    msft = onnxscript.values.Opset("com.microsoft", 1)
    return msft.MultiHeadAttention(query, key, value, None, None, attention_bias, num_heads=num_heads,
                                   scale=float(scale), unidirectional=int(bool(unidirectional)))


def _int(d):
    """``d`` as an int, or None for a symbolic dim (never guards on it)."""
    if isinstance(d, torch.SymInt):
        return d.node.maybe_as_int()
    return int(d)


class SdpaAsOrtMultiHeadAttention(Legalization):
    """See the module docstring."""

    name = "ort-multihead-attention"
    backends = ("onnx",)
    targets = (aten.scaled_dot_product_attention.default,)

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
        if mask is not None:
            mv = val(mask)
            if not isinstance(mv, torch.Tensor):
                return MatchResult.fail("a mask without a shape")
            if mv.dtype == torch.bool:
                return MatchResult.fail("a boolean mask (MultiHeadAttention adds a float bias)")
            if mv.dtype != torch.float32:
                return MatchResult.fail(f"a {mv.dtype} mask")
            if mv.dim() > 4:
                return MatchResult.fail(f"a mask of rank {mv.dim()}")
            full = mv.dim() >= 2 and (mv.shape[-2] is qv.shape[2] or mv.shape[-2] == qv.shape[2])
            if not full and not (mv.dim() >= 2 and mv.shape[-2] == 1):
                return MatchResult.fail("a mask whose query dim is neither the query length nor 1")
            lead = list(mv.shape[:-2])
            lead = [1] * (2 - len(lead)) + lead
            if not (lead[1] == 1 or lead[1] == n):
                return MatchResult.fail("a mask whose head dim is neither the head count nor 1")
        scale = arg(node, 6, "scale")
        scale = 1.0 / math.sqrt(hq) if scale is None else float(scale)
        return MatchResult.success(q=q, k=k, v=v, mask=mask, n=n, hv=int(vv.shape[-1]), scale=scale,
                                   causal=causal)

    def apply(self, node, m):
        # [B, N, L, H] -> [B, L, N*H]: the transpose cancels against the one that split the heads
        q3, k3, v3 = (self.emit(node, aten.flatten.using_ints, (self.emit(node, aten.transpose.int, (x, 1, 2)), 2, 3))
                      for x in (m["q"], m["k"], m["v"]))
        bias = m["mask"]
        if bias is not None:
            mv = val(bias)
            while mv.dim() < 4:
                bias = self.emit(node, aten.unsqueeze.default, (bias, 0))
                mv = val(bias)
            if not (mv.shape[-2] is val(m["q"]).shape[2] or mv.shape[-2] == val(m["q"]).shape[2]):
                # a padding mask [B, 1, 1, T]: ONNX Runtime's bias holds a row per query
                s = self.emit(node, aten.sym_size.int, (m["q"], 2))
                bias = self.emit(node, aten.expand.default, (bias, [-1, -1, s, -1]))
        out = self.emit(node, torch.ops.optc.ort_multihead_attention.default,
                        (q3, k3, v3, bias, m["n"], m["scale"], m["causal"]))
        out4 = self.emit(node, aten.unflatten.int, (out, 2, [m["n"], m["hv"]]))
        self.replace(node, self.emit(node, aten.transpose.int, (out4, 1, 2)))


@register_pass("ort-contrib-ops", exact=True,
               description="ONNX: fused ops as ONNX Runtime's com.microsoft kernels, where they measured faster")
def ort_contrib_ops(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    rules = [SdpaAsOrtMultiHeadAttention(GraphFacts(gm))]
    n = apply_rules(gm, rules, ctx)
    if n:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(gm, n > 0, dict(ctx.stats))


__all__ = ["ort_multihead_attention", "ort_contrib_ops", "SdpaAsOrtMultiHeadAttention"]
