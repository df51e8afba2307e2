"""Constant folding.

Rewrite: a subgraph whose inputs are only ``get_attr`` constants and literals is evaluated
once, eagerly on the real tensors, and its result becomes a new attribute::

    %w = get_attr fc.weight;  %t = aten.t(%w);  %mm = aten.mm(%x, %t)
        ==>   %fc_weight_t = get_attr fc_weight_t;  %mm = aten.mm(%x, %fc_weight_t)

Typical folds: weight transposes, permutes, reshapes and views, arithmetic on weights,
``lift_fresh_copy`` of ``torch.tensor(...)`` literals, ``_to_copy`` of a constant,
slices of position-id buffers, masks computed from constant buffers. Only the frontier of
a constant subgraph is materialised (a constant node with a user that stays); its interior
is evaluated and erased, with the get_attr nodes only it used. Frontier nodes that compute
the same value the same way (two layers each inverting the same causal mask) share one
attribute. The new attribute is a contiguous tensor that shares no storage with the
originals, which are never modified; it is an ``nn.Parameter`` when the value is floating
point and derives from a parameter (so fine-tuning can still train it), else a buffer.

Preconditions (else the node stays; refusals are recorded with their reason, rule "fold"):
- every input node is a constant (a tensor ``get_attr`` or an already-constant node);
  nodes that depend on a placeholder are never folded;
- the op is pure (:func:`optc.ir.effects.is_pure_call`: no mutable schema, no random ops
  such as ``aten.rand`` or ``dropout``, no uninitialised ``empty``);
- nothing writes into a value of the subgraph in place at run time (then the attributes
  it derives from are not constants at all; ``detach_``, which changes only autograd
  metadata, does not count);
- the value is one tensor and not a graph output (the graph would return the attribute
  itself, which a caller could then modify);
- size: the folded tensor may be larger than the sum of the constants it is computed from
  by at most ``max_bytes`` (default 1 MiB). Transposes, reshapes, slices and elementwise
  ops on weights never grow it and always fold; an ``expand``/broadcast or a factory op
  (``aten.zeros([4096, 4096])``) that would bake a large tensor into the model does not.
  The inputs count even where they stay in the model for other users (a weight used both
  as is and transposed is then stored twice);
- the eager evaluation succeeds (an op that fails on the real tensors is left alone).
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
import torch.nn as nn

from optc.ir.effects import arg_key, is_pure_call, mutates
from optc.ir.queries import constant_nodes
from optc.ir.rewrite import add_attr, attr_node, attr_value
from optc.passes.base import Option, PassContext, PassResult, register_pass

log = logging.getLogger(__name__)

RULE = "fold"


def _nbytes(val) -> int:
    return val.numel() * val.element_size()


def _written(node: fx.Node) -> fx.Node | None:
    """A user that writes into ``node``'s data in place, if any."""
    for u in node.users:
        if mutates(u, node):
            return u
    return None


def _preserved(node: fx.Node) -> bool:
    """optc's dequantize ops are never folded (as onnxscript's folder keeps DequantizeLinear): the
    int8 weight behind a dequantize is what a backend fuses into an integer kernel."""
    from optc.ir.quant_ops import is_dequantize
    return is_dequantize(node.target)


def _constant_nodes(gm: fx.GraphModule, excluded: set[fx.Node]) -> list[fx.Node]:
    """call_function nodes that depend only on constants (tensor attributes, through pure calls
    other than dequantize ops), in topological order."""
    nodes = constant_nodes(gm, lambda n: is_pure_call(n) and not _preserved(n),
                           leaf_ok=lambda n: attr_value(n) is not None, exclude=excluded)
    return [n for n in nodes if n.op == "call_function"]


def _ancestors(node: fx.Node, const: set[fx.Node]) -> list[fx.Node]:
    """The constant nodes ``node`` is computed from (itself excluded), depth first."""
    out: list[fx.Node] = []
    seen: set[fx.Node] = set()
    stack = list(reversed(node.all_input_nodes))
    while stack:
        n = stack.pop()
        if n in seen or n not in const:
            continue
        seen.add(n)
        out.append(n)
        stack.extend(reversed(n.all_input_nodes))
    return out


def _leaves(node: fx.Node, const: set[fx.Node]) -> list[fx.Node]:
    """The get_attr nodes a constant node is computed from."""
    return [n for n in _ancestors(node, const) if n.op == "get_attr"]


def _evaluate(node: fx.Node, memo: dict[fx.Node, object]):
    if node not in memo:
        if node.op == "get_attr":
            memo[node] = attr_value(node)
        else:
            args = fx.node.map_arg(node.args, lambda n: _evaluate(n, memo))
            kwargs = fx.node.map_arg(node.kwargs, lambda n: _evaluate(n, memo))
            with torch.no_grad():
                memo[node] = node.target(*args, **kwargs)
    return memo[node]


def _structure(node: fx.Node, memo: dict[fx.Node, object]):
    """A key equal for two constant nodes that compute the same value the same way."""
    if node not in memo:
        if node.op == "get_attr":
            memo[node] = ("get_attr", node.target)
        else:
            memo[node] = (node.target, arg_key(node.args, lambda n: _structure(n, memo)),
                          arg_key(dict(node.kwargs), lambda n: _structure(n, memo)))
    return memo[node]


def _refusal(node: fx.Node, const: set[fx.Node], max_bytes: int) -> str | None:
    """Why the frontier node ``node`` cannot become an attribute, or None."""
    val = node.meta.get("val")
    if any(u.op == "output" for u in node.users):
        return "value is a graph output (the graph would return the attribute itself)"
    if not isinstance(val, torch.Tensor):
        return f"value is not a single tensor ({type(val).__name__})"
    grow = _nbytes(val) - sum(_nbytes(attr_value(a)) for a in _leaves(node, const))
    if grow > max_bytes:
        return (f"folded value {list(val.shape)} would grow the model by {grow} bytes "
                f"(max_bytes={max_bytes})")
    return None


@register_pass("constant-fold", exact=True,
               description="evaluate subgraphs that depend only on constants into new attributes",
               options={"max_bytes": Option(int, 1 << 20, "largest allowed growth of the model per folded "
                                                          "tensor, in bytes (output minus constant inputs)")})
def constant_fold(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    max_bytes = ctx.options.get("max_bytes", 1 << 20)

    # Constants written in place at run time are not constants: drop the attributes they
    # derive from (views may alias them) and look again.
    excluded: set[fx.Node] = set()
    while True:
        candidates = _constant_nodes(gm, excluded)
        const = set(candidates) | {n for n in gm.graph.nodes if n.op == "get_attr" and n not in excluded}
        bad = {}
        for node in [n for n in gm.graph.nodes if n in const]:
            if (w := _written(node)) is not None:
                bad[node] = w
        if not bad:
            break
        for node, w in bad.items():
            ctx.reject(RULE, node, f"%{w.name} modifies its value in place")
            excluded.update([node, *_leaves(node, const)])

    # Users first: a constant node whose users are all folded is interior; one with a user
    # that stays (non-constant or refused) is a frontier node and becomes an attribute,
    # unless refused -- then its own inputs become frontier nodes.
    refused: set[fx.Node] = set()
    frontier: list[fx.Node] = []
    for node in reversed(candidates):
        if not any(u not in const or u in refused for u in node.users):
            continue
        reason = _refusal(node, const, max_bytes)
        if reason is None and not ctx.allow_rewrite(RULE, node):
            reason = "rewrite limit reached"
        if reason:
            ctx.reject(RULE, node, reason)
            refused.add(node)
        else:
            frontier.append(node)

    memo: dict[fx.Node, object] = {}
    structures: dict[fx.Node, object] = {}
    made: dict[object, fx.Node] = {}              # structure -> get_attr node: one attribute per value
    new_attrs = 0
    touched: set[fx.Node] = set()
    for node in reversed(frontier):               # topological order: deterministic names
        try:
            key = _structure(node, structures)
        except TypeError:
            key = node
        if key in made:
            log.debug("constant-fold: %%%s -> get_attr %s (same value)", node.name, made[key].target)
            node.replace_all_uses_with(made[key])
            touched.update([node, *_ancestors(node, const)])
            continue
        try:
            value = _evaluate(node, memo)
        except Exception as e:  # an op failing on the real tensors: leave its subgraph as it is
            ctx.reject(RULE, node, f"evaluation failed: {type(e).__name__}: {e}")
            continue
        if not isinstance(value, torch.Tensor):
            ctx.reject(RULE, node, f"value is not a tensor ({type(value).__name__})")
            continue
        leaves = _leaves(node, const)
        from_param = value.is_floating_point() and any(isinstance(attr_value(a), nn.Parameter) for a in leaves)
        hint = f"{leaves[0].target}_{node.name}" if leaves else node.name
        target = add_attr(gm, hint, value.detach().clone(memory_format=torch.contiguous_format),
                          parameter=from_param)
        with gm.graph.inserting_before(node):
            new = attr_node(gm, target, like=node, pass_name=ctx.pass_name)
        node.replace_all_uses_with(new)
        made[key] = new
        touched.update([node, *_ancestors(node, const)])
        new_attrs += 1
        log.debug("constant-fold: %%%s -> get_attr %s %s", node.name, target, list(value.shape))

    # Erase what the folds left dead (and nothing else: other dead code is dce's).
    folded = 0
    for node in reversed(list(gm.graph.nodes)):
        if node in touched and not node.users:
            folded += node.op == "call_function"
            gm.graph.erase_node(node)
    return PassResult(gm, new_attrs > 0 or folded > 0, {"folded": folded, "constants": new_attrs})
