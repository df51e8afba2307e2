"""The generator's idioms of HF transformers models (``rmsnorm``, ``rotary``, ``gqa_attention``,
``inplace``, ``embed``, ``moe``, ``dtype_roundtrip``, ``empty``; optc.tools.fuzz.kinds.transformer, docs/fuzzing.md)
through capture, the default pipeline and every backend, compared with eager PyTorch in float64
by the fuzzer's oracle.

Each kind is drawn alone (``random_spec(seed, kinds=[kind])``): of the first seeds' small specs,
a few chosen greedily for covering the most forms the others do not, so that every form of the
kind runs on every backend (a form a backend fails on or refuses runs in a small spec of its own,
where it hides no other form from that backend). The backend failures these idioms found are
worked around; their shrunk models are kept in ``FIXED`` as regression tests.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter

import pytest

from optc.tools import fuzz
from optc.tools.fuzz import ModelSpec, Op, known_issue, oracle, random_spec, run_target

IDIOMS = ("rmsnorm", "rotary", "gqa_attention", "inplace", "embed", "moe", "dtype_roundtrip", "empty")
TARGETS = ("capture", "pipeline:default") + tuple(f"backend:{b}" for b in fuzz.DEFAULT_BACKENDS)
PASSING = ("ok", "fired", "unavailable")

# The forms each kind must have (its params' values, as ModelSpec.forms() reports them).
FORMS = {
    "rmsnorm": {"form=llama", "form=gemma", "form=t5", "form=near_miss"},
    "rotary": {"form=rotate_half", "form=interleaved", "rot=full", "rot=partial", "rot=partial_all"},
    "gqa_attention": {"form=eager", "form=sdpa", "mask=causal", "mask=sliding", "mask=padding",
                      "mask=causal_padding", "mask=none", "apply=where", "apply=masked_fill", "apply=additive",
                      "apply=bool", "apply=is_causal", "alibi=True", "upcast=True", "upcast=False"},
    "inplace": {"form=shift", "form=fill", "form=masked_fill", "form=index_put", "form=index_put_method",
                "form=div_", "form=mul_", "form=add_"},
    "embed": {"form=argmax", "form=topk", "form=neg_index", "form=positions", "form=positions_offset",
              "form=floordiv", "form=cumsum"},
    "moe": {"form=one_hot", "form=eq", "form=scatter", "form=sorted", "restore=inv_perm", "restore=index_add",
            "sort=sort", "sort=argsort", "sort=sort_stable"},
    "dtype_roundtrip": {"form=float_type_as", "form=to_float32", "form=type_as_other", "form=softmax_fp32",
                        "form=float_to_dtype"},
    "empty": {"form=legacy_cache", "form=zero_slice_end", "form=zero_slice_front", "form=new_zeros",
              "form=empty_sum"},
}


# ---- backend failures these idioms found, now worked around ---------------------------------------
def _spec(inputs, kind, params, shape):
    return ModelSpec(inputs=(inputs,), ops=(Op(kind=kind, inputs=(0,), params=tuple(params), shape=shape),),
                     outputs=(1,), seed=0)


# issue -> (target it failed on, shrunk models). Worked around in backends/workarounds.py; pure
# reproducers in docs/fuzzing.md ("Findings").
FIXED = {
    # TVM 0.27's from_exported_program lowers index_put with fewer index tensors than the data has
    # dims (``y[:, idx] = v``: indices [None, idx]) and index_add (an index_put on dim 0) to a Relax
    # IndexPut that wants one index tensor per dim: "IndexPut requires the number of index tensors
    # (2) to match the data tensor dimensions (3)" (and adds duplicates wrongly with None entries and
    # accumulate=True). Worked around: index_put_full_indices.
    "tvm-index-put-partial": ("backend:tvm", [
        _spec((1, 1, 1), "inplace", (("form", "index_put"), ("c", 2.0), ("t", 0.5), ("step", 2)), (1, 1, 1)),
        _spec((1, 1), "moe", (("form", "sorted"), ("experts", 2), ("k", 2), ("hidden", 1), ("renorm", True),
                              ("expert_form", "fused"), ("gated", False), ("restore", "index_add"),
                              ("sort", "argsort")), (1, 1)),
    ]),
    # TVM 0.27: a zero-element constant (FoldConstant of ``x.new_zeros((1, 0))``) runs in memory,
    # but the library written by export_library fails to load: "Invalid DLTensor file format".
    # Worked around: cat_drop_empty drops zero-element operands.
    "tvm-zero-size-constant": ("backend:tvm", [
        _spec((1, 1), "empty", (("form", "new_zeros"),), (1, 1)),
    ]),
}

# Explicit refusals ("cannot lower": status unsupported, a coverage gap, not a finding) these
# idioms meet: target -> pattern of the note. None today: torch.sort(stable=True) (aten.sort.stable,
# no ONNX or TVM translation) is decomposed for the 1-d integer keys MoE routing sorts
# (ir/decompositions.py).
UNSUPPORTED: dict[str, str] = {}


# ---- the specs -------------------------------------------------------------------------------------
def _forms_of(spec: ModelSpec, kind: str) -> set[str]:
    return {f.split("/", 1)[1] for f in spec.forms() if f.startswith(kind + "/")}


# Forms that failed on a backend (FIXED) or that a backend refused: each also runs in a spec of its
# own, so that it can hide no other form from a backend should it fail again.
ISOLATED = {"inplace": {"form=index_put"}, "empty": {"form=new_zeros"},
            "moe": {"restore=index_add", "sort=sort_stable"}}


def _size(spec: ModelSpec) -> int:
    return sum(math.prod(op.shape) for op in spec.ops)


@functools.cache
def idiom_specs(kind: str, n: int = 3, max_ops: int = 3, seeds: int = 300) -> tuple[ModelSpec, ...]:
    """``n`` specs of ``kind`` alone among the first ``seeds`` seeds, chosen greedily for the most
    forms not yet covered, then the smallest spec for each ISOLATED form (deterministic)."""
    pool = [s for s in (random_spec(seed, max_ops=max_ops, kinds=[kind]) for seed in range(seeds)) if kind in s.kinds()]
    isolated = ISOLATED.get(kind, set())
    clean = [s for s in pool if not _forms_of(s, kind) & isolated]
    chosen, covered = [], set()
    for _ in range(n):
        best = max(clean, key=lambda s: (len(_forms_of(s, kind) - covered), -_size(s)))
        if not _forms_of(best, kind) - covered:
            break
        chosen.append(best)
        covered |= _forms_of(best, kind)
        clean.remove(best)
    for form in sorted(isolated):     # the fewest ops, with no other isolated form
        chosen.append(min((s for s in pool if _forms_of(s, kind) & isolated == {form}),
                          key=lambda s: (len(s.ops), _size(s))))
    return tuple(chosen)


# ---- the generator ---------------------------------------------------------------------------------
def test_idioms_appear_often_in_random_specs_with_all_their_forms():
    # the campaign draws from every kind: each idiom must be in hundreds of its 10,000 models
    models, forms = Counter(), Counter()
    for seed in range(2000):
        spec = random_spec(seed)
        models.update(spec.kinds())
        forms.update(spec.forms())
    for kind in IDIOMS:
        assert models[kind] >= 60, (kind, models[kind])      # 3 % of the models
        missing = {f for f in FORMS[kind] if forms[f"{kind}/{f}"] == 0}
        assert not missing, (kind, missing)


@pytest.mark.parametrize("kind", IDIOMS)
def test_the_chosen_specs_cover_every_form_and_are_small(kind):
    specs = idiom_specs(kind)
    assert all(s.kinds() == {kind} and len(s.ops) <= 3 for s in specs)
    assert all(len(_forms_of(s, kind) & ISOLATED.get(kind, set())) <= 1 for s in specs)
    covered = set().union(*(_forms_of(s, kind) for s in specs))
    assert FORMS[kind] <= covered, FORMS[kind] - covered


# ---- the oracle on every target -----------------------------------------------------------------
@pytest.mark.parametrize("kind", IDIOMS)
def test_idiom_agrees_with_eager_on_capture_pipeline_and_backends(kind):
    failures = []
    for spec in idiom_specs(kind):
        res = oracle(spec, passes=[], backends=fuzz.DEFAULT_BACKENDS)
        assert res.discarded is None, (res.discarded, spec.describe())
        assert set(res.status) == set(TARGETS), res.status
        for m in res.mismatches:
            if known_issue(m) is None:
                failures.append(f"{str(m)[:600]}\n{spec.describe()}")
        for target, status in res.status.items():
            if status == "unsupported" and re.search(UNSUPPORTED.get(target, "^$"), res.notes[target]):
                continue
            if status not in PASSING and not any(m.target == target for m in res.mismatches):
                failures.append(f"{target}: {status}: {res.notes.get(target)}\n{spec.describe()}")
    assert not failures, "\n\n".join(failures)


def _fixed_cases():
    for issue, (target, specs) in sorted(FIXED.items()):
        for k, spec in enumerate(specs):
            yield pytest.param(issue, target, spec, id=f"{issue}-{k}")


@pytest.mark.parametrize("issue, target, spec", list(_fixed_cases()))
def test_backend_failures_found_by_the_idioms_stay_fixed(issue, target, spec):
    res = run_target(spec, target)
    if res.status.get(target) == "unavailable":
        pytest.skip(res.notes[target])
    assert res.mismatches == [], [str(m) for m in res.mismatches]
    for other in ("capture", "pipeline:default", "backend:onnx", "backend:torchscript"):
        assert run_target(spec, other).mismatches == []


def test_campaign_reports_the_idioms_per_kind(tmp_path):
    report = fuzz.campaign(5, seed=7, backends=(), passes=["cse"], max_models=4, max_ops=3, progress=False,
                           out=tmp_path, kinds=["rmsnorm", "embed", "empty"])
    text = report.format()
    assert "op kinds (models with at least one):" in text
    for kind in report.kinds:
        assert re.search(rf"\b{kind} {report.kinds[kind]}\b", text), text
    assert set(report.kinds) & {"rmsnorm", "embed", "empty"}
