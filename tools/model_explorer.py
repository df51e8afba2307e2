"""Export a Program to Google Model Explorer: its graph JSON and node-data overlays.

    write_model_explorer(program, "me/")          # me/graph.json, me/params.nodedata.json, me/flops.nodedata.json
    model-explorer me/graph.json --node_data_paths=me/flops.nodedata.json

Two formats, both read by Model Explorer's web UI without an adapter extension:

**Graph JSON** (``graph.json``): one ``GraphCollection`` object, ``{"label", "graphs": [Graph]}``.
The UI's JSON loader takes a file as a collection when it has ``label`` and ``graphs``
(``loadGraphsJson`` in ``src/ui/src/common/utils.ts``; a *list* of collections is not accepted
there, only a list of graphs or the built-in adapters' ``[{label, subgraphs}]``). A Graph is
``{"id", "nodes": [GraphNode], "groupNodeAttributes"}``; a GraphNode is ``{"id", "label",
"namespace", "attrs": [{key, value}], "incomingEdges": [{sourceNodeId, sourceNodeOutputId,
targetNodeInputId}], "inputsMetadata", "outputsMetadata": [{id, attrs: [{key, value}]}]}``, every
value a string. optc fills them so:

- one GraphNode per fx node, in graph order, ``id`` = the fx node name (the printer's ``%name``),
  ``label`` = :func:`~optc.ir.printer.op_name` (``aten.conv2d``, ``getitem``, ``placeholder``,
  ``get_attr``, ``output``);
- ``namespace`` = the module path of the innermost module in ``nn_module_stack``, its ``.``
  turned into ``/`` (``layer1.0.conv1`` -> ``layer1/0/conv1``), so Model Explorer draws one
  collapsible layer per submodule; ``""`` (the top level) without one -- placeholders, the
  output and every node of an ``fx.symbolic_trace`` graph. A ``get_attr`` node has no module
  stack: it sits in the namespace of its users when they all share one (a layer's weights are
  drawn inside the layer), else at the top;
- ``attrs``: ``kind`` (``input``, ``weight``, ``op``, ``output``), ``type`` (the printer's
  ``f32[1,64,56,56]``), ``target`` (a weight's attribute path), ``args`` (the printer's argument
  text), ``source`` (the user's ``file.py:LINE``), ``module`` (the innermost module's class),
  ``provenance`` (:func:`~optc.ir.provenance.describe`: ``from %a, %b by PASS (rule R)``),
  ``pass`` and ``rule``; each only where it has a value;
- one ``incomingEdge`` per node argument, in argument order: ``targetNodeInputId`` = its
  position, ``sourceNodeOutputId`` = the output read, which is ``"0"`` except for a ``getitem``
  of a multi-output node (``aten.chunk``, ``aten.max.dim``): the item's index. ``inputsMetadata``
  names each input (``__tensor_tag``: the schema's argument name, ``weight``, ``tensors[1]``);
- ``outputsMetadata``: per output (``"0"``, or one per item of a multi-output node) its
  ``tensor_shape``, the printer's type (``f32[2,5,16]``) -- the key Model Explorer shows as
  "shape" and can draw on edges;
- ``groupNodeAttributes``: per namespace the module's class and dotted path (shown when a layer
  is selected), and under ``""`` the program's name, node and parameter counts.

**Node data** (``<name>.nodedata.json``): ``{graph_id: {"name", "results": {node_id: {"value":
number}}, "gradient" | "thresholds"}}`` -- Model Explorer's ``NodeDataProviderData``, keyed by
the graph id above. A value that is not finite (``nan``, ``inf``) is written as a string:
JSON has no number for it, and the UI shows any value but colours numbers only. Without
``gradient`` or ``thresholds`` a white-to-red gradient over the values' range is used.
:func:`default_overlays` computes ``params`` and ``flops`` per layer op from
:func:`~optc.ir.stats.model_stats` without running anything.

Verified against google-ai-edge/model-explorer at commit c0f8dbac5cf2 (2026-08-21):

- ``src/server/package/src/model_explorer/graph_builder.py`` (``GraphCollection``, ``Graph``,
  ``GraphNode``, ``IncomingEdge``, ``KeyValue``, ``MetadataItem``, ``GroupNodeAttributes``);
- ``src/ui/src/components/visualizer/common/input_graph.ts`` and ``common/types.ts`` (the same
  types as the UI reads them: ``namespace`` required, edge ids strings, ``NodeDataProviderGraphData``,
  ``ThresholdItem``, ``GradientItem``);
- ``src/ui/src/common/utils.ts`` (``loadGraphsJson``: which JSON shapes a file may have);
- ``src/ui/src/components/visualizer/worker/graph_processor.ts`` (namespaces split on ``/``, group
  ids ``<namespace>___group___``, ``tensor_shape`` shown as "shape", edges deduplicated on all three
  ids);
- ``src/ui/src/components/visualizer/node_data_provider_extension_service.ts`` and
  ``node_data_provider_dropdown.ts`` (node data keyed by graph id, or one graph's data alone);
- ``src/server/package/src/model_explorer/node_data_builder.py`` (``ModelNodeData``,
  ``GraphNodeData``, ``NodeDataResult``, gradient stops 0 and 1 required);
- ``src/server/package/src/model_explorer/cmdline.py`` and ``apis.py`` (``model-explorer PATHS
  --node_data_paths=...``; ``model_explorer.visualize(..., node_data=[{name, node_data_path}])``).
"""

from __future__ import annotations

import math
import numbers
import os
import re
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx

from optc.errors import OptcError
from optc.ir.printer import format_arg, op_name, type_str
from optc.ir.program import Program, attr_tensors
from optc.ir.provenance import PASS, RULE, describe
from optc.ir.queries import module_path
from optc.ir.source import node_source

GRAPH_FILE = "graph.json"
NODE_DATA_SUFFIX = ".nodedata.json"
DEFAULT_GRADIENT = ({"stop": 0, "bgColor": "#ffffff"}, {"stop": 1, "bgColor": "#d93025"})
"""White at the smallest value, red at the largest (Model Explorer interpolates between stops)."""

_KIND = {"placeholder": "input", "get_attr": "weight", "output": "output"}
_OVERLAY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _gm(program: Program | fx.GraphModule) -> fx.GraphModule:
    return program.graph_module if isinstance(program, Program) else program


def graph_id(program: Program | fx.GraphModule) -> str:
    """The Model Explorer graph id of ``program``: its name (``graph`` for a bare GraphModule)."""
    return program.name if isinstance(program, Program) else "graph"


# ---- namespaces ----------------------------------------------------------------------------------
def _namespace_of_path(path: str) -> str:
    """``layer1.0.conv1`` -> ``layer1/0/conv1`` (a ``/`` inside a name escaped as Model Explorer
    splits namespaces: ``\\/``)."""
    return "/".join(part.replace("/", "\\/") for part in path.split(".") if part)


def _module_namespace(node: fx.Node) -> str:
    path = module_path(node)
    return _namespace_of_path(path) if isinstance(path, str) else ""


def namespaces(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """Each node's namespace: its innermost module path; a get_attr node's users' namespace when
    they all share one; else the top level ``""``."""
    out = {n: _module_namespace(n) for n in gm.graph.nodes}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and not n.meta.get("nn_module_stack"):
            used_in = {out[u] for u in n.users}
            out[n] = used_in.pop() if len(used_in) == 1 else ""
    return out


def _type_name(t: Any) -> str:
    return t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"


def _group_attributes(gm: fx.GraphModule, name: str) -> dict[str, dict[str, str]]:
    """``{namespace: {module, path}}`` for every module on a node's stack, and the graph's own under
    ``""`` (Model Explorer shows the latter when nothing is selected)."""
    nodes = list(gm.graph.nodes)
    params = sum(t.numel() for t in attr_tensors(gm).values() if isinstance(t, torch.nn.Parameter))
    groups: dict[str, dict[str, str]] = {"": {"program": name, "nodes": str(len(nodes)), "parameters": str(params)}}
    for n in nodes:
        for path, cls in (n.meta.get("nn_module_stack") or {}).values():
            ns = _namespace_of_path(path) if isinstance(path, str) else ""
            if ns and ns not in groups:
                groups[ns] = {"module": _type_name(cls), "path": path}
    return groups


# ---- edges ---------------------------------------------------------------------------------------
def _arg_names(node: fx.Node) -> list[str]:
    if node.op == "output":
        return ["output"]
    schema = getattr(node.target, "_schema", None)
    return [a.name for a in schema.arguments] if schema is not None else []


def _input_leaves(node: fx.Node) -> list[tuple[fx.Node, str]]:
    """Every node ``node`` reads, with the name of the argument it is read at, in argument order
    (a node read twice is listed twice)."""
    out: list[tuple[fx.Node, str]] = []

    def walk(a: Any, tag: str) -> None:
        if isinstance(a, fx.Node):
            out.append((a, tag))
        elif isinstance(a, (list, tuple)):
            for i, x in enumerate(a):
                walk(x, f"{tag}[{i}]")
        elif isinstance(a, dict):
            for k, x in a.items():
                walk(x, f"{tag}[{k}]")

    names = _arg_names(node)
    for i, a in enumerate(node.args):
        walk(a, names[i] if i < len(names) else f"arg{i}")
    for k, v in node.kwargs.items():
        walk(v, k)
    return out


def _multi(val: Any) -> bool:
    return isinstance(val, (tuple, list))


def source_output_id(source: fx.Node, user: fx.Node) -> str:
    """The output of ``source`` that ``user`` reads: the item's index for a ``getitem`` of a
    multi-output node, else ``"0"``."""
    val = source.meta.get("val")
    if (_multi(val) and user.op == "call_function" and op_name(user) == "getitem"
            and user.args[0] is source and isinstance(user.args[1], int) and val):
        return str(user.args[1] % len(val))
    return "0"


# ---- nodes ---------------------------------------------------------------------------------------
def _kv(key: str, value: Any) -> dict[str, str]:
    return {"key": key, "value": str(value)}


def _args_text(node: fx.Node) -> str:
    if node.op == "output":
        return format_arg(node.args[0])
    parts = [format_arg(a) for a in node.args] + [f"{k}={format_arg(v)}" for k, v in node.kwargs.items()]
    return ", ".join(parts)


def _attrs(node: fx.Node) -> list[dict[str, str]]:
    attrs = [_kv("kind", _KIND.get(node.op, "op"))]
    if node.op != "output" and "val" in node.meta:
        attrs.append(_kv("type", type_str(node.meta["val"])))
    if node.op == "get_attr":
        attrs.append(_kv("target", node.target))
    elif node.op != "placeholder":
        attrs.append(_kv("args", _args_text(node)))
    stack = node.meta.get("nn_module_stack")
    if stack:
        attrs.append(_kv("module", _type_name(list(stack.values())[-1][1])))
    src = node_source(node)
    if src:
        attrs.append(_kv("source", src))
    prov = describe(node)
    if prov:
        attrs.append(_kv("provenance", prov))
    for key, meta_key in (("pass", PASS), ("rule", RULE)):
        if node.meta.get(meta_key):
            attrs.append(_kv(key, node.meta[meta_key]))
    return attrs


def _outputs_metadata(node: fx.Node) -> list[dict]:
    val = node.meta.get("val")
    if node.op == "output" or val is None:
        return []
    items = list(enumerate(val)) if _multi(val) else [(0, val)]
    out = []
    for i, v in items:
        if v is None:
            continue
        key = "tensor_shape" if isinstance(v, torch.Tensor) else "type"
        out.append({"id": str(i), "attrs": [_kv(key, type_str(v))]})
    return out


def _graph_node(node: fx.Node, namespace: str) -> dict:
    edges, inputs = [], []
    for i, (src, tag) in enumerate(_input_leaves(node)):
        edges.append({"sourceNodeId": src.name, "sourceNodeOutputId": source_output_id(src, node),
                      "targetNodeInputId": str(i)})
        inputs.append({"id": str(i), "attrs": [_kv("__tensor_tag", tag)]})
    return {"id": node.name, "label": op_name(node), "namespace": namespace, "subgraphIds": [],
            "attrs": _attrs(node), "incomingEdges": edges, "inputsMetadata": inputs,
            "outputsMetadata": _outputs_metadata(node)}


def to_model_explorer_graph(program: Program | fx.GraphModule, *, label: str | None = None) -> dict:
    """``program`` as one Model Explorer ``GraphCollection`` (see the module doc), labelled
    ``label`` (default: the graph id). ``json.dump`` it to a ``.json`` file Model Explorer opens."""
    gm = _gm(program)
    gid = graph_id(program)
    ns = namespaces(gm)
    graph = {"id": gid, "nodes": [_graph_node(n, ns[n]) for n in gm.graph.nodes],
             "groupNodeAttributes": _group_attributes(gm, gid)}
    return {"label": label if label is not None else gid, "graphs": [graph]}


# ---- node data -----------------------------------------------------------------------------------
def _value(node: str, v: Any) -> int | float | str:
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"node data for %{node}: expected a number, got {type(v).__name__} {v!r}")
    if isinstance(v, numbers.Integral):
        return int(v)
    v = float(v)
    return v if math.isfinite(v) else str(v)     # JSON has no nan/inf; Model Explorer shows strings


def _check_gradient(gradient: Sequence[Mapping]) -> list[dict]:
    items = [dict(g) for g in gradient]
    stops = {g.get("stop") for g in items}
    if not {0, 1} <= stops:
        raise ValueError(f"gradient needs stops 0 and 1 (Model Explorer maps them to the smallest and largest "
                         f"value); got stops {sorted(s for s in stops if s is not None)}")
    return items


def _check_thresholds(thresholds: Sequence[Mapping]) -> list[dict]:
    items = [dict(t) for t in thresholds]
    for t in items:
        if not isinstance(t.get("value"), numbers.Real) or not isinstance(t.get("bgColor"), str):
            raise ValueError(f"threshold {t!r}: needs a numeric 'value' and a 'bgColor' string")
    return items


def to_node_data(program_or_graph_id: Program | fx.GraphModule | str, values: Mapping[str, float], *, name: str,
                 gradient: Sequence[Mapping] | None = None, thresholds: Sequence[Mapping] | None = None) -> dict:
    """``values`` (``{node name: number}``) as Model Explorer node data for the graph of
    ``program_or_graph_id`` (a Program, a GraphModule or a graph id), named ``name``.

    Colours come from ``gradient`` (``[{stop, bgColor}]``, stops 0 and 1 required) or
    ``thresholds`` (``[{value, bgColor}]``: values up to each threshold get its colour); neither
    given: :data:`DEFAULT_GRADIENT`. Given a Program, every key must name one of its nodes
    (``ValueError`` otherwise)."""
    if isinstance(program_or_graph_id, str):
        gid = program_or_graph_id
    else:
        gid = graph_id(program_or_graph_id)
        known = {n.name for n in _gm(program_or_graph_id).graph.nodes}
        unknown = [k for k in values if k not in known]
        if unknown:
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            shown = ", ".join(f"'{k}'" for k in unknown[:5]) + more
            raise ValueError(f"node data '{name}': {len(unknown)} key(s) name no node of graph '{gid}': {shown}")
    data: dict[str, Any] = {"name": name, "results": {str(k): {"value": _value(k, v)} for k, v in values.items()}}
    if thresholds is not None:
        data["thresholds"] = _check_thresholds(thresholds)
    if gradient is not None or thresholds is None:
        data["gradient"] = _check_gradient(DEFAULT_GRADIENT if gradient is None else gradient)
    return {gid: data}


def default_overlays(program: Program | fx.GraphModule) -> dict[str, dict[str, int]]:
    """``params`` and ``flops`` of each layer op (convolution, linear, matmul, attention, norm,
    embedding: the rows of :func:`~optc.ir.stats.model_stats`), by node name; computed from shapes
    alone. Other nodes have no value."""
    from optc.ir.stats import model_stats
    rows = [r for r in model_stats(program).rows if r.node]
    return {"params": {r.node: r.params for r in rows}, "flops": {r.node: r.flops for r in rows}}


# ---- files ---------------------------------------------------------------------------------------
def write_model_explorer(program: Program | fx.GraphModule, out_dir: str,
                         overlays: Mapping[str, Mapping[str, float]] | None = None, *,
                         label: str | None = None, defaults: bool = True) -> list[str]:
    """Write ``out_dir/graph.json`` and one ``out_dir/<name>.nodedata.json`` per overlay: the
    :func:`default_overlays` (unless ``defaults=False``) and ``overlays`` (``{name: {node name:
    number}}``; a name of a default replaces it). Each file is written whole or not at all, and
    nothing is written when an overlay is invalid. Returns the paths, ``graph.json`` first.

    Raises ``ValueError`` for an overlay name that is not a plain file name or keys that name no
    node, and :class:`~optc.errors.OptcError` when ``out_dir`` cannot be created or written."""
    from optc.tools.compare import check_writable, write_json
    sets: dict[str, Mapping[str, float]] = dict(default_overlays(program)) if defaults else {}
    sets.update(overlays or {})
    for name in sets:
        if not _OVERLAY_NAME.fullmatch(name):
            raise ValueError(f"overlay name '{name}': use letters, digits, '_', '-' and '.', starting with a "
                             "letter or digit (it names the file <name>.nodedata.json)")
    docs = {GRAPH_FILE: to_model_explorer_graph(program, label=label)}
    for name, values in sets.items():
        docs[name + NODE_DATA_SUFFIX] = to_node_data(program, values, name=name)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise OptcError(f"model explorer folder '{out_dir}': cannot create it ({e.strerror or e})") from e
    paths = [os.path.join(out_dir, f) for f in docs]
    check_writable(paths[0], "model explorer folder")
    for path, doc in zip(paths, docs.values()):
        write_json(path, doc)
    return paths


__all__ = ["GRAPH_FILE", "NODE_DATA_SUFFIX", "DEFAULT_GRADIENT", "graph_id", "namespaces", "source_output_id",
           "to_model_explorer_graph", "to_node_data", "default_overlays", "write_model_explorer"]
