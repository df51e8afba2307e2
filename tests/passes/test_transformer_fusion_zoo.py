"""Integration: the transformer fusions on the zoo's hand-written BERT, GPT and ViT (tiny)."""

from collections import Counter

import pytest
import torch

from optc.ir.capture import capture
from optc.ir.printer import op_name
from optc.ir.verifier import check_close
from optc.passes import PassManager
from optc.tools import zoo

PIPELINE = "fuse-attention,fuse-layer-norm,fuse-gelu,merge-parallel-linear,dce"


def _ops(program) -> Counter:
    return Counter(op_name(n) for n in program.graph.nodes if n.op == "call_function")


def _count(model, *class_names) -> int:
    return sum(type(m).__name__ in class_names for m in model.modules())


@pytest.mark.parametrize("gelu", ["erf", "tanh"])
@pytest.mark.parametrize("name", ["bert", "gpt", "vit"])
def test_transformer_fusions_on_zoo(name, gelu):
    cfg = {**zoo.tiny_config(name), "attention": "explicit", "norm": "decomposed", "gelu": gelu}
    model, inputs = zoo.load(name, batch=2, **cfg)      # bert: batch 2 pads the second sample
    layers, norms, gelus = cfg["num_layers"], _count(model, "DecomposedLayerNorm"), _count(model, "ErfGELU", "TanhGELU")
    program = capture(model, inputs)
    before = _ops(program)

    new, report = PassManager(PIPELINE, default="", verify_each=True, check_modified=True).run(program)
    after = _ops(new)

    assert after["aten.scaled_dot_product_attention"] == layers
    assert after["aten.softmax.int"] == 0 and after["aten.matmul"] == 0
    assert after["aten.layer_norm"] == norms and after["aten.rsqrt"] == 0 and after["aten.mean.dim"] == 0
    assert after["aten.gelu"] == gelus == layers and after["aten.erf"] == after["aten.tanh"] == 0
    assert after["aten.split_with_sizes"] == layers
    assert after["aten.linear"] == before["aten.linear"] - 2 * layers          # q, k, v -> one linear
    assert report.stats("merge-parallel-linear") == {"merged_groups": layers, "merged_linears": 3 * layers}
    for p in ("fuse-attention", "fuse-layer-norm", "fuse-gelu", "merge-parallel-linear"):
        assert report.record(p).rejections == [], p
    with torch.no_grad():
        check_close(model(*inputs), new(*inputs), rtol=1e-4)
