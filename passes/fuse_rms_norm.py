"""Fuse RMS normalisation written out by hand into ``aten.rms_norm``.

Rewrite, anchored at every inverse square root (``D`` the last ``k`` dims of ``%x``)::

    %sq   = aten.pow(%x, 2) | aten.mul(%x, %x)
    %ms   = aten.mean.dim(%sq, D, keepdim=True)
    %r    = aten.rsqrt(%ms + eps) | aten.pow(%ms + eps, -0.5) | aten.reciprocal(aten.sqrt(%ms + eps))
    %n    = aten.mul(%x, %r)                                   (either operand order)
    %y    = [aten.mul(%n, %w)]                                 %w: shape x.shape[-k:], x's dtype
  ==>
    %y    = aten.rms_norm(%x, x.shape[-k:], %w | None, eps)

This is how Llama, Mistral, Qwen, Gemma, T5, OLMo-2, Phi-3 and their kin write RMSNorm
(``hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)`` then ``weight * hidden``);
Gemma's ``* (1 + w)`` is a weight once constant-fold has computed ``1 + w``. Where the model
upcasts to float32 first and casts back before the weight (``hidden.to(torch.float32)`` ...
``weight * hidden.to(input_dtype)`` in a float16 or bfloat16 program), the normalisation is fused
in float32 and the cast and the weight multiply are left as they are: the rounding points stay
where the model put them. In a float32 program canonicalize has already removed those casts.

Preconditions (each refusal reported with its reason): ``eps`` is a constant added to the mean
square inside the root (``x / (sqrt(ms) + eps)`` is a different function and does not match);
the mean reduces the last dims with ``keepdim=True``; the square, mean, ``+ eps`` and root have
no other user; one floating dtype from ``%x`` to ``%n``; static normalised shape.

The pattern is written in the combinators of :mod:`optc.ir.pattern`.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from optc.ir.pattern import Alt, Const, Op, Var, describe, match, value_users
from optc.ir.queries import val
from optc.ir.rewrite import MatchResult, RewriteRule, apply_rules, call, erase_if_unused, is_op
from optc.passes.base import PassContext, PassResult, register_pass

log = logging.getLogger(__name__)
aten = torch.ops.aten

_SQUARE = Alt(Op(aten.pow.Tensor_Scalar, Var("x"), Const(lambda c: c == 2.0, why="a power other than 2")),
              Op(aten.mul.Tensor, Var("x"), Var("x")))
_MEAN_SQ = Op(aten.mean.dim, _SQUARE.one_use(), Var("dims"), Var("keepdim"), ..., name="mean")
_PLUS_EPS = Op((aten.add.Tensor, aten.add.Scalar), _MEAN_SQ.one_use(),
               Const(lambda c: c >= 0.0, name="eps", why="eps is negative"), commutative=True, name="plus_eps")
_INV_ROOT = Alt(
    Op(aten.rsqrt.default, _PLUS_EPS.one_use()),
    Op(aten.pow.Tensor_Scalar, _PLUS_EPS.one_use(), Const(lambda c: c == -0.5, why="a power other than -1/2")),
    Op(aten.reciprocal.default, Op(aten.sqrt.default, _PLUS_EPS.one_use(), name="sqrt").one_use()),
)
_ANCHORS = (aten.rsqrt.default, aten.pow.Tensor_Scalar, aten.reciprocal.default)


def _is_mean_square_root(node: fx.Node) -> bool:
    """A quick pre-filter: the anchor reads (through + eps, maybe sqrt) a mean. Anything else
    (an rsqrt in a layer norm's variance, a pow(x, 3) in GELU) is not a candidate at all."""
    x = node.args[0]
    if is_op(node, aten.reciprocal.default):
        if not is_op(x, aten.sqrt.default):
            return False
        x = x.args[0]
    if is_op(x, aten.add.Tensor, aten.add.Scalar):
        x = next((a for a in x.args if is_op(a, aten.mean.dim)), None)
    if not is_op(x, aten.mean.dim):
        return False
    sq = x.args[0]
    if is_op(sq, aten.pow.Tensor_Scalar):
        return True
    return is_op(sq, aten.mul.Tensor) and sq.args[0] is sq.args[1]


class FuseRMSNorm(RewriteRule):
    name = "fuse-rms-norm"

    def match(self, node: fx.Node, ctx: PassContext) -> MatchResult | None:
        if not is_op(node, *_ANCHORS) or not _is_mean_square_root(node):
            return None
        m = match(_INV_ROOT, node)
        if m.failure is not None:
            return MatchResult.fail(str(m.failure))
        x, mean = m["x"], m["mean"]
        xv = val(x)
        if xv is None or not xv.dtype.is_floating_point:
            return MatchResult.fail(f"{describe(x)} is not a floating-point tensor")
        rank = xv.dim()
        dims = m["dims"]
        dims = sorted(d % rank for d in ([dims] if isinstance(dims, int) else list(dims or [])))
        k = len(dims)
        if not dims or dims != list(range(rank - k, rank)):
            return MatchResult.fail(f"the mean square reduces dims {m['dims']}, not the last dims of {describe(x)}")
        if m["keepdim"] is not True:
            return MatchResult.fail("the mean square is not kept as a dim (keepdim=False)")
        if mean.kwargs.get("dtype") is not None:
            return MatchResult.fail("the mean square is computed in another dtype")
        shape = list(xv.shape[-k:])
        if not all(isinstance(d, int) for d in shape):
            return MatchResult.fail(f"the normalised shape {shape} is dynamic")
        users = value_users(node)
        if len(users) != 1:
            return MatchResult.fail(f"the inverse root {describe(node)} has {len(users)} users, "
                                    f"not one multiply by {describe(x)}")
        n = users[0]
        if not (is_op(n, aten.mul.Tensor) and len(n.args) == 2 and {id(a) for a in n.args} == {id(x), id(node)}):
            return MatchResult.fail(f"the inverse root is used by {describe(n)}, not multiplied by {describe(x)}")
        nv = val(n)
        if nv is None or nv.dtype != xv.dtype or list(nv.shape) != list(xv.shape):
            return MatchResult.fail(f"{describe(n)} changes the shape or dtype of {describe(x)}")
        if any(val(t) is not None and val(t).dtype != xv.dtype for t in (node, mean)):
            return MatchResult.fail("the mean square is computed in another dtype than its input")
        # the optional weight multiply
        weight, out = None, n
        nu = value_users(n)
        if len(nu) == 1 and is_op(nu[0], aten.mul.Tensor) and len(nu[0].args) == 2:
            w = nu[0].args[1] if nu[0].args[0] is n else nu[0].args[0]
            wv = val(w)
            if isinstance(w, fx.Node) and w is not n and wv is not None and list(wv.shape) == shape \
                    and wv.dtype == xv.dtype and list(val(nu[0]).shape) == list(xv.shape):
                weight, out = w, nu[0]
        erase = [out, n, node, *reversed(m.nodes)]
        return MatchResult.success(x=x, shape=shape, weight=weight, eps=m["eps"], out=out, erase=erase)

    def rewrite(self, node: fx.Node, m: MatchResult, ctx: PassContext) -> None:
        out = m["out"]
        g = node.graph
        with g.inserting_before(out):
            new = call(g, aten.rms_norm.default, (m["x"], m["shape"], m["weight"], float(m["eps"])),
                       like=out, pass_name=ctx.pass_name, name="rms_norm")
        log.debug("fuse-rms-norm: %%%s -> %%%s (eps %g, weight %s)", out.name, new.name, m["eps"],
                  None if m["weight"] is None else m["weight"].name)
        out.replace_all_uses_with(new)
        erase_if_unused(*m["erase"])


@register_pass("fuse-rms-norm", exact=True,
               description="replace RMS normalisation written out by hand (x * rsqrt(mean(x^2) + eps) "
                           "[* w]) with aten.rms_norm")
def fuse_rms_norm(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    n = apply_rules(gm, [FuseRMSNorm()], ctx)
    return PassResult(gm, n > 0, {"fused": n})
