"""insert-qdq's report: per quantized layer, its input's scale and zero point, its weight scales and
the signal-to-quantization-noise ratio (SQNR, dB) of its output against the float program.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from optc.errors import OptcError
from optc.ir.calibration import probe_module

if TYPE_CHECKING:
    from optc.passes.insert_qdq.placement import Plan
    from optc.passes.insert_qdq.sites import Site

optc_ops = torch.ops.optc


# ---- the report ----------------------------------------------------------------------------------
@dataclass
class LayerReport:
    """One quantized site: its input's scale and zero point, its weight scales and the SQNR (dB)
    of its output against float32 (``inf``: no error; ``None``: not measured)."""

    node: str
    module: str
    kind: str
    input_scale: float | None
    input_zero_point: int | None
    weight_scale_min: float | None
    weight_scale_max: float | None
    sqnr_db: float | None = None
    input_sqnr_db: float | None = None
    weight_sqnr_db: float | None = None


@dataclass
class QuantReport:
    scheme: str
    calibration: str
    samples: int
    layers: list[LayerReport] = field(default_factory=list)
    output_sqnr_db: float | None = None

    def worst(self, n: int = 5) -> list[LayerReport]:
        """The ``n`` layers with the lowest output SQNR."""
        rated = [la for la in self.layers if la.sqnr_db is not None]
        return sorted(rated, key=lambda la: la.sqnr_db)[:n]

    def format(self) -> str:
        lines = [f"insert-qdq: {self.scheme}, calibration={self.calibration} on {self.samples} samples, "
                 f"{len(self.layers)} quantized layers, output SQNR {_db(self.output_sqnr_db)} dB",
                 f"{'layer':<28}{'module':<28}{'kind':<8}{'in scale':>11}{'zp':>5}{'w scale':>21}"
                 f"{'SQNR dB':>9}{'in dB':>8}{'w dB':>8}"]
        for la in self.layers:
            ws = "-" if la.weight_scale_min is None else f"{la.weight_scale_min:.2e}..{la.weight_scale_max:.2e}"
            sc = "dynamic" if la.input_scale is None else f"{la.input_scale:.3e}"
            zp = "-" if la.input_zero_point is None else str(la.input_zero_point)
            lines.append(f"{la.node[:27]:<28}{la.module[:27]:<28}{la.kind:<8}{sc:>11}{zp:>5}{ws:>21}"
                         f"{_db(la.sqnr_db):>9}{_db(la.input_sqnr_db):>8}{_db(la.weight_sqnr_db):>8}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _db(v: float | None) -> str:
    if v is None:
        return "-"
    return "inf" if math.isinf(v) else f"{v:.1f}"


def quant_report(program) -> QuantReport:
    """The per-layer report of the last ``insert-qdq`` run on ``program`` (a Program or a
    GraphModule): scale, zero point and output SQNR against float32 of every quantized layer."""
    gm = getattr(program, "graph_module", program)
    rep = getattr(gm, "meta", {}).get("optc_quant_report")
    if rep is None:
        raise OptcError("this program has no quantization report: it was not quantized by insert-qdq")
    return rep


def sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    signal = float(ref.double().pow(2).sum())
    noise = float((ref.double() - got.double()).pow(2).sum())
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10 * math.log10(signal / noise)


def measure(report: QuantReport, reference: fx.GraphModule, gm: fx.GraphModule, sites: dict[fx.Node, Site],
            plan: Plan | None, params: dict, samples: list, renamed: dict[str, str] | None = None) -> None:
    """SQNR of each site's output (quantized program vs float program), of each site's input
    quantization alone, and of the model outputs, accumulated over ``samples``."""
    if not samples:
        return
    names = [n.name for n in sites]
    ref_nodes = {n.name: n for n in reference.graph.nodes}
    q_nodes = {n.name: n for n in gm.graph.nodes}
    acts = {site.node.name: site.acts[0].name for site in sites.values()}
    ref_out = [a for a in reference.graph.output_node().args[0] if isinstance(a, fx.Node)]
    q_out = [a for a in gm.graph.output_node().args[0] if isinstance(a, fx.Node)]
    act_names = sorted({a for a in acts.values() if a in ref_nodes})
    ref_probe = probe_module(reference, [ref_nodes[n] for n in names] + [ref_nodes[a] for a in act_names] + ref_out)
    renamed = renamed or {}
    q_probe = probe_module(gm, [q_nodes[renamed.get(n, n)] for n in names] + q_out)
    energy: dict[str, list[float]] = {}

    def acc(key, ref, got):
        e = energy.setdefault(key, [0.0, 0.0])
        e[0] += float(ref.double().pow(2).sum())
        e[1] += float((ref.double() - got.double()).pow(2).sum())

    act_params = {}
    if plan is not None:
        for site in sites.values():
            qp = params.get(site.acts[0])
            if qp is not None:
                act_params[site.node.name] = qp
    with torch.no_grad():
        for flat in samples:
            r = list(ref_probe(*flat))
            g = list(q_probe(*flat))
            k = len(names)
            ref_acts = dict(zip(act_names, r[k:k + len(act_names)]))
            for i, n in enumerate(names):
                if torch.is_tensor(r[i]) and torch.is_tensor(g[i]):
                    acc(n, r[i], g[i])
                qp = act_params.get(n)
                x = ref_acts.get(acts[n])
                if qp is not None and x is not None:
                    args = (qp.scale, qp.zero_point, qp.quant_min, qp.quant_max, qp.dtype)
                    xq = optc_ops.dequantize_per_tensor(optc_ops.quantize_per_tensor(x, *args), *args)
                    acc("in:" + n, x, xq)
            for a, b in zip(r[k + len(act_names):], g[k:]):
                if torch.is_tensor(a) and a.is_floating_point():
                    acc("@output", a, b)

    def db(key):
        if key not in energy:
            return None
        s, nz = energy[key]
        return math.inf if nz == 0 else (-math.inf if s == 0 else 10 * math.log10(s / nz))

    original = {v: k for k, v in renamed.items()}
    for la in report.layers:
        key = original.get(la.node, la.node)
        la.sqnr_db = db(key)
        la.input_sqnr_db = db("in:" + key)
    report.output_sqnr_db = db("@output")


def add_sqnr_stats(stats: dict, report: QuantReport) -> None:
    worst = report.worst(1)
    if worst:
        stats["min_sqnr_db"] = round(worst[0].sqnr_db, 2) if not math.isinf(worst[0].sqnr_db) else worst[0].sqnr_db
        stats["worst_layer"] = worst[0].node
    if report.output_sqnr_db is not None:
        stats["output_sqnr_db"] = round(report.output_sqnr_db, 2) if not math.isinf(report.output_sqnr_db) \
            else report.output_sqnr_db
