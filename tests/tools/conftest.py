"""Fixtures shared by the debugging-tool tests (compare, bisect, reduce)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def wrong_mha_translation():
    """The ONNX translation of ``optc::ort_multihead_attention`` with a scale 1.5x too large: a
    backend miscompile inside one ONNX node that the optimized Program does not have. Restored
    afterwards."""
    pytest.importorskip("onnxruntime")
    from optc.backends import onnx as onnx_backend
    from optc.backends import onnx_contrib
    op = torch.ops.optc.ort_multihead_attention.default
    right = onnx_backend.onnx_translations()[op]

    def wrong(query, key, value, attention_bias=None, num_heads=1, scale=1.0, unidirectional=False):
        return onnx_contrib._translate_mha(query, key, value, attention_bias, num_heads, scale * 1.5, unidirectional)

    onnx_backend.register_onnx_translation(op, wrong, replace=True)
    yield
    onnx_backend.register_onnx_translation(op, right, replace=True)
