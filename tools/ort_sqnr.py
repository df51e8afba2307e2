"""ONNX Runtime's own per-activation SQNR (``onnxruntime.quantization.qdq_loss_debug``) on a
quantized Program and its float Program, both lowered by optc's ONNX backend: the cross-check of
``optc compare``'s SQNR ranking (:func:`optc.tools.compare.layer_sqnr`).

    float Program  --optc ONNX backend-->  float.onnx  (value of node %x renamed "x")
    quant Program  --optc ONNX backend-->  qdq.onnx    (QuantizeLinear / DequantizeLinear; the value
                                                        of %x renamed "x", its DequantizeLinear's
                                                        output "x_DequantizeLinear_Output")

``qdq_loss_debug`` pairs tensors by ONNX Runtime's quantizer's names (``x`` in the float model with
``x_DequantizeLinear_Output`` in the QDQ model); optc's exporter names values after the nodes of
the staged program and its Q/DQ values ``quantize_per_tensor_N`` / ``dequantize_per_tensor_N``, so
each model's values are renamed first, through the backend's node map (``backend_map``: each optc
node's ONNX value). Then ORT's steps, unchanged: ``modify_model_output_intermediate_tensors`` (every
float tensor an extra output), ``collect_activations`` (ONNX Runtime with graph optimizations off,
on every sample), ``create_activation_matching`` and ``compute_activation_error``; its
``xmodel_err`` of ``x`` is the SQNR of the QDQ model's dequantized ``x`` against the float model's.
"""

from __future__ import annotations

import os
import tempfile
from typing import Sequence

import torch

__all__ = ["ort_layer_sqnr"]

_DQ_SUFFIX = "_DequantizeLinear_Output"    # onnxruntime.quantization.quant_utils.DEQUANT_OUTPUT_SUFFIX


def _proto(compiled):
    import onnx
    if compiled.model_bytes is not None:
        return onnx.load_from_string(compiled.model_bytes)
    from optc.backends.onnx import MODEL_FILE
    return onnx.load(os.path.join(compiled.model_dir, MODEL_FILE))


def _rename(graph, mapping: dict[str, str]) -> None:
    """Renames ONNX values (node inputs and outputs, graph inputs, outputs and value infos) at once."""
    taken = ({v for n in graph.node for v in (*n.input, *n.output)} | {i.name for i in graph.input}
             | {i.name for i in graph.initializer}) - set(mapping)
    clash = sorted(set(mapping.values()) & taken)
    if clash:
        raise ValueError(f"cannot rename ONNX values to {clash[:3]}: names already used")
    for n in graph.node:
        n.input[:] = [mapping.get(v, v) for v in n.input]
        n.output[:] = [mapping.get(v, v) for v in n.output]
    for vi in (*graph.input, *graph.output, *graph.value_info):
        vi.name = mapping.get(vi.name, vi.name)


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over flat input samples."""

    def __init__(self, names: list[str | None], samples):
        self.names, self.it = names, iter(samples)

    def get_next(self):
        flat = next(self.it, None)
        if flat is None:
            return None
        return {n: t.detach().cpu().contiguous().numpy() for n, t in zip(self.names, flat) if n is not None}

    def __iter__(self):
        return self

    def __next__(self):
        d = self.get_next()
        if d is None:
            raise StopIteration
        return d


def ort_layer_sqnr(float_program, quant_program, samples: Sequence[Sequence[torch.Tensor]], *,
                   workdir: str | None = None) -> dict[str, float]:
    """optc node name -> ``qdq_loss_debug``'s ``xmodel_err`` (SQNR, dB) of every activation
    ``quant_program`` fake-quantizes whose float value ``float_program`` has under the same node
    name, over ``samples`` (flat graph inputs). ``workdir``: where the ONNX files are written
    (default: a temporary folder, removed)."""
    import onnx
    from onnxruntime.quantization import qdq_loss_debug as qld

    from optc.backends.lowering import lower
    from optc.tools.compare import quantized_activations

    with tempfile.TemporaryDirectory(prefix="optc-ort-sqnr-") as tmp:
        d = workdir or tmp
        os.makedirs(d, exist_ok=True)
        float_names = {n.name for n in float_program.graph.nodes}
        pairs = [(x.name, dq.args[0].name, dq.name) for x, dq in quantized_activations(quant_program)
                 if x.name in float_names]
        fo = lower(float_program, "cpu", "onnx", ort_fusions=False)
        qo = lower(quant_program, "cpu", "onnx", ort_fusions=False)
        fproto, qproto = _proto(fo), _proto(qo)

        # the QDQ model: x's value is what its QuantizeLinear reads; DQ(Q(x)) renamed x_DequantizeLinear_Output
        produced_by = {v: n for n in qproto.graph.node for v in n.output}
        qmap, x_value = {}, {}
        for x, q, dq in pairs:
            q_entry, dq_entry = (qo.backend_map or {}).get(q), (qo.backend_map or {}).get(dq)
            q_node = produced_by.get(q_entry["value"]) if q_entry and q_entry.get("value") else None
            if q_node is None or q_node.op_type != "QuantizeLinear" or not dq_entry or not dq_entry.get("value"):
                continue
            x_value[x] = q_node.input[0]
            qmap[q_node.input[0]] = x
            qmap[dq_entry["value"]] = x + _DQ_SUFFIX
        # the float model: x's value from the node map; where the map has none (a node the exporter
        # decomposed itself: flatten -> view), the value of the same name as in the QDQ model
        fnames = {v for n in fproto.graph.node for v in n.output} | {i.name for i in fproto.graph.input}
        fmap = {}
        for x, value in x_value.items():
            entry = (fo.backend_map or {}).get(x)
            v = entry["value"] if entry and entry.get("value") else value if value in fnames else None
            if v is not None:
                fmap[v] = x
        _rename(fproto.graph, {k: v for k, v in fmap.items() if k != v})
        _rename(qproto.graph, {k: v for k, v in qmap.items() if k != v})

        collected = {}
        for tag, proto, program in (("float", fproto, float_program), ("qdq", qproto, quant_program)):
            path, augmented = os.path.join(d, f"{tag}.onnx"), os.path.join(d, f"{tag}.augmented.onnx")
            onnx.save(proto, path)
            qld.modify_model_output_intermediate_tensors(path, augmented)
            present = {i.name for i in proto.graph.input}
            names = [p.name if p.name in present else None
                     for p in program.graph.nodes if p.op == "placeholder"]
            collected[tag] = qld.collect_activations(augmented, _Reader(names, samples))
        matched = qld.create_activation_matching(collected["qdq"], collected["float"])
        # compute_activation_error raises KeyError on a QDQ tensor with no float counterpart
        errors = qld.compute_activation_error({k: m for k, m in matched.items() if "float" in m})
    return {name: e["xmodel_err"] for name, e in errors.items() if "xmodel_err" in e}
