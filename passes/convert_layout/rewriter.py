"""convert-layout's rewriter: the layout of every value in one run, and how to obtain a value in
another layout (permutes that cancel, reshapes where only unit axes move, constants permuted at
compile time, constant subgraphs re-emitted); and the protocol of its rules (:class:`LayoutRule`:
``match`` on a node and the layouts of its inputs, ``build`` the node's new form).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from optc.errors import PassError
from optc.ir.rewrite import MatchResult, RewriteRule, add_attr, attr_node, attr_value, call, infer_val, is_op
from optc.passes.base import PassContext
from optc.passes.convert_layout.perm import Perm, identity, inverse, is_identity, is_one, shape_of, static_dim, then

PASS = "convert-layout"
aten = torch.ops.aten


def attr_name(target: str, p: Perm) -> str:
    """``conv.weight`` in layout ``p`` -> ``conv_weight_nhwc`` (a suffix of an earlier conversion replaced)."""
    base = re.sub(r"_(nhwc|nchw|p\d+)$", "", str(target).replace(".", "_"))
    return base + "_" + {(0, 2, 3, 1): "nhwc", (0, 3, 1, 2): "nchw"}.get(tuple(p), "p" + "".join(map(str, p)))


# ---- the rewriter: values in a requested layout ------------------------------------------------------
@dataclass
class Built:
    """What a rule turns a node into: target, arguments and the layout of its result (a perm, a
    list of perms for ops returning a list, or None for non-tensor results)."""

    target: Callable
    args: tuple
    kwargs: dict
    out: Any


class Rewriter:
    """The state of one run: the layout of every value and how to get it in another layout.

    ``env[n] = (node, perm)``: ``node`` (in the rewritten graph) holds ``logical(n).permute(perm)``.
    """

    def __init__(self, gm: fx.GraphModule, ctx: PassContext, target: str, reemit_rules: tuple = ()):
        self.gm = gm
        self.graph = gm.graph
        self.ctx = ctx
        self.layout = target
        self.env: dict[fx.Node, tuple] = {}
        self.logical: dict[fx.Node, Any] = {n: n.meta.get("val") for n in gm.graph.nodes}
        self.const: set[fx.Node] = set()
        self.cache: dict[tuple, fx.Node] = {}
        self.cursor: fx.Node | None = None
        self.created: list[fx.Node] = []
        self.dead: list[fx.Node] = []
        self.strided: set[fx.Node] = set()   # values that may carry permuted strides (driver._fallback)
        self.reemit_rules = reemit_rules      # rules that can compute a constant subgraph in a layout
        self.stats = {"converted": 0, "permutes": 0, "absorbed": 0, "reshapes": 0, "constants": 0}

    # -- layouts --
    def perm(self, v) -> Any:
        return self.env[v][1] if isinstance(v, fx.Node) and v in self.env else None

    def lshape(self, v) -> list | None:
        val = self.logical.get(v) if isinstance(v, fx.Node) else None
        return list(val.shape) if isinstance(val, torch.Tensor) else None

    def rank(self, v) -> int | None:
        s = self.lshape(v)
        return None if s is None else len(s)

    def moving(self, v) -> bool:
        """A non-constant tensor whose layout is permuted: what decides an op's layout."""
        return isinstance(v, fx.Node) and v not in self.const and not is_identity(self.perm(v)) \
            and isinstance(self.perm(v), tuple)

    # -- new nodes --
    def _call(self, target, args, like: fx.Node | None, name: str, kwargs: dict | None = None) -> fx.Node:
        with self.graph.inserting_before(self.cursor):
            node = call(self.graph, target, args, kwargs, like=like, pass_name=PASS, name=name)
        self.created.append(node)
        return node

    def request(self, v, q: Perm) -> Any:
        """``v`` (a node of the original graph) as ``logical(v).permute(q)`` in the new graph."""
        if not isinstance(v, fx.Node):
            return v
        x, p = self.env[v]
        if p is None or not isinstance(p, tuple):
            if not is_identity(q):
                raise PassError(f"%{v.name} has no tensor layout to permute", pass_name=PASS, node=v.name)
            return x
        if len(q) != len(p):
            raise PassError(f"layout of rank {len(q)} requested for %{v.name} of rank {len(p)}", pass_name=PASS,
                            node=v.name)
        r = tuple(inverse(p)[d] for d in q)          # x.permute(r) == logical.permute(q)
        if is_identity(r):
            return x
        key = (v, tuple(q))
        if key in self.cache:
            return self.cache[key]
        if v in self.const:
            out = self._constant(v, tuple(q))
        else:
            out = self._permute(x, r, like=v)
        self.cache[key] = out
        return out

    def plain(self, a) -> Any:
        """An argument (a node, or a list/tuple/dict of them) with every tensor in its logical layout."""
        if isinstance(a, fx.Node):
            p = self.perm(a)
            if isinstance(p, tuple):
                return self.request(a, identity(len(p)))
            return self.env[a][0] if a in self.env else a
        if isinstance(a, (list, tuple)):
            return type(a)(self.plain(x) for x in a)
        if isinstance(a, dict):
            return {k: self.plain(v) for k, v in a.items()}
        return a

    def request_broadcast(self, v, p: Perm) -> Any:
        """``v`` as an operand of a pointwise op whose result is in layout ``p`` (rank ``len(p)``):
        a lower-rank operand is broadcast (leading size-1 axes) before it is permuted."""
        r = self.rank(v)
        if r is None:
            return self.plain(v)
        if r == len(p):
            return self.request(v, p)
        if r == 0:
            return self.request(v, ())
        shape = [1] * (len(p) - r) + self.lshape(v)
        if v in self.const and attr_value(v) is not None:
            key = (v, "broadcast", tuple(p))
            if key not in self.cache:
                t = attr_value(v).reshape(shape).permute(p).contiguous()
                self.cache[key] = self._new_attr(v, t, attr_name(v.target, p))
            return self.cache[key]
        if not all(static_dim(d) for d in shape):
            return None
        # a reshape to the permuted broadcast shape is exact when the non-unit axes keep their order
        order = [d for d in p if not is_one(shape[d])]
        if order == sorted(order):
            key = (v, "broadcast", tuple(p))
            if key not in self.cache:
                base = self.request(v, identity(r))
                self.cache[key] = self._reshape(base, [int(shape[d]) for d in p], like=v)
            return self.cache[key]
        return None

    def _permute(self, x: fx.Node, r: Perm, like: fx.Node) -> fx.Node:
        # cancel: permute(permute(b, a), r) == permute(b, a then r)
        while is_op(x, aten.permute.default) and isinstance(x.args[0], fx.Node):
            r = then(tuple(x.args[1]), r)
            x = x.args[0]
            if is_identity(r):
                return x
        shape = shape_of(x)
        if shape is not None and all(static_dim(d) for d in shape):
            order = [d for d in r if not is_one(shape[d])]
            if order == sorted(order):         # only unit axes move: a reshape keeps the element order
                return self._reshape(x, [int(shape[d]) for d in r], like=like)
        return self._call(aten.permute.default, (x, list(r)), like, "permute")

    def _reshape(self, x: fx.Node, shape: list, like: fx.Node) -> fx.Node:
        self.stats["reshapes"] += 1
        return self._call(aten.reshape.default, (x, shape), like, "reshape")

    def _new_attr(self, like: fx.Node, value: torch.Tensor, hint: str) -> fx.Node:
        orig = attr_value(like)
        target = add_attr(self.gm, hint, value, parameter=isinstance(orig, nn.Parameter))
        with self.graph.inserting_before(self.cursor):
            node = attr_node(self.gm, target, like=like, pass_name=PASS)
        self.created.append(node)
        self.stats["constants"] += 1
        return node

    def _constant(self, v: fx.Node, q: Perm) -> fx.Node:
        """A constant in layout ``q``: a permuted copy of the tensor (compile time), or the constant
        subgraph that computes it re-emitted on permuted inputs."""
        t = attr_value(v)
        if t is not None:
            return self._new_attr(v, t.permute(q).contiguous(), attr_name(v.target, q))
        for rule in self.reemit_rules:
            built = rule.reemit(v, q, self)
            if built is not None:
                with self.graph.inserting_before(self.cursor):
                    node = self.graph.create_node("call_function", built.target, built.args, built.kwargs,
                                                  name=v.name)
                node.meta.update({k: val for k, val in v.meta.items() if k != "val"})
                node.meta["optc_pass"] = PASS
                self._check(node, v, q, infer=True)
                self.created.append(node)
                return node
        x, p = self.env[v]
        return self._permute(x, tuple(inverse(p)[d] for d in q), like=v)

    # -- checks --
    def _check(self, node: fx.Node, orig: fx.Node, out, *, infer: bool = True) -> None:
        """The new value has the logical shape of ``orig`` permuted by ``out``."""
        if infer:
            infer_val(node)
        want, got = self.logical.get(orig), node.meta.get("val")

        def expect(val, p):
            if not isinstance(val, torch.Tensor):
                return None
            s = list(val.shape)
            return [str(s[d]) for d in p] if isinstance(p, tuple) else [str(d) for d in s]

        def seen(val):
            return [str(d) for d in val.shape] if isinstance(val, torch.Tensor) else None

        if isinstance(want, (list, tuple)):
            outs = out if isinstance(out, list) else [out] * len(want)
            ok = isinstance(got, (list, tuple)) and len(got) == len(want) and all(
                expect(w, o) == seen(g) for w, o, g in zip(want, outs, got))
        else:
            ok = expect(want, out) == seen(got)
        if not ok:
            raise PassError(f"rewriting %{orig.name} gave {_describe(got)}, expected the logical "
                            f"{_describe(want)} in layout {out}", pass_name=PASS, node=orig.name)


def _describe(val) -> str:
    if isinstance(val, torch.Tensor):
        return f"{list(val.shape)}"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(_describe(v) for v in val) + ")"
    return repr(val)


# ---- the rule protocol ----------------------------------------------------------------------------
class LayoutRule(RewriteRule):
    """A rule of this pass: ``match`` (pure: the node and the layouts of its inputs) says whether
    and how the node can work on permuted values; ``build`` (which may add input permutes through
    the rewriter) gives the new target, arguments and result layout."""

    name = "layout"
    same_rank = False      # result in the layout of the input (may re-emit constant subgraphs)

    def match(self, node: fx.Node, rw: Rewriter) -> MatchResult | None:   # noqa: D401
        raise NotImplementedError

    def build(self, node: fx.Node, m: MatchResult, rw: Rewriter) -> Built:
        raise NotImplementedError

    def reemit(self, node: fx.Node, q: Perm, rw: Rewriter) -> Built | None:
        """``node`` computed in layout ``q`` from inputs in layout ``q`` (constant subgraphs)."""
        if not self.same_rank:
            return None
        m = self.match_in(node, q, rw)
        return None if m is None or not m.ok else self.build(node, m, rw)

    def match_in(self, node: fx.Node, p: Perm, rw: Rewriter) -> MatchResult | None:
        return None


class Stop(Exception):
    """A rule found, while building, that it cannot apply: the node falls back to the logical layout."""
