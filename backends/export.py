"""Graph helpers shared by the backends: a GraphModule's constants on a device, the symbolic dims
of a Program's inputs, and the Program exported again with ``torch.export`` for the backends that
import an ExportedProgram (ONNX, TVM)."""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
import torch.fx as fx

from optc.ir.program import Program, copy_graph_module


def graph_module_on(gm: fx.GraphModule, device: torch.device | str) -> fx.GraphModule:
    """``gm`` with copies of its attribute tensors on ``device`` (``gm`` itself is untouched:
    ``nn.Module.to`` would move shared Parameters in place)."""
    device = torch.device(device)
    root: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = gm
            for atom in node.target.split("."):
                obj = getattr(obj, atom)
            if isinstance(obj, torch.Tensor) and obj.device != device:
                obj = torch.nn.Parameter(obj.detach().to(device), requires_grad=False) \
                    if isinstance(obj, torch.nn.Parameter) else obj.to(device)
            root[node.target] = obj
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(root, graph, class_name="GraphModule")


def symbolic_dims(program: Program) -> dict[int, dict[int, str]]:
    """``{placeholder index: {axis: symbol}}`` for every symbolic dim of the graph inputs."""
    out: dict[int, dict[int, str]] = {}
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for axis, d in enumerate(val.shape):
            if isinstance(d, torch.SymInt) and d.node.maybe_as_int() is None:
                out.setdefault(i, {})[axis] = str(d)
    return out


def export_inputs(program: Program) -> tuple[list[torch.Tensor], tuple | None]:
    """Example flat inputs and a ``dynamic_shapes`` spec for ``torch.export`` of the flat graph.

    Symbolic dims of the placeholders become shared ``torch.export.Dim`` objects (one per symbol,
    range from the shape environment). A dynamic dim whose example size is 0 or 1 is repeated to
    2, as torch.export specialises sizes 0 and 1.
    """
    flat = [t.detach() for t in program.example_flat_inputs()]
    dims = symbolic_dims(program)
    if not dims:
        return flat, None
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    shared: dict[str, Any] = {}
    spec: list[dict | None] = []
    for i, t in enumerate(flat):
        axes = dims.get(i)
        if not axes:
            spec.append(None)
            continue
        entry = {}
        for axis, sym in axes.items():
            if sym not in shared:
                lo, hi = _sym_range(placeholders[i].meta["val"].shape[axis])
                name = re.sub(r"\W", "_", sym)
                shared[sym] = torch.export.Dim(name if name.isidentifier() else f"d_{name}", min=lo, max=hi)
            entry[axis] = shared[sym]
            if t.shape[axis] == 1:
                reps = [1] * t.dim()
                reps[axis] = 2
                t = t.repeat(*reps)
        flat[i] = t
        spec.append(entry)
    return flat, tuple(spec)


def export_program(program: Program) -> torch.export.ExportedProgram:
    """The Program's flat graph exported again with ``torch.export`` (for backends that consume an
    ExportedProgram: ONNX, TVM's ``from_exported_program``), on a private copy of the graph (its
    attributes shared); symbolic dims stay dynamic (see :func:`export_inputs`). The backend stage
    has run before: what is left of ``optc::`` ops has a native translation, or is a call of its
    decomposition, which the export traces."""
    gm = copy_graph_module(program.graph_module)
    flat, dynamic = export_inputs(program)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(gm, tuple(flat), dynamic_shapes=dynamic, strict=False)
        except Exception as e:  # noqa: BLE001 - torch.export's UserError wraps the constraint violation
            if dynamic is None or "Constraints violated" not in str(e):
                raise
            # torch.export cannot prove a guard the graph makes over the named ranges (HF's key/value
            # cache: "min(16 + 16*s, 32 + 32*s) == 16 + 16*s" for a past length s >= 1); Dim.DYNAMIC
            # lets it keep the dims symbolic without proving the range -- checked below
            dynamic = tuple(None if d is None else {a: torch.export.Dim.DYNAMIC for a in d} for d in dynamic)
            ep = torch.export.export(gm, tuple(flat), dynamic_shapes=dynamic, strict=False)
            _check_still_dynamic(ep, dynamic)
        if _rename_clashing_attrs(gm, ep):
            ep = torch.export.export(gm, tuple(flat), dynamic_shapes=dynamic, strict=False)
    # the graph the export traced: each exported node's ``from_node`` names a node of it (node maps
    # match on this graph's identity, not on names, which later decompositions reuse)
    ep.optc_source_graph = gm.graph
    return ep


def _check_still_dynamic(ep: torch.export.ExportedProgram, dynamic: tuple) -> None:
    from optc.errors import LoweringError
    inputs = [n for n in ep.graph.nodes if n.op == "placeholder"
              and n.name in {s.arg.name for s in ep.graph_signature.input_specs
                             if s.kind == torch.export.graph_signature.InputKind.USER_INPUT}]
    for i, (node, axes) in enumerate(zip(inputs, dynamic)):
        for a in (axes or {}):
            if not isinstance(node.meta["val"].shape[a], torch.SymInt):
                raise LoweringError(f"input {i} ('{node.name}') dim {a} is dynamic in the program but the backend's "
                                    f"export made it static (torch.export could not keep it symbolic)")


def _rename_clashing_attrs(gm: fx.GraphModule, ep: torch.export.ExportedProgram) -> int:
    """Give a new name to each attribute of ``gm`` whose name is also the name of a node of ``ep``
    (a constant folded from a ``where`` node is the attribute ``where``; the export of an
    ``aten.where`` call is the node ``where``). torch 2.13's ONNX exporter names an initializer
    after the attribute and a value after the node, and writes both: "Duplicate definition of
    name (where)" (docs/fuzzing.md, ``onnx-initializer-name-clash``)."""
    names = {n.name for n in ep.graph.nodes if n.op != "placeholder"}
    clash = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target in names]
    for node in clash:
        from optc.ir.rewrite import add_attr
        new = add_attr(gm, f"{node.target}_const", get_attr_value(gm, node.target))
        node.target = new
    if clash:
        gm.recompile()
    return len(clash)


def get_attr_value(gm: fx.GraphModule, target: str):
    obj = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _sym_range(d: torch.SymInt) -> tuple[int, int]:
    lo, hi = 1, 1 << 30
    try:
        vr = d.node.shape_env.var_to_range.get(d.node._expr)
        if vr is not None:
            lo = max(int(vr.lower), 1) if vr.lower.is_finite else 1
            hi = int(vr.upper) if vr.upper.is_finite else hi
    except Exception:  # ranges are advisory: fall back to [1, 2**30]
        pass
    return lo, max(hi, lo + 1)


def flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return list(out)




__all__ = ["graph_module_on", "symbolic_dims", "export_inputs", "export_program", "flat_outputs"]
