"""to-half: mixed precision -- float32 compute in float16 or bfloat16, numerically sensitive ops kept
in float32, casts at the boundaries.

Every float32 op is put in one of three classes (torch autocast's, restated for a graph):

``half``
    the ops where half precision pays: conv (1/2/3-d, transposed), linear, matmul / mm / bmm /
    addmm / baddbmm. Their float32 inputs are cast to ``dtype``; their constant weights and biases
    are converted once, at compile time (new attributes), not cast at run time.
``keep`` (float32)
    the ops whose result half precision spoils: softmax / log_softmax, layer / group / batch /
    RMS norm, reductions (sum, mean, var, std, norm, prod, cumsum, cumprod, logsumexp), exp / log /
    pow / rsqrt / reciprocal and their kin, scaled_dot_product_attention (it holds a softmax), and
    optc's quantize / dequantize ops. Their half inputs are cast back to float32. ``keep=...``
    replaces this list: ``|``/``,``-separated op names (``softmax``), node names or module paths
    (fnmatch patterns; ``default`` stands for the list above, so ``keep=default|head`` adds the
    module ``head``).
``follow``
    everything else (elementwise ops, activations, views, pooling, cat): it runs in the type of
    its float inputs -- half if they all are half, float32 if any is (the half ones cast up),
    so a residual add of a half branch and a float32 input computes in float32.

``range`` (float16 only; ``range_check=true``, the default)
    an op whose float32 result, or any of whose float inputs, reaches beyond a quarter of
    float16's range (65504 / 4) on the program's example inputs (and its calibration data, when
    given) stays float32: float16 would overflow to inf there. bfloat16 has float32's range.

A value is cast at most once per type (the cast is shared by its readers). Graph inputs keep their
dtypes (cast after them), and every float32 graph output stays float32 (cast before it): the
compiled model is called and answers like the original. Integer and float64 values are untouched.
A conv or linear that reads a dequantized value stays float32 (refused: the backend fuses it
into an integer kernel), so ``insert-qdq`` then ``to-half`` leaves the quantized layers alone.

Rewrite, e.g. (``dtype=bfloat16``)::

    %y = aten.linear(%x, %w, %b)                   %x_bf16 = aten.to.dtype(%x, bf16)
    %s = aten.softmax.int(%y, -1)        ==>       %y = aten.linear(%x_bf16, %w_bf16, %b_bf16)    # weights converted
    return (%s)                                    %y_f32 = aten.to.dtype(%y, f32)
                                                   %s = aten.softmax.int(%y_f32, -1)
                                                   return (%s)

Lossy: the error is half precision's rounding, about 2^-11 (float16) or 2^-8 (bfloat16) relative
per rounding, accumulated over the half layers. Preconditions: none (run after BatchNorm folding so
that folded weights, not BatchNorm, are converted).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import operator
import re

import torch
import torch.fx as fx

from optc.ir.rewrite import add_attr, attr_node, attr_value, call, infer_val, is_op
from optc.memory import release_mapped
from optc.passes.base import Option, PassContext, PassResult, register_pass

log = logging.getLogger(__name__)
aten = torch.ops.aten
PASS = "to-half"

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

HALF_OPS = {
    "conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "linear", "matmul", "mm", "bmm", "addmm", "baddbmm",
}
#: Kept in float32 by default (``keep=default``): what half precision spoils.
KEEP_OPS = (
    "softmax", "_softmax", "log_softmax", "_log_softmax", "layer_norm", "native_layer_norm", "group_norm",
    "native_group_norm", "batch_norm", "_native_batch_norm_legit_no_training", "rms_norm", "sum", "mean",
    "var", "var_mean", "std", "std_mean", "norm", "linalg_vector_norm", "prod", "cumsum", "cumprod",
    "logsumexp", "exp", "expm1", "log", "log1p", "log2", "log10", "pow", "rsqrt", "reciprocal", "erfinv",
    "acos", "asin", "cosh", "sinh", "tan", "softplus", "scaled_dot_product_attention",
)
#: Weight / bias argument positions of the half ops whose constants are converted at compile time.
_CONST_ARGS = {"conv1d": (1, 2), "conv2d": (1, 2), "conv3d": (1, 2), "convolution": (1, 2),
               "conv_transpose1d": (1, 2), "conv_transpose2d": (1, 2), "conv_transpose3d": (1, 2),
               "linear": (1, 2), "matmul": (1,), "mm": (1,), "addmm": (0, 2)}


def _op_name(node: fx.Node) -> str | None:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._opname
    return None


def _is_float(node, dtype=torch.float32) -> bool:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dtype == dtype


def _float_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)
            and a.meta["val"].is_floating_point()]


def parse_keep(text: str) -> list[str]:
    out = []
    for p in re.split(r"[|,\s]+", text):
        if not p:
            continue
        out.extend(KEEP_OPS if p == "default" else [p])
    return out


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    return str(list(stack.values())[-1][0]) if stack else ""


def _kept(node: fx.Node, patterns: list[str]) -> str | None:
    name, path = _op_name(node) or "", _module_path(node)
    for p in patterns:
        if name == p or fnmatch.fnmatchcase(node.name, p) or (path and fnmatch.fnmatchcase(path, p)):
            return p
    return None


def _reads_dequantized(node: fx.Node) -> bool:
    from optc.ir.quant_ops import is_dequantize
    return any(a.op == "call_function" and (is_dequantize(a.target)
                                            or a.target is torch.ops.optc.quantize_dequantize_dynamic.default)
               for a in node.all_input_nodes)


def _overflows(node: fx.Node, half: torch.dtype) -> bool:
    """A Python float argument beyond ``half``'s range (an attention mask's ``finfo(float32).min``):
    the op cannot run in ``half`` (torch refuses the scalar), so it stays float32."""
    limit = torch.finfo(half).max
    return any(isinstance(a, float) and math.isfinite(a) and abs(a) > limit
               for a in (*node.args, *node.kwargs.values()))


def _retype_assert(node: fx.Node) -> None:
    """``aten._assert_tensor_metadata(x, dtype=float32)`` of a value this pass made half asserts the
    new dtype (it only checks what the graph itself computes)."""
    v = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if not isinstance(v, torch.Tensor):
        return
    if node.kwargs.get("dtype") is not None and node.kwargs["dtype"] != v.dtype:
        node.update_kwarg("dtype", v.dtype)
    elif len(node.args) > 3 and node.args[3] is not None and node.args[3] != v.dtype:
        node.update_arg(3, v.dtype)


#: ``range_check``: a value this far from zero (as a share of the half type's max) stays float32.
RANGE_SHARE = 0.25


def _value_ranges(gm: fx.GraphModule, ctx: PassContext) -> dict[str, float]:
    """max |value| of every float tensor the graph computes, over the program's example inputs and
    up to 8 samples of its calibration data (when given), in float32, before the rewrite: the
    calibration machinery of insert-qdq (a probe module and min/max observers)."""
    from optc.ir.calibration import MinMaxObserver, calibration_samples, probe_module, run_probe
    program = ctx.program
    if program is None:
        return {}
    samples = [program.example_flat_inputs()]
    data = ctx.extra.get("calibration_data")
    if data:
        samples += calibration_samples(program, list(data)[:8], samples=1, pass_name=PASS)
    nodes = [n for n in gm.graph.nodes if n.op != "output" and isinstance(n.meta.get("val"), torch.Tensor)
             and n.meta["val"].is_floating_point()]
    observers = [MinMaxObserver() for _ in nodes]
    for outs in run_probe(probe_module(gm, nodes), samples, desc=f"{PASS}: value ranges"):
        for obs, t in zip(observers, outs):
            obs.update(t)
    return {n.name: max(abs(lo), abs(hi)) for n, obs in zip(nodes, observers) for lo, hi in (obs.range(),)}


OPTIONS = {
    "dtype": Option(tuple(DTYPES), "float16", "the half type"),
    "range_check": Option(bool, True, "float16: ops whose values on the example inputs reach a quarter of its range "
                          "stay float32"),
    "keep": Option(str, "default", "ops (names), nodes or module paths kept in float32; 'default' = softmax, "
                   "norms, reductions, exp/log/pow, SDPA"),
}


def _refuse(options: dict, target) -> str | None:
    """bfloat16 on ONNX Runtime's CPU provider: it has no bfloat16 kernels (no Conv, Gemm, MatMul),
    so the backend can only emulate the roundings in float32 (``bfloat16-as-rounded-float32``),
    which is slower than float32 itself (docs/quantization.md, "bfloat16 on ONNX Runtime")."""
    if options.get("dtype") == "bfloat16" and target.backend == "onnx" and target.device == "cpu":
        return ("ONNX Runtime has no CPU bfloat16 kernels: the ONNX backend would emulate bfloat16 in float32, "
                "slower than float32 itself (1.79x on ResNet-50, 1.23x on BERT-base: docs/quantization.md); run "
                "bfloat16 on torchscript or openvino (oneDNN's bfloat16 kernels)")
    return None


@register_pass(PASS, exact=False, options=OPTIONS, after=("fold-conv-bn", "fold-linear-bn", "insert-qdq"),
               refuse=_refuse,
               description="mixed precision: conv/linear/matmul in float16 or bfloat16, sensitive ops in float32",
               lossy_tolerance=None)
def to_half(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    half = DTYPES[ctx.options["dtype"]]
    keep = parse_keep(ctx.options["keep"])
    graph = gm.graph
    casts: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
    converted: dict[tuple[str, torch.dtype], str] = {}
    stats = {"half": 0, "follow_half": 0, "kept": 0, "casts": 0, "weights": 0}
    limit = torch.finfo(half).max * RANGE_SHARE
    ranges = _value_ranges(gm, ctx) if ctx.options["range_check"] and half == torch.float16 else {}

    def out_of_range(node: fx.Node) -> float | None:
        big = [ranges.get(a.name, 0.0) for a in (node, *_float_inputs(node))]
        return max(big) if big and max(big) > limit else None

    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]

    def cast(v: fx.Node, dtype: torch.dtype) -> fx.Node:
        key = (v, dtype)
        if key not in casts:
            with graph.inserting_after(placeholders[-1] if v.op == "placeholder" else v):
                suffix = _SUFFIX.get(dtype, "cast")
                casts[key] = call(graph, aten.to.dtype, (v, dtype), like=v, pass_name=PASS, name=f"{v.name}_{suffix}")
            stats["casts"] += 1
        return casts[key]

    def convert_const(v: fx.Node, user: fx.Node) -> fx.Node:
        key = (v.target, half)
        if key not in converted:
            source = attr_value(v)
            converted[key] = add_attr(gm, f"{str(v.target).replace('.', '_')}_{_SUFFIX[half]}",
                                      source.detach().to(half))
            release_mapped([source])       # a weight mapped from a file: its float32 pages handed back
            stats["weights"] += 1
        with graph.inserting_before(user):
            return attr_node(gm, converted[key], pass_name=PASS)

    out = graph.output_node()
    out_dtypes = [a.meta["val"].dtype if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor)
                  else None for a in out.args[0]]

    for node in nodes:
        if node.op == "call_function" and node.target is operator.getitem:
            infer_val(node)                            # an element of a (maybe now half) tuple
            continue
        if is_op(node, aten._assert_tensor_metadata.default):
            _retype_assert(node)                       # torch.export's check of a .to(): the new dtype
            continue
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        name = _op_name(node)
        ins = _float_inputs(node)
        if not ins or any(_is_float(a, torch.float64) for a in ins):
            continue                                   # no float input, or float64 compute: untouched
        pat = _kept(node, keep)
        wide = out_of_range(node)
        if node.target.namespace == "optc":
            mode = "keep"
        elif wide is not None:
            mode = "keep"                              # float16 would overflow here
            if name in HALF_OPS or any(_is_float(a, half) for a in ins):   # the check changed it
                stats["kept_range"] = stats.get("kept_range", 0) + 1
            if name in HALF_OPS:
                ctx.reject("half", node, f"values reach {wide:.3g} on the example inputs, beyond {limit:.3g}: "
                           "stays float32 (range_check)")
        elif pat is not None:
            mode = "keep"
            if name in HALF_OPS:
                ctx.reject("half", node, f"kept in float32 by keep='{pat}'")
        elif name in HALF_OPS:
            if _reads_dequantized(node):
                ctx.reject("half", node, "reads a dequantized value: stays float32 for the backend's integer kernel")
                mode = "keep"
            else:
                mode = "half"
        elif _overflows(node, half):
            mode = "keep"                              # e.g. masked_fill(scores, mask, finfo(f32).min)
        else:
            mode = "follow" if all(_is_float(a, half) for a in ins) else "keep"
        if mode == "keep" and not any(_is_float(a, half) for a in ins):
            continue                                   # float32 op with float32 inputs: unchanged
        if mode == "follow":                           # all inputs already half: nothing to cast
            infer_val(node)
            stats["follow_half"] += 1
            continue
        want = half if mode == "half" else torch.float32
        consts = _CONST_ARGS.get(name, ()) if mode == "half" else ()

        def convert(i, a):
            if mode == "half" and i in consts and a.op == "get_attr" and _is_float(a):
                return convert_const(a, node)
            if want == half and _is_float(a):
                return cast(a, half)
            if want == torch.float32 and _is_float(a, half):
                return cast(a, torch.float32)
            return a

        for i, a in enumerate(node.args):
            if isinstance(a, fx.Node) and a in ins:
                node.update_arg(i, convert(i, a))
            elif isinstance(a, (list, tuple)) and any(isinstance(e, fx.Node) and e in ins for e in a):
                node.update_arg(i, type(a)(convert(-1, e) if isinstance(e, fx.Node) and e in ins else e for e in a))
        for k, a in list(node.kwargs.items()):
            if isinstance(a, fx.Node) and a in ins:
                node.update_kwarg(k, convert({"weight": 1, "bias": 2}.get(k, -1), a))
        infer_val(node)
        stats["half" if mode == "half" else "kept"] += 1

    if not (stats["half"] or stats["casts"] or stats["weights"]):
        reason = "no conv, linear or matmul computes in float32" if not ctx.rejections else \
            "every conv, linear and matmul is kept in float32"
        return PassResult(gm, False, {**stats, "nothing-to-do": reason})

    for n in nodes:                                    # float32 weights that were converted
        if n.op == "get_attr" and not n.users and (n.target, half) in converted:
            graph.erase_node(n)

    # graph outputs keep their dtypes
    new_args = []
    for a, dt in zip(out.args[0], out_dtypes):
        if isinstance(a, fx.Node) and dt is not None and a.meta["val"].dtype != dt:
            a = cast(a, dt)
        new_args.append(a)
    out.args = (tuple(new_args),)
    graph.lint()
    gm.recompile()
    log.debug("%s: %d ops in %s, %d casts", PASS, stats["half"], half, stats["casts"])
    return PassResult(gm, True, {**stats, "dtype": ctx.options["dtype"]})


__all__ = ["to_half", "KEEP_OPS", "HALF_OPS", "parse_keep"]
