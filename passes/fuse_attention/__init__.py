"""Fuse attention written out by hand into ``aten.scaled_dot_product_attention``.

Anchored at **every softmax** (a softmax that is not attention says why, so no candidate is
missed silently), the rule walks two chains (``chain.py``)::

    %scores = aten.matmul | aten.bmm (%q, %kT)     | aten.baddbmm(%bias, %q, %kT, beta=1, alpha=a)
      ... any number of steps, in any order:
          scale   aten.mul / aten.div by a scalar constant (on the scores, on q, on k^T)
          mask    aten.add(%x, %mask)                additive (position bias, ALiBi, padding)
                  aten.masked_fill(%x, %cond, fill) | aten.where(%keep, %x, fill) | where(%cond, fill, %x)
          cast    aten.to / _to_copy / type_as       (a float32 softmax in a half program)
          reshape view / reshape / unsqueeze ...     that keeps the last two dims (heads folded
                                                     into the batch for bmm, MBart, BLOOM)
    %probs  = aten.softmax | aten._softmax | aten._safe_softmax (%x, -1)
      ... eval dropout, casts back, reshapes
    %out    = aten.matmul | aten.bmm (%probs, %v)
  ==>
    %out    = [reshape](aten.scaled_dot_product_attention(%q', %k', %v', attn_mask=M | is_causal, scale=s))

``s`` is the product of every scale found. SDPA runs in the frame with the most dims among the
shapes the scores take (so a 4-d mask of a bmm attention is not expanded): q, k, v are reshaped to
it, the output back. k and v whose batch dims broadcast against q's (multi-query attention,
Falcon) are expanded. ``%k`` is recovered from ``%kT`` by composing its transpose/permute with the
swap of the last two dims. ``scale=`` is always passed (SDPA's default is ``1/sqrt(E)``).

Masks, and why the replacement computes the same function:

- one additive mask is passed as ``attn_mask``; SDPA adds it after scaling, as the model does.
- several steps are combined into one additive mask by applying them, in order, to zero scores:
  ``add`` terms are summed, a fill overwrites what came before. Exact for ``-inf`` fills and for
  finite fills that absorb every score (``fill + s == fill`` in the scores' dtype for
  ``|s| <= 2**20``, e.g. ``finfo.min``); other finite fills (``-1e9`` with a run-time mask) are
  refused: a fully-masked row would differ. Summing the terms first rounds differently from adding
  them one by one to the scores (an ulp of the scores).
- a single fill with a constant mask (built from attributes, e.g. a ``tril`` buffer) whose every
  row keeps a position: any fill at or below -2**21 gives exactly-zero weights, and a bool mask is
  used; a constant mask equal to ``tril(ones(L, S))`` becomes ``is_causal=True``.
- Divergence, by design: a row whose every score is ``-inf`` gives NaN (0/0) in the model and 0
  from SDPA (``_safe_softmax`` gives 0 too). It cannot be checked at compile time for masks
  computed at run time.

Refused, each with its reason (``optc dump -v``, the report's rejections): a softmax not over
the last dim or whose output feeds something other than ``probs @ v`` (a MoE router); a scale
applied after a mask; soft-capping (``tanh``) between the scores and the softmax (Gemma-2);
probabilities rounded to another dtype than the scores before the matmul (Inductor's patterns
7-10 in a float32 program); any intermediate with another user that reads its value (users that
read only the shape, ``sym_size`` and torch.export's assertions, do not count); a mask that
enlarges the scores or has another dtype; q broadcast against k; reshapes of the batch with
dynamic shapes.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.fx as fx

from optc.ir.pattern import value_users
from optc.ir.queries import constant_value, val
from optc.ir.rewrite import MatchResult, RewriteRule, apply_rules, arg, call, erase_if_unused, is_op
from optc.passes.base import PassContext, PassResult, register_pass
from optc.passes.fuse_attention.chain import (
    _CASTS, _CONST_EVAL_NODES, _CONST_EVAL_NUMEL, _LOW_FILL, _SOFTMAX, _Step, _absorbs, _combined_mask,
    _compile_time_op, _dims, _erase_dead_inputs, _expand_to, _is_causal, _keep_node, _keep_rows_ok, _op_name,
    _perm_of, _reaches_scores, _reframe, _strip_scale, _walk_to_matmul, _walk_to_scores,
)

log = logging.getLogger(__name__)
aten = torch.ops.aten


# ---- the rule ------------------------------------------------------------------------------------
class FuseAttention(RewriteRule):
    """Anchored at every softmax: a softmax that is not attention says why (``optc dump -v``)."""

    name = "fuse-attention"

    def match(self, softmax: fx.Node, ctx: PassContext) -> MatchResult | None:
        if not is_op(softmax, *_SOFTMAX):
            return None
        sin = softmax.args[0]
        sv, iv = val(softmax), val(sin)
        if sv is None or iv is None:
            return MatchResult.fail("missing shape metadata")
        rank = iv.dim()
        dim = arg(softmax, 1, "dim")
        if rank == 0 or dim % rank != rank - 1:
            return MatchResult.fail(f"softmax over dim {dim}, attention needs the last dim ({rank - 1})")
        down = _walk_to_matmul(softmax)
        if isinstance(down, str):
            return MatchResult.fail(down)
        probs_chain, node = down
        v = node.args[1]
        up = _walk_to_scores(sin)
        if isinstance(up, str):
            return MatchResult.fail(up)
        steps, scores = up
        if len(value_users(scores)) != 1:
            return MatchResult.fail(f"the attention scores {_op_name(scores)} have other users")

        # dtypes: scores, softmax and probabilities in one dtype, or an upcast softmax cast back
        sc = val(scores)
        if sc is None or not sc.dtype.is_floating_point:
            return MatchResult.fail("the scores are not floating point")
        casts_up = [s for s in steps if s.kind == "cast"]
        casts_down = [p for p in probs_chain if is_op(p, *_CASTS)]
        pv = val(node.args[0])
        if is_op(softmax, aten._softmax.default) and arg(softmax, 2, "half_to_float") and pv.dtype != iv.dtype:
            return MatchResult.fail("softmax computes in float32 for half inputs (half_to_float)")
        upcast = sv.dtype != sc.dtype
        if pv.dtype != sc.dtype:
            return MatchResult.fail(
                f"the probabilities are {pv.dtype} at the matmul with v, the scores {sc.dtype}: the program "
                f"rounds them (SDPA computes in one dtype)")
        if upcast and not (sv.dtype == torch.float32 and sc.dtype in (torch.float16, torch.bfloat16)):
            return MatchResult.fail(f"softmax computes in {sv.dtype}, the scores are {sc.dtype}")
        for s in casts_up:
            if val(s.node).dtype not in (sc.dtype, sv.dtype):
                return MatchResult.fail(f"{_op_name(s.node)} casts the scores to {val(s.node).dtype}")
        if any(val(s.node).dtype != sc.dtype for s in steps if s.kind in ("add", "fill")):
            return MatchResult.fail("a mask is applied to the scores in float32 after an upcast; SDPA adds it "
                                    f"in {sc.dtype}")
        del casts_down

        # q, k, v
        scale = 1.0
        for s in steps:
            if s.kind == "scale":
                scale *= s.factor
        extra_add = None
        if is_op(scores, aten.baddbmm.default):
            beta, alpha = arg(scores, 3, "beta", 1), arg(scores, 4, "alpha", 1)
            if beta != 1:
                return MatchResult.fail(f"baddbmm {_op_name(scores)} has beta={beta}")
            scale *= alpha
            extra_add = scores.args[0]
            qk = scores.args[1:3]
        else:
            qk = scores.args
        q_chain: list[fx.Node] = []
        k_chain: list[fx.Node] = []
        q, scale = _strip_scale(qk[0], scale, q_chain)
        kT, scale = _strip_scale(qk[1], scale, k_chain)
        for n in [*q_chain, *k_chain]:
            if len(value_users(n)) != 1:
                return MatchResult.fail(f"the scaled q or k {_op_name(n)} has other users")
        perm = _perm_of(kT)
        if perm is not None:
            k_chain.append(kT)
            perm = perm[:-2] + [perm[-1], perm[-2]]
            perm = None if perm == list(range(len(perm))) else perm
            k_src, scale = _strip_scale(kT.args[0], scale, k_chain)
        else:
            k_src, perm = kT, "swap"
        qv, kTv, vv, ov = val(q), val(kT), val(v), val(node)
        if None in (qv, kTv, vv, ov):
            return MatchResult.fail("missing shape metadata")
        if min(qv.dim(), kTv.dim(), vv.dim()) < 2:
            return MatchResult.fail(f"q, k, v have ranks {qv.dim()}, {kTv.dim()}, {vv.dim()}")
        if not qv.dtype.is_floating_point or len({qv.dtype, kTv.dtype, vv.dtype, sc.dtype}) != 1:
            return MatchResult.fail(f"dtypes differ or are not floating point (q {qv.dtype}, k {kTv.dtype}, "
                                    f"v {vv.dtype}, scores {sc.dtype})")
        s0 = list(sc.shape)
        s2 = list(pv.shape)
        # where SDPA runs: of the shapes the scores take on the way (bmm's folded heads, the
        # masks' 4-d view), the one with most dims, so that no mask has to be expanded to fit
        frame = max([list(iv.shape), s0, s2] + [s.frame for s in steps if s.frame is not None], key=len)
        if len(frame) < 3:
            return MatchResult.fail(f"the scores {frame} have no batch dim; SDPA needs rank >= 3")
        if _dims(qv.shape[:-2]) != _dims(s0[:-2]):
            return MatchResult.fail(f"batch dims of q {list(qv.shape[:-2])} are not those of the scores "
                                    f"{s0[:-2]} (q broadcast against k)")
        frames = [s0, list(iv.shape), s2] + [s.frame for s in steps if s.frame is not None]
        reframed = any(_dims(f) != _dims(frame) for f in frames)
        if reframed:
            if not all(isinstance(d, int) for f in frames for d in f):
                return MatchResult.fail("the scores are reshaped between q @ k^T and the softmax, with dynamic shapes")
            if len({math.prod(f[:-2]) for f in frames}) != 1:
                return MatchResult.fail("a reshape between the scores and the softmax changes the batch size")
            if any(_dims(f[-2:]) != _dims(frame[-2:]) for f in frames):
                return MatchResult.fail("a reshape between the scores and the softmax changes the last two dims")
        if _dims(ov.shape) != _dims(s2[:-1] + [vv.shape[-1]]):
            return MatchResult.fail(f"output shape {list(ov.shape)} is not the probabilities' batch and length "
                                    f"with v's width (v broadcast against the probabilities)")

        # masks, in application order, each in the frame it is applied to
        masks = ([_Step("add", scores, s0, mask=extra_add)] if extra_add is not None else []) + \
            [s for s in steps if s.kind in ("add", "fill")]
        for s in masks:
            mv, outv = val(s.mask), val(s.node)
            if mv is None:
                return MatchResult.fail(f"mask {_op_name(s.mask)} is not a tensor")
            if s.node is not scores and _dims(outv.shape) != _dims(s.frame):
                return MatchResult.fail(f"mask {list(mv.shape)} enlarges the scores {s.frame} in {_op_name(s.node)}")
            if mv.dim() > len(s.frame):
                return MatchResult.fail(f"mask {_op_name(s.mask)} has more dims than the scores")
            if s.kind == "add" and mv.dtype != sc.dtype:
                return MatchResult.fail(f"additive mask {_op_name(s.mask)} is {mv.dtype}, the scores are {sc.dtype}")
            if s.kind == "fill":
                if mv.dtype != torch.bool:
                    return MatchResult.fail(f"mask {_op_name(s.mask)} is not a bool tensor")
                if math.isnan(s.fill):
                    return MatchResult.fail("the fill value is NaN")
        L, S = frame[-2], frame[-1]
        attn = None
        if len(masks) == 1 and masks[0].kind == "fill" and _dims(masks[0].frame) == _dims(frame):
            s = masks[0]
            fill, kind = s.fill, s.fill_kind
            const = constant_value(s.mask, _compile_time_op, max_nodes=_CONST_EVAL_NODES,
                                   max_numel=_CONST_EVAL_NUMEL)
            keep_const = None if const is None else (const if kind == "keep" else ~const)
            if keep_const is not None and fill <= _LOW_FILL and _is_causal(keep_const, L, S):
                attn = ("causal", s.mask)
            elif keep_const is not None and fill <= _LOW_FILL and _keep_rows_ok(keep_const):
                attn = ("bool", s.mask, kind)
            elif fill == -math.inf:
                attn = ("bool", s.mask, kind)
        if attn is None and masks:
            for s in masks:
                if s.kind == "fill" and s.fill != -math.inf and not _absorbs(s.fill, sc.dtype):
                    return MatchResult.fail(
                        f"masked_fill with {s.fill!r} cannot be written as an SDPA mask: a fully-masked row gives "
                        f"uniform weights here, and {s.fill!r} + score is not {s.fill!r} in {sc.dtype} "
                        f"(use -inf or finfo.min, or a constant mask whose every row keeps a position)")
            attn = ("combined", masks)

        fills = [a for s in steps if s.kind == "fill" for a in s.node.args
                 if isinstance(a, fx.Node) and a is not s.mask and not _reaches_scores(a)]
        erase = [node, *probs_chain[::-1], softmax] + [s.node for s in steps[::-1]] + fills + [scores] + q_chain + k_chain
        return MatchResult.success(q=q, k_src=k_src, perm=perm, v=v, attn=attn, scale=scale, erase=erase,
                                   node=node, s0=s0, frame=frame, s2=s2, dtype=sc.dtype)

    def rewrite(self, softmax: fx.Node, m: MatchResult, ctx: PassContext) -> None:
        node = m["node"]
        g = node.graph
        kw = dict(like=node, pass_name=ctx.pass_name)
        s0, frame, s2 = m["s0"], m["frame"], m["s2"]
        with g.inserting_before(node):
            k, perm = m["k_src"], m["perm"]
            if perm == "swap":
                k = call(g, aten.transpose.int, (k, -2, -1), name="transpose", **kw)
            elif perm is not None:
                moved = [i for i, p in enumerate(perm) if p != i]
                if len(moved) == 2:
                    k = call(g, aten.transpose.int, (k, moved[0], moved[1]), name="transpose", **kw)
                else:
                    k = call(g, aten.permute.default, (k, perm), name="permute", **kw)
            q, v = m["q"], m["v"]
            k = _expand_to(g, k, s0[:-2], kw)
            v = _expand_to(g, v, s2[:-2], kw)
            q, k, v = (_reframe(g, t, base[:-2] + list(val(t).shape[-2:]), frame[:-2] + list(val(t).shape[-2:]), kw)
                       for t, base in ((q, s0), (k, s0), (v, s2)))
            kwargs: dict = {}
            attn = m["attn"]
            if attn is not None and attn[0] == "causal":
                kwargs["is_causal"] = True
            elif attn is not None and attn[0] == "bool":
                kwargs["attn_mask"] = _keep_node(g, attn[1], attn[2], kw)
            elif attn is not None:
                kwargs["attn_mask"] = _combined_mask(g, attn[1], frame, m["dtype"], kw)
            kwargs["scale"] = float(m["scale"])
            out = call(g, aten.scaled_dot_product_attention.default, (q, k, v), kwargs,
                       name="scaled_dot_product_attention", **kw)
            if _dims(val(out).shape) != _dims(val(node).shape):
                out = call(g, aten.reshape.default, (out, list(val(node).shape)), name="reshape", **kw)
        log.debug("fuse-attention: %%%s -> %%%s (scale %g, mask %s)", node.name, out.name, m["scale"],
                  None if attn is None else attn[0])
        node.replace_all_uses_with(out)
        erase_if_unused(*m["erase"])
        if attn is not None and attn[0] in ("causal", "bool"):
            _erase_dead_inputs(attn[1])


@register_pass("fuse-attention", exact=True,
               description="replace softmax(q @ k^T * scale + mask) @ v written out by hand with "
                           "aten.scaled_dot_product_attention")
def fuse_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    n = apply_rules(gm, [FuseAttention()], ctx)
    return PassResult(gm, n > 0, {"fused": n})
