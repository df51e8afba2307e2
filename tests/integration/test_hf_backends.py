"""HF transformers architectures that failed or returned wrong answers on a backend, compiled by
every backend with the default pipeline and compared with eager (fp32: max abs error <= 1e-4 of
the output scale, on the example inputs and a fresh draw).

Falcon (TVM: a negative list index read out of bounds, NaN), Swin and SigLIP's vision tower (TVM:
``std::bad_alloc`` reported; not reproduced since), Phi-3 (TVM: a zero-width rotary slice),
BART (ONNX: in-place ``copy_``; TorchScript: ``fill.Tensor``), Mixtral (every backend:
``transformers::grouped_mm_fallback``, ``histc``, ``perm // k``). Needs the ``hf`` extra; skipped
without it. The idioms themselves are tested without transformers in
``tests/backends/test_real_model_idioms.py``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="needs the hf extra: pip install optc[hf]")

import optc  # noqa: E402
from optc.ir.verifier import compare_outputs, random_inputs_like  # noqa: E402
from optc.tools import hf_corpus  # noqa: E402

ARCHITECTURES = ["falcon", "swin", "siglip_vision", "phi3", "bart", "mixtral"]
BACKENDS = ["torchscript", "onnx", "tvm"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_hf_architecture_matches_eager(name, backend):
    model, inputs = hf_corpus.build(name)
    compiled, report = optc.compile(model, inputs, backend=backend)
    assert report.check is not None and report.check.ok
    program = optc.capture(model, inputs)
    for args, kwargs in [(inputs, {}), random_inputs_like(program, seed=5)]:
        with torch.no_grad():
            ref = model(*args, **kwargs)
        got = compiled(*args, **kwargs)
        err = compare_outputs(ref, got)
        assert err.max_rel_error <= 1e-4, f"{name} on {backend}: {err}"
