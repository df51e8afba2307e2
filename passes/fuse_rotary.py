"""Recognise rotary position embeddings written out by hand as ``optc::rotary_embedding``.

Rewrite, anchored at every ``add`` (``d`` the last dim of ``%x``, ``h = d / 2``)::

    %rot = aten.cat([aten.neg(aten.slice(%x, -1, h, d)), aten.slice(%x, -1, 0, h)], -1)   rotate_half
         | aten.flatten(aten.stack([aten.neg(%x[..., 1::2]), %x[..., 0::2]], -1), -2)  rotate_every_two
    %y   = aten.add(aten.mul(%x, %cos), aten.mul(%rot, %sin))          (any operand order)
  ==>
    %y   = optc.rotary_embedding(%x, %cos, %sin, interleaved)

This is ``apply_rotary_pos_emb`` of Llama, Mistral, Qwen, Gemma, Phi-3, GPT-NeoX (rotate_half),
and GPT-J/CodeGen's ``rotate_every_two`` (interleaved); a partial rotary (Phi, StableLM,
GPT-NeoX) is the same on the rotated slice. The op's reference kernel and decomposition are the
formula above (``ir/ops.py``); backends without a native form run the decomposition, so the
rewrite is exact. What it buys: one op where analyses and backends can see a rotary embedding
(the channel-dependency analysis of pruning, a fused backend kernel).

Preconditions (each refusal reported with its reason): the two halves are exactly
``[h, d)`` and ``[0, h)`` of the last dim (or the odd and even elements), the second is negated
and comes first; ``%x``, ``%cos``, ``%sin`` have one floating dtype; the result has ``%x``'s
shape (``%cos``/``%sin`` broadcast to it, not beyond); the rotation and its products have no
other user.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

import optc.ir.ops  # noqa: F401  (registers optc::rotary_embedding)
from optc.ir.pattern import Match, Op, Pattern, Var, describe, match, value_users
from optc.ir.queries import val
from optc.ir.rewrite import MatchResult, RewriteRule, apply_rules, call, erase_if_unused, is_op
from optc.passes.base import PassContext, PassResult, register_pass

log = logging.getLogger(__name__)
aten = torch.ops.aten
_BIG = 1 << 62


def _slice_range(node: fx.Node) -> tuple[fx.Node, int, int, int, int] | None:
    """``aten.slice(x, dim, start, end, step)`` as ``(x, dim, start, end, step)`` with the dim and
    the bounds normalised (static sizes only)."""
    if not is_op(node, aten.slice.Tensor):
        return None
    x = node.args[0]
    xv = val(x)
    if xv is None or not all(isinstance(a, (int, type(None))) for a in node.args[1:]):
        return None
    dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
    dim %= xv.dim()
    n = xv.shape[dim]
    if not isinstance(n, int):
        return None
    start = 0 if start is None else (start + n if start < 0 else start)
    end = n if end is None or end >= _BIG else (end + n if end < 0 else end)
    return x, dim, max(0, min(start, n)), max(0, min(end, n)), step or 1


def _negated_pair(parts, m: Match, at: fx.Node, not_negated: str, not_slices: str):
    """``(-slice_a(x), slice_b(x))``: the two nodes and both slices' ranges, or None (``m`` failed)."""
    neg, first = parts
    if not is_op(neg, aten.neg.default):
        m.fail(not_negated.format(describe(neg)), at)
        return None
    a, b = _slice_range(neg.args[0]), _slice_range(first)
    if a is None or b is None or a[0] is not b[0]:
        m.fail(not_slices, at)
        return None
    return neg, first, a, b


class _Rotated(Pattern):
    """``rotate_half(x)`` or ``rotate_every_two(x)``; binds ``x`` (or checks it) and ``interleaved``."""

    def match(self, value, m: Match) -> bool:
        if is_op(value, aten.cat.default):
            return self._half(value, m)
        if is_op(value, aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            return self._every_two(value, m)
        return m.fail(f"expected a rotate_half cat or a rotate_every_two flatten, found {describe(value)}", value)

    def _take(self, m: Match, x, interleaved: bool, *, inner: tuple, outer: tuple) -> bool:
        """The rotation matched: its ``inner`` nodes must have no other user; record them (after the
        ``outer`` ones, users before operands) and bind ``x`` and ``interleaved``."""
        for n in inner:
            if len(value_users(n)) != 1:
                return m.fail(f"{describe(n)} has other users", n)
        m.nodes.extend([*outer, *inner])
        if not Var("x").match(x, m):
            return False
        m.bindings["interleaved"] = interleaved
        return True

    def _half(self, cat: fx.Node, m: Match) -> bool:
        parts, dim = cat.args[0], (cat.args[1] if len(cat.args) > 1 else 0)
        cv = val(cat)
        if cv is None or len(parts) != 2 or dim % cv.dim() != cv.dim() - 1:
            return m.fail("the cat does not join two halves along the last dim", cat)
        got = _negated_pair(parts, m, cat, "the first half {} is not negated (rotate_half is cat(-x2, x1))",
                            "the halves are not static slices of one tensor")
        if got is None:
            return False
        neg, first, a, b = got
        x, d = a[0], val(a[0]).shape[-1]
        h = d // 2
        if d % 2 or a[1] != cv.dim() - 1 or b[1] != a[1] or (a[2], a[3], a[4]) != (h, d, 1) \
                or (b[2], b[3], b[4]) != (0, h, 1):
            return m.fail(f"the halves are [{a[2]}, {a[3]}) and [{b[2]}, {b[3]}) of a last dim of {d}, "
                          f"not [{h}, {d}) and [0, {h})", cat)
        return self._take(m, x, False, inner=(neg, neg.args[0], first), outer=(cat,))

    def _every_two(self, flat: fx.Node, m: Match) -> bool:
        stack = flat.args[0]
        fv = val(flat)
        if is_op(stack, aten.stack.default):
            parts, dim = stack.args[0], (stack.args[1] if len(stack.args) > 1 else 0)
        else:
            return m.fail(f"{describe(flat)} does not flatten a stack", flat)
        sv = val(stack)
        if fv is None or sv is None or len(parts) != 2 or dim % sv.dim() != sv.dim() - 1 \
                or list(fv.shape) != list(sv.shape[:-2]) + [sv.shape[-2] * 2]:
            return m.fail("not a pairwise stack flattened over the last dim", flat)
        got = _negated_pair(parts, m, flat, "the first of the pair {} is not negated",
                            "the pair is not two strided slices of one tensor")
        if got is None:
            return False
        neg, first, a, b = got
        x, d = a[0], val(a[0]).shape[-1]
        if d % 2 or a[1] != val(x).dim() - 1 or b[1] != a[1] or (a[2], a[4]) != (1, 2) or (b[2], b[4]) != (0, 2) \
                or a[3] != d or b[3] < d - 1:
            return m.fail("the pair is not the odd and the even elements of the last dim", flat)
        return self._take(m, x, True, inner=(stack, neg, neg.args[0], first), outer=(flat,))


_ROTARY = Op(aten.add.Tensor,
             Op(aten.mul.Tensor, Var("x"), Var("cos"), commutative=True, name="mul_cos").one_use(),
             Op(aten.mul.Tensor, _Rotated(), Var("sin"), commutative=True, name="mul_sin").one_use(),
             commutative=True)


def _candidate(node: fx.Node) -> bool:
    """An add of two products, one of which reads a concatenation or a flattened stack."""
    if not is_op(node, aten.add.Tensor) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return False
    if not all(is_op(a, aten.mul.Tensor) for a in node.args):
        return False
    return any(is_op(b, aten.cat.default, aten.flatten.using_ints, aten.view.default, aten.reshape.default,
                     aten._unsafe_view.default) and (is_op(b, aten.cat.default) or is_op(b.args[0], aten.stack.default))
               for a in node.args for b in a.args if isinstance(b, fx.Node))


class FuseRotary(RewriteRule):
    name = "fuse-rotary"

    def match(self, node: fx.Node, ctx: PassContext) -> MatchResult | None:
        if not _candidate(node):
            return None
        m = match(_ROTARY, node)
        if m.failure is not None:
            return MatchResult.fail(str(m.failure))
        x, cos, sin = m["x"], m["cos"], m["sin"]
        xv, cv, sv, ov = val(x), val(cos), val(sin), val(node)
        if None in (xv, cv, sv, ov):
            return MatchResult.fail("missing shape metadata")
        if not xv.dtype.is_floating_point or len({xv.dtype, cv.dtype, sv.dtype}) != 1:
            return MatchResult.fail(f"x, cos and sin have dtypes {xv.dtype}, {cv.dtype}, {sv.dtype}")
        if list(ov.shape) != list(xv.shape):
            return MatchResult.fail(f"cos/sin {list(cv.shape)}/{list(sv.shape)} broadcast x {list(xv.shape)} "
                                    f"to {list(ov.shape)}")
        if cos is sin:
            return MatchResult.fail("cos and sin are the same tensor")
        erase = [node, m["mul_cos"], m["mul_sin"], *m.nodes]
        return MatchResult.success(x=x, cos=cos, sin=sin, interleaved=m["interleaved"], erase=erase)

    def rewrite(self, node: fx.Node, m: MatchResult, ctx: PassContext) -> None:
        g = node.graph
        with g.inserting_before(node):
            new = call(g, torch.ops.optc.rotary_embedding.default, (m["x"], m["cos"], m["sin"], m["interleaved"]),
                       like=node, pass_name=ctx.pass_name, name="rotary_embedding")
        log.debug("fuse-rotary: %%%s -> %%%s (interleaved %s)", node.name, new.name, m["interleaved"])
        node.replace_all_uses_with(new)
        seen = set()
        erase_if_unused(*[n for n in m["erase"] if not (n in seen or seen.add(n))])


@register_pass("fuse-rotary", exact=True,
               description="recognise rotary position embeddings (x * cos + rotate_half(x) * sin, or "
                           "rotate_every_two) as optc::rotary_embedding")
def fuse_rotary(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    n = apply_rules(gm, [FuseRotary()], ctx)
    return PassResult(gm, n > 0, {"fused": n})
