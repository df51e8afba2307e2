"""Integration: the fusion passes on whole zoo models (tiny configs)."""

import pytest
import torch

from optc.ir.capture import capture
from optc.ir.verifier import check_close, random_inputs_like
from optc.passes import PassManager
from optc.tools import zoo

PIPELINE = "fold-conv-bn,fold-linear-bn,fold-binary,dce"


def _batch_norms(program) -> int:
    return sum(1 for n in program.graph.nodes if n.op == "call_function" and "batch_norm" in str(n.target))


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "resnet50", "mobilenet_v2"])
def test_every_batchnorm_folded(name):
    model, inputs = zoo.load(name, **zoo.tiny_config(name))
    program = capture(model, inputs)
    n_bn = _batch_norms(program)
    assert n_bn > 0
    new, report = PassManager(PIPELINE, default="", verify_each=True).run(program)
    assert _batch_norms(new) == 0
    assert report.stats("fold-conv-bn")["folded"] + report.stats("fold-linear-bn")["folded"] == n_bn
    assert not report.record("fold-conv-bn").rejections
    for args, kwargs in [(inputs, {}), random_inputs_like(program, seed=1)]:
        with torch.no_grad():
            check_close(model(*args, **kwargs), new(*args, **kwargs), rtol=1e-4)
