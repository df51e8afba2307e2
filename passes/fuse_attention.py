"""Fuse attention written out by hand into ``aten.scaled_dot_product_attention``.

Rewrite (matched backwards from the second matmul; ``s`` is the product of every scalar
scale found, ``[...]`` marks optional steps)::

    %scores = aten.matmul(%q, %kT)                  q and kT may carry scalar scales (pre-scaled q)
    %scaled = [aten.div(%scores, c) | aten.mul(%scores, s) ...]
    %masked = [aten.add(%scaled, %mask)             additive float mask
              | aten.masked_fill(%scaled, %cond, fill) | aten.where(%keep, %scaled, fill)]
    %probs  = aten.softmax(%masked, -1)
    %probs  = [aten.dropout(%probs, p, False)]      eval mode
    %out    = aten.matmul(%probs, %v)
  ==>
    %out    = aten.scaled_dot_product_attention(%q, %k, %v, attn_mask=M, [is_causal=True,] scale=s)

``%k`` is recovered from ``%kT`` (``..., E, S``): a ``transpose``/``permute`` producing it is
composed with the swap of the last two dims (a new ``transpose``/``permute`` only where that
is not the identity, e.g. keys laid out ``(B, L, H, E)`` and read through
``permute(0, 2, 3, 1)``); any other ``%kT`` gets ``transpose(%kT, -2, -1)``. ``scale=`` is
always passed (SDPA's default is ``1/sqrt(E)``; no scale found means ``scale=1.0``).
``aten.bmm`` is accepted for either matmul.

Masks, and why each replacement computes the same function:

- additive (``scores + mask``): passed as ``attn_mask``; SDPA adds it after scaling, as here.
- ``masked_fill(scores, cond, fill)`` (or ``where(keep, scores, fill)``) replaces scores;
  SDPA can only add. With ``fill = -inf`` the keep mask is passed as a bool ``attn_mask``.
  With a finite fill that absorbs every score (``fill + s == fill`` in the scores' dtype for
  ``|s| <= 2**20``, e.g. ``finfo.min`` in fp32/bf16) the additive mask
  ``masked_fill(zeros, cond, fill)`` reproduces the replaced scores exactly, including
  fully-masked rows (uniform weights). When the mask is a constant (built from attributes,
  e.g. a ``tril`` buffer) whose every row keeps a position, any fill at or below -2**21 gives
  exactly-zero weights to masked positions and a bool mask is used; a constant mask equal
  to ``tril(ones(L, S))`` becomes ``is_causal=True`` with no mask. Other finite fills (e.g.
  ``-1e9`` with a mask computed at run time) are refused: a fully-masked row would differ.
  (Both finite-fill arguments assume scores below 2**20 in magnitude.)
- Divergence, by design: a row whose every score is ``-inf`` (an all-``-inf`` additive mask
  row, or a fully-masked row with ``fill = -inf``) gives NaN (0/0) here and 0 from SDPA.
  The pass treats that as a refinement of NaN: it cannot be checked at compile time for
  masks computed at run time.

Preconditions (each refusal is reported with its reason): the softmax is over the last dim,
in the input's dtype; dropout is in eval mode; scale factors are scalar constants applied
before the mask; every intermediate (scores .. probabilities) has no other user; q, k and v
have rank >= 3, equal batch dims and one floating dtype; an additive mask has the scores'
dtype and broadcasts to the scores' shape without enlarging it.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.fx as fx

from optc.ir.queries import constant_value, scalar, val
from optc.ir.rewrite import MatchResult, RewriteRule, apply_rules, arg, attr_value, call, erase_if_unused, is_op
from optc.passes.base import PassContext, PassResult, register_pass

log = logging.getLogger(__name__)
aten = torch.ops.aten

_MATMUL = (aten.matmul.default, aten.bmm.default)
_SOFTMAX = (aten.softmax.int, aten._softmax.default)
_DROPOUT = (aten.dropout.default, aten.feature_dropout.default)
_SAME_DTYPE_COPY = (aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.contiguous.default)
_MUL = (aten.mul.Tensor, aten.mul.Scalar)
_DIV = (aten.div.Tensor, aten.div.Scalar)
_NOT = (aten.bitwise_not.default, aten.logical_not.default)
_SCORE_BOUND = 2.0 ** 20      # |score| assumed below this when a finite fill must absorb scores
_LOW_FILL = -(2.0 ** 21)      # fills at or below this give exactly-zero weights (|score| < 2**20)
_CONST_EVAL_NODES = 32        # bounds on the constant mask subgraph evaluated at match time
_CONST_EVAL_NUMEL = 1 << 24


# ---- helpers ---------------------------------------------------------------------------
def _dims(shape) -> list[str]:
    """Dims as strings: compares symbolic dims without guarding on them."""
    return [str(d) for d in shape]


def _scalar(a) -> float | None:
    """A Python number, or a one-element constant attribute, as a float (a complex one is not)."""
    t = attr_value(a) if isinstance(a, fx.Node) else None
    return None if t is not None and t.dtype.is_complex else scalar(a)


def _fill_value(a) -> float | None:
    """A masked_fill/where fill: a scalar, or a 0-d ``aten.full``/``scalar_tensor``/attribute."""
    s = _scalar(a)
    if s is not None:
        return s
    if is_op(a, aten.full.default) and list(a.args[0]) == []:
        return _scalar(a.args[1])
    if is_op(a, aten.scalar_tensor.default):
        return _scalar(a.args[0])
    return None


def _strip_scale(node, scale: float, chain: list) -> tuple[fx.Node, float]:
    """Walk down ``mul``/``div`` by scalar constants; returns the operand and the scale."""
    while True:
        if is_op(node, *_MUL) and len(node.args) == 2:
            a, b = node.args
            sb, sa = _scalar(b), _scalar(a)
            if sb is not None and isinstance(a, fx.Node):
                scale, nxt = scale * sb, a
            elif sa is not None and isinstance(b, fx.Node):
                scale, nxt = scale * sa, b
            else:
                return node, scale
        elif is_op(node, *_DIV) and len(node.args) == 2 and isinstance(node.args[0], fx.Node) \
                and _scalar(node.args[1]) not in (None, 0.0):
            scale, nxt = scale / _scalar(node.args[1]), node.args[0]
        else:
            return node, scale
        chain.append(node)
        node = nxt


def _perm_of(node: fx.Node) -> list[int] | None:
    """The permutation a ``transpose``/``permute``/``t`` node applies, or None."""
    v = val(node.args[0]) if is_op(node, aten.permute.default, aten.transpose.int, aten.t.default) else None
    if v is None or v.dim() == 0:
        return None
    rank = v.dim()
    if is_op(node, aten.permute.default):
        return [d % rank for d in arg(node, 1, "dims")]
    a, b = (0, min(1, rank - 1)) if is_op(node, aten.t.default) else \
        (arg(node, 1, "dim0") % rank, arg(node, 2, "dim1") % rank)
    perm = list(range(rank))
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def _op_name(node) -> str:
    if not isinstance(node, fx.Node):
        return repr(node)
    t = node.target
    return f"%{node.name} ({t})" if node.op == "call_function" else f"%{node.name} ({node.op})"


def _compile_time_op(node: fx.Node) -> bool:
    """An ATen/custom op the matcher may evaluate on constant masks: not in place, not random."""
    t = node.target
    return isinstance(t, torch._ops.OpOverload) and not t._schema.is_mutable \
        and torch.Tag.nondeterministic_seeded not in t.tags


def _keep_rows_ok(keep: torch.Tensor) -> bool:
    """Every row of the (broadcast) keep mask keeps at least one position."""
    return keep.numel() > 0 and bool(keep.any(dim=-1).all()) and keep.shape[-1] > 0


def _is_causal(keep: torch.Tensor, L, S) -> bool:
    """``keep`` is ``(..., L, S)`` and equals ``tril(ones(L, S))`` (SDPA's is_causal) in every slice."""
    if not (isinstance(L, int) and isinstance(S, int)) or keep.dim() < 2:
        return False
    if keep.shape[-2] != L or keep.shape[-1] != S:
        return False
    tril = torch.ones(L, S, dtype=torch.bool).tril()
    return bool((keep.to(torch.bool) == tril).all())


def _absorbs(fill: float, dtype: torch.dtype) -> bool:
    """``fill + s`` rounds to ``fill`` for every ``|s| <= 2**20`` in ``dtype``."""
    if not math.isfinite(fill):
        return False
    f = torch.tensor(fill, dtype=dtype)
    if not torch.isfinite(f) or float(f) != fill:
        return False
    probe = torch.tensor([-_SCORE_BOUND, _SCORE_BOUND, -1.0, 1.0], dtype=dtype)
    return bool(((probe + f) == f).all())


# ---- the rule ------------------------------------------------------------------------
class FuseAttention(RewriteRule):
    name = "fuse-attention"

    def match(self, node: fx.Node, ctx: PassContext) -> MatchResult | None:
        if not is_op(node, *_MATMUL) or len(node.args) != 2:
            return None
        probs_out, v = node.args
        # probabilities: softmax, then eval dropout / same-dtype copies
        passthrough: list[fx.Node] = []
        cur = probs_out
        while is_op(cur, *_DROPOUT, *_SAME_DTYPE_COPY):
            passthrough.append(cur)
            cur = cur.args[0]
        if not is_op(cur, *_SOFTMAX):
            return None                                   # not attention: no softmax feeding it
        softmax = cur
        for p in passthrough:
            if is_op(p, *_DROPOUT) and arg(p, 2, "train") and arg(p, 1, "p") != 0:
                return MatchResult.fail(f"dropout %{p.name} is in training mode (p={arg(p, 1, 'p')})")
            if not is_op(p, *_DROPOUT):
                pv, sv = val(p), val(p.args[0])
                if pv is None or sv is None or pv.dtype != sv.dtype or pv.device != sv.device:
                    return MatchResult.fail(f"%{p.name} converts the probabilities to another dtype or device")
        sin = softmax.args[0]
        sv, iv = val(softmax), val(sin)
        if sv is None or iv is None:
            return MatchResult.fail("missing shape metadata")
        rank = iv.dim()
        dim = arg(softmax, 1, "dim")
        if dim % rank != rank - 1:
            return MatchResult.fail(f"softmax over dim {dim}, attention needs the last dim ({rank - 1})")
        if is_op(softmax, aten._softmax.default) and arg(softmax, 2, "half_to_float"):
            return MatchResult.fail("softmax computes in float32 for half inputs (half_to_float)")
        if sv.dtype != iv.dtype:
            return MatchResult.fail(f"softmax computes in {sv.dtype}, its input is {iv.dtype}")
        for n in [softmax, *passthrough]:
            if len(n.users) != 1:
                return MatchResult.fail(f"the attention probabilities %{n.name} have other users")

        # mask
        mask_kind, mask_op, mask, fill = None, None, None, None
        scaled = sin
        if is_op(sin, aten.add.Tensor) and len(sin.args) == 2:
            if sin.kwargs.get("alpha", 1) != 1:
                return MatchResult.fail(f"mask add %{sin.name} has alpha={sin.kwargs['alpha']}")
            a, b = sin.args
            side = [x for x in (a, b) if isinstance(x, fx.Node) and is_op(_strip_scale(x, 1.0, [])[0], *_MATMUL)]
            if not side:
                return MatchResult.fail(f"softmax input %{sin.name} is an add of which no operand is q @ k^T")
            scaled = side[0]
            mask = b if scaled is a else a
            mask_kind, mask_op = "add", sin
        elif is_op(sin, aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            scaled, mask, fill = sin.args[0], sin.args[1], _fill_value(sin.args[2])
            mask_kind, mask_op = "masked", sin
            if fill is None:
                return MatchResult.fail(f"masked_fill value {_op_name(sin.args[2])} is not a constant scalar")
        elif is_op(sin, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf) and len(sin.args) == 3:
            cond, a, b = sin.args
            fa, fb = _fill_value(a), _fill_value(b)
            if fb is not None and isinstance(a, fx.Node) and fa is None:
                scaled, mask, fill, mask_kind = a, cond, fb, "keep"
            elif fa is not None and isinstance(b, fx.Node) and fb is None:
                scaled, mask, fill, mask_kind = b, cond, fa, "masked"
            else:
                return MatchResult.fail(f"where %{sin.name} does not select between the scores and a constant")
            mask_op = sin
        if mask_op is not None and len(mask_op.users) != 1:
            return MatchResult.fail(f"the masked scores %{mask_op.name} have other users")

        # scale, then q @ kT
        scale_chain: list[fx.Node] = []
        scores, scale = _strip_scale(scaled, 1.0, scale_chain)
        if not is_op(scores, *_MATMUL):
            if is_op(scores, aten.add.Tensor, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self):
                return MatchResult.fail(f"the scores are scaled after the mask %{scores.name}")
            return MatchResult.fail(f"softmax input does not come from q @ k^T (found {_op_name(scores)})")
        for n in [*scale_chain, scores]:
            if len(n.users) != 1:
                return MatchResult.fail(f"the attention scores %{n.name} have other users")
        q_chain: list[fx.Node] = []
        k_chain: list[fx.Node] = []
        q, scale = _strip_scale(scores.args[0], scale, q_chain)
        kT, scale = _strip_scale(scores.args[1], scale, k_chain)
        perm = _perm_of(kT)
        if perm is not None:                   # kT = permute(k_src): k = permute(k_src, perm with last two swapped)
            k_chain.append(kT)
            perm = perm[:-2] + [perm[-1], perm[-2]]
            perm = None if perm == list(range(len(perm))) else perm
            k_src, scale = _strip_scale(kT.args[0], scale, k_chain)
        else:
            k_src, perm = kT, "swap"
        # shapes and dtypes
        qv, kTv, vv, ov = val(q), val(kT), val(v), val(node)
        if None in (qv, kTv, vv, ov):
            return MatchResult.fail("missing shape metadata")
        if min(qv.dim(), kTv.dim(), vv.dim()) < 3:
            return MatchResult.fail(f"q, k, v have ranks {qv.dim()}, {kTv.dim()}, {vv.dim()}; SDPA needs rank >= 3")
        if not (_dims(qv.shape[:-2]) == _dims(kTv.shape[:-2]) == _dims(vv.shape[:-2])):
            return MatchResult.fail(f"batch dims of q {list(qv.shape[:-2])}, k {list(kTv.shape[:-2])} and "
                                    f"v {list(vv.shape[:-2])} differ (SDPA does not broadcast them)")
        if not qv.dtype.is_floating_point or len({qv.dtype, kTv.dtype, vv.dtype, iv.dtype}) != 1:
            return MatchResult.fail(f"dtypes differ or are not floating point (q {qv.dtype}, k {kTv.dtype}, "
                                    f"v {vv.dtype}, scores {iv.dtype})")
        if _dims(ov.shape) != _dims(list(qv.shape[:-1]) + [vv.shape[-1]]):
            return MatchResult.fail(f"output shape {list(ov.shape)} is not q's batch and length with v's width")
        sc = val(scores)
        L, S = qv.shape[-2], kTv.shape[-1]

        # mask semantics
        attn = None
        if mask_kind == "add":
            mv, av = val(mask), val(sin)
            if mv is None:
                return MatchResult.fail(f"mask {_op_name(mask)} is not a tensor")
            if mv.dtype != iv.dtype or av.dtype != sc.dtype:
                return MatchResult.fail(f"additive mask is {mv.dtype}, the scores are {sc.dtype}")
            if _dims(av.shape) != _dims(sc.shape) or mv.dim() > sc.dim():
                return MatchResult.fail(f"mask {list(mv.shape)} enlarges the scores {list(sc.shape)} when added")
            attn = ("add", mask)
        elif mask_kind is not None:
            mv, av = val(mask), val(mask_op)
            if mv is None or mv.dtype != torch.bool:
                return MatchResult.fail(f"mask {_op_name(mask)} is not a bool tensor")
            if av is None or _dims(av.shape) != _dims(sc.shape) or av.dtype != sc.dtype:
                return MatchResult.fail(f"masking %{mask_op.name} changes the scores' shape or dtype")
            if math.isnan(fill):
                return MatchResult.fail("the fill value is NaN")
            const = constant_value(mask, _compile_time_op, max_nodes=_CONST_EVAL_NODES,
                                   max_numel=_CONST_EVAL_NUMEL)
            keep_const = None if const is None else (const if mask_kind == "keep" else ~const)
            if keep_const is not None and fill <= _LOW_FILL and _is_causal(keep_const, L, S):
                attn = ("causal", mask)
            elif keep_const is not None and fill <= _LOW_FILL and _keep_rows_ok(keep_const):
                attn = ("bool", mask, mask_kind)
            elif fill == -math.inf:
                attn = ("bool", mask, mask_kind)
            elif _absorbs(fill, sc.dtype):
                attn = ("fill", mask, mask_kind, fill)
            else:
                return MatchResult.fail(
                    f"masked_fill with {fill!r} cannot be written as an SDPA mask: a fully-masked row gives "
                    f"uniform weights here, and {fill!r} + score is not {fill!r} in {sc.dtype} "
                    f"(use -inf or finfo.min, or a constant mask whose every row keeps a position)")

        # users before operands, so that erase_if_unused frees each chain top-down
        fill_nodes = [x for x in (mask_op.args[1:] if mask_op is not None and mask_kind != "add" else ())
                      if isinstance(x, fx.Node) and x is not scaled and x is not mask]
        erase = [node, *passthrough, softmax] + ([mask_op] if mask_op is not None else []) + fill_nodes \
            + scale_chain + [scores] + q_chain + k_chain
        return MatchResult.success(q=q, k_src=k_src, perm=perm, v=v, attn=attn, scale=scale, erase=erase)

    def rewrite(self, node: fx.Node, m: MatchResult, ctx: PassContext) -> None:
        g = node.graph
        kw = dict(like=node, pass_name=ctx.pass_name)
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
            kwargs: dict = {}
            attn = m["attn"]
            if attn is not None and attn[0] == "add":
                kwargs["attn_mask"] = attn[1]
            elif attn is not None and attn[0] == "causal":
                kwargs["is_causal"] = True
            elif attn is not None and attn[0] == "bool":
                kwargs["attn_mask"] = _keep_node(g, attn[1], attn[2], kw)
            elif attn is not None and attn[0] == "fill":
                _, cond, kind, fill = attn
                dt = val(m["q"]).dtype
                if kind == "masked":
                    zeros = call(g, aten.zeros_like.default, (cond,), {"dtype": dt}, name="zeros_like", **kw)
                    kwargs["attn_mask"] = call(g, aten.masked_fill.Scalar, (zeros, cond, fill),
                                               name="masked_fill", **kw)
                else:
                    full = call(g, aten.full_like.default, (cond, fill), {"dtype": dt}, name="full_like", **kw)
                    kwargs["attn_mask"] = call(g, aten.masked_fill.Scalar, (full, cond, 0.0), name="masked_fill", **kw)
            kwargs["scale"] = float(m["scale"])
            sdpa = call(g, aten.scaled_dot_product_attention.default, (m["q"], k, m["v"]), kwargs,
                        name="scaled_dot_product_attention", **kw)
        log.debug("fuse-attention: %%%s -> %%%s (scale %g, mask %s)", node.name, sdpa.name, m["scale"],
                  None if attn is None else attn[0])
        node.replace_all_uses_with(sdpa)
        erase_if_unused(*m["erase"])
        if attn is not None and attn[0] in ("causal", "bool"):
            _erase_dead_inputs(attn[1])


def _erase_dead_inputs(node) -> None:
    """Erase ``node`` and, transitively, its inputs that nothing uses any more (a mask that
    ``is_causal`` replaced, a negation the bool mask did not need)."""
    if not isinstance(node, fx.Node) or node._erased or node.users or node.op not in ("call_function", "get_attr"):
        return
    inputs = node.all_input_nodes
    node.graph.erase_node(node)
    for i in inputs:
        _erase_dead_inputs(i)


def _keep_node(g: fx.Graph, cond: fx.Node, kind: str, kw: dict) -> fx.Node:
    """A bool node that is True where attention may look."""
    if kind == "keep":
        return cond
    src = cond.args[0] if cond.args else None
    if val(src) is not None and val(src).dtype == torch.bool and (
            is_op(cond, *_NOT) or (is_op(cond, aten.eq.Scalar) and cond.args[1] in (0, False))):
        return src                               # cond = ~keep or keep == 0
    return call(g, aten.logical_not.default, (cond,), name="logical_not", **kw)


@register_pass("fuse-attention", exact=True,
               description="replace softmax(q @ k^T * scale + mask) @ v written out by hand with "
                           "aten.scaled_dot_product_attention")
def fuse_attention(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    n = apply_rules(gm, [FuseAttention()], ctx)
    return PassResult(gm, n > 0, {"fused": n})
