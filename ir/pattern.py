"""Patterns as values: a small combinator language over optc's ATen graphs, and one matcher.

A fusion is written the way the model author wrote the code, as a tree of pattern values::

    scores = Op(MATMUL, Scaled(Var("q")), Scaled(Var("kT")))
    masked = Alt(Op(aten.add.Tensor, scores, Var("mask"), commutative=True), scores)
    probs  = Through(IDENTITY_LIKE, Op(SOFTMAX, masked.one_use(), LastDim()))
    attention = Op(MATMUL, probs.one_use(), Var("v"))

and :func:`match` walks the graph for it from an anchor node. The pieces:

==================  ==============================================================================
``Op(t, *args)``    a call of ``t`` (an OpOverload, a packet, or a tuple of them) whose arguments
                    match ``args`` in order (``...`` ends the list: the rest are not looked at);
                    ``commutative=True`` also tries the two first arguments swapped; keyword
                    arguments match by name (``dtype=Const(None)``)
``Var(name)``       anything; bound to ``name``. A name bound twice must bind the same value
``Const(pred)``     a Python scalar, or a one-element constant attribute, for which ``pred`` holds
``Alt(p, q, ...)``  the first alternative that matches (bindings of a failed one are undone)
``Through(ts, p)``  ``p``, after looking through any chain of single-input ops in ``ts`` (copies,
                    casts that change nothing, eval dropout, ...), each checked by ``when``
``p.where(f, why)`` ``p``, then ``f(value, bindings)`` must hold; else the match fails with ``why``
``p.one_use()``     ``p``, and its node has one user that reads its value (users that read only its
                    shape or metadata -- ``sym_size``, ``_assert_tensor_metadata`` -- do not count)
``p.bind(name)``    ``p``, and its value bound to ``name`` too
==================  ==============================================================================

Custom pieces subclass :class:`Pattern` (``ir/attention_patterns.py`` has a scale chain that
multiplies every constant factor it strips into one binding). A failed match records the reason
and the node that refused (:class:`Failure`); of the alternatives tried, the failure that got
furthest into the pattern is reported, so an anchor that almost matched says exactly where and
why it did not (``optc dump -v``). Matching never mutates the graph.

Why a combinator language rather than patterns traced from eager functions (Inductor's
``register_replacement``): the fusions here need alternatives within one pattern (four mask
spellings x three scale placements x optional casts would be dozens of traced variants), refusal
reasons that name a node, and predicates on constants and shapes evaluated while matching; the
combinators give all three at the cost of writing patterns by hand, the way onnxscript's rewriter
and tinygrad's UPat do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

from optc.ir.queries import scalar
from optc.ir.rewrite import is_op

__all__ = ["Pattern", "Op", "Var", "Const", "Alt", "Through", "Any_", "Match", "Failure", "match",
           "value_users", "SHAPE_ONLY"]

#: ops that read only a tensor's shape or metadata: not users of its value
SHAPE_ONLY = (torch.ops.aten.sym_size.int, torch.ops.aten.sym_size.default, torch.ops.aten.sym_numel.default,
              torch.ops.aten.sym_stride.int, torch.ops.aten._assert_tensor_metadata.default)


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its value (not only its shape or metadata)."""
    return [u for u in node.users if not (u.op == "call_function" and u.target in SHAPE_ONLY)]


@dataclass
class Failure:
    reason: str
    node: Any = None          # the node that refused (or the value, for a constant)
    depth: int = 0            # how far into the pattern the match had got

    def __str__(self) -> str:
        where = f"%{self.node.name}: " if isinstance(self.node, fx.Node) else ""
        return where + self.reason


@dataclass
class Match:
    """The state of one match: bindings, the nodes matched (for erasing), the best failure."""

    bindings: dict = field(default_factory=dict)
    nodes: list = field(default_factory=list)
    failure: Failure | None = None
    depth: int = 0

    def __getitem__(self, key):
        return self.bindings[key]

    def get(self, key, default=None):
        return self.bindings.get(key, default)

    def fail(self, reason: str, node: Any = None) -> bool:
        if self.failure is None or self.depth > self.failure.depth:   # the first of the deepest
            self.failure = Failure(reason, node, self.depth)
        return False

    def save(self):
        return dict(self.bindings), len(self.nodes), self.depth

    def restore(self, state) -> None:
        self.bindings, n, self.depth = dict(state[0]), state[1], state[2]
        del self.nodes[n:]


class Pattern:
    """A pattern value. :meth:`match` returns True (bindings added to ``m``) or False (``m.fail``
    called with the reason); it never mutates the graph."""

    def match(self, value: Any, m: Match) -> bool:
        raise NotImplementedError

    # -- combinators ------------------------------------------------------------------------------
    def where(self, pred: Callable[[Any, Match], bool], why: str | Callable[[Any, Match], str]) -> "Pattern":
        return _Where(self, pred, why)

    def one_use(self) -> "Pattern":
        return _OneUse(self)

    def bind(self, name: str) -> "Pattern":
        return _Bind(self, name)

    def __or__(self, other: "Pattern") -> "Pattern":
        return Alt(self, other)


def _targets(t) -> tuple:
    return tuple(t) if isinstance(t, (tuple, list, set, frozenset)) else (t,)


def _is_target(node: Any, targets: tuple) -> bool:
    return is_op(node, *targets)


def _name(t) -> str:
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}.{t._opname}" + ("" if t._overloadname == "default" else f".{t._overloadname}")
    return getattr(t, "__name__", str(t))


def describe(value: Any) -> str:
    if isinstance(value, fx.Node):
        return f"%{value.name} ({_name(value.target)})" if value.op == "call_function" else f"%{value.name} ({value.op})"
    return repr(value)


class Op(Pattern):
    def __init__(self, targets, *args, commutative: bool = False, name: str | None = None, **kwargs):
        self.targets = _targets(targets)
        self.args = list(args)
        self.open = bool(self.args) and self.args[-1] is Ellipsis
        if self.open:
            self.args.pop()
        self.kwargs = kwargs
        self.commutative = commutative
        self.name = name

    def match(self, value, m):
        if not _is_target(value, self.targets):
            want = " or ".join(_name(t) for t in self.targets)
            return m.fail(f"expected {want}, found {describe(value)}", value)
        node: fx.Node = value
        args = list(node.args)
        if not self.open and len(args) > len(self.args) and any(a is not None for a in args[len(self.args):]):
            pass   # trailing defaults the pattern does not name are allowed only when the pattern is open
        if len(args) < len(self.args):
            return m.fail(f"{describe(node)} has {len(args)} arguments, the pattern {len(self.args)}", node)
        orders = [args]
        if self.commutative and len(args) >= 2:
            orders.append([args[1], args[0], *args[2:]])
        for order in orders:
            state = m.save()
            m.depth += 1
            ok = all(p.match(a, m) for p, a in zip(self.args, order)) and all(
                p.match(node.kwargs.get(k), m) for k, p in self.kwargs.items())
            if ok:
                m.nodes.append(node)
                if self.name:
                    m.bindings[self.name] = node
                return True
            m.restore(state)
        return False


class Var(Pattern):
    def __init__(self, name: str | None = None):
        self.name = name

    def match(self, value, m):
        if self.name is None:
            return True
        if self.name in m.bindings and m.bindings[self.name] is not value:
            return m.fail(f"'{self.name}' is bound to {describe(m.bindings[self.name])}, not {describe(value)}", value)
        m.bindings[self.name] = value
        return True


Any_ = Var   # an unnamed Var matches anything


class Const(Pattern):
    """A Python number (or a one-element constant attribute) ``c`` with ``pred(c)``."""

    def __init__(self, pred: Callable[[float], bool] | None = None, name: str | None = None, why: str = ""):
        self.pred, self.name, self.why = pred, name, why

    def match(self, value, m):
        c = scalar(value)
        if c is None:
            return m.fail(f"{describe(value)} is not a constant scalar", value)
        if self.pred is not None and not self.pred(c):
            return m.fail(self.why or f"constant {c!r} does not qualify", value)
        if self.name:
            m.bindings[self.name] = c
        return True


class Alt(Pattern):
    def __init__(self, *alternatives: Pattern):
        self.alternatives = alternatives

    def match(self, value, m):
        for p in self.alternatives:
            state = m.save()
            if p.match(value, m):
                return True
            m.restore(state)
        return False


class Through(Pattern):
    """``inner``, after looking through a chain of single-input ops in ``targets``; each skipped
    node must satisfy ``when(node)`` (else the match fails with ``why``) and, with ``one_use``,
    have one value user. Skipped nodes are recorded (in order) under ``skipped``."""

    def __init__(self, targets, inner: Pattern, *, when: Callable[[fx.Node], str | None] | None = None,
                 one_use: bool = True, skipped: str | None = None):
        self.targets, self.inner, self.when, self.one_use_, self.skipped = _targets(targets), inner, when, one_use, skipped

    def match(self, value, m):
        seen = []
        cur = value
        while _is_target(cur, self.targets):
            if self.when is not None:
                why = self.when(cur)
                if why is not None:
                    break
            if self.one_use_ and cur is not value and len(value_users(cur)) != 1:
                return m.fail(f"{describe(cur)} has other users", cur)
            seen.append(cur)
            cur = cur.args[0]
        if self.skipped:
            m.bindings[self.skipped] = m.bindings.get(self.skipped, []) + seen
        m.nodes.extend(seen)
        return self.inner.match(cur, m)


class _Where(Pattern):
    def __init__(self, inner: Pattern, pred, why):
        self.inner, self.pred, self.why = inner, pred, why

    def match(self, value, m):
        if not self.inner.match(value, m):
            return False
        if not self.pred(value, m):
            why = self.why(value, m) if callable(self.why) else self.why
            return m.fail(why, value)
        return True


class _OneUse(Pattern):
    def __init__(self, inner: Pattern):
        self.inner = inner

    def match(self, value, m):
        if isinstance(value, fx.Node) and len(value_users(value)) > 1:
            return m.fail(f"{describe(value)} has other users ({', '.join('%' + u.name for u in value_users(value))})",
                          value)
        return self.inner.match(value, m)


class _Bind(Pattern):
    def __init__(self, inner: Pattern, name: str):
        self.inner, self.name = inner, name

    def match(self, value, m):
        if not self.inner.match(value, m):
            return False
        m.bindings[self.name] = value
        return True


def match(pattern: Pattern, anchor: fx.Node, **bindings) -> Match:
    """Match ``pattern`` at ``anchor``; ``result.failure`` is None on success."""
    m = Match(dict(bindings))
    ok = pattern.match(anchor, m)
    if ok:
        m.failure = None
    elif m.failure is None:
        m.failure = Failure("no match", anchor)
    return m


def any_of(patterns: Iterable[Pattern]) -> Pattern:
    return Alt(*patterns)
