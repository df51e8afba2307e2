"""Decompositions of ops some backend cannot lower, written as eager code over ATen ops.

A decomposition is a Python function of ``torch.ops.aten`` calls. :func:`inline` runs it on
``torch.fx.Proxy`` objects bound to the graph, so every call it makes becomes a node in place of
the decomposed one (shape metadata, source line and the creating pass carried over); sizes it
needs come from the node's ``meta["val"]`` (static ints) or from ``aten.sym_size`` nodes (dynamic).

=================================  ==============================================================
op                                 written as
=================================  ==============================================================
``transformers::grouped_mm_fallback``  transformers' MoE experts (``grouped_mm_experts_forward``):
                                   ``input[S,K]`` rows sorted by expert, ``weight[E,K,N]``,
                                   ``offs[E]`` cumulative row counts. Every expert's product over
                                   every row, the one each row belongs to selected with ``where``
                                   and summed: static shapes, E times the FLOPs of the grouped
                                   kernel, exact (the other terms are +0). Rows past ``offs[-1]``
                                   are 0, as in the reference kernel.
``aten.histc``                     ``bin = trunc((x - lo) * bins / (hi - lo))`` in ``x``'s dtype,
                                   the last edge folded into the last bin, values outside
                                   ``[lo, hi]`` and NaN dropped, counted with a one-hot sum: the
                                   arithmetic of torch's CPU kernel (``HistogramKernel.cpp``), so
                                   the same bin for every value. ``min == max == 0`` (edges from
                                   the data) is refused.
``aten.sort.stable``                a 1-d integer or bool input (transformers' MoE sorts expert ids
                                   with ``stable=True``): ranks by counting pairwise comparisons,
                                   exact, O(n^2); floats (NaN order) and longer inputs are refused.
``aten.empty_like``                ``zeros_like`` (OpenVINO only: its PyTorch frontend has no
                                   ``empty_permuted``, which ``empty_like`` becomes). An empty
                                   tensor's values are unspecified, zeros are one choice of them;
                                   transformers' MoE routing writes every element after
                                   (``inv[perm] = arange``).
=================================  ==============================================================

Each entry also states which backends lack the op (``needed_by``): the backend stage decomposes
only there. An entry's ``check`` refuses a node it cannot decompose, with the reason.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

from optc.ir.rewrite import carry_meta, infer_val

log = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass(frozen=True)
class Decomposition:
    qualname: str                         # "aten::histc", "transformers::grouped_mm_fallback"
    fn: Callable                          # fn(builder, *args, **kwargs) over proxies -> proxy
    needed_by: frozenset = field(default_factory=frozenset)   # backends without a lowering
    check: Callable[[fx.Node], "str | None"] = lambda node: None


_TABLE: dict[str, Decomposition] = {}


def register_decomposition(qualname: str, *, needed_by=("torchscript", "onnx", "tvm", "openvino"),
                           check: Callable[[fx.Node], "str | None"] | None = None):
    """Decorator: ``fn(builder, *args, **kwargs)`` decomposes calls of ``qualname`` (``builder.node``
    is the node, ``builder.call(op, ...)`` emits an op with no proxy argument)."""
    def deco(fn):
        _TABLE[qualname] = Decomposition(qualname, fn, frozenset(needed_by), check or (lambda node: None))
        return fn
    return deco


def qualname(target: Any) -> str | None:
    """``aten::histc``, ``aten::sort.stable``: the op, and its overload unless ``default``."""
    if isinstance(target, torch._ops.OpOverload):
        base = f"{target.namespace}::{target._opname}"
        return base if target._overloadname == "default" else f"{base}.{target._overloadname}"
    return None


def decomposition_for(node: fx.Node) -> Decomposition | None:
    if node.op != "call_function":
        return None
    return _TABLE.get(qualname(node.target) or "")


def table() -> dict[str, Decomposition]:
    return dict(_TABLE)


def inline(node: fx.Node, decomposition: Decomposition, pass_name: str = "decompose") -> fx.Node:
    """Replace ``node`` by the nodes ``decomposition.fn`` emits; returns the new result node."""
    graph = node.graph
    tracer = fx.proxy.GraphAppendingTracer(graph)

    def wrap(a):
        if isinstance(a, fx.Node):
            return fx.Proxy(a, tracer)
        if isinstance(a, (list, tuple)):
            return type(a)(wrap(x) for x in a)
        return a

    before = set(graph.nodes)
    with graph.inserting_before(node):
        out = decomposition.fn(Builder(node, tracer), *wrap(node.args), **{k: wrap(v) for k, v in node.kwargs.items()})
    for new in graph.nodes:
        if new in before:
            continue
        carry_meta(new, node, pass_name)
        new.meta["optc_rule"] = f"decompose:{decomposition.qualname}"
        infer_val(new)
    if isinstance(out, (tuple, list)):      # a multi-output op: its users are getitem nodes
        parts = [o.node if isinstance(o, fx.Proxy) else o for o in out]
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(parts[user.args[1]])
                graph.erase_node(user)
        if node.users:
            raise ValueError(f"decomposition of {decomposition.qualname}: %{node.name} is used whole")
        graph.erase_node(node)
        return parts[0]
    result = out.node if isinstance(out, fx.Proxy) else out
    node.replace_all_uses_with(result)
    graph.erase_node(node)
    return result


class Builder:
    """What a decomposition gets besides the proxies: the node it replaces, and ``call`` for ops
    with no proxy among their arguments (``aten.arange(n)``), which would otherwise run eagerly
    and be baked into the graph as a constant."""

    def __init__(self, node: fx.Node, tracer):
        self.node, self._tracer = node, tracer

    def call(self, target, *args, **kwargs) -> fx.Proxy:
        return self._tracer.create_proxy("call_function", target, args, kwargs)


def _val(node: fx.Node, i: int) -> torch.Tensor:
    a = node.args[i]
    return a.meta["val"]


def _size(proxy: fx.Proxy, val: torch.Tensor, dim: int):
    d = val.shape[dim]
    if isinstance(d, torch.SymInt):
        static = d.node.maybe_as_int()
        if static is None:
            return aten.sym_size.int(proxy, dim)
        return int(static)
    return int(d)


# ---- transformers::grouped_mm_fallback ------------------------------------------------------------
def _grouped_mm_check(node: fx.Node) -> str | None:
    inp, weight, offs = (_val(node, i) for i in range(3))
    if inp.dim() != 2 or weight.dim() != 3 or offs.dim() != 1:
        return f"expects input [S,K], weight [E,K,N], offs [E]; got {list(inp.shape)}, {list(weight.shape)}, {list(offs.shape)}"
    return None


@register_decomposition("transformers::grouped_mm_fallback", check=_grouped_mm_check)
def _grouped_mm(b, inp, weight, offs):
    iv, wv, ov = (_val(b.node, i) for i in range(3))
    rows = b.call(aten.arange.start_step, 0, _size(inp, iv, 0), 1, dtype=ov.dtype, device=iv.device)
    # the group of row s: how many offsets are <= s (rows past offs[-1] get E: no expert)
    group = aten.sum.dim_IntList(aten.ge.Tensor(aten.unsqueeze.default(rows, 1), aten.unsqueeze.default(offs, 0)), [1])
    experts = b.call(aten.arange.start_step, 0, _size(weight, wv, 0), 1, dtype=torch.int64, device=iv.device)
    mine = aten.eq.Tensor(aten.unsqueeze.default(experts, 1), aten.unsqueeze.default(group, 0))   # [E, S]
    every = aten.matmul.default(aten.unsqueeze.default(inp, 0), weight)                            # [E, S, N]
    picked = aten.where.ScalarOther(aten.unsqueeze.default(mine, 2), every, 0.0)
    return aten.sum.dim_IntList(picked, [0])


# ---- aten::histc ------------------------------------------------------------------------------------
def _histc_args(node: fx.Node) -> tuple[int, float, float]:
    bins = node.args[1] if len(node.args) > 1 else node.kwargs.get("bins", 100)
    lo = node.args[2] if len(node.args) > 2 else node.kwargs.get("min", 0)
    hi = node.args[3] if len(node.args) > 3 else node.kwargs.get("max", 0)
    return bins, lo, hi


def _histc_check(node: fx.Node) -> str | None:
    bins, lo, hi = _histc_args(node)
    if not all(isinstance(v, (int, float)) for v in (bins, lo, hi)):
        return "bins, min and max must be constants"
    if lo == hi == 0:
        return "min = max = 0 takes the edges from the data (data-dependent); give min and max"
    if lo > hi:
        return f"min {lo} > max {hi}"
    if not _val(node, 0).is_floating_point():
        return "integer input (torch's CPU histc takes floating point only)"
    return None


@register_decomposition("aten::histc", needed_by=("tvm", "openvino"), check=_histc_check)
def _histc(b, x, *_args, **_kwargs):
    bins, lo, hi = _histc_args(b.node)
    xv = _val(b.node, 0)
    np_dtype = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}.get(xv.dtype, np.float32)
    lo_t, hi_t = np_dtype(lo), np_dtype(hi)
    if lo_t == hi_t:          # torch widens an empty range by 1 on each side
        lo_t, hi_t = np_dtype(lo_t - 1), np_dtype(hi_t + 1)
    width = float(np_dtype(hi_t - lo_t))
    flat = aten.reshape.default(x, [-1])
    inside = aten.logical_and.default(aten.ge.Scalar(flat, float(lo_t)), aten.le.Scalar(flat, float(hi_t)))
    pos = aten.div.Tensor(aten.mul.Tensor(aten.sub.Tensor(flat, float(lo_t)), float(bins)), width)
    pos = aten.clamp.default(aten._to_copy.default(pos, dtype=torch.int64), 0, bins - 1)
    edges = b.call(aten.arange.start_step, 0, bins, 1, dtype=torch.int64, device=xv.device)
    hit = aten.logical_and.default(aten.eq.Tensor(aten.unsqueeze.default(pos, 1), aten.unsqueeze.default(edges, 0)),
                                   aten.unsqueeze.default(inside, 1))
    return aten.sum.dim_IntList(hit, [0], dtype=xv.dtype)


# ---- aten::sort(stable=True) -------------------------------------------------------------------------
def _stable_sort_args(node: fx.Node):
    dim = node.kwargs.get("dim", -1)
    descending = node.kwargs.get("descending", False)
    return dim, descending


def _stable_sort_check(node: fx.Node) -> str | None:
    xv = _val(node, 0)
    if xv.dim() != 1:
        return f"a {xv.dim()}-d input (decomposed for 1-d inputs only)"
    if xv.is_floating_point() or xv.is_complex():
        return "a floating-point input (NaN ordering; decomposed for integer and bool inputs only)"
    n = xv.shape[0]
    if isinstance(n, torch.SymInt) or n > 8192:
        return f"{n} elements (the decomposition compares every pair: at most 8192, static)"
    return None


@register_decomposition("aten::sort.stable", needed_by=("onnx", "tvm", "openvino"), check=_stable_sort_check)
def _stable_sort(b, x, *_args, **_kwargs):
    """Stable sort of a 1-d integer tensor (transformers' MoE sorts expert ids, ``sort(stable=True)``)
    by counting: the rank of ``x_i`` is the number of ``x_j`` before it in the order (``x_j < x_i``,
    or ``x_j > x_i`` descending) plus the equal ``x_j`` with ``j < i``; the indices are the inverse
    of the ranks. Exact for any values (no key arithmetic that could overflow); O(n^2) comparisons."""
    _dim, descending = _stable_sort_args(b.node)
    xv = _val(b.node, 0)
    n = int(xv.shape[0])
    pos = b.call(aten.arange.start_step, 0, n, 1, dtype=torch.int64, device=xv.device)
    xi, xj = aten.unsqueeze.default(x, 1), aten.unsqueeze.default(x, 0)
    before = aten.gt.Tensor(xi, xj) if not descending else aten.lt.Tensor(xi, xj)    # [i, j]: x_j goes first
    tie = aten.logical_and.default(aten.eq.Tensor(xi, xj),
                                   aten.gt.Tensor(aten.unsqueeze.default(pos, 1), aten.unsqueeze.default(pos, 0)))
    rank = aten.sum.dim_IntList(aten.logical_or.default(before, tie), [1])
    order = aten.index_put.default(aten.zeros_like.default(pos), [rank], pos)
    return aten.index.Tensor(x, [order]), order


__all__ = ["Decomposition", "register_decomposition", "decomposition_for", "inline", "table", "qualname"]


# ---- aten::empty_like (OpenVINO) -----------------------------------------------------------------------
@register_decomposition("aten::empty_like", needed_by=("openvino",))
def _empty_like(b, x, **kwargs):
    dtype = kwargs.get("dtype")
    return aten.zeros_like.default(x, dtype=dtype) if dtype is not None else aten.zeros_like.default(x)
