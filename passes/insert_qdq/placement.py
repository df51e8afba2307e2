"""insert-qdq's placement: which values get a quantize-dequantize pair, which of their users read
the dequantized value, and which values share quantization parameters (see the rules in
:mod:`optc.passes.insert_qdq`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from optc.ir.rewrite import attr_value, is_op
from optc.passes.insert_qdq.sites import Site, is_f32

aten = torch.ops.aten

_ACTIVATIONS = (aten.relu.default, aten.hardtanh.default, aten.clamp.default, aten.relu6.default)
_PASS_THROUGH = (
    aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
    aten.flatten.using_ints, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
    aten.permute.default, aten.transpose.int, aten.t.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.unsqueeze.default, aten.slice.Tensor, aten.select.int, aten.clone.default,
    aten.contiguous.default, torch.ops.optc.max_pool2d_nhwc.default,
)
_TAKES_DEQUANTIZED = (torch.ops.optc.adaptive_avg_pool2d_nhwc.default, torch.ops.optc.avg_pool2d_nhwc.default,
                      aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
                      aten.avg_pool1d.default, aten.avg_pool2d.default, aten.mean.dim)
_ADD = aten.add.Tensor
_CAT = aten.cat.default


def activation_tail(node: fx.Node) -> fx.Node:
    """``node``, or the ReLU/ReLU6/clamp that is its only user."""
    if len(node.users) == 1:
        u = next(iter(node.users))
        if is_op(u, *_ACTIVATIONS) and u.args[0] is node and is_f32(u):
            if is_op(u, aten.clamp.default) and not all(isinstance(a, (int, float, type(None))) for a in u.args[1:]):
                return node
            return u
    return node


def _is_int_add(node: fx.Node) -> bool:
    if not is_op(node, _ADD) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return False
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and is_f32(a) and is_f32(b) and is_f32(node)):
        return False
    if attr_value(a) is not None or attr_value(b) is not None:
        return False
    return tuple(a.meta["val"].shape) == tuple(b.meta["val"].shape) == tuple(node.meta["val"].shape)


def _is_int_cat(node: fx.Node) -> bool:
    if not is_op(node, _CAT) or not is_f32(node):
        return False
    ins = node.args[0]
    return all(isinstance(i, fx.Node) and is_f32(i) and attr_value(i) is None for i in ins)


def _is_pass_through(node: fx.Node) -> bool:
    return is_op(node, *_PASS_THROUGH) and isinstance(node.args[0], fx.Node) and is_f32(node.args[0]) \
        and is_f32(node)


class _UnionFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] is not x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self.parent[rb] = ra


@dataclass
class Plan:
    """Which values get a Q/DQ pair, which of their users read the dequantized value, and which
    values share quantization parameters."""

    values: list[fx.Node]                              # in graph order
    readers: dict[fx.Node, list[fx.Node]]              # value -> users that read DQ
    same: _UnionFind                                   # same scale and zero point
    same_scale: _UnionFind                             # same scale (add inputs)
    int_ops: set[fx.Node]                              # integer adds / cats


def _operands(node: fx.Node) -> list:
    return list(node.args[0]) if is_op(node, _CAT) else [node.args[0], node.args[1]]


def plan_placement(gm: fx.GraphModule, sites: dict[fx.Node, Site], share_add_scales: bool) -> Plan:
    nodes = list(gm.graph.nodes)
    tails = {activation_tail(s): s for s in sites}            # site tail -> site node
    # a conv runs in integers only with a quantized output (ONNX Runtime's QLinearConv has no
    # float-output form); linear/matmul have one (QGemm, MatMulIntegerToFloat)
    conv_tails = {t for t, s in tails.items() if sites[s].kind == "conv"}
    int_candidates = {n for n in nodes if _is_int_add(n) or _is_int_cat(n)}
    # values that may be produced in integers, forward: site tails; an add/cat all of whose inputs
    # may be (its tail: the add or its fused ReLU); a pass-through op of one
    may_be_int: set[fx.Node] = set(tails)
    viable: set[fx.Node] = set()
    for n in nodes:
        if n in int_candidates and all(i in may_be_int for i in _operands(n)):
            viable.add(n)
            may_be_int.add(activation_tail(n))
        elif _is_pass_through(n) and n.args[0] in may_be_int:
            may_be_int.add(n)
    quantized_out: dict[fx.Node, bool] = {}

    def takes_integer(user: fx.Node, value: fx.Node) -> bool:
        if user in sites:
            return value in sites[user].acts
        if user in viable:
            return quantized_out.get(activation_tail(user), False)
        if _is_pass_through(user):   # of a float value, quantize after it: Q(maxpool(x)) == maxpool(Q(x))
            return user.args[0] is value and quantized_out.get(user, False) and value in may_be_int
        if is_op(user, *_TAKES_DEQUANTIZED):   # it lets the producer (an add's convs) run in integers
            return user.args[0] is value and value in may_be_int
        return False

    for n in reversed(nodes):          # users before producers
        if n.op in ("output", "get_attr") or not is_f32(n):
            continue
        quantized_out[n] = n in conv_tails or any(takes_integer(u, n) for u in n.users)

    int_ops = {c for c in viable if quantized_out.get(activation_tail(c), False)}
    int_tails = {activation_tail(c) for c in int_ops}

    values, readers = [], {}
    integer_produced: set[fx.Node] = set()
    for n in nodes:
        if not quantized_out.get(n, False):
            continue
        produced_int = (n in tails or n in int_tails
                        or (_is_pass_through(n) and n.args[0] in integer_produced and quantized_out.get(n.args[0])))
        if produced_int:
            integer_produced.add(n)
            readers[n] = list(n.users)
        else:
            readers[n] = [u for u in n.users if takes_integer(u, n)]
        values.append(n)

    same, same_scale = _UnionFind(), _UnionFind()
    for n in values:
        same.find(n)
        if _is_pass_through(n) and quantized_out.get(n.args[0]):
            same.union(n.args[0], n)
    for c in int_ops:
        if is_op(c, _CAT) and c is activation_tail(c):
            for i in c.args[0]:
                same.union(c, i)
        elif is_op(c, _ADD) and share_add_scales:
            same_scale.union(c.args[0], c.args[1])
    return Plan(values, readers, same, same_scale, int_ops)
