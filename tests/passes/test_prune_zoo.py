"""prune-channels on the zoo (tiny configs) and a concatenation model: shapes consistent, the
signature unchanged, the surgery exact, the model smaller, and the pruned program runs on
every backend available here."""

import functools
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import optc
from optc.errors import BackendUnavailableError
from optc.ir.verifier import compare_outputs, random_inputs_like, verify
from optc.passes.manager import PassManager
from optc.passes.prune_channels import zero_removed_channels
from optc.tools import zoo

SURGERY_RTOL = 1e-5      # pruned vs original-with-removed-channels-zeroed: float rounding only
BACKEND_RTOL = 1e-4      # a backend vs the pruned Program it lowered


class DenseCat(nn.Module):
    """A depthwise residual block, Inception-style branches concatenated, a DenseNet-style concat."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8))
        self.b1 = nn.Conv2d(8, 6, 1)
        self.b3 = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1))
        self.bn = nn.BatchNorm2d(20)
        self.grow = nn.Conv2d(20, 8, 3, padding=1)
        self.head = nn.Linear(28, 5)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.3, 0.3)
                    m.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        s = self.stem(x)
        s = s + self.dw(s)
        h = F.relu(self.bn(torch.cat([s, self.b1(s), self.b3(s)], 1)))
        h = torch.cat([h, F.relu(self.grow(h))], 1)
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


MODELS = ["resnet18", "resnet50", "mobilenet_v2", "bert", "small_cnn", "dense_cat"]
# TorchScript (fast to lower) on every model; ONNX and TVM on two models that between them have every
# pattern (bert: residual adds, heads, MLPs; dense_cat: depthwise residual, BatchNorm, concatenations,
# flatten into a linear) -- lowering the zoo's CNNs with them takes minutes on a 2-core machine.
# OPTC_PRUNE_ALL_BACKENDS=1 runs every model on every backend.
ALL = os.environ.get("OPTC_PRUNE_ALL_BACKENDS", "") not in ("", "0")
BACKEND_CASES = [(m, b) for m in MODELS for b in ("torchscript", "onnx", "tvm")
                 if ALL or b == "torchscript" or m in ("bert", "dense_cat")]


@functools.lru_cache(maxsize=None)
def pruned(name: str):
    torch.manual_seed(0)
    if name == "dense_cat":
        model, inputs = DenseCat().eval(), (torch.randn(2, 3, 8, 8),)
    else:
        model, inputs = zoo.load(name, **zoo.tiny_config(name))
    program = optc.capture(model, inputs)
    new, report = PassManager("prune-channels{ratio=0.5}", default="", check_modified=True).run(program)
    return program, new, report


@pytest.mark.parametrize("name", MODELS)
def test_prune_zoo_model(name):
    program, new, report = pruned(name)
    rec = report.record("prune-channels")
    assert rec.modified and rec.stats["pruned"] >= 1
    verify(new, repropagate=True)
    assert new.input_specs == program.input_specs
    assert new.output_specs == program.output_specs
    assert new.num_parameters() < program.num_parameters()
    assert rec.stats["params_after"] < rec.stats["params_before"]
    zeroed = zero_removed_channels(program, new.meta["prune_plan"])
    for seed in (0, 1):
        args, kwargs = random_inputs_like(program, seed=seed)
        with torch.no_grad():
            got = new(*args, **kwargs)
            rep = compare_outputs(zeroed(*args, **kwargs), got)
            assert rep.max_rel_error <= SURGERY_RTOL, f"{name}: surgery is not exact: {rep}"
            assert compare_outputs(program(*args, **kwargs), got).max_rel_error > 1e-3


def test_prune_zoo_groups():
    """What the analysis ties together in the zoo models."""
    stats = {name: pruned(name)[2].stats("prune-channels") for name in ("resnet18", "mobilenet_v2", "bert")}
    # resnet18: 4 residual streams + 8 block-internal convs prunable, fc (the output) refused
    assert (stats["resnet18"]["groups"], stats["resnet18"]["pruned"]) == (13, 12)
    # bert (2 layers): per layer the q/k/v heads and the MLP; the residual stream reaches the output
    assert (stats["bert"]["groups"], stats["bert"]["pruned"]) == (5, 4)
    assert stats["mobilenet_v2"]["refused"] == 1


@pytest.mark.parametrize("name,backend", BACKEND_CASES)
def test_pruned_model_runs_on_backend(name, backend):
    from optc.backends.base import get_backend, lower
    try:
        get_backend(backend).check_available(optc.resolve_target("cpu", backend))
    except BackendUnavailableError as e:
        pytest.skip(str(e))
    program, new, _ = pruned(name)
    compiled = lower(new, "cpu", backend)
    args, kwargs = random_inputs_like(program, seed=3)
    with torch.no_grad():
        rep = compare_outputs(new(*args, **kwargs), compiled(*args, **kwargs))
    assert rep.max_rel_error <= BACKEND_RTOL, f"{name} on {backend}: {rep}"
