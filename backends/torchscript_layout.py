"""TorchScript lowering of NHWC programs: PyTorch's own convention, channels-last memory format.

In PyTorch NHWC is not a shape but a memory format: a channels-last tensor keeps its logical
NCHW shape and stores ``[N, H, W, C]``; ``aten.conv2d`` on one runs oneDNN's NHWC kernel and
returns channels-last, pooling and pointwise ops keep it. An NHWC Program (``optc.conv2d_nhwc``,
logical NHWC shapes) is therefore lowered as

1. ``convert-layout{layout=NCHW}``: ATen ops on logical NCHW values again (the conversion
   cancels the permutes the NHWC conversion added at the boundaries);
2. ``channels-last`` (:func:`to_channels_last`): every 4-d graph input that a convolution reads is made channels-last once
   (``aten.contiguous(memory_format=channels_last)``: the input permute, as a copy), and every
   convolution weight becomes a channels-last constant (OHWI in memory).

Both run in TorchScript's backend stage (:func:`stage_passes`). From there the values stay channels-last: that is what ``torch.jit.trace``/``freeze`` see and
``torch.jit.optimize_for_inference`` gets (which may then move them into oneDNN's blocked
layout, as it does for NCHW programs). The alternative, the ATen decompositions of the NHWC ops
(``permute -> conv2d -> permute`` views), computes the same but puts a permute between every
pair of convolutions, and ``optimize_for_inference`` then converts to and from oneDNN's layout
around each one (measured 1.45x slower on ResNet-50, docs/layout.md).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from optc.ir.layout_ops import is_layout_op
from optc.ir.rewrite import add_attr, attr_value, call, remove_unused_attrs

aten = torch.ops.aten


def has_layout_ops(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and is_layout_op(n.target) for n in gm.graph.nodes)


def has_bf16_conv(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and n.target in (aten.conv2d.default, aten.convolution.default)
               and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dtype == torch.bfloat16
               and n.meta["val"].dim() == 4 for n in gm.graph.nodes)


def stage_passes(gm: fx.GraphModule) -> list[str]:
    """The TorchScript stage's layout passes: an NHWC program back to NCHW values in channels-last
    memory; a bfloat16 program with convolutions in channels-last memory too (oneDNN's bf16
    convolutions are faster on it: ResNet-50 with to-half{dtype=bfloat16}, 0.516x eager against
    0.607x in NCHW memory, interleaved, AMD EPYC with avx512_bf16; for float32 programs the gain,
    0.797x against 0.837x, was inside the noise: docs/layout.md); none for other programs."""
    if has_layout_ops(gm):
        return ["convert-layout{layout=NCHW}", "channels-last"]
    return ["channels-last"] if has_bf16_conv(gm) else []


def to_channels_last(gm: fx.GraphModule) -> int:
    """Step 2 above, in place on a logical-NCHW program: every 4-d graph input a convolution reads
    made channels-last once, every 4-d convolution weight a channels-last constant. Returns how
    many convolutions it touched."""
    graph = gm.graph
    converted: dict[fx.Node, fx.Node] = {}
    strided: set[fx.Node] = set()
    n = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.conv2d.default, aten.convolution.default):
            continue
        x, w = node.args[0], node.args[1]
        if not (isinstance(x, fx.Node) and x.meta["val"].dim() == 4):
            continue
        t = attr_value(w)
        touched = False
        if t is not None and t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
            name = add_attr(gm, f"{w.target}_cl", t.contiguous(memory_format=torch.channels_last))
            with graph.inserting_before(node):
                new_w = graph.get_attr(name)
                new_w.meta["val"] = w.meta["val"]
            node.replace_input_with(w, new_w)
            touched = True
        if x.op == "placeholder":
            if x not in converted:
                last = [p for p in graph.nodes if p.op == "placeholder"][-1]
                with graph.inserting_after(last):
                    converted[x] = call(graph, aten.contiguous.default, (x,), {"memory_format": torch.channels_last},
                                        like=node, pass_name="channels-last", name=f"{x.name}_channels_last")
            node.replace_input_with(x, converted[x])
            touched = True
        n += touched
        if touched:
            strided.add(node)
    if n:
        # an eager kernel keeps its input's memory format, so everything computed from a
        # channels-last convolution may have channels-last strides, on which a ``view`` fails ("view
        # size is not compatible with input tensor's size and stride"; found by optc fuzz: a conv, a
        # relu and a functionalised ``index_put_`` that flattens with ``view(-1)``): such views
        # become reshapes (the same values; a copy only where the strides need one)
        for node in graph.nodes:
            if node.op == "call_function" and any(a in strided for a in node.all_input_nodes):
                strided.add(node)
                if node.target in (aten.view.default, aten._unsafe_view.default):
                    node.target = aten.reshape.default
        graph.eliminate_dead_code()
        remove_unused_attrs(gm)
        gm.recompile()
    return n
