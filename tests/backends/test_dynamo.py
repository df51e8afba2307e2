"""torch.compile(model, backend="optc"): discovered through the entry point, matches eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from optc.dynamo import optc_backend
from optc.ir.verifier import check_close


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(6, 8)
        self.l2 = nn.Linear(8, 1)          # a (1, 8) weight: a size-1 dim 0 that must stay static

    def forward(self, x):
        return {"y": self.l2(torch.relu(self.l1(x))), "mean": x.mean(-1)}


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_entry_point_registers_backend():
    assert "optc" in torch._dynamo.list_backends()
    assert torch._dynamo.lookup_backend("optc") is optc_backend


def test_torch_compile_onnx_matches_eager():
    model = Small().eval()
    compiled = torch.compile(model, backend="optc", options={"pipeline": "dce"})   # onnx by default
    x = torch.randn(3, 6)
    with torch.no_grad():
        got = compiled(x)
    assert set(got) == {"y", "mean"}
    check_close(model(x), got)


def test_torch_compile_recompiles_dynamic_batch():
    """Batch 5 after 2 makes Dynamo mark the batch dynamic and pass it as a SymInt input: the
    graph is lowered once more, batch-generic, and serves 7 without a third compile."""
    model = Small().eval()
    calls = []

    def counting(gm, example_inputs, **kwargs):
        calls.append([type(x).__name__ for x in example_inputs])
        return optc_backend(gm, example_inputs, **kwargs)

    compiled = torch.compile(model, backend=counting, options={"backend": "torchscript", "pipeline": "dce"})
    with torch.no_grad():
        for batch in (2, 5, 7):
            x = torch.randn(batch, 6)
            check_close(model(x), compiled(x))
    assert len(calls) == 2 and "SymInt" in calls[1]


def test_backend_called_directly_returns_graph_outputs():
    model = Small().eval()
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(3, 6)
    run = optc_backend(gm, [x], options={"backend": "torchscript", "pipeline": "dce"})
    check_close(gm(x), run(x))
    assert run.compiled.backend == "torchscript"
