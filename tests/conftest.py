"""Shared pytest configuration: ``--update-goldens`` and the ``cuda`` marker."""

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--update-goldens", action="store_true", default=False,
                     help="rewrite inline golden strings in test files with the current output")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    if config.getoption("--update-goldens"):
        import os
        os.environ["EXPECTTEST_ACCEPT"] = "1"


class _Attention(torch.nn.Module):
    """Self-attention with q/k/v from one fused projection, split into 2 heads of 8 (6 tokens)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = (t.view(1, 6, 2, 8).transpose(1, 2) for t in self.qkv(x).split(16, -1))
        p = (q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1)
        return self.o((p @ v).transpose(1, 2).reshape(1, 6, 16))


@pytest.fixture
def attention_block():
    """The class of a small self-attention block (q/k/v split from one projection), shared by the
    backend node-map and compare tests."""
    return _Attention
