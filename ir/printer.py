"""The canonical printer: one node a line with shape and dtype, and the user's source line.

    graph(%x : f32[1,3,224,224]):
      %conv1_weight : f32[64,3,7,7] = get_attr conv1.weight
      %conv2d : f32[1,64,112,112] = aten.conv2d(%x, %conv1_weight, None, [2, 2], [3, 3])  # model.py:41
      return (%linear)

Names are the fx node names, which are deterministic for a given model and pipeline, so
two dumps of the same program are identical and two stages diff cleanly. The same printer
serves the test goldens, the CLI and the logs. ``format_json`` and ``format_dot`` give the
same information as JSON and Graphviz DOT.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
import torch.fx as fx

from optc.ir.program import Program, dtype_short
from optc.ir.source import node_source


def op_name(node: fx.Node) -> str:
    """``aten.conv2d``, ``aten.add.Tensor``, ``optc.example_scale_bias``, ``getitem``."""
    t = node.target
    if node.op in ("placeholder", "get_attr", "output"):
        return node.op
    if isinstance(t, torch._ops.OpOverload):
        ns = t.namespace
        base = t._schema.name.split("::")[-1]
        overload = t._overloadname
        return f"{ns}.{base}" if overload == "default" else f"{ns}.{base}.{overload}"
    if isinstance(t, torch._ops.OpOverloadPacket):
        return str(t).replace("::", ".")
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", str(t))


def type_str(val: Any) -> str:
    if isinstance(val, torch.Tensor):
        dims = ",".join(_dim(d) for d in val.shape)
        return f"{dtype_short(val.dtype)}[{dims}]"
    if isinstance(val, (tuple, list)):
        return "(" + ", ".join(type_str(v) for v in val) + ")"
    if isinstance(val, torch.SymInt):
        return f"sym[{val}]"
    if isinstance(val, (int, float, bool)):
        return type(val).__name__
    if val is None:
        return "none"
    return type(val).__name__


def _dim(d) -> str:
    return str(d)


def format_arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        inner = ", ".join(format_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else (f"({inner},)" if len(a) == 1 else f"({inner})")
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k}: {format_arg(v)}" for k, v in a.items()) + "}"
    if isinstance(a, torch.dtype):
        return dtype_short(a)
    if isinstance(a, float):
        if math.isinf(a) or math.isnan(a):
            return str(a)
        return repr(a)
    if isinstance(a, torch.device):
        return f"device({a.type})" if a.index is None else f"device({a.type}:{a.index})"
    if isinstance(a, torch.memory_format):
        return str(a).replace("torch.", "")
    if isinstance(a, torch.layout):
        return str(a).replace("torch.", "")
    if isinstance(a, str):
        return repr(a)
    return str(a)


def format_node(node: fx.Node, *, with_source: bool = True, with_provenance: bool = False) -> str:
    if node.op == "output":
        vals = node.args[0]
        vals = vals if isinstance(vals, (tuple, list)) else (vals,)
        return "return (" + ", ".join(format_arg(v) for v in vals) + ")"
    ty = type_str(node.meta.get("val"))
    if node.op == "get_attr":
        return f"%{node.name} : {ty} = get_attr {node.target}"
    args = [format_arg(a) for a in node.args]
    args += [f"{k}={format_arg(v)}" for k, v in node.kwargs.items()]
    line = f"%{node.name} : {ty} = {op_name(node)}({', '.join(args)})"
    notes = []
    if with_source:
        src = node_source(node)
        if src:
            notes.append(src)
    if with_provenance:
        from optc.ir.provenance import describe
        prov = describe(node)
        if prov:
            notes.append(prov)
    if notes:
        line += "  # " + "; ".join(notes)
    return line


def format_text(program: Program | fx.GraphModule, *, with_source: bool = True, with_provenance: bool = False) -> str:
    gm = program.graph_module if isinstance(program, Program) else program
    nodes = list(gm.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    header = ", ".join(f"%{n.name} : {type_str(n.meta.get('val'))}" for n in inputs)
    lines = [f"graph({header}):"]
    for n in nodes:
        if n.op == "placeholder":
            continue
        lines.append("  " + format_node(n, with_source=with_source, with_provenance=with_provenance))
    return "\n".join(lines) + "\n"


def format_json(program: Program | fx.GraphModule) -> str:
    gm = program.graph_module if isinstance(program, Program) else program
    nodes = []
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        entry: dict[str, Any] = {"name": n.name, "op": n.op, "target": op_name(n) if n.op != "get_attr" else n.target}
        if isinstance(val, torch.Tensor):
            entry["shape"] = [_json_dim(d) for d in val.shape]
            entry["dtype"] = dtype_short(val.dtype)
        elif val is not None:
            entry["type"] = type_str(val)
        if n.op not in ("placeholder", "get_attr"):
            entry["args"] = [_json_arg(a) for a in n.args]
            if n.kwargs:
                entry["kwargs"] = {k: _json_arg(v) for k, v in n.kwargs.items()}
        src = node_source(n)
        if src:
            entry["source"] = src
        if n.meta.get("optc_origin"):
            entry["origin"] = list(n.meta["optc_origin"])
        if n.meta.get("optc_pass"):
            entry["pass"] = n.meta["optc_pass"]
        if n.meta.get("optc_rule"):
            entry["rule"] = n.meta["optc_rule"]
        nodes.append(entry)
    doc = {"name": program.name if isinstance(program, Program) else "graph", "nodes": nodes}
    return json.dumps(doc, indent=1) + "\n"


def _json_dim(d):
    try:
        return int(d)
    except Exception:
        return str(d)


def _json_arg(a):
    if isinstance(a, fx.Node):
        return {"node": a.name}
    if isinstance(a, (list, tuple)):
        return [_json_arg(x) for x in a]
    if isinstance(a, dict):
        return {str(k): _json_arg(v) for k, v in a.items()}
    if isinstance(a, (int, float, bool, str)) or a is None:
        if isinstance(a, float) and (math.isinf(a) or math.isnan(a)):
            return str(a)
        return a
    return format_arg(a)


def format_dot(program: Program | fx.GraphModule, *, show_attrs: bool = False) -> str:
    """Graphviz DOT. Parameters are hidden unless ``show_attrs`` (they dominate big models)."""
    gm = program.graph_module if isinstance(program, Program) else program
    lines = ["digraph optc {", "  rankdir=TB;", '  node [shape=box, fontname="monospace", fontsize=10];']
    shown = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr" and not show_attrs:
            continue
        shown.add(n.name)
        ty = type_str(n.meta.get("val")) if n.op != "output" else ""
        label = f"{n.name}\\n{op_name(n)}" + (f"\\n{ty}" if ty else "")
        shape = {"placeholder": "ellipse", "output": "ellipse", "get_attr": "note"}.get(n.op, "box")
        lines.append(f'  "{n.name}" [label="{label}", shape={shape}];')
    for n in gm.graph.nodes:
        if n.name not in shown:
            continue
        for inp in n.all_input_nodes:
            if inp.name in shown:
                lines.append(f'  "{inp.name}" -> "{n.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


FORMATS = {"text": format_text, "json": format_json, "dot": format_dot}
