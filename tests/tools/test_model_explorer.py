"""Tests of optc.tools.model_explorer: the graph JSON and node data Model Explorer loads.

Programs: the zoo's ResNet-18 (tiny config; captured, and after the default pipeline folded its
BatchNorms into new weights), a small HF-BERT-like module (nested ``encoder.layer.N.attention.self``
submodules, a fused qkv ``chunk`` and a ``max(dim)``: multi-output nodes read through
``getitem``; after the default pipeline a fused attention carries provenance) and a plain
function traced by ``fx.symbolic_trace`` (no module structure, no shapes).
"""

from __future__ import annotations

import json
import operator
import os
from collections import Counter

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from optc.api import optimize
from optc.errors import OptcError
from optc.ir.capture import capture
from optc.tools import zoo
from optc.tools.model_explorer import (DEFAULT_GRADIENT, default_overlays, to_model_explorer_graph, to_node_data,
                                       write_model_explorer)

# ---- the format, written down from Model Explorer's source -------------------------------------------------
# google-ai-edge/model-explorer @ c0f8dbac5cf2: src/ui/src/components/visualizer/common/input_graph.ts
# (GraphCollection, Graph, GraphNode), common/types.ts (KeyValue, MetadataItem, IncomingEdge,
# NodeDataProviderGraphData, ThresholdItem, GradientItem), mirrored by src/server/package/src/model_explorer/
# graph_builder.py and node_data_builder.py. A schema is {"required": {key: schema}, "optional": {...}};
# [schema] is a list of it; a type is isinstance; ("map", schema) a dict of string keys to it. Keys outside
# the schema fail: a misspelt key is silently ignored by the UI, so only the test can catch it.
KEY_VALUE = {"required": {"key": str, "value": str}}
METADATA_ITEM = {"required": {"id": str, "attrs": [KEY_VALUE]}}
INCOMING_EDGE = {"required": {"sourceNodeId": str, "sourceNodeOutputId": str, "targetNodeInputId": str}}
GRAPH_NODE = {"required": {"id": str, "label": str, "namespace": str},
              "optional": {"subgraphIds": [str], "attrs": [KEY_VALUE], "incomingEdges": [INCOMING_EDGE],
                           "inputsMetadata": [METADATA_ITEM], "outputsMetadata": [METADATA_ITEM]}}
GRAPH = {"required": {"id": str, "nodes": [GRAPH_NODE]},
         "optional": {"groupNodeAttributes": ("map", ("map", str))}}
GRAPH_COLLECTION = {"required": {"label": str, "graphs": [GRAPH]}}
NUMBER = (int, float)
NODE_DATA_RESULT = {"required": {"value": (int, float, str)}, "optional": {"bgColor": str, "textColor": str}}
GRAPH_NODE_DATA = {"required": {"results": ("map", NODE_DATA_RESULT)},
                   "optional": {"name": str,
                                "thresholds": [{"required": {"value": NUMBER, "bgColor": str},
                                                "optional": {"textColor": str}}],
                                "gradient": [{"required": {"stop": NUMBER},
                                              "optional": {"bgColor": str, "textColor": str}}]}}
NODE_DATA = ("map", GRAPH_NODE_DATA)


def validate(value, schema, where="$"):
    if isinstance(schema, list):
        assert isinstance(value, list), f"{where}: expected a list, got {type(value).__name__}"
        for i, item in enumerate(value):
            validate(item, schema[0], f"{where}[{i}]")
    elif isinstance(schema, tuple) and schema and schema[0] == "map":
        assert isinstance(value, dict), f"{where}: expected an object"
        for k, v in value.items():
            assert isinstance(k, str), f"{where}: key {k!r} is not a string"
            validate(v, schema[1], f"{where}.{k}")
    elif isinstance(schema, dict):
        assert isinstance(value, dict), f"{where}: expected an object, got {type(value).__name__}"
        required, optional = schema["required"], schema.get("optional", {})
        missing = set(required) - set(value)
        assert not missing, f"{where}: missing {sorted(missing)}"
        unknown = set(value) - set(required) - set(optional)
        assert not unknown, f"{where}: keys not in Model Explorer's format: {sorted(unknown)}"
        for k, v in value.items():
            validate(v, {**required, **optional}[k], f"{where}.{k}")
    else:
        ok = isinstance(value, schema) and not isinstance(value, bool)
        assert ok, f"{where}: expected {schema}, got {type(value).__name__} {value!r}"


def test_schema_validator_rejects_what_model_explorer_would_not_read():
    node = {"id": "a", "label": "x", "namespace": ""}
    validate({"label": "c", "graphs": [{"id": "g", "nodes": [node]}]}, GRAPH_COLLECTION)
    with pytest.raises(AssertionError, match="missing"):
        validate({"label": "c", "graphs": [{"id": "g", "nodes": [{"id": "a", "label": "x"}]}]}, GRAPH_COLLECTION)
    with pytest.raises(AssertionError, match="not in Model Explorer"):
        validate({**node, "incomingEdge": []}, GRAPH_NODE)
    with pytest.raises(AssertionError, match="expected <class 'str'>"):
        validate({**node, "incomingEdges": [{"sourceNodeId": "b", "sourceNodeOutputId": 0,
                                             "targetNodeInputId": "0"}]}, GRAPH_NODE)


# ---- programs ---------------------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # ME-SOURCE
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        w = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return (w @ v).transpose(1, 2).reshape(b, s, d)


class SelfOutput(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.dense = nn.Linear(d, d)
        self.LayerNorm = nn.LayerNorm(d)

    def forward(self, h, x):
        return self.LayerNorm(self.dense(h) + x)


class Attention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.self = SelfAttention(d, heads)
        self.output = SelfOutput(d)

    def forward(self, x):
        return self.output(self.self(x), x)


class Layer(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.attention = Attention(d, heads)
        self.intermediate = nn.Linear(d, 2 * d)
        self.output = nn.Linear(2 * d, d)

    def forward(self, x):
        a = self.attention(x)
        return self.output(F.gelu(self.intermediate(a))) + a


class Encoder(nn.Module):
    def __init__(self, d, heads, n):
        super().__init__()
        self.layer = nn.ModuleList(Layer(d, heads) for _ in range(n))

    def forward(self, x):
        for layer in self.layer:
            x = layer(x)
        return x


class TinyBert(nn.Module):
    """The module layout of Hugging Face's BERT (``encoder.layer.N.attention.self``), tiny."""

    def __init__(self, vocab=32, d=16, heads=2, n=2):
        super().__init__()
        self.embeddings = nn.Embedding(vocab, d)
        self.encoder = Encoder(d, heads, n)

    def forward(self, ids):
        h = self.encoder(self.embeddings(ids))
        best, where = h.max(dim=-1)
        return best, where


def _plain(x, y):
    return torch.relu(x) + y * 2


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model, inputs = zoo.load("resnet18", batch=1, **zoo.tiny_config("resnet18"))
    return capture(model.eval(), inputs)


@pytest.fixture(scope="module")
def resnet_opt(resnet):
    return optimize(resnet)[0]


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    return capture(TinyBert().eval(), (torch.randint(0, 32, (2, 5)),))


@pytest.fixture(scope="module")
def bert_opt(bert):
    return optimize(bert)[0]


@pytest.fixture(scope="module")
def plain():
    return fx.symbolic_trace(_plain)


PROGRAMS = ["resnet", "resnet_opt", "bert", "bert_opt", "plain"]


def _gm(p):
    return p.graph_module if hasattr(p, "graph_module") else p


def _nodes(doc) -> dict[str, dict]:
    return {n["id"]: n for n in doc["graphs"][0]["nodes"]}


def _attrs(node) -> dict[str, str]:
    return {a["key"]: a["value"] for a in node["attrs"]}


# ---- the graph --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", PROGRAMS)
def test_graph_json_validates_and_has_every_node_once(which, request):
    program = request.getfixturevalue(which)
    doc = to_model_explorer_graph(program, label="my model")
    validate(doc, GRAPH_COLLECTION)
    doc = json.loads(json.dumps(doc, allow_nan=False))         # what a file holds
    assert doc["label"] == "my model" and len(doc["graphs"]) == 1
    ids = [n["id"] for n in doc["graphs"][0]["nodes"]]
    assert ids == [n.name for n in _gm(program).graph.nodes]   # each fx node once, in graph order
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("which", PROGRAMS)
def test_every_fx_edge_is_an_incoming_edge(which, request):
    gm = _gm(request.getfixturevalue(which))
    nodes = _nodes(to_model_explorer_graph(gm))
    for n in gm.graph.nodes:
        edges = nodes[n.name]["incomingEdges"]
        assert {e["sourceNodeId"] for e in edges} == {a.name for a in n.all_input_nodes}, n.name
        # one edge per argument read, in argument order; a node read twice is two edges
        reads = Counter(a.name for a in torch.utils._pytree.tree_leaves((n.args, n.kwargs)) if isinstance(a, fx.Node))
        assert Counter(e["sourceNodeId"] for e in edges) == reads, n.name
        assert [e["targetNodeInputId"] for e in edges] == [str(i) for i in range(len(edges))]
        assert [m["id"] for m in nodes[n.name]["inputsMetadata"]] == [str(i) for i in range(len(edges))]
        for e in edges:
            outputs = {m["id"] for m in nodes[e["sourceNodeId"]]["outputsMetadata"]}
            assert not outputs or e["sourceNodeOutputId"] in outputs, (n.name, e)
        if n.target is operator.getitem and isinstance(n.args[0].meta.get("val"), (tuple, list)):
            assert edges[0]["sourceNodeOutputId"] == str(n.args[1]), n.name    # the item it reads
        elif edges:
            assert {e["sourceNodeOutputId"] for e in edges} == {"0"}, n.name


def test_multi_output_nodes_connect_each_getitem_to_its_output(bert):
    nodes = _nodes(to_model_explorer_graph(bert))
    chunk = nodes["chunk"]
    assert chunk["label"] == "aten.chunk"
    assert chunk["outputsMetadata"] == [{"id": str(i), "attrs": [{"key": "tensor_shape", "value": "f32[2,5,16]"}]}
                                        for i in range(3)]
    for i, name in enumerate(["getitem", "getitem_1", "getitem_2"]):
        assert nodes[name]["incomingEdges"] == [{"sourceNodeId": "chunk", "sourceNodeOutputId": str(i),
                                                 "targetNodeInputId": "0"}]
    assert nodes["max_1"]["outputsMetadata"] == [
        {"id": "0", "attrs": [{"key": "tensor_shape", "value": "f32[2,5]"}]},
        {"id": "1", "attrs": [{"key": "tensor_shape", "value": "i64[2,5]"}]}]
    assert nodes["getitem_7"]["incomingEdges"] == [{"sourceNodeId": "max_1", "sourceNodeOutputId": "1",
                                                    "targetNodeInputId": "0"}]
    # a single-output source is output "0"; inputs are named by the op's schema
    assert nodes["linear"]["incomingEdges"] == [
        {"sourceNodeId": "embedding", "sourceNodeOutputId": "0", "targetNodeInputId": "0"},
        {"sourceNodeId": "encoder_layer_0_attention_self_qkv_weight", "sourceNodeOutputId": "0",
         "targetNodeInputId": "1"},
        {"sourceNodeId": "encoder_layer_0_attention_self_qkv_bias", "sourceNodeOutputId": "0",
         "targetNodeInputId": "2"}]
    assert [m["attrs"] for m in nodes["linear"]["inputsMetadata"]] == [
        [{"key": "__tensor_tag", "value": v}] for v in ("input", "weight", "bias")]
    assert nodes["output"]["incomingEdges"] == [
        {"sourceNodeId": "getitem_6", "sourceNodeOutputId": "0", "targetNodeInputId": "0"},
        {"sourceNodeId": "getitem_7", "sourceNodeOutputId": "0", "targetNodeInputId": "1"}]


def test_namespaces_follow_nn_module_stack(bert, resnet):
    nodes = _nodes(to_model_explorer_graph(bert))
    ns = {k: v["namespace"] for k, v in nodes.items()}
    assert ns["linear"] == "encoder/layer/0/attention/self/qkv"
    assert ns["chunk"] == ns["matmul"] == "encoder/layer/0/attention/self"
    assert ns["linear_1"] == "encoder/layer/0/attention/output/dense"
    assert ns["layer_norm_1"] == "encoder/layer/1/attention/output/LayerNorm"
    assert ns["gelu"] == "encoder/layer/0"                      # F.gelu in Layer.forward
    assert ns["embedding"] == "embeddings"
    assert ns["max_1"] == ns["getitem_7"] == ""                 # the root module
    assert ns["ids"] == ns["output"] == ""
    # weights sit in their users' namespace
    assert ns["encoder_layer_0_attention_self_qkv_weight"] == "encoder/layer/0/attention/self/qkv"
    assert ns["encoder_layer_1_intermediate_bias"] == "encoder/layer/1/intermediate"
    for n in bert.graph.nodes:                                   # every op: its innermost module path
        if n.op == "call_function":
            path = list(n.meta["nn_module_stack"].values())[-1][0]
            assert ns[n.name] == path.replace(".", "/"), n.name
    groups = to_model_explorer_graph(bert)["graphs"][0]["groupNodeAttributes"]
    assert groups["encoder/layer/1/attention/self"] == {"module": f"{__name__}.SelfAttention",
                                                        "path": "encoder.layer.1.attention.self"}
    assert groups[""] == {"program": "TinyBert", "nodes": str(len(nodes)), "parameters": str(
        sum(p.numel() for p in TinyBert().parameters()))}

    rn = {k: v["namespace"] for k, v in _nodes(to_model_explorer_graph(resnet)).items()}
    assert rn["conv2d"] == rn["conv1_weight"] == "conv1"
    assert rn["conv2d_1"] == "layer1/0/conv1"
    assert rn["add"] == "layer1/0"
    assert rn["linear"] == "fc"


def test_attrs_shapes_source_and_weights(bert, resnet):
    nodes = _nodes(to_model_explorer_graph(bert))
    with open(__file__) as f:
        line = next(i for i, text in enumerate(f, 1) if text.rstrip().endswith("# ME-SOURCE"))
    assert _attrs(nodes["linear"]) == {
        "kind": "op", "type": "f32[2,5,48]",
        "args": "%embedding, %encoder_layer_0_attention_self_qkv_weight, %encoder_layer_0_attention_self_qkv_bias",
        "module": "torch.nn.modules.linear.Linear", "source": f"test_model_explorer.py:{line}"}
    assert nodes["linear"]["outputsMetadata"] == [
        {"id": "0", "attrs": [{"key": "tensor_shape", "value": "f32[2,5,48]"}]}]
    assert _attrs(nodes["chunk"])["type"] == "(f32[2,5,16], f32[2,5,16], f32[2,5,16])"
    assert _attrs(nodes["chunk"])["args"] == "%linear, 3, -1"
    weight = nodes["encoder_layer_0_attention_self_qkv_weight"]
    assert weight["label"] == "get_attr"
    assert _attrs(weight) == {"kind": "weight", "type": "f32[48,16]",
                              "target": "encoder.layer.0.attention.self.qkv.weight"}
    assert nodes["ids"]["label"] == "placeholder" and _attrs(nodes["ids"]) == {"kind": "input", "type": "i64[2,5]"}
    assert nodes["output"]["label"] == "output"
    assert _attrs(nodes["output"]) == {"kind": "output", "args": "(%getitem_6, %getitem_7)"}
    assert nodes["output"]["outputsMetadata"] == []

    rn = _nodes(to_model_explorer_graph(resnet))
    assert rn["conv2d"]["label"] == "aten.conv2d"
    assert _attrs(rn["conv2d"])["type"] == "f32[1,8,16,16]"
    assert _attrs(rn["conv2d"])["source"].startswith("cnn.py:")
    kinds = Counter(_attrs(n)["kind"] for n in rn.values())
    gm_ops = Counter(n.op for n in resnet.graph.nodes)
    assert kinds == {"input": gm_ops["placeholder"], "weight": gm_ops["get_attr"], "output": 1,
                     "op": gm_ops["call_function"]}


def test_provenance_of_a_fused_attention(bert_opt):
    nodes = _nodes(to_model_explorer_graph(bert_opt))
    sdpa = nodes["scaled_dot_product_attention"]
    assert sdpa["label"] == "aten.scaled_dot_product_attention"
    attrs = _attrs(sdpa)
    assert attrs["provenance"] == "from %div, %matmul, %matmul_1, %softmax, %transpose_3 by fuse-attention"
    assert attrs["pass"] == "fuse-attention"
    assert sdpa["namespace"] == "encoder/layer/0/attention/self"
    assert "provenance" not in _attrs(nodes["linear"])              # captured as it is


def test_folded_weights_sit_in_their_layer(resnet_opt):
    nodes = _nodes(to_model_explorer_graph(resnet_opt))
    folded = [n for n in resnet_opt.graph.nodes if n.op == "get_attr" and n.target == "conv1_weight_folded"]
    assert len(folded) == 1
    assert nodes["conv1_weight_folded"]["namespace"] == "conv1"
    assert _attrs(nodes["conv1_weight_folded"])["target"] == "conv1_weight_folded"


def test_plain_function_exports_without_module_structure(plain):
    doc = to_model_explorer_graph(plain)
    validate(doc, GRAPH_COLLECTION)
    assert doc["label"] == "graph" and doc["graphs"][0]["id"] == "graph"
    nodes = doc["graphs"][0]["nodes"]
    assert [(n["id"], n["label"], n["namespace"]) for n in nodes] == [
        ("x", "placeholder", ""), ("y", "placeholder", ""), ("relu", "relu", ""), ("mul", "mul", ""),
        ("add", "add", ""), ("output", "output", "")]
    add = nodes[4]
    assert add["incomingEdges"] == [{"sourceNodeId": "relu", "sourceNodeOutputId": "0", "targetNodeInputId": "0"},
                                    {"sourceNodeId": "mul", "sourceNodeOutputId": "0", "targetNodeInputId": "1"}]
    assert _attrs(add) == {"kind": "op", "args": "%relu, %mul"}     # no shapes were propagated
    assert add["outputsMetadata"] == []
    assert doc["graphs"][0]["groupNodeAttributes"] == {"": {"program": "graph", "nodes": "6", "parameters": "0"}}


# ---- node data --------------------------------------------------------------------------------------------------
def test_node_data_format(bert):
    data = to_node_data(bert, {"linear": 3, "gelu": 0.5, "chunk": float("nan"), "ids": float("-inf")}, name="err")
    validate(data, NODE_DATA)
    assert data == {"TinyBert": {"name": "err",
                                 "results": {"linear": {"value": 3}, "gelu": {"value": 0.5},
                                             "chunk": {"value": "nan"}, "ids": {"value": "-inf"}},
                                 "gradient": [dict(g) for g in DEFAULT_GRADIENT]}}
    json.dumps(data, allow_nan=False)
    by_id = to_node_data("my graph", {"a": 1}, name="x", thresholds=[{"value": 10, "bgColor": "red"}])
    assert by_id == {"my graph": {"name": "x", "results": {"a": {"value": 1}},
                                  "thresholds": [{"value": 10, "bgColor": "red"}]}}
    validate(by_id, NODE_DATA)


def test_node_data_refuses_what_model_explorer_cannot_show(bert):
    with pytest.raises(ValueError, match=r"1 key\(s\) name no node of graph 'TinyBert': 'lineaar'"):
        to_node_data(bert, {"linear": 1, "lineaar": 2}, name="x")
    with pytest.raises(TypeError, match="expected a number"):
        to_node_data(bert, {"linear": "big"}, name="x")
    with pytest.raises(ValueError, match="stops 0 and 1"):
        to_node_data(bert, {"linear": 1}, name="x", gradient=[{"stop": 0, "bgColor": "red"}])
    with pytest.raises(ValueError, match="bgColor"):
        to_node_data(bert, {"linear": 1}, name="x", thresholds=[{"value": 1}])


def test_default_overlays_are_params_and_flops_of_layer_ops(resnet, bert):
    over = default_overlays(resnet)
    assert set(over) == {"params", "flops"}
    assert over["params"]["conv2d"] == 8 * 3 * 7 * 7                      # conv1: 8 filters of 3x7x7
    assert over["flops"]["conv2d"] == 2 * (8 * 16 * 16) * (3 * 7 * 7)      # 2 * out_numel * in*kh*kw
    assert over["params"]["batch_norm"] == 16 and over["flops"]["batch_norm"] == 0
    assert "relu" not in over["flops"]                                     # not a layer op
    graph_ids = {n.name for n in resnet.graph.nodes}
    assert set(over["params"]) == set(over["flops"]) and set(over["flops"]) <= graph_ids
    b = default_overlays(bert)
    assert b["flops"]["linear"] == 2 * (2 * 5 * 48) * 16
    assert b["params"]["linear"] == 48 * 16 + 48


# ---- files ------------------------------------------------------------------------------------------------------
def test_write_model_explorer(bert, tmp_path):
    out = tmp_path / "me"
    paths = write_model_explorer(bert, str(out), {"err": {"linear": 0.25}, "flops": {"linear": 7}})
    assert paths == [str(out / f) for f in ("graph.json", "params.nodedata.json", "flops.nodedata.json",
                                            "err.nodedata.json")]
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in paths)     # no .tmp left
    with open(paths[0]) as f:
        graph = json.load(f)
    validate(graph, GRAPH_COLLECTION)
    assert graph == json.loads(json.dumps(to_model_explorer_graph(bert)))
    ids = {n["id"] for n in graph["graphs"][0]["nodes"]}
    for path in paths[1:]:
        with open(path) as f:
            data = json.load(f)
        validate(data, NODE_DATA)
        assert list(data) == [graph["graphs"][0]["id"]]
        assert set(data["TinyBert"]["results"]) <= ids, path
    with open(out / "flops.nodedata.json") as f:
        assert json.load(f)["TinyBert"]["results"] == {"linear": {"value": 7}}   # the given one replaces the default
    with open(out / "params.nodedata.json") as f:
        assert json.load(f)["TinyBert"]["results"]["linear"] == {"value": 48 * 16 + 48}

    assert write_model_explorer(bert, str(tmp_path / "only"), {"err": {"linear": 1}}, defaults=False) == [
        str(tmp_path / "only" / "graph.json"), str(tmp_path / "only" / "err.nodedata.json")]


def test_write_model_explorer_writes_nothing_when_refused(bert, tmp_path):
    out = tmp_path / "me"
    with pytest.raises(ValueError, match="overlay name '../x'"):
        write_model_explorer(bert, str(out), {"../x": {"linear": 1}})
    with pytest.raises(ValueError, match="name no node"):
        write_model_explorer(bert, str(out), {"x": {"nope": 1}})
    assert not out.exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OptcError, match="cannot create it"):
        write_model_explorer(bert, str(blocker / "me"))
