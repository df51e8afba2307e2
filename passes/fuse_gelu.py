"""Fuse GELU written out by hand into ``aten.gelu``.

Rewrite::

    0.5 * x * (1 + erf(x / sqrt(2)))                            ==>  aten.gelu(x)
    0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))     ==>  aten.gelu(x, approximate='tanh')

matched at the root of the outer product in any arrangement the algebra allows: the
product of ``mul``/``div``-by-constant nodes is flattened into a coefficient and factors,
which must be ``x`` and one factor that is a polynomial in ``E = erf(..)`` or ``tanh(..)``
(``1 + E``, ``(E + 1) * 0.5``, ...); the whole must equal ``0.5*x + 0.5*x*E``. The argument
of ``E`` must be a polynomial in the same ``x`` (``x / sqrt(2)``, ``x * 0.7071067811865476``;
``c*(x + 0.044715*x^3)``, with ``x^3`` as ``pow(x, 3)``, ``x*x*x``, ``x * (1 + 0.044715*x*x)``).

Preconditions (each refusal reported with its reason): every constant matches the GELU
constant within 1e-6 relative (float32 rounding of 1/sqrt(2) or sqrt(2/pi) is accepted, a
truncated ``1.4142`` is not), ``x`` is floating point and the result has ``x``'s shape and
dtype. Intermediates with other users stay for them (the rewrite only replaces the root).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.fx as fx

from optc.ir.queries import scalar, val
from optc.ir.rewrite import MatchResult, RewriteRule, apply_rules, call, erase_if_unused, is_op
from optc.passes.base import PassContext, PassResult, register_pass

log = logging.getLogger(__name__)
aten = torch.ops.aten

_MUL = (aten.mul.Tensor, aten.mul.Scalar)
_DIV = (aten.div.Tensor, aten.div.Scalar)
_ADD = (aten.add.Tensor, aten.add.Scalar)
_SUB = (aten.sub.Tensor, aten.sub.Scalar)
_ATOMS = {aten.erf.default: "erf", aten.tanh.default: "tanh"}
_RTOL = 1e-6
_MAX_DEGREE = 4
_MAX_DEPTH = 12

SQRT1_2 = math.sqrt(0.5)            # M_SQRT1_2
SQRT_2_PI = math.sqrt(2.0 / math.pi)
KAPPA = 0.044715

Poly = dict  # exponent -> coefficient


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _RTOL * abs(b)


# ---- the outer product ------------------------------------------------------------------
def _product(node, depth: int = 0) -> tuple[float, list]:
    """Flatten ``mul``/``div``-by-constant nodes: ``node == coef * prod(factors)``."""
    if depth < _MAX_DEPTH and is_op(node, *_MUL) and len(node.args) == 2:
        coef, factors = 1.0, []
        for a in node.args:
            s = scalar(a)
            if s is not None:
                coef *= s
            else:
                c, f = _product(a, depth + 1)
                coef, factors = coef * c, factors + f
        return coef, factors
    if depth < _MAX_DEPTH and is_op(node, *_DIV) and len(node.args) == 2 and scalar(node.args[1]) not in (None, 0.0):
        c, f = _product(node.args[0], depth + 1)
        return c / scalar(node.args[1]), f
    return 1.0, [node]


def _atom_in(node, depth: int = 0) -> fx.Node | None:
    """An erf/tanh node reachable through add/sub/mul/div-by-constant nodes (few levels)."""
    if is_op(node, *_ATOMS):
        return node
    if depth >= 3 or not is_op(node, *_ADD, *_SUB, *_MUL, *_DIV):
        return None
    for a in node.args[:2]:
        if isinstance(a, fx.Node):
            found = _atom_in(a, depth + 1)
            if found is not None:
                return found
    return None


# ---- polynomials in one atom -------------------------------------------------------------
def _poly(node, atom: fx.Node, depth: int = 0) -> Poly | None:
    """``node`` as a polynomial in ``atom`` with scalar-constant coefficients, or None."""
    s = scalar(node)
    if s is not None:
        return {0: s}
    if node is atom:
        return {1: 1.0}
    if depth >= _MAX_DEPTH or not isinstance(node, fx.Node):
        return None
    if is_op(node, aten.neg.default):
        p = _poly(node.args[0], atom, depth + 1)
        return None if p is None else {e: -c for e, c in p.items()}
    if len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if is_op(node, *_ADD, *_SUB):
        pa, pb = _poly(a, atom, depth + 1), _poly(b, atom, depth + 1)
        if pa is None or pb is None:
            return None
        alpha = float(node.kwargs.get("alpha", 1)) * (-1.0 if is_op(node, *_SUB) else 1.0)
        out = dict(pa)
        for e, c in pb.items():
            out[e] = out.get(e, 0.0) + alpha * c
        return out
    if is_op(node, *_MUL):
        pa, pb = _poly(a, atom, depth + 1), _poly(b, atom, depth + 1)
        if pa is None or pb is None:
            return None
        out = _mul_poly(pa, pb)
        return out if max(out, default=0) <= _MAX_DEGREE else None
    if is_op(node, *_DIV):
        pa, s = _poly(a, atom, depth + 1), scalar(b)
        if pa is None or s in (None, 0.0):
            return None
        return {e: c / s for e, c in pa.items()}
    if is_op(node, aten.pow.Tensor_Scalar):
        pa, n = _poly(a, atom, depth + 1), scalar(b)
        if pa is None or n is None or n != int(n) or not 0 <= n <= _MAX_DEGREE:
            return None
        return _pow_poly(pa, int(n))
    return None


def _mul_poly(p: Poly, q: Poly) -> Poly:
    out: Poly = {}
    for ea, ca in p.items():
        for eb, cb in q.items():
            out[ea + eb] = out.get(ea + eb, 0.0) + ca * cb
    return out


def _pow_poly(p: Poly, n: int) -> Poly | None:
    out: Poly = {0: 1.0}
    for _ in range(n):
        out = _mul_poly(out, p)
    return out if max(out, default=0) <= _MAX_DEGREE else None


def _clean(p: Poly) -> Poly:
    return {e: c for e, c in sorted(p.items()) if c != 0.0}


def _fmt(p: Poly, var: str) -> str:
    """``0.5 + 0.5*erf``; ``c*(x + k*x^3)`` for the tanh argument's shape; 10 digits."""
    if set(p) == {1, 3} and p[1] != 0.0:
        return f"{p[1]:.10g}*({var} + {p[3] / p[1]:.10g}*{var}^3)"
    terms = []
    for e, c in sorted(p.items()):
        terms.append(f"{c:.10g}" if e == 0 else f"{c:.10g}*{var}" if e == 1 else f"{c:.10g}*{var}^{e}")
    return " + ".join(terms) or "0"


def _matches(p: Poly, want: Poly) -> bool:
    return set(p) == set(want) and all(_close(p[e], want[e]) for e in want)


class FuseGelu(RewriteRule):
    name = "fuse-gelu"

    def match(self, node: fx.Node, ctx: PassContext) -> MatchResult | None:
        if not is_op(node, *_MUL, *_DIV):
            return None
        coef, factors = _product(node)
        with_atom = [(f, _atom_in(f)) for f in factors if is_op(f, *_ADD, *_SUB)]   # 1 + E, not E alone
        with_atom = [(f, a) for f, a in with_atom if a is not None]
        if not with_atom:
            return None                            # no erf/tanh factor: not a GELU candidate
        m = self._check(node, coef, factors, with_atom)
        if not m.ok and len(node.users) == 1 and is_op(next(iter(node.users)), *_MUL, *_DIV):
            return None                            # the product goes on: judge it at its root
        return m

    def _check(self, node, coef, factors, with_atom) -> MatchResult:
        if len(with_atom) != 1 or len(factors) != 2:
            return MatchResult.fail(f"the product has {len(factors)} factors; GELU is 0.5 * x * (1 + erf/tanh(..))")
        f_atom, atom = with_atom[0]
        x = factors[0] if factors[1] is f_atom else factors[1]
        kind = _ATOMS[atom.target]
        outer = _poly(f_atom, atom)
        if outer is None:
            return MatchResult.fail(f"%{f_atom.name} is not a polynomial in %{atom.name}")
        outer = _clean({e: coef * c for e, c in outer.items()})
        if not _matches(outer, {0: 0.5, 1: 0.5}):
            return MatchResult.fail(f"x * ({_fmt(outer, kind)}) is not GELU's 0.5*x*(1 + {kind}(..))")
        inner = _poly(atom.args[0], x)
        if inner is None:
            return MatchResult.fail(f"the {kind} argument %{atom.args[0].name} is not a polynomial in x "
                                    f"(%{getattr(x, 'name', x)})")
        inner = _clean(inner)
        if kind == "erf":
            want, approximate = {1: SQRT1_2}, "none"
        else:
            want, approximate = {1: SQRT_2_PI, 3: SQRT_2_PI * KAPPA}, "tanh"
        if not _matches(inner, want):
            return MatchResult.fail(f"{kind} argument is {_fmt(inner, 'x')}; GELU needs {_fmt(want, 'x')}")
        xv, yv = val(x), val(node)
        if xv is None or yv is None:
            return MatchResult.fail("missing shape metadata")
        if not xv.dtype.is_floating_point or xv.dtype != yv.dtype or list(xv.shape) != list(yv.shape):
            return MatchResult.fail(f"x is {xv.dtype}{list(xv.shape)}, the result {yv.dtype}{list(yv.shape)}")
        return MatchResult.success(x=x, approximate=approximate, atom=atom)

    def rewrite(self, node: fx.Node, m: MatchResult, ctx: PassContext) -> None:
        kwargs = {"approximate": "tanh"} if m["approximate"] == "tanh" else {}
        with node.graph.inserting_before(node):
            gelu = call(node.graph, aten.gelu.default, (m["x"],), kwargs, like=node, pass_name=ctx.pass_name,
                        name="gelu")
        log.debug("fuse-gelu: %%%s -> %%%s (%s)", node.name, gelu.name, m["approximate"])
        node.replace_all_uses_with(gelu)
        _erase_tree(node, m["x"])


def _erase_tree(node, keep: fx.Node) -> None:
    """Erase ``node`` and the operands it alone used, down to ``keep``."""
    if not isinstance(node, fx.Node) or node is keep or node._erased or node.users or node.op != "call_function":
        return
    inputs = node.all_input_nodes
    erase_if_unused(node)
    for i in inputs:
        _erase_tree(i, keep)


@register_pass("fuse-gelu", exact=True,
               description="replace GELU written out by hand (erf or tanh form) with aten.gelu")
def fuse_gelu(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    n = apply_rules(gm, [FuseGelu()], ctx)
    return PassResult(gm, n > 0, {"fused": n})
