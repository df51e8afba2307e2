"""``optc compare``: the optimized Program and each backend against a float64 reference, and the
first node where the numbers go wrong.

    optc compare MODEL [--pipeline P] [--backend B ...] [--atol A] [--rtol R] [--no-locate] [--json OUT]

What runs, on the model's example inputs:

- **the reference**: the user's model in float64 (a deep copy: the model is not touched), its
  floating inputs in float64; where the model cannot run in float64, in its own dtypes (said so);
- **the optimized Program** (capture, then the pipeline) and **each backend** (``optc.compile``
  with the same pipeline, without its own check).

Per output: max abs error, max error relative to the output scale (``max |y - ref| / max |ref|``),
cosine similarity, SQNR in dB, and pass/fail. The tolerance is on the relative error and defaults
from the dtype the program computes in (``backends/check.py``: 1e-4 for float32, 1e-2 for
float16, 6e-2 for bfloat16, 0.1 with a cosine >= 0.995 for quantized programs); ``--rtol``
replaces it, ``--atol`` adds an absolute bound (an output passes when ``max_abs <= atol`` or the
relative error is within ``rtol``).

**Locating the first divergence** (``--locate``, on by default when something fails): every node
of the optimized Program is compared with the same node of the captured Program run in float64
(nodes are matched by name: passes keep the names of the nodes they keep; a node a pass created,
such as a fused op, is matched through provenance with the captured node whose value it computes
-- ``optc_value_of``, ``ir/provenance.py`` -- or, where it computes none alone, through its
users). The **first divergence** is the earliest node,
in topological order, whose value is outside the tolerance of its dtype while all of its inputs
are inside; the next ones are ranked by how much error each adds (its error minus its inputs').
Each is reported with its op, the pass that created it (if one did), the user's source line and
its inputs' errors. The values come from a separate interpreted run of the two Programs; the
artifacts the user runs are not changed.

**In a backend** (ONNX, TorchScript, TVM): a backend candidate that fails (every one, with
``--locate``) is located too, against the staged Program it was lowered from, run by optc's
reference kernels: the lowering's node map (``backend_map``: each optc node's backend nodes and
result value -- ONNX from the exporter's node metadata and torch.export's ``from_node``,
TorchScript from the FX code lines it records, TVM from the importer's fx node -> Relax variable
table and ``from_node``) names the backend value of each node, and a separate instrumented run
gives them (ONNX: a session of a copy of the model with those values as extra outputs;
TorchScript: a copy of the frozen graph returning them; TVM: a separate build of the imported
Relax module whose ``main`` returns them). The first node whose backend value is outside
tolerance while its inputs' are inside is reported with its backend nodes (TVM: the kernel calls
of the library that compute it).

**SQNR per quantized activation** (when the pipeline quantizes: ``insert-qdq``): every activation
the quantized Program fake-quantizes (the float value ``x`` of each ``Q -> DQ`` pair: the graph
input, each conv's output or its fused ReLU, integer adds, pass-through ops, the value a linear
reads) is compared with the same value of the float Program that ``insert-qdq`` ran on, as ONNX
Runtime's ``qdq_loss_debug`` compares the float model's tensor ``x`` with the QDQ model's
``x_DequantizeLinear_Output``: ``20 log10(max(|x|, eps) / max(|x - DQ(Q(x))|, eps))`` with the
norms taken over all samples at once (its ``compute_signal_to_quantization_noice_ratio``), on the
calibration data (else the example inputs). Listed lowest SQNR first, each with the conv / linear
/ matmul that computes it.

Exit status: 0 when every candidate is within tolerance, 1 when one is not (or a backend fails to
lower: the row says why), 2 for a usage error.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from optc.errors import OptcError

__all__ = ["OutputDiff", "Candidate", "Divergence", "CompareResult", "LayerSQNR", "compare", "locate", "locate_backend",
           "layer_sqnr", "quantized_activations", "qdq_sqnr_db"]


@dataclass
class OutputDiff:
    index: int
    max_abs: float
    max_rel: float
    cosine: float
    sqnr_db: float
    tolerance: float
    ok: bool
    detail: str = ""


@dataclass
class Candidate:
    name: str                       # "program" or a backend name
    outputs: list[OutputDiff] = field(default_factory=list)
    error: str | None = None        # it could not be built or run

    @property
    def ok(self) -> bool:
        return self.error is None and all(o.ok for o in self.outputs)


@dataclass
class Divergence:
    node: str
    op: str
    source: str | None
    created_by: str | None          # the pass that created the node (None: the model's own node)
    error: float                    # relative to the reference value's scale
    tolerance: float
    inputs: list[tuple[str, float]]  # (input node, its error)
    added: float                    # error - max(input errors)
    backend_nodes: list[str] = field(default_factory=list)   # a backend's ops for this node (backend locate)


@dataclass
class LayerSQNR:
    """One fake-quantized activation of a quantized Program against the float Program."""
    node: str                       # the float value quantized (qdq_loss_debug's tensor name)
    op: str
    source: str | None
    sqnr_db: float                  # qdq_loss_debug's SQNR of its dequantized value, dB
    layer: str | None = None        # the conv / linear / matmul whose output it is (through a ReLU / clamp)
    module: str = ""                # the module path of the node ("" when unknown)

    # read as the tuple ``(node, op, source, sqnr_db)`` too
    def __iter__(self):
        return iter((self.node, self.op, self.source, self.sqnr_db))

    def __getitem__(self, i):
        return (self.node, self.op, self.source, self.sqnr_db)[i]

    def __len__(self) -> int:
        return 4


@dataclass
class CompareResult:
    model: str
    pipeline: str
    reference: str                  # "float64 eager" or why not
    candidates: list[Candidate]
    divergences: list[Divergence] = field(default_factory=list)
    located: bool = False
    #: backend -> its first divergences from the optimized Program, node by node (a separate
    #: instrumented run of its artifact; backends with a node map: onnx, torchscript, tvm)
    backend_divergences: dict = field(default_factory=dict)
    #: quantized programs: each fake-quantized activation's SQNR against the float program, worst first
    sqnr: list[LayerSQNR] = field(default_factory=list)
    sqnr_samples: int = 0
    top: int = 5                    # rows of ``sqnr`` that format() prints

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.candidates)

    def to_json(self) -> dict:
        return {"model": self.model, "pipeline": self.pipeline, "reference": self.reference, "ok": self.ok,
                "candidates": [{"name": c.name, "ok": c.ok, "error": c.error,
                                "outputs": [_finite(asdict(o)) for o in c.outputs]} for c in self.candidates],
                "located": self.located,
                "first_divergence": _finite(asdict(self.divergences[0])) if self.divergences else None,
                "divergences": [_finite(asdict(d)) for d in self.divergences],
                "backend_divergences": {b: [_finite(asdict(d)) for d in ds] for b, ds in self.backend_divergences.items()},
                "sqnr": [_finite(asdict(s)) for s in self.sqnr], "sqnr_samples": self.sqnr_samples}

    def format(self) -> str:
        lines = [f"reference: {self.reference}; pipeline: {self.pipeline}",
                 f"{'candidate':<14}{'out':>4}  {'max abs':>10}  {'max rel':>10}  {'cosine':>9}  {'SQNR dB':>8}  "
                 f"{'tolerance':>9}  result"]
        for c in self.candidates:
            if c.error is not None:
                lines.append(f"{c.name:<14}{'':>4}  FAILED: {c.error}")
                continue
            for o in c.outputs:
                lines.append(f"{c.name:<14}{o.index:>4}  {o.max_abs:>10.3g}  {o.max_rel:>10.3g}  {o.cosine:>9.6f}  "
                             f"{o.sqnr_db:>8.1f}  {o.tolerance:>9.1g}  {'ok' if o.ok else 'MISMATCH'}"
                             + (f" ({o.detail})" if o.detail else ""))
        if self.located:
            if not self.divergences:
                lines.append("no node of the optimized Program diverges from the reference")
            for i, d in enumerate(self.divergences):
                head = "first divergence" if i == 0 else f"divergence {i + 1}"
                ins = ", ".join(f"%{n} {e:.2g}" for n, e in d.inputs) or "none compared"
                lines.append(f"{head}: %{d.node} ({d.op}) at {d.source or 'unknown source'}"
                             f"{', created by ' + d.created_by if d.created_by else ''}: error {d.error:.3g} "
                             f"(tolerance {d.tolerance:.1g}); inputs: {ins}")
        for b, ds in self.backend_divergences.items():
            if not ds:
                lines.append(f"{b}: no mapped value diverges from the optimized Program")
            for i, d in enumerate(ds):
                head = f"{b}: first divergence" if i == 0 else f"{b}: divergence {i + 1}"
                ins = ", ".join(f"%{n} {e:.2g}" for n, e in d.inputs) or "none compared"
                lines.append(f"{head}: %{d.node} ({d.op}) at {d.source or 'unknown source'}"
                             f"{', created by ' + d.created_by if d.created_by else ''}"
                             f"{' -> ' + ', '.join(d.backend_nodes) if d.backend_nodes else ''}: "
                             f"error {d.error:.3g} (tolerance {d.tolerance:.1g}); inputs: {ins}")
        if self.sqnr:
            lines.append(f"SQNR per quantized activation, worst {min(self.top, len(self.sqnr))} of {len(self.sqnr)} "
                         f"(qdq_loss_debug's definition, {self.sqnr_samples} sample"
                         f"{'s' if self.sqnr_samples != 1 else ''}):")
            for s in self.sqnr[:self.top]:
                layer = f", output of %{s.layer}" if s.layer and s.layer != s.node else ""
                lines.append(f"  {s.sqnr_db:7.2f} dB  %{s.node} ({s.op}{layer}) {s.module or '-'} "
                             f"at {s.source or 'unknown source'}")
        return "\n".join(lines)


def _finite(d: dict) -> dict:
    """JSON has no inf/NaN: written as strings."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


# ---- measuring -----------------------------------------------------------------------------------------
def _diff(index: int, ref: Any, got: Any, tolerance: float, atol: float | None, quantized: bool) -> OutputDiff:
    from optc.backends.check import QUANTIZED_MIN_COSINE, compare_output
    if not isinstance(ref, torch.Tensor):
        same = ref == got
        return OutputDiff(index, 0.0 if same else math.inf, 0.0 if same else math.inf, 1.0, math.inf, tolerance,
                          bool(same), "" if same else f"{got!r} != {ref!r}")
    if isinstance(got, torch.Tensor) and ref.is_floating_point() and got.is_floating_point():
        got = got.to(ref.dtype)
    rel, cos, _, detail = compare_output(ref, got, tolerance, quantized=quantized)
    max_abs, sqnr = math.inf, -math.inf
    if isinstance(got, torch.Tensor) and got.shape == ref.shape and ref.is_floating_point():
        r, g = ref.double(), got.double()
        fin = torch.isfinite(r) & torch.isfinite(g)
        d = (r - g)[fin]
        max_abs = float(d.abs().max()) if d.numel() else 0.0
        if not bool(fin.all()) and bool((torch.isfinite(r) & ~torch.isfinite(g)).any()):
            max_abs = math.inf
        noise = float((d ** 2).sum())
        signal = float((r[fin] ** 2).sum())
        sqnr = math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf
        if max_abs == math.inf:
            sqnr = -math.inf
    elif isinstance(got, torch.Tensor) and got.shape == ref.shape:
        max_abs = float((ref != got).sum())
        sqnr = math.inf if max_abs == 0 else -math.inf
    ok = rel <= tolerance or (atol is not None and max_abs <= atol)
    if quantized and cos < QUANTIZED_MIN_COSINE:
        ok = False
    return OutputDiff(index, max_abs, rel, cos, sqnr, tolerance, ok, detail)


def _flat(out: Any) -> list:
    return list(pytree.tree_leaves(out))


def _to64(x: Any) -> Any:
    return pytree.tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, x)


def _reference(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[list, str]:
    try:
        m64 = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            return _flat(m64(*_to64(args), **_to64(kwargs))), "float64 eager (a copy of the model)"
    except Exception as e:  # noqa: BLE001 - some models cannot run in float64: their own dtypes then
        with torch.no_grad():
            return _flat(model(*args, **kwargs)), f"eager in the model's dtypes (float64 failed: {type(e).__name__})"


def _candidate(name: str, run, args, kwargs, ref: list, program, rtol: float | None, atol: float | None) -> Candidate:
    from optc.backends.check import _quantized, tolerance_for
    cand = Candidate(name)
    try:
        with torch.no_grad():
            got = _flat(run(*args, **kwargs))
    except Exception as e:  # noqa: BLE001 - a candidate that cannot run is a row, not a crash
        cand.error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        return cand
    if len(got) != len(ref):
        cand.error = f"{len(got)} outputs, the reference has {len(ref)}"
        return cand
    quantized = _quantized(program)
    for i, (r, g) in enumerate(zip(ref, got)):
        dtype = g.dtype if isinstance(g, torch.Tensor) else torch.float32
        tol = rtol if rtol is not None else tolerance_for(program, dtype)
        cand.outputs.append(_diff(i, r, g, tol, atol, quantized))
    return cand


# ---- locating ------------------------------------------------------------------------------------------
class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach()
        return out


def _record(gm: fx.GraphModule, flat_inputs: list) -> dict[str, Any]:
    rec = _Recorder(gm)
    with torch.no_grad():
        rec.run(*flat_inputs)
    return rec.values


def _node_error(ref: torch.Tensor, got: torch.Tensor) -> float | None:
    """Max error relative to the reference value's scale; None where the two are not comparable."""
    if ref.shape != got.shape or not ref.is_floating_point() or not got.is_floating_point():
        return None
    r, g = ref.double(), got.double()
    nan_r = torch.isnan(r)
    if bool((torch.isnan(g) & ~nan_r).any()) or bool((torch.isinf(g) & torch.isfinite(r)).any()):
        return math.inf
    fin = torch.isfinite(r)
    if not bool(fin.any()):
        return 0.0
    scale = float(r[fin].abs().max()) or 1.0
    return float((r - g)[fin].abs().max()) / scale


def locate(captured, optimized, flat_inputs: list, *, rtol: float | None = None, top: int = 5) -> list[Divergence]:
    """The divergences of ``optimized`` from ``captured`` run in float64 (module docstring)."""
    errors, tols = node_errors(captured, optimized, flat_inputs, rtol=rtol)
    return _rank([n for n in optimized.graph.nodes if n.op == "call_function"], errors, tols, top)


def node_errors(captured, optimized, flat_inputs: list, *, rtol: float | None = None
                ) -> tuple[dict[str, float], dict[str, float]]:
    """Every compared node of ``optimized``: its relative error against ``captured`` run in float64,
    and its tolerance (both keyed by the optimized node's name)."""
    from optc.backends.check import TOLERANCE
    gm64 = copy.deepcopy(captured.graph_module)
    for name, t in list(gm64.state_dict(keep_vars=True).items()):
        if t.is_floating_point():
            *path, leaf = name.split(".")
            owner = gm64.get_submodule(".".join(path)) if path else gm64
            new = t.detach().double()
            if isinstance(getattr(owner, leaf), torch.nn.Parameter):
                setattr(owner, leaf, torch.nn.Parameter(new, requires_grad=False))
            else:
                setattr(owner, leaf, new)
    for attr in [n.target for n in gm64.graph.nodes if n.op == "get_attr"]:
        obj = gm64
        *path, leaf = attr.split(".")
        for p in path:
            obj = getattr(obj, p)
        v = getattr(obj, leaf, None)
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != torch.float64:
            setattr(obj, leaf, v.detach().double())
    try:
        ref = _record(gm64, [_to64(t) for t in flat_inputs])
    except Exception:  # noqa: BLE001 - a graph with explicit float32 casts that float64 breaks: float32
        ref = _record(captured.graph_module, flat_inputs)
    got = _record(optimized.graph_module, flat_inputs)

    errors: dict[str, float] = {}
    tols: dict[str, float] = {}
    nodes = [n for n in optimized.graph.nodes if n.op == "call_function"]
    for n in nodes:
        # a node a pass created is compared with the captured node whose value it computes
        # (provenance: optc_value_of); a node no pass touched, with itself
        key = n.meta.get("optc_value_of", n.name)
        if key in ref and n.name in got:
            e = _node_error(ref[key], got[n.name])
            if e is not None:
                errors[n.name] = e
                tols[n.name] = rtol if rtol is not None else TOLERANCE.get(got[n.name].dtype, 1e-4)
    return errors, tols


def _rank(nodes: list[fx.Node], errors: dict[str, float], tols: dict[str, float], top: int,
          backend_nodes: dict[str, list[str]] | None = None) -> list[Divergence]:
    """The first divergence (earliest node outside its tolerance with every compared input inside)
    and the next ones by the error each adds."""
    from optc.ir.source import node_source

    def input_errors(n: fx.Node, depth: int = 0) -> list[tuple[str, float]]:
        out = []
        for a in n.all_input_nodes:
            if a.name in errors:
                out.append((a.name, errors[a.name]))
            elif depth < 4 and a.op == "call_function":
                out.extend(input_errors(a, depth + 1))
        return out

    divs = []
    for n in nodes:
        e = errors.get(n.name)
        if e is None or e <= tols[n.name]:
            continue
        ins = input_errors(n)
        worst_in = max((x for _, x in ins), default=0.0)
        if any(x > tols.get(name, 1e-4) for name, x in ins):
            added = e - worst_in if math.isfinite(e) and math.isfinite(worst_in) else (0.0 if e == worst_in else e)
            divs.append((False, n, e, ins, added))
        else:
            divs.append((True, n, e, ins, e - worst_in if math.isfinite(e) else math.inf))
    first = [d for d in divs if d[0]]
    # the others, by the error each adds; a node that only carries its inputs' error adds none
    rest = sorted((d for d in divs if d is not (first[0] if first else None) and d[4] > tols[d[1].name]),
                  key=lambda d: -d[4])
    ordered = (first[:1] + rest)[:top]

    def op_name(n: fx.Node) -> str:
        t = n.target
        return f"{t.namespace}.{t._opname}" if isinstance(t, torch._ops.OpOverload) else str(t)

    return [Divergence(n.name, op_name(n), node_source(n), n.meta.get("optc_pass"), e, tols[n.name], ins, added,
                       list((backend_nodes or {}).get(n.name, [])))
            for _, n, e, ins, added in ordered]


def locate_backend(compiled, staged, flat_inputs: list, *, rtol: float | None = None, top: int = 5) -> list[Divergence]:
    """The divergences of a backend's intermediate values from the staged Program it was lowered
    from (run by optc's reference kernels in the same dtype), node by node through the backend's
    node map (``compiled.backend_map``); the values come from ``compiled.intermediate_values``, a
    separate instrumented run -- the artifact the user runs is not changed."""
    from optc.backends.check import TOLERANCE
    bmap = compiled.backend_map or {}
    want = {name: entry["value"] for name, entry in bmap.items() if entry.get("value")}
    got_backend = compiled.intermediate_values(list(flat_inputs), list(want.values()))
    ref = _record(staged.graph_module, flat_inputs)
    errors: dict[str, float] = {}
    tols: dict[str, float] = {}
    nodes = [n for n in staged.graph.nodes if n.op == "call_function"]
    for n in nodes:
        v = want.get(n.name)
        if v is None or v not in got_backend or n.name not in ref:
            continue
        r, g = ref[n.name], got_backend[v]
        if r.shape != g.shape and r.numel() == g.numel():
            g = g.reshape(r.shape)
        e = _node_error(r, g.to(r.dtype) if g.is_floating_point() and r.is_floating_point() else g)
        if e is not None:
            errors[n.name] = e
            tols[n.name] = rtol if rtol is not None else TOLERANCE.get(r.dtype, 1e-4)
    return _rank(nodes, errors, tols, top, {k: v["nodes"] for k, v in bmap.items()})


# ---- quantized programs: SQNR per fake-quantized activation -----------------------------------------
#: numpy.finfo(float).eps: qdq_loss_debug's floor on both norms
_SQNR_EPS = 2.220446049250313e-16


def qdq_sqnr_db(signal: float, noise: float) -> float:
    """ONNX Runtime's ``qdq_loss_debug.compute_signal_to_quantization_noice_ratio`` from the sums of
    squares of the float tensor (``signal``) and of its error (``noise``) over every sample:
    ``20 log10(max(sqrt(signal), eps) / max(sqrt(noise), eps))`` -- finite where the error is 0."""
    return 20 * math.log10(max(math.sqrt(signal), _SQNR_EPS) / max(math.sqrt(noise), _SQNR_EPS))


def quantized_activations(program) -> list[tuple[fx.Node, fx.Node]]:
    """``(x, DQ(Q(x)))`` for every activation ``x`` of ``program`` quantized by a per-tensor
    quantize-dequantize pair (constants -- weights, biases -- are left out)."""
    optc_ops = torch.ops.optc
    pairs = []
    for q in program.graph.nodes:
        if q.op != "call_function" or q.target is not optc_ops.quantize_per_tensor.default:
            continue
        x = q.args[0]
        if not isinstance(x, fx.Node) or x.op == "get_attr":
            continue
        dq = next((u for u in q.users if u.target is optc_ops.dequantize_per_tensor.default), None)
        if dq is not None:
            pairs.append((x, dq))
    return pairs


def _producing_layer(x: fx.Node) -> str | None:
    """The conv / linear / matmul whose output ``x`` is, directly or through its fused ReLU / clamp."""
    from optc.passes.insert_qdq.sites import _CONVS, _MATMULS
    aten = torch.ops.aten
    layers = (*_CONVS, *_MATMULS, aten.linear.default)
    if x.op == "call_function" and x.target in (aten.relu.default, aten.relu6.default, aten.hardtanh.default,
                                                aten.clamp.default) and isinstance(x.args[0], fx.Node):
        x = x.args[0] if x.args[0].op == "call_function" and x.args[0].target in layers else x
    return x.name if x.op == "call_function" and x.target in layers else None


def layer_sqnr(float_program, quant_program, samples: Sequence[Sequence[torch.Tensor]]) -> list[LayerSQNR]:
    """SQNR (dB) of every fake-quantized activation of ``quant_program`` -- its dequantized value
    against the same value of ``float_program`` (the program ``insert-qdq`` ran on, or the captured
    one; matched through provenance -- the captured node whose value each computes -- and by name)
    -- over ``samples`` (each a flat list of graph inputs, as
    ``Program.example_flat_inputs()``), as ONNX Runtime's ``qdq_loss_debug`` computes it
    (:func:`qdq_sqnr_db`); lowest SQNR first. Values of the float program are those of a separate
    run; neither program is changed."""
    from optc.ir.calibration import probe_module
    from optc.ir.queries import module_path
    from optc.ir.source import node_source

    def value_of(n: fx.Node) -> str:          # the captured node whose value ``n`` computes
        return n.meta.get("optc_value_of", n.name)

    by_name = {n.name: n for n in float_program.graph.nodes}
    by_value: dict[str, fx.Node] = {}
    for n in float_program.graph.nodes:
        if value_of(n) not in by_value or n.name == value_of(n):
            by_value[value_of(n)] = n
    rows = []
    for x, dq in quantized_activations(quant_program):
        ref = by_name.get(x.name)
        if ref is None or value_of(ref) != value_of(x):
            ref = by_value.get(value_of(x))
        if ref is not None and ref.op not in ("get_attr", "output"):
            rows.append((x, dq, ref))
    if not rows or not samples:
        return []
    ref_probe = probe_module(float_program.graph_module, [r for _, _, r in rows])
    q_probe = probe_module(quant_program.graph_module, [dq for _, dq, _ in rows])
    energy = [[0.0, 0.0] for _ in rows]
    with torch.no_grad():
        for flat in samples:
            for e, r, g in zip(energy, ref_probe(*flat), q_probe(*flat)):
                r = r.detach().double()
                e[0] += float(r.pow(2).sum())
                e[1] += float((r - g.detach().double()).pow(2).sum())
    out = []
    for (x, _, _), (signal, noise) in zip(rows, energy):
        t = x.target
        op = f"{t.namespace}.{t._opname}" if isinstance(t, torch._ops.OpOverload) else \
            str(t) if x.op == "call_function" else x.op
        path = module_path(x)
        out.append(LayerSQNR(x.name, op, node_source(x), qdq_sqnr_db(signal, noise), _producing_layer(x),
                             "" if path is None else str(path)))
    return sorted(out, key=lambda s: s.sqnr_db)


def _optimize(captured, pipeline: str, target: str, calibration_data):
    """``optc.optimize``, also returning the Program ``insert-qdq`` ran on (None: it did not run)."""
    from optc.ir.calibration import prepare_calibration_data
    from optc.passes.manager import Instrument, PassManager
    from optc.target import resolve_target
    if calibration_data is not None:
        calibration_data = prepare_calibration_data(captured, calibration_data)

    class KeepFloatProgram(Instrument):
        """Keeps the Program the first ``insert-qdq`` ran on (the manager's snapshot before it)."""
        program = None

        def after(self, record, before, after):
            if record.name == "insert-qdq" and record.modified and self.program is None:
                self.program = before

    keep = KeepFloatProgram()
    pm = PassManager(pipeline, target=resolve_target(target), instruments=[keep],
                     extra={"calibration_data": calibration_data} if calibration_data is not None else None)
    optimized, _ = pm.run(captured)
    return optimized, keep.program


# ---- the command's work ----------------------------------------------------------------------------------
def compare(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, *, pipeline: str = "default",
            backends: Sequence[str] = (), target: str = "cpu", rtol: float | None = None, atol: float | None = None,
            locate_divergence: bool | None = None, top: int = 5, label: str = "", calibration_data=None,
            progress=None) -> CompareResult:
    """Compare the optimized Program and each backend with the float64 reference (module doc).
    ``locate_divergence`` None: locate when something fails."""
    import optc
    say = progress or (lambda msg: None)
    kwargs = dict(kwargs or {})
    say("reference")
    ref, ref_note = _reference(model, args, kwargs)
    say("capture and pipeline")
    captured = optc.capture(model, args, kwargs or None)
    if calibration_data is not None:     # validated, and a generator read once: the pipeline, backends, SQNR
        from optc.ir.calibration import prepare_calibration_data
        calibration_data = prepare_calibration_data(captured, calibration_data)
    optimized, float_program = _optimize(captured, pipeline, target, calibration_data)
    cands = [_candidate("program", optimized, args, kwargs, ref, optimized, rtol, atol)]
    compiled_models = {}
    for b in backends:
        say(f"backend {b}")
        try:
            compiled, _ = optc.compile(model, args, example_kwargs=kwargs or None, backend=b, target=target,
                                       pipeline=pipeline, check=False, calibration_data=calibration_data)
        except OptcError as e:
            cands.append(Candidate(b, error=f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"))
            continue
        cands.append(_candidate(b, compiled, args, kwargs, ref, optimized, rtol, atol))
        compiled_models[b] = compiled
    result = CompareResult(label or type(model).__name__, pipeline, ref_note, cands, top=top)
    if float_program is not None:
        say("SQNR per quantized activation")
        from optc.ir.calibration import calibration_samples
        samples = calibration_samples(captured, calibration_data, samples=1, pass_name="compare") \
            if calibration_data is not None else [optimized.example_flat_inputs()]
        result.sqnr = layer_sqnr(float_program, optimized, samples)
        result.sqnr_samples = len(samples)
    if locate_divergence or (locate_divergence is None and not result.ok):
        say("locating the first divergence")
        result.divergences = locate(captured, optimized, optimized.example_flat_inputs(), rtol=rtol, top=top)
        result.located = True
        from optc.backends.lowering import resolve, run_backend_stage
        for c in cands[1:]:
            compiled = compiled_models.get(c.name)
            if compiled is None or getattr(compiled, "backend_map", None) is None or (c.ok and not locate_divergence):
                continue
            say(f"locating the first divergence in {c.name}")
            # the program the backend lowered: the pipeline for the backend's own target (its default
            # pipeline may differ from the plain target's), then its stage -- the node names the
            # backend's node map uses
            tgt, be = resolve(target, c.name, {})
            backend_optimized, _ = _optimize(captured, pipeline, tgt, calibration_data)
            staged, _ = run_backend_stage(backend_optimized, be, tgt)
            result.backend_divergences[c.name] = locate_backend(compiled, staged, optimized.example_flat_inputs(),
                                                                rtol=rtol, top=top)
    return result


def check_writable(path: str | None, flag: str = "--json") -> None:
    """A usage error now, before the (slow) work, if ``path``'s folder cannot be written."""
    if path:
        d = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(d) or not os.access(d, os.W_OK):
            raise OptcError(f"{flag} '{path}': folder '{d}' does not exist or is not writable")


def write_json(path: str, data: dict) -> None:
    """``data`` as JSON at ``path``, complete or absent (written to ``path.tmp``, then renamed)."""
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def add_debug_command(sub, name: str, help: str, doc: str):
    """The part ``optc compare``, ``bisect``, ``reduce`` and ``report`` share: the subcommand (its
    description the module ``doc`` between the first paragraph and "Exit status"), MODEL and its
    input options, ``--pipeline``, ``--target`` and ``-v``. Returns the parser for the rest."""
    import argparse
    from optc.tools.bench import add_model_arguments
    p = sub.add_parser(name, help=help, description=doc.split("\n\n", 1)[1].rsplit("\n\nExit status", 1)[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--pipeline", default="default", metavar="P", help="pipeline (default: the target's)")
    p.add_argument("--target", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and tracebacks")
    return p


def add_compare_parser(sub) -> None:
    p = add_debug_command(sub, "compare", "compare the optimized program and backends with a float64 reference; "
                                       "locate the first diverging node", __doc__)
    p.add_argument("--backend", action="append", default=[], metavar="B",
                   help="also compile and compare with backend B (repeatable: onnx, torchscript, tvm)")
    p.add_argument("--rtol", type=float, default=None,
                   help="tolerance on the error relative to the output scale (default: from the dtype)")
    p.add_argument("--atol", type=float, default=None, help="also pass outputs whose max abs error is within this")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--locate", dest="locate", action="store_true", default=None,
                   help="locate the first diverging node even when everything passes")
    g.add_argument("--no-locate", dest="locate", action="store_false", help="do not locate")
    p.add_argument("--top", type=int, default=5, help="divergences listed (default 5)")
    p.add_argument("--calibration-data", metavar="FILE", default=None,
                   help="calibration inputs for insert-qdq (a .pt file, as for optc compile)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the result as JSON")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    import sys

    from optc.passes.manager import PassManager
    from optc.tools.cli import load_calibration_data
    from optc.tools.models import load_model, parse_config
    PassManager(args.pipeline, target=args.target)        # a malformed pipeline fails before the load
    check_writable(args.json)
    loaded = load_model(args.model, inputs=args.input, config=parse_config(args.config), tiny=args.tiny,
                        batch=args.batch)
    progress = (lambda msg: print(f"optc: {msg}...", file=sys.stderr, flush=True)) if sys.stderr.isatty() else None
    result = compare(loaded.model, loaded.args, loaded.kwargs, pipeline=args.pipeline, backends=args.backend,
                     target=args.target, rtol=args.rtol, atol=args.atol, locate_divergence=args.locate,
                     top=args.top, label=loaded.label,
                     calibration_data=load_calibration_data(args.calibration_data, loaded.args),
                     progress=progress)
    print(result.format())
    if args.json:
        write_json(args.json, result.to_json())
    return 0 if result.ok else 1
