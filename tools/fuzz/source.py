"""A spec as standalone Python source, and the model and inputs built from it.

A spec prints itself as standalone Python source (:func:`emit_source`, :meth:`ModelSpec.source`:
``import torch``, a ``Model`` class, ``make_inputs``) and :func:`build_model` builds the model by
executing that source, so a reproducer holds exactly the model that was tested. Weights come from
a ``torch.Generator`` seeded by ``spec.seed`` (scaled by fan-in so activations stay O(1);
BatchNorm statistics and LayerNorm affine parameters are random, not the identity); inputs are
standard normal from ``spec.seed + 1`` (and ``+ 2``, ... for more input sets): free of NaN and Inf.
"""

from __future__ import annotations

import linecache
from typing import Any

from optc.tools.fuzz.kinds import KINDS
from optc.tools.fuzz.spec import ModelSpec


_HEADER = '''\
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _normal(g, shape, std=1.0, mean=0.0):
    return torch.randn(shape, generator=g) * std + mean


def _away_from_zero(g, shape):
    """Values in +-[0.5, 1.5): safe divisors and scales."""
    return (torch.rand(shape, generator=g) + 0.5) * (torch.randint(0, 2, shape, generator=g) * 2 - 1)


def _init_weights(model, g):
    """Fan-in scaled weights, random BatchNorm statistics and norm affines (not the identity)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
                fan_in = m.weight[0].numel() if not isinstance(m, nn.ConvTranspose2d) else \\
                    m.weight.numel() // max(m.out_channels, 1)
                m.weight.copy_(_normal(g, m.weight.shape, 1.0 / math.sqrt(max(fan_in, 1))))
                if m.bias is not None:
                    m.bias.copy_(_normal(g, m.bias.shape, 0.2))
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(_normal(g, m.running_mean.shape, 0.3))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(_normal(g, m.bias.shape, 0.2))
            elif isinstance(m, nn.LayerNorm):
                if m.weight is not None:
                    m.weight.copy_(_normal(g, m.weight.shape, 0.2, 1.0))
                if m.bias is not None:
                    m.bias.copy_(_normal(g, m.bias.shape, 0.2))
'''


def emit_source(spec: ModelSpec) -> str:
    n = len(spec.inputs)
    init: list[str] = []
    fwd: list[str] = []
    for i, op in enumerate(spec.ops):
        a = [f"v{v}" for v in op.inputs]
        shapes = [spec.shape_of(v) for v in op.inputs]
        fwd.append(f"# {op.describe()}")
        ini, lines = KINDS[op.kind].emit(op, i, a, shapes, f"v{n + i}")
        init += ini
        fwd += lines
    outs = ", ".join(f"v{o}" for o in spec.outputs)
    ret = outs if len(spec.outputs) == 1 else f"({outs})"
    args = ", ".join(f"v{k}" for k in range(n))
    body = ["class Model(nn.Module):", f"    def __init__(self, seed={spec.seed}):", "        super().__init__()",
            "        g = torch.Generator().manual_seed(seed)"]
    body += [f"        {line}" for line in init]
    body += ["        _init_weights(self, g)", "", f"    def forward(self, {args}):"]
    body += [f"        {line}" for line in fwd]
    body += [f"        return {ret}", "", ""]
    shapes = ", ".join(repr(tuple(s)) for s in spec.inputs)
    body += [f"INPUT_SHAPES = [{shapes}]", "", "",
             f"def make_inputs(seed={spec.seed + 1}):",
             '    """Standard normal inputs (no NaN, no Inf)."""',
             "    g = torch.Generator().manual_seed(seed)",
             "    return tuple(torch.randn(s, generator=g) for s in INPUT_SHAPES)", ""]
    return _HEADER + "\n\n" + "\n".join(body)


def load_source(source: str, name: str) -> dict:
    """Execute model source; the namespace (``Model``, ``make_inputs``). The source is put in
    ``linecache`` so tracebacks and torch.export's stack traces show its lines."""
    filename = f"<optc-fuzz-{name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    ns: dict[str, Any] = {"__name__": f"optc_fuzz_{name}"}
    exec(compile(source, filename, "exec"), ns)
    return ns


_NS_CACHE: dict[str, dict] = {}


def build_model(spec: ModelSpec):
    """The model of ``spec`` in eval mode, built by executing :meth:`ModelSpec.source`."""
    key = spec.digest()
    ns = _NS_CACHE.get(key)
    if ns is None:
        ns = load_source(spec.source(), key)
        if len(_NS_CACHE) > 64:
            _NS_CACHE.clear()
        _NS_CACHE[key] = ns
    return ns["Model"]().eval()


def make_inputs(spec: ModelSpec, index: int = 0) -> tuple:
    """Input set ``index`` of ``spec``: standard normal from seed ``spec.seed + 1 + index``."""
    import torch
    g = torch.Generator().manual_seed(spec.seed + 1 + index)
    return tuple(torch.randn(s, generator=g) for s in spec.inputs)
