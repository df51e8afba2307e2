"""Small questions asked of graph nodes by more than one pass.

- what a node holds: :func:`val` (its tensor metadata), :func:`scalar` (a number or a 0-d
  constant as a float);
- where it comes from in the user's model: :func:`module_path`, :func:`layer_name`;
- constant subgraphs: :func:`constant_nodes` (every node computed from constants only, in graph
  order) and :func:`constant_value` (the value of one such node, evaluated within bounds).

Which ops may belong to a constant subgraph is the caller's policy (``op_ok``): constant folding
evaluates only pure calls, a layout rewrite may treat any call without side effects on constants
as a constant, a pattern matcher evaluates a few ATen ops at match time. The walk is the same.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Container

import torch
import torch.fx as fx

from optc.ir.rewrite import arg, attr_value


# ---- what a node holds ------------------------------------------------------------------------
def known_equal(a: Any, b: Any) -> bool:
    """``a == b`` for ints or SymInts, True only when it holds for every size the dims may take --
    without adding a guard (comparing SymInts with ``==`` in Python guards on the example's sizes
    and turns a dynamic dim static)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true
    if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt):
        return bool(statically_known_true(a == b))
    return a == b


def same_shape(a: Any, b: Any) -> bool:
    """Whether two shapes are equal for every size their dims may take (no guard added)."""
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(known_equal(x, y) for x, y in zip(a, b))


def val(node: Any) -> torch.Tensor | None:
    """``node.meta['val']`` if ``node`` is a node holding a tensor, else None."""
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def scalar(a: Any) -> float | None:
    """A Python number (not a bool), or a 0-d non-bool constant attribute, as a float; else None."""
    if isinstance(a, (int, float)) and not isinstance(a, bool):
        return float(a)
    t = attr_value(a) if isinstance(a, fx.Node) else None
    if t is not None and t.dim() == 0 and t.dtype != torch.bool:
        return float(t)
    return None


# ---- where a node comes from --------------------------------------------------------------------
def module_path(node: fx.Node) -> Any:
    """The module path of the innermost ``nn.Module`` that called ``node`` as recorded in
    ``nn_module_stack`` (``layer1.0.conv1``; ``""`` for the root), or None without one."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0]


def layer_name(node: fx.Node) -> str:
    """A name for the layer ``node`` computes: its module path, else its weight's attribute path
    without ``.weight``, else the node's name."""
    path = module_path(node)
    if isinstance(path, str) and path:
        return path
    w = arg(node, 1, "weight")
    if isinstance(w, fx.Node) and w.op == "get_attr":
        return re.sub(r"\.weight$", "", str(w.target))
    return node.name


# ---- constant subgraphs ---------------------------------------------------------------------------
def constant_nodes(gm: fx.GraphModule, op_ok: Callable[[fx.Node], bool], *,
                   leaf_ok: Callable[[fx.Node], bool] | None = None, exclude: Container = ()) -> list[fx.Node]:
    """The nodes of ``gm`` computed from constants only, in graph order: the ``get_attr`` nodes
    (those for which ``leaf_ok`` holds, when given) and the ``call_function`` nodes for which
    ``op_ok`` holds whose inputs are all constant. Nodes in ``exclude`` are never constant."""
    const: set[fx.Node] = set()
    order: list[fx.Node] = []
    for n in gm.graph.nodes:
        if n in exclude:
            continue
        if n.op == "get_attr":
            ok = leaf_ok is None or leaf_ok(n)
        elif n.op == "call_function":
            ok = op_ok(n) and all(i in const for i in n.all_input_nodes)
        else:
            ok = False
        if ok:
            const.add(n)
            order.append(n)
    return order


def constant_value(node: Any, op_ok: Callable[[fx.Node], bool], *, max_nodes: int,
                   max_numel: int) -> torch.Tensor | None:
    """Evaluate ``node`` eagerly if it is computed from constant attributes only, through calls for
    which ``op_ok`` holds; else None. Bounded: at most ``max_nodes`` call visits (a node reached
    twice counts twice) and ``max_numel`` elements per value; an op that fails on the real tensors
    (e.g. a device this machine lacks) makes the value unknown, not an error."""
    return _value(node, op_ok, [max_nodes], max_numel)


def _value(node: Any, op_ok: Callable[[fx.Node], bool], budget: list[int], max_numel: int):
    t = attr_value(node)
    if t is not None:
        return t if t.numel() <= max_numel else None
    if not isinstance(node, fx.Node) or node.op != "call_function" or not op_ok(node):
        return None
    budget[0] -= 1
    if budget[0] < 0:
        return None

    def ev(a):
        if isinstance(a, fx.Node):
            r = _value(a, op_ok, budget, max_numel)
            if r is None:
                raise LookupError
            return r
        if isinstance(a, (list, tuple)):
            return type(a)(ev(x) for x in a)
        return a
    try:
        args, kwargs = ev(node.args), {k: ev(v) for k, v in node.kwargs.items()}
    except LookupError:
        return None
    try:
        with torch.no_grad():
            out = node.target(*args, **kwargs)
    except Exception:        # e.g. a device this machine lacks: just not provably constant
        return None
    return out if isinstance(out, torch.Tensor) and out.numel() <= max_numel else None
