"""NHWC programs (convert-layout) on every backend: each lowers the converted zoo CNNs and a model
with every NHWC op natively and matches eager; the per-target layout table and default pipelines
agree; TorchScript runs them in channels-last memory format; TVM runs NHWC convolutions, and its
``layout`` option converts what the Program did not."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import optc
import optc.ir.ops  # noqa: F401  (registers the optc:: ops)
from optc.backends import get_backend, lower
from optc.errors import OptcError
from optc.ir.verifier import check_close, random_inputs_like
from optc.target import BACKENDS, DEFAULT_PIPELINES, DEVICES, LAYOUTS, make_target
from optc.tools import zoo

aten = torch.ops.aten
NHWC_CONV = torch.ops.optc.conv2d_nhwc.default
CNNS = [n for n in ("small_cnn", "resnet18", "resnet50", "mobilenet_v2", "hf_mobilenet_v2") if zoo.is_available(n)]


def _available(backend: str) -> bool:
    try:
        get_backend(backend).check_available(make_target("cpu", backend))
        return True
    except OptcError:
        return False


AVAILABLE = [b for b in BACKENDS if _available(b)]


class AllNHWCOps(nn.Module):
    """Every NHWC op: conv (plain, strided, depthwise), max/avg/adaptive pooling, nearest and
    bilinear upsampling, plus a concatenation on channels and a padded residual."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.c2 = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = F.relu(self.c1(x))                                   # [N, 8, 8, 8]
        y = torch.cat([y, F.relu6(self.dw(y))], dim=1)           # [N, 16, 8, 8]
        p = F.max_pool2d(y, 3, stride=2, padding=1)              # [N, 16, 4, 4]
        a = F.avg_pool2d(y, 2, ceil_mode=True, count_include_pad=False)
        u = F.interpolate(p + a, scale_factor=2.0, mode="nearest") + F.pad(y, [0, 0, 0, 0])
        z = self.c2(u)
        # 8x8 -> 2x2: TorchScript's oneDNN adaptive pool (optimize_for_inference) needs divisible sizes
        return F.interpolate(F.adaptive_avg_pool2d(z, 2), size=(6, 6), mode="bilinear", align_corners=True)


def _nhwc_program(model, inputs):
    program = optc.capture(model.eval(), inputs)
    nhwc, report = optc.optimize(program, "default,convert-layout", target="cpu")
    assert report.stats("convert-layout")["converted"] > 0
    return nhwc


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("name", CNNS)
def test_backend_runs_the_nhwc_zoo_cnn(name, backend):
    model, inputs = zoo.load(name, **zoo.tiny_config(name))
    nhwc = _nhwc_program(model, inputs)
    compiled = lower(nhwc, "cpu", backend)
    with torch.no_grad():
        check_close(model(*inputs), compiled(*inputs), rtol=1e-4)
        args, _ = random_inputs_like(nhwc, seed=1)
        check_close(model(*args), compiled(*args), rtol=1e-4)


@pytest.mark.parametrize("backend", AVAILABLE)
def test_backend_lowers_every_nhwc_op(backend):
    torch.manual_seed(0)
    model = AllNHWCOps().eval()
    x = torch.randn(2, 3, 16, 16)
    nhwc = _nhwc_program(model, (x,))
    ops = collections.Counter(n.target for n in nhwc.graph.nodes if n.op == "call_function")
    for op in optc.ir.layout_ops.NHWC_OPS.values():
        assert ops[op] >= 1, op
    compiled = lower(nhwc, "cpu", backend)
    for seed in (0, 1):
        xi = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            check_close(model(xi), compiled(xi), rtol=1e-4)


# ---- the per-target decision -----------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", (None, *BACKENDS))
def test_default_pipeline_applies_the_targets_layout(device, backend):
    target = make_target(device, backend)
    assert target.layout == LAYOUTS[(device, backend)] in ("NHWC", "NCHW")
    assert ("convert-layout{layout=NHWC}" in DEFAULT_PIPELINES[(device, backend)]) == (target.layout == "NHWC")


@pytest.mark.parametrize("backend", AVAILABLE)
def test_compile_runs_the_layout_its_target_picked(backend, convnet):
    model, inputs = convnet
    compiled, report = optc.compile(model, inputs, backend=backend)
    nhwc = make_target("cpu", backend).layout == "NHWC"
    assert any(r.name == "convert-layout" and r.modified for r in report.pipeline.records) == nhwc
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        check_close(model(x), compiled(x), rtol=1e-4)


# ---- how each backend lowers it --------------------------------------------------------------------
@pytest.mark.skipif("torchscript" not in AVAILABLE, reason="torchscript unavailable")
def test_torchscript_runs_nhwc_as_channels_last(tmp_path):
    model, inputs = zoo.load("resnet18", **zoo.tiny_config("resnet18"))
    compiled = lower(_nhwc_program(model, inputs), "cpu", "torchscript", optimize=False)
    graph = compiled.module.graph
    kinds = collections.Counter(n.kind() for n in graph.nodes())
    assert kinds["aten::permute"] == 0 and kinds["aten::contiguous"] == 1   # the input, made channels-last once
    assert kinds["aten::_convolution"] == 20
    loaded = optc.load(compiled.save(tmp_path / "ts"))
    with torch.no_grad():
        check_close(model(*inputs), loaded(*inputs), rtol=1e-4)


@pytest.mark.skipif("tvm" not in AVAILABLE, reason="tvm unavailable")
def test_tvm_layout_option_converts_what_the_program_did_not(convnet):
    model, inputs = convnet
    program = optc.capture(model, inputs)
    nhwc = _nhwc_program(model, inputs)
    x = torch.randn(2, 3, 8, 8)
    for prog, layout in ((program, "NHWC"), (nhwc, "NCHW"), (nhwc, None)):
        compiled = lower(prog, "cpu", "tvm", layout=layout)
        assert compiled.backend_options["layout"] == (layout or "NHWC")
        with torch.no_grad():
            check_close(model(x), compiled(x), rtol=1e-4)
