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
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from optc.ir.pattern import value_users
from optc.ir.queries import constant_value, scalar, val
from optc.ir.rewrite import MatchResult, RewriteRule, apply_rules, arg, attr_value, call, erase_if_unused, is_op
from optc.passes.base import PassContext, PassResult, register_pass

log = logging.getLogger(__name__)
aten = torch.ops.aten

_MATMUL = (aten.matmul.default, aten.bmm.default)
_SOFTMAX = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
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


# ---- the chain between the scores and the softmax ------------------------------------------------
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
          aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.flatten.using_ints,
          aten.unflatten.int)
_CASTS = (aten.to.dtype, aten._to_copy.default, aten.type_as.default)
_SCORES = (*_MATMUL, aten.baddbmm.default)
_CHAIN_DEPTH = 24


def _fill_const(a) -> float | None:
    return _fill_value(a)


@dataclass
class _Step:
    """One step applied to the scores on their way to the softmax, in application order."""

    kind: str                 # "add" | "fill" | "scale" | "view" | "cast"
    node: fx.Node
    frame: list               # shape of the tensor the step is applied to
    mask: Any = None          # add: the additive term; fill: the bool condition
    fill: float | None = None
    fill_kind: str = ""       # fill: "masked" (True = masked out) | "keep" (True = kept)
    factor: float = 1.0       # scale


def _is_view_step(n: fx.Node) -> bool:
    """A reshape that keeps the last two dims (only splits or merges batch dims)."""
    if not is_op(n, *_VIEWS) or not isinstance(n.args[0], fx.Node):
        return False
    iv, ov = val(n.args[0]), val(n)
    return iv is not None and ov is not None and iv.dim() >= 2 and ov.dim() >= 2 and \
        _dims(iv.shape[-2:]) == _dims(ov.shape[-2:]) and iv.numel() == ov.numel()


def _reaches_scores(n: Any, depth: int = 0) -> bool:
    """``n`` is computed from ``q @ k^T`` through steps this pass understands."""
    if not isinstance(n, fx.Node) or depth > _CHAIN_DEPTH:
        return False
    if is_op(n, *_SCORES):
        return True
    if is_op(n, aten.add.Tensor) and len(n.args) == 2:
        return any(_reaches_scores(a, depth + 1) for a in n.args)
    if is_op(n, aten.masked_fill.Scalar, aten.masked_fill.Tensor, *_CASTS, *_VIEWS, *_MUL, *_DIV,
             aten.clone.default, aten.contiguous.default, aten.tanh.default):
        return _reaches_scores(n.args[0], depth + 1)
    if is_op(n, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf) and len(n.args) == 3:
        return _reaches_scores(n.args[1], depth + 1) or _reaches_scores(n.args[2], depth + 1)
    return False


def _scale_factor(n: fx.Node) -> tuple[fx.Node, float] | None:
    """``n`` multiplies or divides one tensor by a scalar constant: (the tensor, the factor)."""
    if is_op(n, *_MUL) and len(n.args) == 2:
        a, b = n.args
        if isinstance(a, fx.Node) and _scalar(b) is not None:
            return a, _scalar(b)
        if isinstance(b, fx.Node) and _scalar(a) is not None:
            return b, _scalar(a)
    if is_op(n, *_DIV) and len(n.args) == 2 and isinstance(n.args[0], fx.Node) \
            and _scalar(n.args[1]) not in (None, 0.0) and not n.kwargs.get("rounding_mode"):
        return n.args[0], 1.0 / _scalar(n.args[1])
    return None


def _walk_to_scores(x: fx.Node) -> tuple[list[_Step], fx.Node] | str:
    """From the softmax input down to ``q @ k^T``: the steps (in application order) and the scores
    node, or the reason this is not attention SDPA can express."""
    steps: list[_Step] = []
    seen_scale = None
    for _ in range(_CHAIN_DEPTH):
        if is_op(x, *_SCORES):
            return steps[::-1], x
        if not isinstance(x, fx.Node) or x.op != "call_function":
            return f"softmax input does not come from q @ k^T (found {_op_name(x)})"
        src = x.args[0] if x.args else None
        if steps and len(value_users(x)) != 1:
            return f"the attention scores {_op_name(x)} have other users " \
                   f"({', '.join('%' + u.name for u in value_users(x))})"
        frame = list(val(src).shape) if isinstance(src, fx.Node) and val(src) is not None else None
        sf = _scale_factor(x)
        if sf is not None and _reaches_scores(sf[0]):
            seen_scale = seen_scale or x
            steps.append(_Step("scale", x, list(val(sf[0]).shape), factor=sf[1]))
            x = sf[0]
            continue
        if is_op(x, aten.clone.default, aten.contiguous.default, aten.alias.default):
            steps.append(_Step("view", x, frame))
            x = src
            continue
        if _is_view_step(x):
            steps.append(_Step("view", x, frame))
            x = src
            continue
        if is_op(x, *_CASTS):
            steps.append(_Step("cast", x, frame))
            x = src
            continue
        if is_op(x, aten.tanh.default):
            return f"{_op_name(x)} soft-caps the scores (tanh) before the softmax: SDPA has no soft-capping"
        mask_step = None
        if is_op(x, aten.add.Tensor) and len(x.args) == 2:
            if x.kwargs.get("alpha", 1) != 1:
                return f"mask add {_op_name(x)} has alpha={x.kwargs['alpha']}"
            a, b = x.args
            sides = [t for t in (a, b) if _reaches_scores(t)]
            if not sides:
                return f"softmax input {_op_name(x)} is an add of which no operand comes from q @ k^T"
            if len(sides) == 2:
                return f"both operands of {_op_name(x)} come from matmuls: not a mask added to the scores"
            nxt = sides[0]
            mask_step = _Step("add", x, list(val(nxt).shape), mask=b if nxt is a else a)
        elif is_op(x, aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            fill = _fill_const(x.args[2])
            if fill is None:
                return f"masked_fill value {_op_name(x.args[2])} is not a constant scalar"
            nxt = x.args[0]
            mask_step = _Step("fill", x, frame, mask=x.args[1], fill=fill, fill_kind="masked")
        elif is_op(x, aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf) and len(x.args) == 3:
            cond, a, b = x.args
            fa, fb = _fill_const(a), _fill_const(b)
            if fb is not None and fa is None and _reaches_scores(a):
                nxt, fill, kind = a, fb, "keep"
            elif fa is not None and fb is None and _reaches_scores(b):
                nxt, fill, kind = b, fa, "masked"
            else:
                return f"where {_op_name(x)} does not select between the scores and a constant"
            mask_step = _Step("fill", x, list(val(nxt).shape), mask=cond, fill=fill, fill_kind=kind)
        else:
            return f"between the scores and the softmax, {_op_name(x)} is not a scale, mask, cast or reshape " \
                   f"SDPA can express"
        if seen_scale is not None:
            return f"the scores are scaled ({_op_name(seen_scale)}) after the mask {_op_name(x)}"
        steps.append(mask_step)
        x = nxt
    return "the chain from the scores to the softmax is longer than this pass follows"


def _walk_to_matmul(softmax: fx.Node) -> tuple[list[fx.Node], fx.Node] | str:
    """From the softmax down to ``probs @ v``: the nodes passed through and the matmul."""
    chain: list[fx.Node] = []
    cur = softmax
    for _ in range(_CHAIN_DEPTH):
        users = value_users(cur)
        if len(users) != 1:
            return f"the attention probabilities {_op_name(cur)} have " + (
                f"other users ({', '.join('%' + u.name for u in users)})" if users else "no users")
        u = users[0]
        if is_op(u, *_MATMUL) and len(u.args) == 2:
            if u.args[0] is not cur:
                return f"the probabilities are the right operand of {_op_name(u)}, not probs @ v"
            return chain, u
        if is_op(u, *_DROPOUT):
            if arg(u, 2, "train") and arg(u, 1, "p") != 0:
                return f"dropout {_op_name(u)} is in training mode (p={arg(u, 1, 'p')})"
        elif not (is_op(u, *_CASTS, aten.clone.default, aten.contiguous.default, aten.alias.default)
                  or _is_view_step(u)) or u.args[0] is not cur:
            return f"the softmax output feeds {_op_name(u)}, not a matmul with the values"
        chain.append(u)
        cur = u
    return "the chain from the softmax to the matmul is longer than this pass follows"


def _reframe(g: fx.Graph, t: fx.Node, frame: list, target: list, kw: dict) -> fx.Node | str:
    """``t``, which broadcasts against a tensor of shape ``frame``, as a tensor that broadcasts
    the same way against that tensor reshaped to ``target`` (same last two dims, same numel).
    Returns the reason where this cannot be done."""
    if _dims(frame) == _dims(target):
        return t
    tv = val(t)
    shape = list(tv.shape)
    if len(shape) > len(frame):
        return f"{_op_name(t)} has more dims than the scores"
    shape = [1] * (len(frame) - len(shape)) + shape
    fb, tb = frame[:-2], target[:-2]
    if not all(isinstance(d, int) for d in [*frame, *target, *shape]):
        return "the batch dims are reshaped and some shapes are dynamic"
    if all(d == 1 for d in shape[:-2]):
        new = [1] * len(tb) + shape[-2:]
    else:
        if shape[:-2] != fb:
            t = call(g, aten.expand.default, (t, fb + shape[-2:]), name="expand", **kw)
        new = tb + shape[-2:]
    if is_op(t, aten.reshape.default, aten.view.default, aten._unsafe_view.default) and list(val(t).shape) == shape:
        t = t.args[0]                  # a reshape of a reshape: reshape the source
    return call(g, aten.reshape.default, (t, new), name="reshape", **kw)


def _expand_to(g: fx.Graph, t: fx.Node, batch: list, kw: dict) -> fx.Node | str:
    """``t`` (``..., X, Y``) broadcast over the batch dims ``batch`` (k/v shared by query heads)."""
    tv = val(t)
    tb = list(tv.shape[:-2])
    if _dims(tb) == _dims(batch):
        return t
    if len(tb) > len(batch):
        return f"{_op_name(t)} has more batch dims than the scores"
    tb = [None] * (len(batch) - len(tb)) + tb
    sizes = []
    for have, want in zip(tb, batch):
        if have is not None and str(have) == str(want):
            sizes.append(-1)
        elif (have is None or have == 1) and isinstance(want, int):
            sizes.append(want)
        else:
            return f"batch dims of {_op_name(t)} {list(tv.shape[:-2])} do not broadcast to {list(batch)}"
    return call(g, aten.expand.default, (t, sizes + [-1, -1]), name="expand", **kw)


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


def _combined_mask(g: fx.Graph, masks: list[_Step], frame: list, dtype: torch.dtype, kw: dict) -> fx.Node:
    """One additive mask equal to applying ``masks`` in order to zero scores: ``add`` terms are
    summed, a fill (``-inf``, or a finite fill that absorbs every score) overwrites what came before.
    Each term is first brought to the frame SDPA runs in."""
    acc = None
    for s in masks:
        t = _reframe(g, s.mask, s.frame, frame[:-2] + list(s.frame[-2:]), kw)
        if s.kind == "add":
            acc = t if acc is None else call(g, aten.add.Tensor, (acc, t), name="add", **kw)
            continue
        if s.fill_kind == "keep":
            cond = call(g, aten.logical_not.default, (t,), name="logical_not", **kw)
        else:
            cond = t
        if acc is None:
            zeros = call(g, aten.zeros_like.default, (cond,), {"dtype": dtype}, name="zeros_like", **kw)
            acc = call(g, aten.masked_fill.Scalar, (zeros, cond, s.fill), name="masked_fill", **kw)
        else:
            acc = call(g, aten.where.ScalarSelf, (cond, s.fill, acc), name="where", **kw)
    return acc


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
