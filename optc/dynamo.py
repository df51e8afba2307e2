"""``torch.compile(model, backend="optc")``: optc as a TorchDynamo backend.

    compiled = torch.compile(model, backend="optc",
                             options={"backend": "onnx", "target": "cpu", "pipeline": "default"})

torch discovers the backend through the ``torch_dynamo_backends`` entry point in pyproject.toml
(``optc = "optc.dynamo:optc_backend"``; ``torch._dynamo.list_backends()`` lists it after
``pip install -e .``) and calls ``optc_backend(gm, example_inputs, options=...)`` for every graph
Dynamo captures. ``options`` holds ``backend`` (default ``onnx``), ``target`` (``cpu``),
``pipeline`` (``default``) and any option of that backend's ``lower``.

Each graph is captured with :func:`optc.capture` (torch.export of Dynamo's GraphModule), run
through the pipeline and lowered; the callable returned takes Dynamo's flat inputs and returns
what the graph returns. Inference only: outputs carry no autograd history.

Dynamic shapes: when Dynamo marks a size dynamic (after a recompile, or ``dynamic=True``) its
graph takes the size as a ``SymInt`` input next to the tensor it belongs to. Such inputs are
rewritten into ``sym_size`` of that tensor and the tensor dims are captured as dynamic, so one
lowered model serves every size. A ``SymInt`` that is no tensor's size is a LoweringError
(compile with ``dynamic=False``).

Under Dynamo, parameters and buffers are graph *inputs* (torch inlines built-in modules), so
passes that fold weights see no constants here; for deployment use :func:`optc.compile`.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
import torch._guards
import torch.fx as fx

from optc.errors import LoweringError

log = logging.getLogger("optc.dynamo")

def optc_backend(gm: fx.GraphModule, example_inputs: list, *, options: dict | None = None, **kwargs):
    """Dynamo backend entry point: lower ``gm`` with optc; return a callable like ``gm.forward``."""
    import optc
    opts = {**(options or {}), **kwargs}
    opts.pop("mode", None)  # torch.compile(mode=...) is an inductor notion
    backend = opts.pop("backend", "onnx")
    target = opts.pop("target", "cpu")
    pipeline = opts.pop("pipeline", "default")

    module, keep, dynamic = _tensor_only(gm, example_inputs)
    # fresh tensor objects: Dynamo's own tensors stay untouched by capture
    tensors = tuple(example_inputs[i].detach() for i in keep)
    # Outside Dynamo's tracing context: torch.export would otherwise pick up Dynamo's fake mode and
    # shape environment and add its own guards to them ("Guard failed on the same frame it was
    # created" on the next call).
    with torch._guards.tracing(None), warnings.catch_warnings():
        # Dynamo's GraphModule has training=True whatever the model's mode: the graph already
        # holds the mode-dependent ops, so capture's training-mode warning does not apply.
        warnings.simplefilter("ignore")
        compiled, report = optc.compile(module, tensors, backend=backend, target=target, pipeline=pipeline,
                                        dynamic_shapes=dynamic, **opts)
    log.info("optc compiled a Dynamo graph:\n%s", report)

    def run(*args):
        return compiled(*(args[i] for i in keep))

    run.compiled = compiled  # for inspection and tests
    run.report = report
    return run


def _tensor_only(gm: fx.GraphModule, example_inputs: list) -> tuple[fx.GraphModule, list[int], Any]:
    """``gm`` with its SymInt inputs replaced by ``sym_size`` of the tensor input they measure.

    Returns the module, the indices of the inputs it keeps, and a ``dynamic_shapes`` spec (None
    when nothing is symbolic)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise LoweringError(f"Dynamo graph has {len(placeholders)} inputs but {len(example_inputs)} example "
                            "inputs", backend="dynamo")
    sym_slots = [i for i, x in enumerate(example_inputs) if not isinstance(x, torch.Tensor)]
    symbolic = {}  # symbol name -> (tensor placeholder index, dim)
    for i, node in enumerate(placeholders):
        val = node.meta.get("example_value")
        if isinstance(val, torch.Tensor):
            for d, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt) and size.node.maybe_as_int() is None:
                    symbolic.setdefault(str(size), (i, d))
    if not sym_slots and not symbolic:
        return gm, list(range(len(example_inputs))), None

    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    new_placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for i in sym_slots:
        node = new_placeholders[i]
        val = placeholders[i].meta.get("example_value", example_inputs[i])
        where = symbolic.get(str(val))
        if not isinstance(val, torch.SymInt) or where is None:
            raise LoweringError(f"Dynamo passed the non-tensor input {placeholders[i].name} = {val!r}, which is no "
                                "tensor's size; compile with torch.compile(..., dynamic=False)",
                                backend="dynamo", node=placeholders[i].name)
        tensor_node, dim = new_placeholders[where[0]], where[1]
        with graph.inserting_after(new_placeholders[-1]):
            size = graph.call_function(torch.ops.aten.sym_size.int, (tensor_node, dim))
        node.replace_all_uses_with(size)
        graph.erase_node(node)
    module = fx.GraphModule(gm, graph, class_name="GraphModule")

    keep = [i for i in range(len(example_inputs)) if i not in sym_slots]
    dims: dict[str, Any] = {}
    spec = []
    for i in keep:
        val = placeholders[i].meta.get("example_value")
        entry = {}
        if isinstance(val, torch.Tensor):
            for d, size in enumerate(val.shape):
                if isinstance(size, torch.SymInt) and size.node.maybe_as_int() is None:
                    entry[d] = dims.setdefault(str(size), torch.export.Dim.DYNAMIC)
        spec.append(entry or None)
    return module, keep, tuple(spec)
