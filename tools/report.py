"""``optc report``: one self-contained HTML page of a compiled model.

    optc report MODEL [--pipeline P] [--backend B] [--target T] --out report.html
    optc report MODEL ... --format model-explorer --out DIR

The page opens from disk with nothing fetched from the network: the graph, grouped by module
(``nn_module_stack``) into collapsible boxes, laid out by dagre (vendored:
``tools/report_assets/vendor``, MIT) and drawn as SVG; a search over node names, ops, modules and
source lines; the pipeline's history (what each pass changed, as a diff, and every refusal with
its reason); per-node overlays to switch between -- error against a float64 eager reference (as
``optc compare`` measures it), time per node from ONNX Runtime's profiler (``--backend onnx``),
quantization SQNR (quantizing pipelines), FLOPs and parameters; and, on a click, a node's
provenance: the user's source line, the pass and rule that created it, the captured nodes it
derives from and the backend ops it became.

Big graphs stay usable because only expanded modules are laid out: a module (or the root of a
graph with no module structure) with more than :data:`MAX_CHILDREN` members is split into
consecutive runs of :data:`CHUNK` nodes, each a box of its own.

``--format model-explorer`` writes Google Model Explorer's graph JSON and node-data JSON (one
file per overlay) into the folder ``--out`` instead (:mod:`optc.tools.model_explorer`).

Exit status: 0 when the report was written; 1 when optc failed; 2 on a usage error (a model that
cannot be loaded, an output folder that cannot be written).
"""

from __future__ import annotations

import difflib
import html
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from optc.errors import OptcError

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "report_assets")
DAGRE = os.path.join(ASSETS, "vendor", "dagre-3.1.4.min.js")
MAX_CHILDREN = 120     # a group with more members than this is split into runs of CHUNK
CHUNK = 100
DIFF_LINES = 400       # lines of a pass's diff kept in the page


# ---- the pipeline's history ------------------------------------------------------------------------------
class HistoryInstrument:
    """Records, for each pass, the unified diff of the graph text it caused (text made only for
    passes that changed the graph) and its refusals."""

    def __init__(self):
        self.entries: list[dict] = []
        self._text: str | None = None

    def start(self, program, passes) -> None:
        from optc.ir.printer import format_text
        if self._text is None:
            self._text = format_text(program, with_source=False)

    def after(self, record, before, after) -> None:
        from optc.ir.printer import format_text
        diff: list[str] = []
        if record.status == "ran" and record.modified:
            new = format_text(after, with_source=False)
            diff = list(difflib.unified_diff(self._text.splitlines(), new.splitlines(), "before", "after",
                                             lineterm="", n=1))[2:]
            self._text = new
        self.entries.append(_history_entry(record, diff))

    def failed(self, record, before, exc) -> None:
        self.entries.append(_history_entry(record, [], error=f"{type(exc).__name__}: {exc}"))


def _history_entry(record, diff: list[str], error: str | None = None) -> dict:
    return {"index": record.index, "pass": record.text, "status": record.status, "modified": record.modified,
            "time_ms": round(record.time_s * 1e3, 2), "nodes": [record.nodes_before, record.nodes_after],
            "stats": {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in record.stats.items()},
            "rejections": [list(r) for r in record.rejections],
            "diff": "\n".join(diff[:DIFF_LINES]), "diff_more": max(0, len(diff) - DIFF_LINES),
            "error": error}


# ---- the graph -------------------------------------------------------------------------------------------
def _stack(node: fx.Node) -> list[tuple[str, str]]:
    """``[(module path, class name), ...]`` from the root's child to the innermost module."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        if isinstance(path, str) and path:
            out.append((path, str(cls).rsplit(".", 1)[-1]))
    return out


def graph_data(program, *, backend_map: dict | None = None) -> dict:
    """Nodes, module groups and edges of ``program`` as the page reads them (compact arrays)."""
    from optc.ir.printer import op_name, type_str
    from optc.ir.provenance import origin
    from optc.ir.source import node_source
    gm = program.graph_module
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    groups: list[dict] = [{"id": "", "label": program.name, "cls": "", "parent": -1}]
    gindex: dict[str, int] = {"": 0}

    def group_of(stack: list[tuple[str, str]]) -> int:
        parent = 0
        for path, cls in stack:
            g = gindex.get(path)
            if g is None:
                g = gindex[path] = len(groups)
                label = path.rsplit(".", 1)[-1] if groups[parent]["id"] and path.startswith(groups[parent]["id"] + ".") \
                    else path
                groups.append({"id": path, "label": label, "cls": cls, "parent": parent})
            parent = g
        return parent

    node_group = [0] * len(nodes)
    for i, n in enumerate(nodes):
        if n.op not in ("get_attr", "placeholder", "output"):
            node_group[i] = group_of(_stack(n))
    for i, n in enumerate(nodes):   # a weight sits with its first user
        if n.op == "get_attr" and n.users:
            node_group[i] = node_group[index[min(n.users, key=lambda u: index[u])]]
    node_group = _chunk(groups, node_group, nodes)

    out_nodes = []
    bmap = backend_map or {}
    for i, n in enumerate(nodes):
        entry: dict[str, Any] = {"n": n.name, "op": op_name(n) if n.op != "get_attr" else "weight",
                                 "g": node_group[i], "in": [index[a] for a in n.all_input_nodes]}
        if n.op == "get_attr":
            entry["target"] = str(n.target)
        if n.op != "output":
            entry["t"] = type_str(n.meta.get("val"))
        src = node_source(n)
        if src:
            entry["src"] = src
        org = origin(n)
        if org and tuple(org) != (n.name,):
            entry["origin"] = list(org)
        for key, meta in (("pass", "optc_pass"), ("rule", "optc_rule"), ("value_of", "optc_value_of")):
            if n.meta.get(meta):
                entry[key] = str(n.meta[meta])
        if n.name in bmap:
            entry["be"] = list(bmap[n.name].get("nodes", []))
        out_nodes.append(entry)
    return {"nodes": out_nodes, "groups": groups}


def _chunk(groups: list[dict], node_group: list[int], nodes: list[fx.Node]) -> list[int]:
    """Split every group with more than MAX_CHILDREN members (nodes and child groups) into runs of
    CHUNK consecutive members, each a synthetic group."""
    members: dict[int, list[tuple[str, int]]] = {}
    seen_child: set[int] = set()
    for i, g in enumerate(node_group):   # members in order of first appearance
        chain = [g]
        while groups[chain[-1]]["parent"] >= 0:
            chain.append(groups[chain[-1]]["parent"])
        for child, parent in zip(chain, chain[1:]):
            if child not in seen_child:
                seen_child.add(child)
                members.setdefault(parent, []).append(("g", child))
        members.setdefault(g, []).append(("n", i))
    out = list(node_group)
    for g, items in list(members.items()):
        if len(items) <= MAX_CHILDREN:
            continue
        for start in range(0, len(items), CHUNK):
            part = items[start:start + CHUNK]
            c = len(groups)
            groups.append({"id": f"{groups[g]['id']}#{start // CHUNK}",
                           "label": f"{groups[g]['label'] or 'graph'} [{start + 1}-{start + len(part)}]",
                           "cls": "(run of nodes)", "parent": g, "chunk": True})
            for kind, k in part:
                if kind == "n":
                    out[k] = c
                else:
                    groups[k]["parent"] = c
    if any(len([1 for x in groups if x["parent"] == g]) > MAX_CHILDREN for g in range(len(groups))):
        return _chunk(groups, out, nodes)   # the runs themselves too many: one level more
    return out


# ---- overlays --------------------------------------------------------------------------------------------
@dataclass
class Overlay:
    key: str
    label: str
    unit: str
    agg: str                  # how a collapsed module shows its members: max, min or sum
    values: dict[str, float] = field(default_factory=dict)
    better: str = "low"       # which end of the colour scale is good
    note: str = ""

    def to_json(self, names: list[str]) -> dict:
        vals = [self.values.get(n) for n in names]
        vals = [None if v is None or (isinstance(v, float) and math.isnan(v)) else
                (v if math.isfinite(v) else (1e308 if v > 0 else -1e308)) for v in vals]
        return {"key": self.key, "label": self.label, "unit": self.unit, "agg": self.agg, "better": self.better,
                "note": self.note, "values": vals, "count": sum(v is not None for v in vals)}


def stats_overlays(program) -> list[Overlay]:
    from optc.ir.stats import model_stats
    stats = model_stats(program)
    flops = Overlay("flops", "FLOPs", "FLOP", "sum", better="low", note="2 x MACs of convolutions, linears, "
                                                                         "matmuls and attention (ir/stats.py)")
    params = Overlay("params", "parameters", "", "sum", note="elements of the nn.Parameter constants each layer "
                                                               "reads (a constant a pass rewrote is a weight, not a parameter)")
    weights = Overlay("weights", "weight bytes", "B", "sum", note="bytes of every constant each layer reads")
    for row in stats.rows:
        if row.node:
            if row.flops:
                flops.values[row.node] = float(row.flops)
            if row.params:
                params.values[row.node] = float(row.params)
            if row.weight_bytes:
                weights.values[row.node] = float(row.weight_bytes)
    return [o for o in (flops, params, weights) if o.values]


def error_overlay(captured, shown, flat_inputs) -> Overlay:
    from optc.tools.compare import node_errors
    errors, tols = node_errors(captured, shown, flat_inputs)
    bad = sum(1 for k, e in errors.items() if e > tols[k])
    return Overlay("error", "error vs float64 reference", "", "max", values=errors,
                   note=f"max |ref - got| / max |ref| per node against the captured graph run in float64 "
                        f"(optc compare); {bad} node(s) outside their dtype's tolerance")


#: who times a backend's kernels (``compiled.node_times``), and what a kernel is called there
_PROFILERS = {"onnx": ("ONNX Runtime profiler", "ONNX Runtime node", "nodes its fusions made"),
              "tvm": ("TVM VM instrument", "TVM kernel call", "layout conversions TVM added")}


def time_overlay(compiled, flat_inputs, runs: int = 10) -> Overlay:
    """Seconds per node from the backend's profiler (ONNX Runtime's; TVM's VM instrument),
    through the lowering's node map."""
    times = compiled.node_times(list(flat_inputs), runs=runs)
    owner: dict[str, str] = {}
    for name, entry in (compiled.backend_map or {}).items():
        for onnx_node in entry.get("nodes", []):
            owner.setdefault(onnx_node, name)
    values: dict[str, float] = {}
    missed: dict[str, float] = {}
    for onnx_node, t in times.items():
        # a node ONNX Runtime fused keeps the name of the node it fused into, with a suffix
        # ("node_MatMul_8/MatMulAddFusion")
        o = owner.get(onnx_node) or owner.get(onnx_node.split("/", 1)[0])
        if o is None:
            missed[onnx_node] = t
        else:
            values[o] = values.get(o, 0.0) + t
    total = sum(times.values()) or 1.0
    worst = ", ".join(n for n, _ in sorted(missed.items(), key=lambda x: -x[1])[:3])
    profiler, kernel, made = _PROFILERS.get(compiled.backend, _PROFILERS["onnx"])
    return Overlay("time", f"time ({profiler})", "s", "sum", values=values,
                   note=f"median of {runs} profiled runs of a separate profiling session; "
                        f"{sum(missed.values()) / total:.0%} of kernel time is in {len(missed)} {kernel}"
                        f"(s) the node map does not name ({made}{': ' + worst if worst else ''})")


# ---- the report ------------------------------------------------------------------------------------------
def build_report(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, *, pipeline: str = "default",
                 target: str = "cpu", backend: str | None = None, label: str = "", calibration_data=None,
                 with_error: bool = True, with_time: bool = True,
                 progress: Callable[[str], None] | None = None) -> "Report":
    """Everything the page shows (module docstring): ``Report.data`` is JSON-able, ``Report.program``
    the Program shown (after the pipeline, and the backend's stage when ``backend`` is given)."""
    import optc
    from optc.passes.manager import PassManager
    say = progress or (lambda msg: None)
    started = time.perf_counter()
    say("capture")
    captured = optc.capture(model, args, kwargs or None)
    history = HistoryInstrument()
    say("pipeline")
    extra = None
    if calibration_data is not None:
        from optc.ir.calibration import prepare_calibration_data
        extra = {"calibration_data": prepare_calibration_data(captured, calibration_data)}
    tgt = target
    if backend:   # the backend's own target: its default pipeline is what optc.compile runs
        from optc.backends.lowering import resolve, run_backend_stage
        tgt, be = resolve(target, backend, {})
    pm = PassManager(pipeline, target=tgt, instruments=[history], extra=extra)
    optimized, preport = pm.run(captured)
    shown, compiled, notes = optimized, None, []
    if backend:
        say(f"{backend} stage")
        shown, _ = run_backend_stage(optimized, be, tgt, first_index=len(preport.records) + 1,
                                     instruments=[history])
        say(f"{backend} lowering")
        try:
            compiled, _ = optc.compile(model, args, example_kwargs=kwargs or None, backend=backend, target=target,
                                       pipeline=pipeline, check=False, calibration_data=calibration_data)
        except OptcError as e:
            notes.append(f"{backend} did not lower: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}")
    flat = optimized.example_flat_inputs()
    overlays: list[Overlay] = []
    if with_error:
        say("errors against the float64 reference")
        overlays.append(error_overlay(captured, shown, flat))
    if with_time and compiled is not None and hasattr(compiled, "node_times"):
        say("profiling")
        overlays.append(time_overlay(compiled, flat))
    elif with_time and backend and compiled is not None:
        notes.append(f"no time overlay: the {backend} backend has no per-node profiler in optc")
    quantized = any("quantize" in str(n.target) for n in optimized.graph.nodes if n.op == "call_function")
    if quantized:
        overlays.append(_sqnr_overlay(captured, optimized, flat))
    overlays += stats_overlays(shown)
    data = graph_data(shown, backend_map=getattr(compiled, "backend_map", None))
    names = [n["n"] for n in data["nodes"]]
    data.update({
        "title": label or type(model).__name__,
        "pipeline": pipeline, "target": target, "backend": backend or "",
        "overlays": [o.to_json(names) for o in overlays],
        "history": history.entries,
        "notes": notes,
        "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "build_s": round(time.perf_counter() - started, 2),
        "optc_version": optc.__version__,
    })
    return Report(data, shown, overlays)


@dataclass
class Report:
    data: dict
    program: Any
    overlays: list


def _sqnr_overlay(captured, optimized, flat) -> Overlay:
    """SQNR of each fake-quantized activation against the captured program (``optc compare``'s)."""
    from optc.tools.compare import layer_sqnr
    values = {r.node: float(r.sqnr_db) for r in layer_sqnr(captured, optimized, [flat])}
    return Overlay("sqnr", "quantization SQNR", "dB", "min", values=values, better="high",
                   note="signal-to-quantization-noise ratio of each quantized layer's output against the float "
                        "program (as ONNX Runtime's qdq_loss_debug computes it)")


def render_html(data: dict) -> str:
    """The self-contained page: template + styles + vendored dagre + the viewer + the data."""
    def read(name):
        with open(os.path.join(ASSETS, name), encoding="utf-8") as f:
            return f.read()
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False)
    payload = payload.replace("<", "\\u003c")   # no "</script>" or "<!--" can end the data block
    page = read("report.html")
    for key, value in (("/*STYLE*/", read("report.css")), ("/*DAGRE*/", read(os.path.join("vendor", "dagre-3.1.4.min.js"))),
                       ("/*VIEWER*/", read("report.js")), ("/*DATA*/", payload),
                       ("{{TITLE}}", html.escape(f"optc report: {data.get('title', '')}"))):
        page = page.replace(key, value, 1)
    return page


def write_report(path: str, page: str) -> None:
    """``page`` at ``path``, complete or absent."""
    from optc.ir.parser import write_atomic
    write_atomic(path, lambda f: f.write(page.encode("utf-8")), what="--out")


# ---- the command -----------------------------------------------------------------------------------------
def add_report_parser(sub) -> None:
    from optc.tools.compare import add_debug_command
    p = add_debug_command(sub, "report", "write a self-contained HTML report of a model's graph, pipeline and "
                                      "overlays (or Model Explorer JSON)", __doc__)
    p.add_argument("--backend", default=None, metavar="B",
                   help="also run backend B's stage (the graph shown is what B lowers) and lower it: its node map "
                        "in the provenance, and per-node time for onnx")
    p.add_argument("--format", choices=("html", "model-explorer"), default="html",
                   help="html: one page (default); model-explorer: graph.json and <overlay>.nodedata.json in --out")
    p.add_argument("--out", required=True, metavar="PATH", help="the HTML file, or the folder for model-explorer")
    p.add_argument("--no-error", action="store_true", help="skip the float64 reference run (no error overlay)")
    p.add_argument("--no-time", action="store_true", help="skip the profiled runs (no time overlay)")
    p.add_argument("--calibration-data", metavar="FILE", default=None,
                   help="calibration inputs for insert-qdq (a .pt file, as for optc compile)")
    p.set_defaults(func=cmd_report)


def _check_out(path: str, fmt: str) -> None:
    from optc.tools.compare import check_writable
    if fmt == "html":
        if os.path.isdir(path):
            raise OptcError(f"--out '{path}' is a folder; give the HTML file to write")
        check_writable(path, "--out")
        return
    d = os.path.abspath(path)
    if os.path.exists(d) and not os.path.isdir(d):
        raise OptcError(f"--out '{path}' exists and is not a folder")
    check_writable(os.path.join(d, "graph.json") if os.path.isdir(d) else d, "--out")


def cmd_report(args) -> int:
    from optc.passes.manager import PassManager
    from optc.tools.cli import load_calibration_data
    from optc.tools.models import load_model, parse_config
    PassManager(args.pipeline, target=args.target)        # a malformed pipeline fails before the load
    _check_out(args.out, args.format)
    loaded = load_model(args.model, inputs=args.input, config=parse_config(args.config), tiny=args.tiny,
                        batch=args.batch)
    progress = (lambda msg: print(f"optc: {msg}...", file=sys.stderr, flush=True)) if sys.stderr.isatty() else None
    report = build_report(loaded.model, loaded.args, loaded.kwargs, pipeline=args.pipeline, target=args.target,
                        backend=args.backend, label=loaded.label, with_error=not args.no_error,
                        with_time=not args.no_time,
                        calibration_data=load_calibration_data(args.calibration_data, loaded.args),
                        progress=progress)
    data = report.data
    if args.format == "model-explorer":
        from optc.tools.model_explorer import write_model_explorer
        os.makedirs(args.out, exist_ok=True)
        written = write_model_explorer(report.program, args.out, overlays={o.key: o.values for o in report.overlays},
                                       label=loaded.label, defaults=False)
        print(f"wrote {', '.join(written)}")
        return 0
    write_report(args.out, render_html(data))
    n = len(data["nodes"])
    print(f"wrote {args.out}: {n} nodes in {len(data['groups'])} groups, {len(data['history'])} passes, overlays: "
          f"{', '.join(o['key'] for o in data['overlays'])} ({os.path.getsize(args.out) / 2**20:.1f} MiB)")
    return 0

