"""Every zoo model captures, runs its target's default pipeline with verify-each and numeric
checks on, and matches eager (fp32: max abs error <= 1e-4 relative to output scale).

Tiny configurations always run; the full-size models (the real proof: resnet50, BERT-base,
GPT-2 small, ViT-B/16) run too, marked ``slow`` so ``pytest -m "not slow"`` skips them.
"""

import pytest
import torch

import optc
from optc.ir.verifier import check_close, random_inputs_like, verify
from optc.tools import zoo

MODELS = zoo.names()


def _run(name: str, config: dict):
    model, inputs = zoo.load(name, **config)
    program = optc.capture(model, inputs)
    new, report = optc.optimize(program, "default", target="cpu", verify_each=True, check_numerics=True)
    verify(new, repropagate=True)
    for args, kwargs in [(program.example_args, program.example_kwargs), random_inputs_like(program, seed=3)]:
        with torch.no_grad():
            check_close(model(*args, **kwargs), new(*args, **kwargs), rtol=1e-4)
    assert all(r.status == "ran" for r in report.records)
    return program, new, report


@pytest.mark.parametrize("name", MODELS)
def test_tiny_zoo_model_default_pipeline_matches_eager(name):
    _run(name, zoo.tiny_config(name))


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_full_size_zoo_model_default_pipeline_matches_eager(name):
    _run(name, {})
