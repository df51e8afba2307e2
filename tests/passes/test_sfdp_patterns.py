"""torch Inductor's own attention patterns (``_sfdp_pattern_1`` ... ``_sfdp_pattern_30`` in
``torch/_inductor/fx_passes/fuse_attention.py``), read from the installed torch: each float32
inference variant, with its scale arguments as Python constants (as real models write them), is
captured, run through ``canonicalize,constant-fold,dce,fuse-attention``, and must fuse into one
``scaled_dot_product_attention`` with the numerics kept (1e-5 of the output scale) -- except
patterns 7-10, which round the probabilities and the values to float16 inside a float32 program:
those are refused, with the reason, since SDPA computes in one dtype."""

from __future__ import annotations

import inspect

import pytest
import torch

from optc.ir.capture import capture
from optc.ir.rewrite import is_op
from optc.ir.verifier import compare_outputs
from optc.passes import PassManager

fa = pytest.importorskip("torch._inductor.fx_passes.fuse_attention")
if not hasattr(fa, "_get_sfdp_patterns"):          # pragma: no cover - a torch without the table
    pytest.skip("this torch has no _get_sfdp_patterns", allow_module_level=True)

PIPELINE = "canonicalize,constant-fold,dce,fuse-attention"
ROUNDS_TO_HALF = {7, 8, 9, 10}


def _float32_inference_patterns():
    out = []
    for name, d in fa._get_sfdp_patterns():
        args = d["example_inputs"]
        if not name.endswith("_inference") or any(isinstance(a, torch.Tensor) and a.dtype == torch.half for a in args):
            continue
        out.append(pytest.param(name, d, id=name.removeprefix("_sfdp_pattern_").removesuffix("_inference")))
    return out


PATTERNS = _float32_inference_patterns()


class _Pattern(torch.nn.Module):
    def __init__(self, fn, params, fixed):
        super().__init__()
        self.fn, self.params, self.fixed = fn, params, fixed

    def forward(self, *tensors):
        it = iter(tensors)
        out = self.fn(**{p: self.fixed[p] if p in self.fixed else next(it) for p in self.params})
        return out[0] if isinstance(out, tuple) else out


def _instantiate(d, seed=0):
    """The pattern as a module, with tensors for its tensor arguments and Python constants for its
    scalar ones (a 0-d example input is a scale: 2.0)."""
    g = torch.Generator().manual_seed(seed)
    fn, fixed = d["search_fn"], dict(d.get("scalar_workaround") or {})
    params = list(inspect.signature(fn).parameters)
    tensors = []
    for pname, a in zip([p for p in params if p not in fixed], d["example_inputs"]):
        if not isinstance(a, torch.Tensor):
            fixed[pname] = a
        elif a.dim() == 0:
            fixed[pname] = 2.0
        elif a.dtype == torch.bool or "mask" in pname:
            keep = torch.rand(a.shape, generator=g) > 0.3
            keep[..., 0] = True            # every row keeps a position (else eager gives NaN rows)
            tensors.append(keep if a.dtype == torch.bool else keep.to(a.dtype))
        else:
            tensors.append(torch.randn(a.shape, generator=g, dtype=a.dtype))
    return _Pattern(fn, params, fixed).eval(), tuple(tensors)


def test_all_forty_float32_variants_are_read():
    assert len(PATTERNS) == 40


@pytest.mark.parametrize("name, d", PATTERNS)
def test_inductor_attention_pattern_fuses(name, d):
    model, inputs = _instantiate(d)
    program = capture(model, inputs)
    new, report = PassManager(PIPELINE, default="", verify_each=True).run(program)
    fused = sum(is_op(n, torch.ops.aten.scaled_dot_product_attention.default) for n in new.graph.nodes)
    reasons = [r[2] for rec in report.records if rec.name == "fuse-attention" for r in rec.rejections]
    number = int(name.split("_")[3])
    if number in ROUNDS_TO_HALF:
        assert fused == 0 and len(reasons) == 1 and "the probabilities are torch.float16 at the matmul with v" \
            in reasons[0], reasons
        return
    assert fused == 1 and reasons == [], reasons
    for seed in (0, 1):
        _, xs = _instantiate(d, seed)
        with torch.no_grad():
            err = compare_outputs(model(*xs), new(*xs))
        assert err.max_rel_error <= 1e-5, f"{name}: {err}"
