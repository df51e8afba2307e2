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

Modules: ``sites.py`` (what is quantized), ``placement.py`` (where the Q/DQ pairs go),
``qparams.py`` (calibration, scales and zero points, int8 weights), ``rewrite.py`` (the graph
surgery), ``report.py`` (the per-layer SQNR report).
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from optc.errors import OptcError
from optc.ir.calibration import OBSERVERS, calibration_samples
from optc.ir.program import copy_graph_module
from optc.passes.base import Option, PassContext, PassResult, register_pass
from optc.passes.insert_qdq.placement import Plan, plan_placement
from optc.passes.insert_qdq.qparams import PASS, QParams, assign_qparams, calibrated_ranges, quantize_weight
from optc.passes.insert_qdq.report import (LayerReport, QuantReport, add_sqnr_stats, measure, quant_report,
                                           sqnr_db)
from optc.passes.insert_qdq.rewrite import insert_pair, quantize_site_weights, rewrite_dynamic
from optc.passes.insert_qdq.sites import Site, excluded, layer_path, match_site

_DTYPES = {"uint8": torch.uint8, "int8": torch.int8}

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
        pat = excluded(node, patterns)
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
    ranges = calibrated_ranges(gm, plan.values, samples, opts["calibration"], opts["percentile"])
    params = assign_qparams(plan, ranges, dtype, opts["symmetric"])

    dq_of: dict[fx.Node, fx.Node] = {}
    for v in plan.values:
        ctx.current_node = v.name
        dq_of[v] = insert_pair(gm, v, params[v], plan.readers[v])
    ctx.current_node = None

    layers, cache = [], {}
    for node, site in sites.items():
        act = site.acts[0]
        qp = params.get(act)
        wmin = wmax = wsq = None
        if site.weight is not None:
            wmin, wmax, wsq = quantize_site_weights(gm, site, qp.scale if qp else None, cache)
        layers.append(LayerReport(node.name, layer_path(node), site.kind, qp.scale if qp else None,
                                  qp.zero_point if qp else None, wmin, wmax, weight_sqnr_db=wsq))
    gm.graph.lint()
    gm.recompile()

    report = QuantReport("static", opts["calibration"], len(samples), layers)
    measure(report, reference, gm, sites, plan, params, samples[: max(0, opts["report_samples"])])
    gm.meta["optc_quant_report"] = report
    stats = {"layers": len(sites), "qdq": len(plan.values), "integer_adds": len(plan.int_ops),
             "calibration": opts["calibration"], "samples": len(samples)}
    add_sqnr_stats(stats, report)
    return PassResult(gm, True, stats)


def _dynamic(gm: fx.GraphModule, ctx: PassContext, sites: dict[fx.Node, Site], reference: fx.GraphModule) -> PassResult:
    layers, cache, renamed = [], {}, {}
    for node, site in sites.items():
        name, module, kind = node.name, layer_path(node), site.kind
        ctx.current_node = name
        new, (wmin, wmax, wsq) = rewrite_dynamic(gm, site, ctx.options["per_channel"], cache)
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
        measure(report, reference, gm, sites, None, {}, samples[: ctx.options["report_samples"]], renamed)
    gm.meta["optc_quant_report"] = report
    stats = {"layers": len(sites), "dynamic": len(sites)}
    add_sqnr_stats(stats, report)
    return PassResult(gm, True, stats)


__all__ = ["insert_qdq", "quant_report", "QuantReport", "LayerReport", "sqnr_db", "quantize_weight", "plan_placement",
           "Plan", "QParams", "Site", "match_site", "assign_qparams", "OPTIONS", "PASS"]
