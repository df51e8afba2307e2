"""insert-qdq's quantization parameters: activation ranges observed on calibration samples, the
scale and zero point of every planned value, and int8 weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from optc.ir import quant_ops
from optc.ir.calibration import make_observer, probe_module, run_probe
from optc.passes.insert_qdq.placement import Plan

PASS = "insert-qdq"


def calibrated_ranges(gm: fx.GraphModule, values: list[fx.Node], samples: list, method: str,
                      percentile: float) -> dict[fx.Node, tuple[float, float]]:
    """The ``(lo, hi)`` range of each of ``values`` over ``samples``, by the observer ``method``."""
    observers = {v: make_observer(method, percentile) for v in values}
    probe = probe_module(gm, values)
    for outs in run_probe(probe, samples, desc=f"{PASS}: calibrating"):
        for v, t in zip(values, outs):
            observers[v].update(t)
    return {v: observers[v].range() for v in values}


@dataclass(frozen=True)
class QParams:
    scale: float
    zero_point: int
    quant_min: int
    quant_max: int
    dtype: torch.dtype


def assign_qparams(plan: Plan, ranges: dict[fx.Node, tuple[float, float]], dtype: torch.dtype,
                   symmetric: bool) -> dict[fx.Node, QParams]:
    """Scale and zero point of every planned value: one range per same-class (the union of its
    members' calibrated ranges, widened to include 0); classes in one same-scale group take the
    largest scale and keep their own zero point."""
    qmin, qmax = quant_ops.qrange(dtype)
    classes: dict[fx.Node, list[fx.Node]] = {}
    for v in plan.values:
        classes.setdefault(plan.same.find(v), []).append(v)
    groups: dict[fx.Node, list[fx.Node]] = {}
    for root, members in classes.items():
        key = next((plan.same_scale.find(m) for m in members if m in plan.same_scale.parent), root)
        groups.setdefault(key, []).append(root)
    params: dict[fx.Node, QParams] = {}
    for roots in groups.values():
        crange = {r: (min(min(ranges[m][0] for m in classes[r]), 0.0), max(max(ranges[m][1] for m in classes[r]), 0.0))
                  for r in roots}
        chosen = {r: quant_ops.choose_qparams(*crange[r], dtype, symmetric=symmetric) for r in roots}
        if len(roots) > 1:
            scale = max(s for s, _ in chosen.values())
            for r in roots:
                zp = chosen[r][1] if symmetric else int(round(qmin - crange[r][0] / scale))
                chosen[r] = (scale, max(qmin, min(qmax, zp)))
        for r in roots:
            for m in classes[r]:
                params[m] = QParams(*chosen[r], qmin, qmax, dtype)
    return params


def quantize_weight(w: torch.Tensor, axis: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 in [-127, 127]: ``(w_q, scales)``; per channel along ``axis`` or per tensor
    (``scales`` has one entry then)."""
    w = w.detach().to(torch.float32)
    if axis is None:
        amax = w.abs().max().reshape(1)
    else:
        amax = w.abs().transpose(0, axis).reshape(w.shape[axis], -1).amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).to(torch.float32)
    scales = torch.clamp(scales, min=1e-12)
    view = [1] * w.dim()
    if axis is not None:
        view[axis] = -1
    q = torch.clamp(torch.round(w / scales.reshape(view)), -127, 127).to(torch.int8)
    return q, scales
