"""Shared fixtures of the backend tests: tiny models, test-only custom ops, captured zoo models.

Captures are cached per session: each zoo model is captured once and lowered by every backend.
Test modules parametrize over the zoo with ``ZOO`` computed themselves (conftest is not importable
under ``--import-mode=importlib``).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn

import optc
from optc.backends.onnx import onnx_opset, register_onnx_translation


# ---- test-only custom ops ------------------------------------------------------------------------
@torch.library.custom_op("optc_test::weird", mutates_args=())
def weird(x: torch.Tensor) -> torch.Tensor:
    """An op no backend can lower: not ATen, not optc::, no translation."""
    return x.sin() * 2


@weird.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("optc_test::double", mutates_args=())
def double(x: torch.Tensor) -> torch.Tensor:
    """An op with an ONNX translation registered by the test suite (the extension point)."""
    return x * 2


@double.register_fake
def _(x):
    return torch.empty_like(x)


def _double_onnx(x):
    op = onnx_opset()
    return op.Add(x, x)


# registered before any ONNX lowering, so the exporter registry is built once per session
register_onnx_translation(torch.ops.optc_test.double.default, _double_onnx, replace=True)


# ---- tiny models ---------------------------------------------------------------------------------
class Structured(nn.Module):
    """Keyword input, dict + nested tuple outputs, an optc::channel_affine, a reshape on the batch."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 4)
        self.scale = nn.Parameter(torch.rand(4) + 0.5)
        self.shift = nn.Parameter(torch.randn(4))

    def forward(self, x, *, bias):
        h = self.lin(x)
        h = torch.ops.optc.channel_affine(h, self.scale, self.shift, 1)
        return {"act": h.relu(), "pair": (h + bias, h.sum(-1).reshape(h.shape[0], 1))}


class Weird(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.ops.optc_test.weird(self.lin(x))  # the line LoweringError must name


class Doubler(nn.Module):
    def forward(self, x):
        return torch.ops.optc_test.double(x) + 1


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.fc(h.mean((2, 3)))


def structured_inputs(batch: int = 3):
    return (torch.randn(batch, 8),), {"bias": torch.randn(batch, 4)}


@pytest.fixture
def structured():
    torch.manual_seed(0)
    model = Structured().eval()
    args, kwargs = structured_inputs()
    return model, args, kwargs


def _randomize_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture
def convnet():
    torch.manual_seed(0)
    return _randomize_bn(ConvNet()).eval(), (torch.randn(2, 3, 8, 8),)


@pytest.fixture
def weird_model():
    torch.manual_seed(0)
    return Weird().eval(), (torch.randn(2, 4),)


@pytest.fixture
def doubler():
    return Doubler().eval(), (torch.randn(2, 3),)


# ---- captured programs, cached per session ----------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _captured_structured(dynamic: bool = False):
    torch.manual_seed(0)
    model = Structured().eval()
    args, kwargs = structured_inputs()
    program = optc.capture(model, args, kwargs, dynamic_shapes="batch" if dynamic else None)
    return model, program


@functools.lru_cache(maxsize=None)
def _captured_zoo(name: str, dynamic: bool = False):
    from optc.tools import zoo
    model, inputs = zoo.load(name, **zoo.tiny_config(name))
    return model, inputs, optc.capture(model, inputs, dynamic_shapes="batch" if dynamic else None)


@pytest.fixture(scope="session")
def captured_structured():
    """``captured_structured(dynamic=False) -> (model, program)``, captured once per session."""
    return _captured_structured


@pytest.fixture(scope="session")
def captured_zoo():
    """``captured_zoo(name, dynamic=False) -> (model, inputs, program)`` at the tiny config, captured
    once per session (``dynamic``: dim 0 of every input dynamic)."""
    return _captured_zoo
