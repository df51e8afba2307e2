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
