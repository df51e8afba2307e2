"""Fuse layer normalisation written out by hand into ``aten.layer_norm``.

Rewrite (``D`` the last ``k`` dims of ``%x``, ``N = x.shape[-k:]``)::

    %mean = aten.mean.dim(%x, D, True)              or var_mean(%x, D, correction=0)[1]
    %d    = aten.sub.Tensor(%x, %mean)
    %var  = aten.mean.dim(aten.pow(%d, 2) | aten.mul(%d, %d), D, True)
          | aten.var(%x, D, correction=0 | unbiased=False, keepdim=True) | var_mean(...)[0]
    %y    = aten.mul(%d, aten.rsqrt(%var + eps))    or %d / aten.sqrt(%var + eps)
                                                    (also pow(%var + eps, -0.5), reciprocal(sqrt))
    %y    = [aten.mul(%y, %gamma)]                  gamma, beta: tensors of shape N, x's dtype
    %y    = [aten.add(%y, %beta)]
  ==>
    %y    = aten.layer_norm(%x, N, %gamma | None, %beta | None, eps)

``eps`` is a scalar constant (0 when no ``add`` is found); the affine ``mul``/``add`` are
absorbed only when the normalised value has no other user.

The structure is a pattern of :mod:`optc.ir.pattern`'s combinators (``_NORMALISED``: its
alternatives are the spellings above, and a refusal names the node that refused); the arithmetic
conditions below are checked on what it binds.

Preconditions (each refusal reported with its reason): the mean and the variance reduce
over the same dims, which are the last dims of ``%x``, with ``keepdim=True``; the variance
is the biased one (``correction=0``); ``eps`` is added to the variance inside the square
root (``d / (sqrt(var) + eps)`` is a different function); one floating dtype throughout;
static normalised shape.
"""

from __future__ import annotations

import logging
import math
import operator

import torch
import torch.fx as fx

from optc.ir.pattern import Alt, Const, Op, Var, describe, match
from optc.ir.queries import scalar, val
from optc.ir.rewrite import MatchResult, RewriteRule, apply_rules, arg, call, erase_if_unused, is_op
from optc.passes.base import PassContext, PassResult, register_pass

log = logging.getLogger(__name__)
aten = torch.ops.aten

_VAR = (aten.var.dim, aten.var.correction)
_VAR_MEAN = (aten.var_mean.dim, aten.var_mean.correction)
_INV_ROOT = (aten.rsqrt.default, aten.pow.Tensor_Scalar, aten.reciprocal.default)   # candidates for 1/sqrt(.)


def _norm_dims(dims, rank: int) -> list[int] | None:
    if dims is None:
        return list(range(rank))
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims:
        return list(range(rank))     # mean.dim with [] reduces everything
    return sorted(d % rank for d in dims)


def _correction(node: fx.Node) -> float:
    """Bessel's correction of a var/var_mean call (1 when unbiased, the default)."""
    if is_op(node, aten.var.dim, aten.var_mean.dim):
        return 1.0 if arg(node, 2, "unbiased", True) else 0.0
    c = node.kwargs.get("correction")
    return 1.0 if c is None else float(c)


def _keepdim(node: fx.Node) -> bool:
    if is_op(node, aten.var.dim, aten.var_mean.dim):
        return bool(arg(node, 3, "keepdim", False))
    if is_op(node, aten.mean.dim):
        return bool(arg(node, 2, "keepdim", False))
    return bool(node.kwargs.get("keepdim", False))


def _same_centered(a, d: fx.Node) -> bool:
    """``a`` is ``d`` or another ``sub`` node with the same operands."""
    return a is d or (is_op(a, aten.sub.Tensor) and a.args == d.args and a.kwargs == d.kwargs)


# ---- the pattern (optc.ir.pattern's combinators) -------------------------------------------------------
def _is_1(c):
    return c == 1


_MEAN = Alt(Op(aten.mean.dim, Var("x"), ..., name="mean_red"),
            Op(operator.getitem, Op(_VAR_MEAN, Var("x"), ..., name="mean_red"), Const(_is_1)))
#: x - mean(x)
_CENTERED = Op(aten.sub.Tensor, Var("x"), _MEAN.bind("mean"), name="d").where(
    lambda d, m: d.kwargs.get("alpha", 1) == 1, "x - alpha * mean with alpha != 1")
#: the same x - mean(x) again (the node itself, or an identical sub CSE has not merged yet)
_D_AGAIN = Var().where(lambda v, m: _same_centered(v, m["d"]), lambda v, m: f"{describe(v)} is not x - mean")
_SQUARE = Alt(Op(aten.pow.Tensor_Scalar, _D_AGAIN, Const(lambda c: c == 2.0, why="a power other than 2")),
              Op(aten.mul.Tensor, _D_AGAIN, _D_AGAIN))
_VARIANCE = Alt(
    Op(aten.mean.dim, _SQUARE.bind("square"), ..., name="var_red"),
    Op(_VAR, Var("x"), ..., name="var_red"),
    Op(operator.getitem, Op(_VAR_MEAN, Var("x"), ..., name="var_red"), Const(lambda c: c == 0)),
).bind("var")
#: var + eps (eps a constant; 0 when there is no add)
_VAR_EPS = Alt(Op(aten.add.Tensor, _VARIANCE, Const(name="eps"), commutative=True, name="ve"), _VARIANCE)
_ROOT = Op(aten.sqrt.default, _VAR_EPS, name="root")
_INV_ROOT_OF = Alt(Op(aten.rsqrt.default, _VAR_EPS),
                   Op(aten.pow.Tensor_Scalar, _VAR_EPS, Const(lambda c: c == -0.5, why="a power other than -1/2")),
                   Op(aten.reciprocal.default, _ROOT))
#: the anchors: (x - mean) * 1/sqrt(var + eps), or (x - mean) / sqrt(var + eps)
_NORMALISED = Alt(Op(aten.mul.Tensor, _CENTERED, _INV_ROOT_OF, commutative=True),
                  Op(aten.div.Tensor, _CENTERED, _ROOT))


class FuseLayerNorm(RewriteRule):
    name = "fuse-layer-norm"

    def match(self, node: fx.Node, ctx: PassContext) -> MatchResult | None:
        # candidates: (x - mean(x)) multiplied by an inverse root or divided by something
        if is_op(node, aten.mul.Tensor) and len(node.args) == 2:
            operands = [(d, s) for d, s in (node.args, node.args[::-1]) if match(_CENTERED, d).failure is None]
            if not operands or not is_op(operands[0][1], *_INV_ROOT):
                return None                              # e.g. (x - mean)^2 as d * d: not a candidate
            scale = operands[0][1]
            if is_op(scale, aten.reciprocal.default) and _sqrt_plus_eps(scale.args[0]):
                return MatchResult.fail("eps added outside the sqrt: d / (sqrt(var) + eps)")
        elif is_op(node, aten.div.Tensor) and len(node.args) == 2 and match(_CENTERED, node.args[0]).failure is None:
            if _sqrt_plus_eps(node.args[1]):
                return MatchResult.fail("eps added outside the sqrt: d / (sqrt(var) + eps)")
        else:
            return None                                  # not (x - mean(x)) scaled by something
        m = match(_NORMALISED, node)
        if m.failure is not None:
            return MatchResult.fail(str(m.failure))
        x, d, mean_red, var_red, var = m["x"], m["d"], m["mean_red"], m["var_red"], m["var"]
        eps = float(m.get("eps", 0.0))
        xv, dv, yv = val(x), val(d), val(node)
        if None in (xv, dv, yv):
            return MatchResult.fail("missing shape metadata")
        rank = xv.dim()
        if not math.isfinite(eps) or eps < 0:
            return MatchResult.fail(f"eps {eps!r} is not a finite non-negative constant")
        if not is_op(var_red, aten.mean.dim) and _correction(var_red) != 0:
            return MatchResult.fail(f"unbiased variance (correction={_correction(var_red):g}); "
                                    f"layer norm uses the biased one")
        if var_red.kwargs.get("dtype") is not None or mean_red.kwargs.get("dtype") is not None:
            return MatchResult.fail("a reduction computes in another dtype")
        mean_dims = _norm_dims(arg(mean_red, 1, "dim"), rank)
        var_dims = _norm_dims(arg(var_red, 1, "dim"), val(var_red.args[0]).dim())
        if not _keepdim(mean_red) or not _keepdim(var_red):
            return MatchResult.fail("a reduction drops the reduced dims (keepdim=False)")
        if mean_dims != var_dims:
            return MatchResult.fail(f"mean over dims {mean_dims} but variance over dims {var_dims}")
        k = len(mean_dims)
        if mean_dims != list(range(rank - k, rank)):
            return MatchResult.fail(f"normalises over dims {mean_dims}; layer_norm needs the last dims")
        shape = list(xv.shape[rank - k:])
        if not all(type(s) is int for s in shape):
            return MatchResult.fail(f"normalised shape {shape} is not static")
        if not xv.dtype.is_floating_point or len({xv.dtype, dv.dtype, yv.dtype}) != 1:
            return MatchResult.fail(f"dtypes differ or are not floating point (x {xv.dtype}, y {yv.dtype})")
        if list(yv.shape) != list(xv.shape):
            return MatchResult.fail(f"result shape {list(yv.shape)} differs from x's {list(xv.shape)}")

        # optional affine steps: absorb a following * gamma and + beta of shape N
        last, gamma, beta, affine = node, None, None, []
        u = _only_user(last)
        if is_op(u, aten.mul.Tensor):
            g = _other(u, last)
            if _is_param(g, shape, xv.dtype) and val(u).shape == yv.shape:
                last, gamma = u, g
                affine.append(u)
                u = _only_user(last)
        if is_op(u, aten.add.Tensor) and u.kwargs.get("alpha", 1) == 1:
            b = _other(u, last)
            if _is_param(b, shape, xv.dtype) and val(u).shape == yv.shape:
                last, beta = u, b
                affine.append(u)
        # users before operands, so that each erase_if_unused frees the next
        square = m.get("square")
        again = [a for a in square.args[:2] if isinstance(a, fx.Node)] if square is not None else []
        erase = [*reversed(affine), *reversed(m.nodes), *again, var, d, m["mean"], mean_red]
        return MatchResult.success(x=x, shape=shape, gamma=gamma, beta=beta, eps=eps, last=last, erase=erase)

    def rewrite(self, node: fx.Node, m: MatchResult, ctx: PassContext) -> None:
        last = m["last"]
        with node.graph.inserting_before(last):
            ln = call(node.graph, aten.layer_norm.default, (m["x"], m["shape"], m["gamma"], m["beta"], m["eps"]),
                      like=last, pass_name=ctx.pass_name, name="layer_norm")
        log.debug("fuse-layer-norm: %%%s -> %%%s (eps %g)", last.name, ln.name, m["eps"])
        last.replace_all_uses_with(ln)
        erase_if_unused(*m["erase"])


def _sqrt_plus_eps(node) -> bool:
    """``node`` is ``sqrt(var) + eps`` (eps outside the root)."""
    if not is_op(node, aten.add.Tensor) or len(node.args) != 2:
        return False
    a, b = node.args
    return (is_op(a, aten.sqrt.default) and scalar(b) is not None) or \
        (is_op(b, aten.sqrt.default) and scalar(a) is not None)


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _other(node: fx.Node, operand: fx.Node):
    a, b = node.args[0], node.args[1]
    return b if a is operand else (a if b is operand else None)


def _is_param(node, shape: list[int], dtype: torch.dtype) -> bool:
    """A tensor of exactly the normalised shape and x's dtype (a gamma or beta)."""
    v = val(node)
    return v is not None and list(v.shape) == shape and v.dtype == dtype


@register_pass("fuse-layer-norm", exact=True,
               description="replace layer normalisation written out by hand (mean, sub, var, add eps, "
                           "rsqrt, mul, affine) with aten.layer_norm")
def fuse_layer_norm(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    n = apply_rules(gm, [FuseLayerNorm()], ctx)
    return PassResult(gm, n > 0, {"fused": n})
