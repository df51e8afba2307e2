"""fuse-attention's matching and building blocks: the chain from ``q @ k^T`` to the softmax
(scales, masks, casts and batch reshapes, as :class:`_Step` values in application order), the
chain from the softmax to ``probs @ v``, mask semantics (fills that absorb a score, constant and
causal masks), and the nodes the rewrite builds (operands brought to the frame SDPA runs in, the
combined additive mask). The rule and its contract are in ``__init__.py``."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from optc.ir.pattern import value_users
from optc.ir.queries import scalar, val
from optc.ir.rewrite import arg, attr_value, call, is_op

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
