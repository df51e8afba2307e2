"""insert-qdq's rewrite: quantize-dequantize pairs on activations, int8 weights and int32 biases
as constants behind dequantize ops, and dynamic ``optc::linear_dynamic`` sites.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from optc.ir.rewrite import add_attr, attr_node, attr_value, call, erase_if_unused
from optc.memory import release_heap, release_mapped
from optc.passes.insert_qdq.qparams import PASS, QParams, quantize_weight
from optc.passes.insert_qdq.report import sqnr_db
from optc.passes.insert_qdq.sites import Site

optc_ops = torch.ops.optc


_NAME_SAN = re.compile(r"[^0-9a-zA-Z_]")


def _insert_point(graph: fx.Graph, v: fx.Node):
    if v.op == "placeholder":   # keep the placeholders together
        return graph.inserting_after([n for n in graph.nodes if n.op == "placeholder"][-1])
    return graph.inserting_after(v)


def insert_pair(gm: fx.GraphModule, v: fx.Node, qp: QParams, readers: list[fx.Node]) -> fx.Node:
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


def rewrite_dynamic(gm: fx.GraphModule, site: Site, per_channel: bool, cache: dict) -> tuple[fx.Node, tuple]:
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
        _done_with(w_node)
    wn, sn, info = cache[key]
    with gm.graph.inserting_before(node):
        new = call(gm.graph, optc_ops.linear_dynamic.default, (site.acts[0], wn, sn, site.bias), like=node,
                   pass_name=PASS, name=f"{node.name}_dynamic")
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    erase_if_unused(w_node)
    return new, info


_TRIM_BYTES = 1 << 20


def _done_with(w_node: fx.Node) -> None:
    """A weight has been quantized: its float32 temporaries (``abs``, the division, the rounding, the
    SQNR's dequantized copy: several times the weight) are freed, and the C heap is asked to give
    their pages back -- else, with the int8 results kept between them, a model's worth of freed
    temporaries stays resident (a 303 M Llama's RSS grew by 2 GiB inside this pass); a weight
    memory-mapped from a file has its pages handed back too."""
    w = attr_value(w_node)
    release_mapped([w])
    if w.nbytes >= _TRIM_BYTES:         # malloc_trim walks the heap: only where there is much to give back
        release_heap()


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
        del deq
        _done_with(w_node)
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
