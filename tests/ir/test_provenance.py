"""Provenance: every node knows the captured nodes it derives from and the pass (and rule) that
made it, through the pipeline and the backend stage; ``optc dump --provenance`` shows it."""

from __future__ import annotations

import json
import math

import torch
import torch.fx as fx
import torch.nn as nn

import optc
from optc.backends.lowering import resolve, run_backend_stage
from optc.ir import provenance
from optc.ir.printer import format_json, format_text


class Block(nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, self.h, self.dh).transpose(1, 2) for p in (self.q, self.k, self.v))
        p = (q @ k.transpose(-1, -2) / math.sqrt(self.dh)).softmax(-1)
        return self.norm(x + self.o((p @ v).transpose(1, 2).reshape(b, s, d)))


def _by_target(program, target):
    return [n for n in program.graph.nodes if n.op == "call_function" and n.target == target]


def _captured():
    torch.manual_seed(0)
    model = Block().eval()
    return model, optc.capture(model, (torch.randn(1, 5, 16),))


def test_capture_stamps_every_node_with_itself():
    _, program = _captured()
    for n in program.graph.nodes:
        if n.op != "output":
            assert provenance.origin(n) == (n.name,)
            assert "optc_pass" not in n.meta


def test_fused_nodes_derive_from_what_they_replaced():
    _, captured = _captured()
    names = {n.name: n for n in captured.graph.nodes}
    softmax = next(n.name for n in captured.graph.nodes if "softmax" in str(n.target))
    linears = sorted(n.name for n in captured.graph.nodes if n.target == torch.ops.aten.linear.default)
    program, _ = optc.optimize(captured)
    [sdpa] = _by_target(program, torch.ops.aten.scaled_dot_product_attention.default)
    assert sdpa.meta["optc_pass"] == "fuse-attention"
    org = provenance.origin(sdpa)
    assert softmax in org
    assert sum(names[o].target == torch.ops.aten.matmul.default for o in org if o in names) == 2
    # the merged q/k/v projection derives from the three linears it merged, not from the output one
    merged = [n for n in _by_target(program, torch.ops.aten.linear.default) if n.meta.get("optc_pass")]
    assert len(merged) == 1 and merged[0].meta["optc_pass"] == "merge-parallel-linear"
    assert set(provenance.origin(merged[0])) == set(linears[:3])
    # a node no pass touched keeps its own name as origin and has no pass
    [norm] = _by_target(program, torch.ops.aten.layer_norm.default)
    assert provenance.origin(norm) == (norm.name,) and "optc_pass" not in norm.meta


def test_backend_stage_records_pass_and_rule_and_keeps_the_origin():
    _, captured = _captured()
    program, _ = optc.optimize(captured)
    [sdpa] = _by_target(program, torch.ops.aten.scaled_dot_product_attention.default)
    tgt, be = resolve("cpu", "onnx", {})
    staged, _ = run_backend_stage(program, be, tgt)
    [mha] = _by_target(staged, torch.ops.optc.ort_multihead_attention.default)
    assert mha.meta["optc_pass"] == "ort-contrib-ops"
    assert mha.meta["optc_rule"] == "ort-multihead-attention"
    assert set(provenance.origin(sdpa)) <= set(provenance.origin(mha))


def test_text_and_json_show_it():
    _, captured = _captured()
    program, _ = optc.optimize(captured)
    text = format_text(program, with_provenance=True)
    line = next(ln for ln in text.splitlines() if "scaled_dot_product_attention(" in ln)
    assert "by fuse-attention" in line and "%softmax" in line
    assert "by fuse-attention" not in format_text(program)        # off by default
    nodes = {e["name"]: e for e in json.loads(format_json(program))["nodes"]}
    sdpa = next(e for e in nodes.values() if e["target"].endswith("scaled_dot_product_attention"))
    assert sdpa["pass"] == "fuse-attention" and "softmax" in sdpa["origin"]


def test_record_keeps_separate_regions_apart():
    """Two chains rewritten in one pass: each new node gets the origins of its own chain only."""
    g = fx.Graph()
    x = g.placeholder("x")
    a1 = g.call_function(torch.ops.aten.relu.default, (x,), name="a1")
    a2 = g.call_function(torch.ops.aten.neg.default, (a1,), name="a2")
    b1 = g.call_function(torch.ops.aten.sigmoid.default, (x,), name="b1")
    b2 = g.call_function(torch.ops.aten.neg.default, (b1,), name="b2")
    g.output((a2, b2))
    old = fx.GraphModule({}, g)
    provenance.stamp(old)
    graph = fx.Graph()
    graph.graph_copy(old.graph, {})       # every node but the output
    nodes = {n.name: n for n in graph.nodes}
    fa = graph.call_function(torch.ops.aten.abs.default, (nodes["x"],), name="fa")
    fb = graph.call_function(torch.ops.aten.exp.default, (nodes["x"],), name="fb")
    graph.output((fa, fb))
    for name in ("a2", "b2", "a1", "b1"):
        graph.erase_node(nodes[name])
    new = fx.GraphModule({}, graph)
    assert provenance.record(old, new, "p") == 2
    fresh = {n.name: n for n in new.graph.nodes}
    assert provenance.origin(fresh["fa"]) == ("a1", "a2")
    assert provenance.origin(fresh["fb"]) == ("b1", "b2")
    assert fresh["fa"].meta["optc_pass"] == "p"


def test_cli_dump_provenance(capsys):
    from optc.tools.cli import main
    assert main(["dump", "zoo:bert", "--tiny", "--pipeline", "default", "--provenance"]) == 0
    out = capsys.readouterr().out
    assert "by fuse-attention" in out and "by merge-parallel-linear" in out


class ScaledLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.lin(x) * 2)


def test_a_surviving_node_that_took_an_erased_nodes_place_computes_its_value():
    # fold-binary folds `* 2` into the linear's weights: the linear keeps its name but now computes
    # the product, so it must be compared with the captured `mul`, not with the captured `linear`
    torch.manual_seed(0)
    model = ScaledLinear().eval()
    captured = optc.capture(model, (torch.randn(2, 8),))
    optimized, report = optc.optimize(captured, "fold-binary")
    assert report.record("fold-binary").modified
    lin = _by_target(optimized, torch.ops.aten.linear.default)
    assert [n.name for n in lin] == ["linear"] and not _by_target(optimized, torch.ops.aten.mul.Tensor)
    assert lin[0].meta[provenance.VALUE_OF] == "mul" and lin[0].meta[provenance.PASS] == "fold-binary"
    assert set(provenance.origin(lin[0])) == {"linear", "mul"}
    from optc.tools.compare import locate
    assert locate(captured, optimized, optimized.example_flat_inputs()) == []
