"""insert-qdq: quantize-dequantize insertion with calibration (static INT8), or dynamic INT8.

Rewrite (static; ``Q``/``DQ`` are ``optc::quantize_per_tensor``/``dequantize_per_tensor``)::

    %y = aten.conv2d(%x, %w, %b)        %x_dq = DQ(Q(%x, s_x, z_x), s_x, z_x)          uint8, per tensor
    %r = aten.relu(%y)          ==>     %w_dq = dequantize_per_channel(%w_q, %s_w, 0, axis 0)   int8 [-127, 127]
                                        %b_dq = dequantize_per_channel(%b_q, s_x * %s_w, 0)     int32
                                        %y = aten.conv2d(%x_dq, %w_dq, %b_dq)
                                        %r = aten.relu(%y);  %r_dq = DQ(Q(%r, s_r, 0), s_r, 0)

That is the QDQ form ONNX Runtime fuses into integer kernels (``DQ -> Conv -> [Relu] -> Q`` is
QLinearConv, ``DQ -> MatMul/Gemm`` is QGemm or MatMulIntegerToFloat): the integer weights and
biases are computed here, at compile time; the activations' scales and zero points come from
calibration (running the program on ``ctx.extra["calibration_data"]``, or, with a warning, on
random inputs).

Where Q/DQ pairs go. Sites are ``conv`` (not transposed), ``linear`` and ``matmul`` with a
constant float32 weight (activation x activation matmuls with ``activation_matmul=true``). A
conv reading fewer than ``min_channels`` input channels (not grouped; default 0: off) stays
float -- the RGB stem of a CNN, the layer most sensitive to quantization. It is off by default
because it does not pay on ONNX Runtime: its integer 7x7 stem conv is no faster than its float
one (0.65 against 0.61 ms on ResNet-50), and with a float stem ORT's QDQ propagation moves the
Q in front of the float max-pool, which then runs as a slow uint8 NCHW max-pool
(docs/quantization.md). A value is quantized when some user takes it as an integer input:

- a site takes its activation operand(s);
- a pass-through op (max-pool, reshape/view/flatten, transpose/permute, squeeze/unsqueeze,
  slice/select, clone) takes its input when its own output is quantized and its input comes from
  an integer op (same scale and zero point on both sides: the op moves integers); after a float
  op the Q goes after the pass-through op instead (``Q(maxpool(x)) == maxpool(Q(x))``: the same
  numbers, and the float op keeps its float neighbour);
- an integer ``add`` (two activations of one shape) or ``cat`` -- one all of whose inputs come
  from integer ops -- takes its inputs when its output (after a fused ReLU/ReLU6/clamp) is
  quantized. The inputs of an add share one scale (each keeps its own zero point, so ReLU outputs
  keep zero point 0), all inputs and the output of a cat share scale and zero point; an add with a
  float input (a layer norm's output, an excluded conv) stays float;
- average pooling and ``mean`` take a quantized input from an integer op (ONNX Runtime
  dequantizes in front of them), which lets the op before them run in integers;
- nothing else does: softmax, layer norm, GELU, SDPA, embeddings, graph outputs read floats.

A conv's tail is always quantized, whoever reads it: ONNX Runtime runs a conv in integers only
as QLinearConv, which has a quantized output (linear and matmul have float-output integer kernels:
QGemm, MatMulIntegerToFloat).

The value quantized after a site is its *tail*: the site, or the ReLU/ReLU6/clamp that is its only
user (ONNX Runtime folds a ReLU followed by a Q with zero point 0 into the integer conv). A value
produced by an integer op (a site's tail, an integer add/cat, a pass-through of a quantized value)
is read dequantized by *every* user -- the float value no longer exists at run time; a value
produced by a float op (an input, a layer norm, a GELU) is read dequantized only by the users that
take integers, the others keep the float.

Dynamic (``scheme=dynamic``): linear and matmul sites only, each replaced by
``optc::linear_dynamic(x, W_q, scales, bias)``: the int8 weight as above (``[N, K]``; bias stays
float), the activation quantized inside the op at run time (uint8, scale and zero point from its
min/max: ONNX ``DynamicQuantizeLinear``). One op rather than Q/DQ because the integer kernel
(ONNX Runtime's DynamicQuantizeMatMul) needs both together: ORT fuses no dynamic QDQ pattern.
No calibration.

The pass records, per site, the scale and zero point of its input, its weight scales and the
signal-to-quantization-noise ratio (SQNR, dB) of its output against the float program on the
first ``report_samples`` calibration samples: :func:`quant_report` returns the table.

Preconditions: float32 program; run after BatchNorm folding and constant folding (``after=``), so
that weights are constants of their final value.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import operator
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from optc.errors import OptcError
from optc.ir import layout_ops as _layout_ops  # noqa: F401  (registers optc::conv2d_nhwc and the other NHWC ops)
from optc.ir import quant_ops
from optc.ir.program import copy_graph_module
from optc.ir.rewrite import add_attr, arg, attr_node, attr_value, call, erase_if_unused, is_op
from optc.passes.base import Option, PassContext, PassResult, register_pass
from optc.passes.calibration import (OBSERVERS, calibration_samples, make_observer, probe_module,
                                     run_probe)

log = logging.getLogger(__name__)
aten = torch.ops.aten
optc_ops = torch.ops.optc
PASS = "insert-qdq"

#: ``optc.conv2d_nhwc`` (convert-layout's, ir/layout_ops.py) takes the arguments of aten.conv2d; its
#: OHWI weight keeps the output channels on axis 0, so per-channel weights mean the same thing
_CONV_NHWC = torch.ops.optc.conv2d_nhwc.default
_CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, _CONV_NHWC)
_MATMULS = (aten.matmul.default, aten.mm.default, aten.bmm.default)
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

_DTYPES = {"uint8": torch.uint8, "int8": torch.int8}


# ---- the report ----------------------------------------------------------------------------------
@dataclass
class LayerReport:
    """One quantized site: its input's scale and zero point, its weight scales and the SQNR (dB)
    of its output against float32 (``inf``: no error; ``None``: not measured)."""

    node: str
    module: str
    kind: str
    input_scale: float | None
    input_zero_point: int | None
    weight_scale_min: float | None
    weight_scale_max: float | None
    sqnr_db: float | None = None
    input_sqnr_db: float | None = None
    weight_sqnr_db: float | None = None


@dataclass
class QuantReport:
    scheme: str
    calibration: str
    samples: int
    layers: list[LayerReport] = field(default_factory=list)
    output_sqnr_db: float | None = None

    def worst(self, n: int = 5) -> list[LayerReport]:
        """The ``n`` layers with the lowest output SQNR."""
        rated = [la for la in self.layers if la.sqnr_db is not None]
        return sorted(rated, key=lambda la: la.sqnr_db)[:n]

    def format(self) -> str:
        lines = [f"insert-qdq: {self.scheme}, calibration={self.calibration} on {self.samples} samples, "
                 f"{len(self.layers)} quantized layers, output SQNR {_db(self.output_sqnr_db)} dB",
                 f"{'layer':<28}{'module':<28}{'kind':<8}{'in scale':>11}{'zp':>5}{'w scale':>21}"
                 f"{'SQNR dB':>9}{'in dB':>8}{'w dB':>8}"]
        for la in self.layers:
            ws = "-" if la.weight_scale_min is None else f"{la.weight_scale_min:.2e}..{la.weight_scale_max:.2e}"
            sc = "dynamic" if la.input_scale is None else f"{la.input_scale:.3e}"
            zp = "-" if la.input_zero_point is None else str(la.input_zero_point)
            lines.append(f"{la.node[:27]:<28}{la.module[:27]:<28}{la.kind:<8}{sc:>11}{zp:>5}{ws:>21}"
                         f"{_db(la.sqnr_db):>9}{_db(la.input_sqnr_db):>8}{_db(la.weight_sqnr_db):>8}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _db(v: float | None) -> str:
    if v is None:
        return "-"
    return "inf" if math.isinf(v) else f"{v:.1f}"


def quant_report(program) -> QuantReport:
    """The per-layer report of the last ``insert-qdq`` run on ``program`` (a Program or a
    GraphModule): scale, zero point and output SQNR against float32 of every quantized layer."""
    gm = getattr(program, "graph_module", program)
    rep = getattr(gm, "meta", {}).get("optc_quant_report")
    if rep is None:
        raise OptcError("this program has no quantization report: it was not quantized by insert-qdq")
    return rep


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    signal = float(ref.double().pow(2).sum())
    noise = float((ref.double() - got.double()).pow(2).sum())
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


# ---- sites --------------------------------------------------------------------------------------
@dataclass
class Site:
    """A compute op with an integer kernel: activation operands, constant weight and bias."""

    node: fx.Node
    kind: str                      # "conv", "linear", "matmul"
    acts: tuple[fx.Node, ...]      # activation operands (quantized per tensor)
    weight: fx.Node | None         # constant weight operand (quantized at compile time)
    weight_index: int | None
    bias: fx.Node | None
    axis: int | None               # weight axis of the output channels (None: per tensor)


def _is_f32(n: Any) -> bool:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dtype == torch.float32


def _const_f32(n: Any) -> bool:
    t = attr_value(n)
    return t is not None and t.dtype == torch.float32


def _float_tensor(n: Any) -> bool:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def match_site(node: fx.Node, opts: dict):
    """A :class:`Site`, a refusal (``MatchResult``-like: ``(None, reason)``) or None (not a candidate)."""
    if node.op != "call_function":
        return None
    if is_op(node, *_CONVS) or is_op(node, aten.linear.default):
        kind = "linear" if is_op(node, aten.linear.default) else "conv"
        x, w, b = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")
        if not _float_tensor(x):
            return None
        if not _is_f32(x) or not _is_f32(node):
            return (None, f"{kind} computes in {x.meta['val'].dtype}, not float32")
        if not _const_f32(w):
            return (None, f"{kind} weight %{getattr(w, 'name', w)} is not a float32 constant")
        if b is not None and not _const_f32(b):
            return (None, f"{kind} bias %{getattr(b, 'name', b)} is not a float32 constant")
        if opts["scheme"] == "dynamic" and kind == "conv":
            return (None, "dynamic quantization covers linear and matmul (conv needs calibrated activation scales)")
        groups = arg(node, 6, "groups", 1)
        wt = attr_value(w)
        cin = int(wt.shape[3] if is_op(node, _CONV_NHWC) else wt.shape[1]) * int(groups)
        if kind == "conv" and groups == 1 and cin < opts["min_channels"]:
            return (None, f"conv reads {cin} input channels (< min_channels={opts['min_channels']}): no fast "
                          "integer kernel for so short a reduction, kept float")
        axis = 0 if opts["per_channel"] else None
        return Site(node, kind, (x,), w, 1, b, axis)
    if is_op(node, aten.convolution.default, aten.conv_transpose1d.default, aten.conv_transpose2d.input,
             aten.conv_transpose3d.input):
        return (None, "transposed or generic convolution: no integer kernel is targeted")
    if is_op(node, *_MATMULS):
        a, b = node.args[0], node.args[1]
        if not (_float_tensor(a) and _float_tensor(b)):
            return None
        if not (_is_f32(a) and _is_f32(b)):
            return (None, f"matmul computes in {a.meta['val'].dtype}, not float32")
        if _const_f32(a):
            return (None, "matmul's left operand is the constant (only x @ W is targeted)")
        if _const_f32(b):
            if b.meta["val"].dim() != 2:
                return (None, "matmul's constant operand is not a 2-d weight")
            return Site(node, "matmul", (a,), b, 1, None, 1 if opts["per_channel"] else None)
        if opts["scheme"] == "dynamic" or not opts["activation_matmul"]:
            return (None, "both matmul operands are activations (activation_matmul=false)")
        return Site(node, "matmul", (a, b), None, None, None, None)
    return None


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        return str(path)
    return ""


def _excluded(node: fx.Node, patterns: list[str]) -> str | None:
    path = _module_path(node)
    for p in patterns:
        if fnmatch.fnmatchcase(node.name, p) or (path and fnmatch.fnmatchcase(path, p)):
            return p
    return None


# ---- placement ----------------------------------------------------------------------------------
def _activation_tail(node: fx.Node) -> fx.Node:
    """``node``, or the ReLU/ReLU6/clamp that is its only user."""
    if len(node.users) == 1:
        u = next(iter(node.users))
        if is_op(u, *_ACTIVATIONS) and u.args[0] is node and _is_f32(u):
            if is_op(u, aten.clamp.default) and not all(isinstance(a, (int, float, type(None))) for a in u.args[1:]):
                return node
            return u
    return node


def _is_int_add(node: fx.Node) -> bool:
    if not is_op(node, _ADD) or len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return False
    a, b = node.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and _is_f32(a) and _is_f32(b) and _is_f32(node)):
        return False
    if attr_value(a) is not None or attr_value(b) is not None:
        return False
    return tuple(a.meta["val"].shape) == tuple(b.meta["val"].shape) == tuple(node.meta["val"].shape)


def _is_int_cat(node: fx.Node) -> bool:
    if not is_op(node, _CAT) or not _is_f32(node):
        return False
    ins = node.args[0]
    return all(isinstance(i, fx.Node) and _is_f32(i) and attr_value(i) is None for i in ins)


def _is_pass_through(node: fx.Node) -> bool:
    return is_op(node, *_PASS_THROUGH) and isinstance(node.args[0], fx.Node) and _is_f32(node.args[0]) \
        and _is_f32(node)


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
    tails = {_activation_tail(s): s for s in sites}            # site tail -> site node
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
            may_be_int.add(_activation_tail(n))
        elif _is_pass_through(n) and n.args[0] in may_be_int:
            may_be_int.add(n)
    quantized_out: dict[fx.Node, bool] = {}

    def takes_integer(user: fx.Node, value: fx.Node) -> bool:
        if user in sites:
            return value in sites[user].acts
        if user in viable:
            return quantized_out.get(_activation_tail(user), False)
        if _is_pass_through(user):   # of a float value, quantize after it: Q(maxpool(x)) == maxpool(Q(x))
            return user.args[0] is value and quantized_out.get(user, False) and value in may_be_int
        if is_op(user, *_TAKES_DEQUANTIZED):   # it lets the producer (an add's convs) run in integers
            return user.args[0] is value and value in may_be_int
        return False

    for n in reversed(nodes):          # users before producers
        if n.op in ("output", "get_attr") or not _is_f32(n):
            continue
        quantized_out[n] = n in conv_tails or any(takes_integer(u, n) for u in n.users)

    int_ops = {c for c in viable if quantized_out.get(_activation_tail(c), False)}
    int_tails = {_activation_tail(c) for c in int_ops}

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
        if is_op(c, _CAT) and c is _activation_tail(c):
            for i in c.args[0]:
                same.union(c, i)
        elif is_op(c, _ADD) and share_add_scales:
            same_scale.union(c.args[0], c.args[1])
    return Plan(values, readers, same, same_scale, int_ops)


# ---- quantization parameters ---------------------------------------------------------------------
@dataclass(frozen=True)
class QParams:
    scale: float
    zero_point: int
    quant_min: int
    quant_max: int
    dtype: torch.dtype


def assign_qparams(plan: Plan, ranges: dict[fx.Node, tuple[float, float]], dtype: torch.dtype,
                   symmetric: bool) -> dict[fx.Node, QParams]:
    """Scale and zero point of every planned value: one range per same-class (the union of its
    members' calibrated ranges, widened to include 0); classes in one same-scale group take the
    largest scale and keep their own zero point."""
    qmin, qmax = quant_ops.qrange(dtype)
    classes: dict[fx.Node, list[fx.Node]] = {}
    for v in plan.values:
        classes.setdefault(plan.same.find(v), []).append(v)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for root, members in classes.items():
        key = next((plan.same_scale.find(m) for m in members if m in plan.same_scale.parent), root)
        groups.setdefault(key, []).append(root)
    params: dict[fx.Node, QParams] = {}
    for roots in groups.values():
        crange = {r: (min(min(ranges[m][0] for m in classes[r]), 0.0), max(max(ranges[m][1] for m in classes[r]), 0.0))
                  for r in roots}
        chosen = {r: quant_ops.choose_qparams(*crange[r], dtype, symmetric=symmetric) for r in roots}
        if len(roots) > 1:
            scale = max(s for s, _ in chosen.values())
            for r in roots:
                zp = chosen[r][1] if symmetric else int(round(qmin - crange[r][0] / scale))
                chosen[r] = (scale, max(qmin, min(qmax, zp)))
        for r in roots:
            for m in classes[r]:
                params[m] = QParams(*chosen[r], qmin, qmax, dtype)
    return params


def quantize_weight(w: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 in [-127, 127]: ``(w_q, scales)``; per channel along ``axis`` or per tensor
    (``scales`` has one entry then)."""
    w = w.detach().to(torch.float32)
    if axis is None:
        amax = w.abs().max().reshape(1)
    else:
        amax = w.abs().transpose(0, axis).reshape(w.shape[axis], -1).amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).to(torch.float32)
    scales = torch.clamp(scales, min=1e-12)
    view = [1] * w.dim()
    if axis is not None:
        view[axis] = -1
    q = torch.clamp(torch.round(w / scales.reshape(view)), -127, 127).to(torch.int8)
    return q, scales


# ---- the rewrite -----------------------------------------------------------------------------------
_NAME_SAN = re.compile(r"[^0-9a-zA-Z_]")


def _insert_point(graph: fx.Graph, v: fx.Node):
    if v.op == "placeholder":   # keep the placeholders together
        return graph.inserting_after([n for n in graph.nodes if n.op == "placeholder"][-1])
    return graph.inserting_after(v)


def _insert_qdq(gm: fx.GraphModule, v: fx.Node, qp: QParams, readers: list[fx.Node]) -> fx.Node:
    graph = gm.graph
    args = (qp.scale, qp.zero_point, qp.quant_min, qp.quant_max, qp.dtype)
    with _insert_point(graph, v):
        q = call(graph, optc_ops.quantize_per_tensor.default, (v, *args), like=v, pass_name=PASS, name=f"{v.name}_q")
    with graph.inserting_after(q):
        dq = call(graph, optc_ops.dequantize_per_tensor.default, (q, *args), like=v, pass_name=PASS,
                  name=f"{v.name}_dq")
    for u in readers:
        u.replace_input_with(v, dq)
    return dq


def _rewrite_dynamic(gm: fx.GraphModule, site: Site, per_channel: bool, cache: dict) -> tuple[fx.Node, tuple]:
    """Replace a linear / ``x @ W`` site by ``optc::linear_dynamic(x, W_q, scales, bias)`` (the weight
    as int8 ``[N, K]``); returns the new node and (min scale, max scale, weight SQNR dB)."""
    node, w_node = site.node, site.weight
    w = attr_value(w_node).detach().to(torch.float32)
    if site.kind == "matmul":
        w = w.t()                               # x @ W with W [K, N] is linear(x, W^T)
    key = (w_node.target, site.kind, per_channel)
    if key not in cache:
        q, scales = quantize_weight(w, 0 if per_channel else None)
        scales = scales.expand(w.shape[0]).contiguous() if not per_channel else scales
        hint = str(w_node.target).replace(".", "_")
        wn = _const(gm, f"{hint}_q", q, node)
        sn = _const(gm, f"{hint}_scale", scales, node)
        cache[key] = (wn, sn, (float(scales.min()), float(scales.max()), sqnr_db(w, q.float() * scales[:, None])))
    wn, sn, info = cache[key]
    with gm.graph.inserting_before(node):
        new = call(gm.graph, optc_ops.linear_dynamic.default, (site.acts[0], wn, sn, site.bias), like=node,
                   pass_name=PASS, name=f"{node.name}_dynamic")
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    erase_if_unused(w_node)
    return new, info


def _const(gm: fx.GraphModule, hint: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
    target = add_attr(gm, hint, value)
    with gm.graph.inserting_before(before):
        return attr_node(gm, target, pass_name=PASS)


def _dequant_const(gm: fx.GraphModule, hint: str, q: torch.Tensor, scales: torch.Tensor, axis: int,
                   qmin: int, qmax: int, dtype: torch.dtype, before: fx.Node) -> fx.Node:
    qn = _const(gm, f"{hint}_q", q, before)
    sn = _const(gm, f"{hint}_scale", scales, before)
    zn = _const(gm, f"{hint}_zero_point", torch.zeros(scales.numel(), dtype=dtype), before)
    with gm.graph.inserting_before(before):
        return call(gm.graph, optc_ops.dequantize_per_channel.default, (qn, sn, zn, axis, qmin, qmax, dtype),
                    pass_name=PASS, name=f"{_NAME_SAN.sub('_', hint)}_dq")


def _set_arg(node: fx.Node, index: int, name: str, value: fx.Node) -> None:
    if len(node.args) > index:
        node.update_arg(index, value)
    else:
        node.update_kwarg(name, value)


def _out_channels(site: Site, w: torch.Tensor) -> int:
    return int(w.shape[1]) if site.kind == "matmul" else int(w.shape[0])


def quantize_site_weights(gm: fx.GraphModule, site: Site, s_x: float | None, cache: dict) -> tuple[float, float, float]:
    """Replace the site's weight by int8 constants + dequantize (per channel along ``site.axis``,
    or per tensor) and, when the input scale ``s_x`` is known, its bias by int32 constants with
    scale ``s_x * s_w`` (what ONNX Runtime's integer conv/gemm expect); returns (min weight
    scale, max weight scale, weight SQNR dB)."""
    w_node = site.weight
    w = attr_value(w_node)
    key = (w_node.target, site.axis)
    if key not in cache:
        q, scales = quantize_weight(w, site.axis)
        hint = str(w_node.target).replace(".", "_")
        if site.axis is None:
            args = (float(scales), 0, -127, 127, torch.int8)
            qn = _const(gm, f"{hint}_q", q, site.node)
            with gm.graph.inserting_before(site.node):
                dq = call(gm.graph, optc_ops.dequantize_per_tensor.default, (qn, *args), pass_name=PASS,
                          name=f"{_NAME_SAN.sub('_', hint)}_dq")
            per_out = scales.expand(_out_channels(site, w)).contiguous()
            deq = q.float() * scales
        else:
            dq = _dequant_const(gm, hint, q, scales, site.axis, -127, 127, torch.int8, site.node)
            per_out = scales
            view = [1] * w.dim()
            view[site.axis] = -1
            deq = q.float() * scales.reshape(view)
        cache[key] = (dq, per_out, sqnr_db(w.float(), deq))
    dq, per_out, w_sqnr = cache[key]
    _set_arg(site.node, site.weight_index, "weight", dq)
    if site.bias is not None and s_x is not None:
        b = attr_value(site.bias).detach().to(torch.float64)
        bscale = per_out.double() * s_x
        qb = torch.round(b / bscale)
        if bool((bscale > 1e-30).all()) and float(qb.abs().max()) < 2 ** 31 - 1:
            hint = str(site.bias.target).replace(".", "_")
            bdq = _dequant_const(gm, hint, qb.to(torch.int32), bscale.to(torch.float32), 0,
                                 -(2 ** 31), 2 ** 31 - 1, torch.int32, site.node)
            _set_arg(site.node, 2, "bias", bdq)
    erase_if_unused(w_node, site.bias)
    return float(per_out.min()), float(per_out.max()), w_sqnr


# ---- the pass --------------------------------------------------------------------------------------------
OPTIONS = {
    "scheme": Option(("static", "dynamic"), "static", "static: calibrated activation scales; dynamic: computed "
                     "per input at run time (linear/matmul only)"),
    "calibration": Option(OBSERVERS, "minmax", "how activation ranges are calibrated"),
    "percentile": Option(float, 99.99, "percentile kept by calibration=percentile"),
    "per_channel": Option(bool, True, "one weight scale per output channel (else one per tensor)"),
    "symmetric": Option(bool, False, "symmetric activation ranges (zero point 128 for uint8, 0 for int8)"),
    "activation_dtype": Option(("uint8", "int8"), "uint8", "integer type of activations (weights are int8)"),
    "exclude": Option(str, "", "node names or module paths (fnmatch patterns, separated by | or ,) to keep in float"),
    "samples": Option(int, 16, "random calibration inputs used when no calibration data is given"),
    "min_channels": Option(int, 0, "convs (not grouped) reading fewer input channels stay float (8: the RGB stem)"),
    "activation_matmul": Option(bool, False, "also quantize matmuls of two activations"),
    "share_add_scales": Option(bool, True, "one scale for both inputs of an integer add"),
    "report_samples": Option(int, 2, "calibration samples used for the per-layer SQNR report (0: no report)"),
}


@register_pass(PASS, exact=False, options=OPTIONS,
               after=("fold-conv-bn", "fold-linear-bn", "fold-binary", "constant-fold"),
               description="insert quantize/dequantize pairs (INT8) around conv/linear/matmul, calibrated")
def insert_qdq(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    opts = dict(ctx.options)
    dtype = _DTYPES[opts["activation_dtype"]]
    patterns = [p for p in re.split(r"[|,\s]+", opts["exclude"]) if p]
    if opts["samples"] < 1:
        raise OptcError(f"{PASS}: samples must be >= 1, got {opts['samples']}")

    sites: dict[fx.Node, Site] = {}
    candidates = 0
    dtypes = set()
    for node in gm.graph.nodes:
        m = match_site(node, opts)
        if m is None:
            continue
        candidates += 1
        if isinstance(m, tuple):
            ctx.reject("site", node, m[1])
            if "not float32" in m[1]:
                dtypes.add(str(node.args[0].meta["val"].dtype).replace("torch.", ""))
            continue
        pat = _excluded(node, patterns)
        if pat is not None:
            ctx.reject("site", node, f"excluded by '{pat}'")
            continue
        if not ctx.allow_rewrite("site", node):
            continue
        sites[node] = m
    if candidates == 0:
        raise OptcError(f"{PASS}: the model has no quantizable op (conv, linear or matmul): nothing to quantize")
    if dtypes and not sites:
        raise OptcError(f"{PASS}: unsupported dtype {', '.join(sorted(dtypes))}: quantization starts from a float32 "
                        "model (run insert-qdq before to-half, or capture the model in float32)")
    if not sites:
        return PassResult(gm, False, {"layers": 0})

    reference = copy_graph_module(gm)
    if opts["scheme"] == "dynamic":
        return _dynamic(gm, ctx, sites, reference)

    plan = plan_placement(gm, sites, opts["share_add_scales"])
    samples = calibration_samples(ctx.program, ctx.extra.get("calibration_data"), samples=opts["samples"],
                                  pass_name=PASS)
    observers = {v: make_observer(opts["calibration"], opts["percentile"]) for v in plan.values}
    probe = probe_module(gm, plan.values)
    for outs in run_probe(probe, samples, desc=f"{PASS}: calibrating"):
        for v, t in zip(plan.values, outs):
            observers[v].update(t)
    ranges = {v: observers[v].range() for v in plan.values}
    params = assign_qparams(plan, ranges, dtype, opts["symmetric"])

    dq_of: dict[fx.Node, fx.Node] = {}
    for v in plan.values:
        ctx.current_node = v.name
        dq_of[v] = _insert_qdq(gm, v, params[v], plan.readers[v])
    ctx.current_node = None

    layers, cache = [], {}
    for node, site in sites.items():
        act = site.acts[0]
        qp = params.get(act)
        wmin = wmax = wsq = None
        if site.weight is not None:
            wmin, wmax, wsq = quantize_site_weights(gm, site, qp.scale if qp else None, cache)
        layers.append(LayerReport(node.name, _module_path(node), site.kind, qp.scale if qp else None,
                                  qp.zero_point if qp else None, wmin, wmax, weight_sqnr_db=wsq))
    gm.graph.lint()
    gm.recompile()

    report = QuantReport("static", opts["calibration"], len(samples), layers)
    _measure(report, reference, gm, sites, plan, params, samples[: max(0, opts["report_samples"])])
    gm.meta["optc_quant_report"] = report
    stats = {"layers": len(sites), "qdq": len(plan.values), "integer_adds": len(plan.int_ops),
             "calibration": opts["calibration"], "samples": len(samples)}
    _add_sqnr_stats(stats, report)
    return PassResult(gm, True, stats)


def _dynamic(gm: fx.GraphModule, ctx: PassContext, sites: dict[fx.Node, Site], reference: fx.GraphModule) -> PassResult:
    layers, cache, renamed = [], {}, {}
    for node, site in sites.items():
        name, module, kind = node.name, _module_path(node), site.kind
        ctx.current_node = name
        new, (wmin, wmax, wsq) = _rewrite_dynamic(gm, site, ctx.options["per_channel"], cache)
        renamed[name] = new.name
        layers.append(LayerReport(new.name, module, kind, None, None, wmin, wmax, weight_sqnr_db=wsq))
    ctx.current_node = None
    gm.graph.lint()
    gm.recompile()
    report = QuantReport("dynamic", "-", 0, layers)
    data = ctx.extra.get("calibration_data")
    samples = calibration_samples(ctx.program, data, samples=1, pass_name=PASS) if data is not None \
        else [ctx.program.example_flat_inputs()]
    if ctx.options["report_samples"] > 0:
        _measure(report, reference, gm, sites, None, {}, samples[: ctx.options["report_samples"]], renamed)
    gm.meta["optc_quant_report"] = report
    stats = {"layers": len(sites), "dynamic": len(sites)}
    _add_sqnr_stats(stats, report)
    return PassResult(gm, True, stats)


def _measure(report: QuantReport, reference: fx.GraphModule, gm: fx.GraphModule, sites: dict[fx.Node, Site],
             plan: Plan | None, params: dict, samples: list, renamed: dict[str, str] | None = None) -> None:
    """SQNR of each site's output (quantized program vs float program), of each site's input
    quantization alone, and of the model outputs, accumulated over ``samples``."""
    if not samples:
        return
    names = [n.name for n in sites]
    ref_nodes = {n.name: n for n in reference.graph.nodes}
    q_nodes = {n.name: n for n in gm.graph.nodes}
    acts = {site.node.name: site.acts[0].name for site in sites.values()}
    ref_out = [a for a in reference.graph.output_node().args[0] if isinstance(a, fx.Node)]
    q_out = [a for a in gm.graph.output_node().args[0] if isinstance(a, fx.Node)]
    act_names = sorted({a for a in acts.values() if a in ref_nodes})
    ref_probe = probe_module(reference, [ref_nodes[n] for n in names] + [ref_nodes[a] for a in act_names] + ref_out)
    renamed = renamed or {}
    q_probe = probe_module(gm, [q_nodes[renamed.get(n, n)] for n in names] + q_out)
    energy: dict[str, list[float]] = {}

    def acc(key, ref, got):
        e = energy.setdefault(key, [0.0, 0.0])
        e[0] += float(ref.double().pow(2).sum())
        e[1] += float((ref.double() - got.double()).pow(2).sum())

    act_params = {}
    if plan is not None:
        for site in sites.values():
            qp = params.get(site.acts[0])
            if qp is not None:
                act_params[site.node.name] = qp
    with torch.no_grad():
        for flat in samples:
            r = list(ref_probe(*flat))
            g = list(q_probe(*flat))
            k = len(names)
            ref_acts = dict(zip(act_names, r[k:k + len(act_names)]))
            for i, n in enumerate(names):
                if torch.is_tensor(r[i]) and torch.is_tensor(g[i]):
                    acc(n, r[i], g[i])
                qp = act_params.get(n)
                x = ref_acts.get(acts[n])
                if qp is not None and x is not None:
                    args = (qp.scale, qp.zero_point, qp.quant_min, qp.quant_max, qp.dtype)
                    xq = optc_ops.dequantize_per_tensor(optc_ops.quantize_per_tensor(x, *args), *args)
                    acc("in:" + n, x, xq)
            for a, b in zip(r[k + len(act_names):], g[k:]):
                if torch.is_tensor(a) and a.is_floating_point():
                    acc("@output", a, b)

    def db(key):
        if key not in energy:
            return None
        s, nz = energy[key]
        return math.inf if nz == 0 else (-math.inf if s == 0 else 10 * math.log10(s / nz))

    original = {v: k for k, v in renamed.items()}
    for la in report.layers:
        key = original.get(la.node, la.node)
        la.sqnr_db = db(key)
        la.input_sqnr_db = db("in:" + key)
    report.output_sqnr_db = db("@output")


def _add_sqnr_stats(stats: dict, report: QuantReport) -> None:
    worst = report.worst(1)
    if worst:
        stats["min_sqnr_db"] = round(worst[0].sqnr_db, 2) if not math.isinf(worst[0].sqnr_db) else worst[0].sqnr_db
        stats["worst_layer"] = worst[0].node
    if report.output_sqnr_db is not None:
        stats["output_sqnr_db"] = round(report.output_sqnr_db, 2) if not math.isinf(report.output_sqnr_db) \
            else report.output_sqnr_db


__all__ = ["insert_qdq", "quant_report", "QuantReport", "LayerReport", "sqnr_db", "quantize_weight", "plan_placement"]
