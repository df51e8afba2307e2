"""Differential testing, fast budget: random valid models (optc.tools.fuzz) through capture,
every registered pass alone and the default pipeline, and on a few models through every backend,
compared with eager PyTorch in float64 (optc.tools.fuzz; rules in docs/fuzzing.md).

Hypothesis draws the models (``derandomize=True``: CI runs the same examples every time) and
shrinks a failing one; its final run writes a standalone reproducer into ``fuzz-repro/``
(``OPTC_FUZZ_REPRO_DIR``). ``OPTC_FUZZ_EXAMPLES`` raises the number of examples locally.

Also here: the generator (coverage, validity, determinism) and the oracle itself (it catches
an injected miscompile and shrinks it to a minimal model whose reproducer runs standalone).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis.control import current_build_context

from optc.passes import base as passes_base
from optc.tools import fuzz
from optc.tools.fuzz import (KINDS, ModelSpec, Op, build_model, known_issue, make_inputs, model_specs, oracle,
                             random_spec, write_reproducer)

REPRO_DIR = os.environ.get("OPTC_FUZZ_REPRO_DIR", "fuzz-repro")
EXAMPLES = int(os.environ.get("OPTC_FUZZ_EXAMPLES", "150"))
BACKEND_EXAMPLES = int(os.environ.get("OPTC_FUZZ_BACKEND_EXAMPLES", "4"))


def _settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def _is_final() -> bool:
    try:
        return current_build_context().is_final
    except Exception:  # outside hypothesis
        return True


_CACHE: dict = {}


def _oracle(spec: ModelSpec, **kw):
    """The oracle, memoised: while shrinking, hypothesis often proposes a model it already ran
    (genes hold more ints than an op reads)."""
    key = (repr(spec), repr(sorted(kw.items())))
    if key not in _CACHE:
        if len(_CACHE) > 2000:
            _CACHE.clear()
        _CACHE[key] = oracle(spec, **kw)
    return _CACHE[key]


def _assert_agrees(spec: ModelSpec, **kw) -> None:
    # known issues (bugs outside optc awaiting a workaround) have their own strict-xfail
    # regression tests in test_regressions.py; anything else fails here
    res = _oracle(spec, **kw)
    unexplained = [m for m in res.mismatches if known_issue(m) is None]
    if not unexplained:
        return
    paths = [write_reproducer(m, REPRO_DIR) for m in unexplained] if _is_final() else []
    lines = [str(m)[:600] for m in unexplained] + [f"reproducer: {p}" for p in paths]
    raise AssertionError("optc disagrees with eager:\n" + "\n".join(lines) + "\n" + spec.describe())


# ---- the fast budget -----------------------------------------------------------------------------
@_settings(EXAMPLES)
@given(model_specs(max_ops=8))
def test_every_pass_and_the_default_pipeline_agree_with_eager(spec):
    _assert_agrees(spec, backends=())


SEEDED_MODELS = int(os.environ.get("OPTC_FUZZ_SEEDED_MODELS", "80"))


def test_seeded_models_agree_with_eager():
    # the campaign's path on a fixed slice of its model space: larger, more varied models than
    # hypothesis' early examples; a mismatch is shrunk on its choice sequence and written out
    report = fuzz.campaign(30, seed=20261122, backends=(), max_models=SEEDED_MODELS, max_ops=8, progress=False,
                           out=REPRO_DIR, shrink_seconds=60)
    assert report.models + report.discarded == SEEDED_MODELS
    assert not report.unexplained, report.format()


@_settings(BACKEND_EXAMPLES)
@given(model_specs(max_ops=6))
def test_every_backend_agrees_with_eager(spec):
    # capture + each backend's default pipeline + lowering; a backend whose package or module is
    # missing is skipped (status "unavailable")
    _assert_agrees(spec, passes=[], pipeline=False, backends=fuzz.DEFAULT_BACKENDS)


# ---- the generator -------------------------------------------------------------------------------
def test_every_op_kind_and_main_form_appears():
    kinds, forms = set(), set()
    for seed in range(1000):
        spec = random_spec(seed)
        kinds |= spec.kinds()
        forms |= spec.forms()
    assert kinds == set(KINDS)
    wanted = {"conv2d/groups_mode=depthwise", "conv2d/groups_mode=grouped", "pool2d/pool=max", "pool2d/pool=avg",
              "act/fn=relu", "act/fn=gelu", "act/fn=gelu_tanh", "act/fn=silu", "gelu_manual/form=erf_div",
              "gelu_manual/form=tanh_pow", "attention/mask=causal_inf", "attention/mask=additive",
              "attention/qkv=fused", "layernorm_manual/var=var_mean", "dropout/form=module", "split/form=glu"}
    assert wanted <= forms, wanted - forms


@pytest.mark.parametrize("seed", range(25))
def test_generated_models_are_valid_and_deterministic(seed):
    spec = random_spec(seed)
    assert random_spec(seed) == spec
    assert eval(repr(spec), {"ModelSpec": ModelSpec, "Op": Op}) == spec      # repr is a literal
    model = build_model(spec)
    for name, t in model.state_dict().items():   # weights come from the seed only
        assert torch.equal(t, build_model(spec).state_dict()[name]), name
    inputs = make_inputs(spec)
    assert all(torch.isfinite(t).all() for t in inputs)
    with torch.no_grad():
        out = model(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    assert [tuple(o.shape) for o in outs] == [spec.shape_of(v) for v in spec.outputs]
    assert all(torch.isfinite(o).all() for o in outs)
    assert all(max(op.shape) >= 1 and torch.Size(op.shape).numel() <= fuzz.MAX_NUMEL for op in spec.ops)


@_settings(60)
@given(model_specs())
def test_hypothesis_specs_build_and_match_their_shapes(spec):
    with torch.no_grad():
        out = build_model(spec)(*make_inputs(spec))
    outs = out if isinstance(out, tuple) else (out,)
    assert [tuple(o.shape) for o in outs] == [spec.shape_of(v) for v in spec.outputs]


def test_restricted_kinds_and_source_is_standalone(tmp_path):
    spec = random_spec(3, kinds=["conv2d", "batchnorm2d", "act"])
    assert spec.kinds() <= {"conv2d", "batchnorm2d", "act"}
    path = tmp_path / "model.py"
    path.write_text(spec.source() + "\nout = Model().eval()(*make_inputs())\n"
                    "print(tuple((out[0] if isinstance(out, tuple) else out).shape))\n")
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(spec.shape_of(spec.outputs[0]))


# ---- the oracle ----------------------------------------------------------------------------------
_WRONG_PASS = '''
"""Test only: a deliberately wrong pass (softmax over the wrong axis) for the fuzzer's tests."""
import torch
from optc.passes.base import PassResult, register_pass


@register_pass("fuzz-test-wrong-softmax-axis", exact=True, description="test only: softmax on the wrong axis")
def wrong_softmax_axis(gm, ctx):
    changed = False
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.softmax.int:
            rank = n.args[0].meta["val"].dim()
            if rank >= 2:
                n.args = (n.args[0], (n.args[1] - 1) % rank) + tuple(n.args[2:])
                changed = True
    return PassResult(gm, changed)
'''


@pytest.fixture
def wrong_pass(tmp_path, monkeypatch):
    """Registers ``fuzz-test-wrong-softmax-axis`` from a module file in tmp_path (so that a
    reproducer can import it in a fresh process) and unregisters it afterwards."""
    (tmp_path / "fuzz_wrong_pass.py").write_text(_WRONG_PASS)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fuzz_wrong_pass", None)
    import importlib
    importlib.import_module("fuzz_wrong_pass")
    yield "fuzz-test-wrong-softmax-axis"
    passes_base._REGISTRY.pop("fuzz-test-wrong-softmax-axis", None)
    sys.modules.pop("fuzz_wrong_pass", None)


def test_oracle_catches_an_injected_miscompile_and_hypothesis_shrinks_it(wrong_pass, tmp_path):
    found: list = []

    @_settings(100)
    @given(model_specs(max_ops=3, kinds=["act", "softmax", "scalar"]))
    def search(spec):
        res = _oracle(spec, passes=[wrong_pass], pipeline=False)
        if res.mismatches:
            if _is_final():
                found.append((res.mismatches[0], write_reproducer(res.mismatches[0], tmp_path / "repro")))
            raise AssertionError(str(res.mismatches[0]))

    with pytest.raises(AssertionError, match="fuzz-test-wrong-softmax-axis: numeric"):
        search()
    mismatch, repro = found[-1]
    spec = mismatch.spec
    kinds = [op.kind for op in spec.ops]                                    # shrunk to a softmax,
    assert "softmax" in kinds and len(kinds) <= 2, spec.describe()          # at most one op more,
    assert torch.Size(spec.inputs[0]).numel() <= 4, spec.describe()         # on a tiny input
    # the reproducer runs standalone (the plugin pass imported by name) and reproduces
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, repro], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "MISMATCH" in run.stdout


def test_campaign_shrinks_and_counts(wrong_pass, tmp_path):
    report = fuzz.campaign(5, seed=3, backends=(), passes=[wrong_pass], max_models=8, progress=False,
                           shrink_seconds=15, out=tmp_path, max_ops=4, kinds=["softmax", "act", "linear"])
    assert report.models == 8
    counts = report.per_target[f"pass:{wrong_pass}"]
    assert counts["ran"] == 8 and counts["mismatch"] >= 1
    (finding,) = report.findings.values()
    assert finding.occurrences == counts["mismatch"]
    assert len(finding.shrunk.spec.ops) <= len(finding.first.spec.ops)
    assert "softmax" in finding.shrunk.spec.kinds()
    assert os.path.isfile(finding.reproducer)
    assert f"pass:{wrong_pass}" in report.format()


def test_a_campaign_in_two_workers_counts_what_one_worker_does(tmp_path):
    kw = dict(seed=5, backends=(), passes=["cse", "fold-binary"], max_models=6, progress=False, out=tmp_path,
              max_ops=5)
    one = fuzz.campaign(5, **kw)
    two = fuzz.parallel_campaign(5, workers=2, **kw)
    assert one.models == two.models == 6
    assert two.distinct == one.distinct
    assert {t: dict(c) for t, c in two.per_target.items()} == {t: dict(c) for t, c in one.per_target.items()}
    assert two.kinds == one.kinds


def _register(name, fn, **kw):
    passes_base.register_pass(name, description="test only", **kw)(fn)
    return name


@pytest.fixture
def test_passes():
    names = []
    yield names
    for n in names:
        passes_base._REGISTRY.pop(n, None)


def _scale_outputs(factor):
    def run(gm, ctx):
        out = gm.graph.output_node()
        with gm.graph.inserting_before(out):
            new = []
            for a in out.args[0]:
                m = gm.graph.call_function(torch.ops.aten.mul.Tensor, (a, factor))
                m.meta["val"] = a.meta["val"]
                new.append(m)
        out.args = (tuple(new),)
        gm.recompile()
        return passes_base.PassResult(gm, True)
    return run


def test_lossy_passes_are_held_to_their_declared_tolerance(test_passes):
    spec = random_spec(5, kinds=["linear", "act"])
    test_passes += [_register("fuzz-test-lossy-declared", _scale_outputs(1.001), exact=False, lossy_tolerance=1e-2),
                    _register("fuzz-test-lossy-too-big", _scale_outputs(1.1), exact=False, lossy_tolerance=1e-2),
                    _register("fuzz-test-lossy-undeclared", _scale_outputs(1.5), exact=False),
                    _register("fuzz-test-exact-but-off", _scale_outputs(1.001), exact=True)]
    res = oracle(spec, passes=test_passes, pipeline=False)
    assert res.status["pass:fuzz-test-lossy-declared"] == "fired"
    assert res.status["pass:fuzz-test-lossy-too-big"] == "mismatch"
    assert res.status["pass:fuzz-test-lossy-undeclared"] == "unchecked"     # only runs + shapes
    assert res.status["pass:fuzz-test-exact-but-off"] == "mismatch"         # 1e-3 is no rounding error
    assert {m.target for m in res.mismatches} == {"pass:fuzz-test-lossy-too-big", "pass:fuzz-test-exact-but-off"}


def test_a_small_wrong_answer_stays_a_mismatch_after_the_float64_recheck(test_passes):
    # 1e-4 off on every output: below the re-check's 1e-3 threshold, but the float64 run is
    # 1e-4 off too, so it is a finding, not rounding
    test_passes.append(_register("fuzz-test-slightly-off", _scale_outputs(1 + 1e-4), exact=True))
    res = oracle(random_spec(5, kinds=["linear", "act"]), passes=test_passes, pipeline=False)
    assert res.status["pass:fuzz-test-slightly-off"] == "mismatch"
    (m,) = res.mismatches
    assert 5e-5 < m.error < 1e-3


def test_rounding_differences_are_not_mismatches():
    # fold-conv-bn changes the rounding (weights folded in float64, rounded once): never a finding
    spec = ModelSpec(inputs=((2, 3, 6, 6),), ops=(
        Op("conv2d", (0,), (("groups_mode", "plain"), ("out", 8), ("k", (3, 3)), ("stride", 1), ("padding", (1, 1)),
                            ("dilation", 1), ("groups", 1), ("bias", True), ("padding_mode", "zeros")), (2, 8, 6, 6)),
        Op("batchnorm2d", (1,), (("affine", True), ("eps", 1e-05)), (2, 8, 6, 6))), outputs=(2,), seed=7)
    res = oracle(spec, passes=["fold-conv-bn"], pipeline=False)
    assert res.status["pass:fold-conv-bn"] == "fired" and not res.mismatches


def test_crashes_are_mismatches_refusals_are_not_and_missing_backends_are_skipped(test_passes, monkeypatch):
    from optc.errors import OptcError

    def crash(gm, ctx):
        raise RuntimeError("boom")

    def refuse(gm, ctx):
        raise OptcError("fuzz-test-refuse: nothing to do on this model")
    test_passes.append(_register("fuzz-test-crash", crash, exact=True))
    test_passes.append(_register("fuzz-test-refuse", refuse, exact=False))
    from optc.backends import base as backends_base
    monkeypatch.setitem(backends_base._BACKENDS, "tvm", "optc.backends.fuzz_test_no_such_module:Nope")
    monkeypatch.delitem(backends_base._INSTANCES, "tvm", raising=False)
    res = oracle(random_spec(1, kinds=["act"]), passes=test_passes, pipeline=False, backends=["tvm"])
    (m,) = res.mismatches
    assert m.target == "pass:fuzz-test-crash" and m.kind == "error" and "boom" in m.detail
    assert res.status["pass:fuzz-test-refuse"] == "refused"
    assert "nothing to do" in res.notes["pass:fuzz-test-refuse"]
    assert res.status["backend:tvm"] == "unavailable"


def test_cli_fuzz(tmp_path, capsys):
    from optc.tools.cli import main
    assert main(["fuzz", "--max-models", "2", "--backends", "", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "pass:cse" in out and "pipeline:default" in out and "no mismatches" in out
    assert main(["fuzz", "--minutes", "-1"]) == 2
    assert main(["fuzz", "--backends", "nope"]) == 2
    assert main(["fuzz", "--backend-rate", "2"]) == 2
    assert main(["fuzz", "--workers", "0"]) == 2


def test_cli_fuzz_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path, capsys):
    from optc.tools.cli import main
    argv = ["fuzz", "--max-models", "3", "--backends", "", "--passes", "cse,dce", "--out", str(tmp_path)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "\r" not in err                                   # no bar redrawn into a log
    lines = [line for line in err.splitlines() if line.startswith("optc fuzz: ")]
    assert len(lines) >= 2, err                              # one line each 5% of the budget
    assert lines[-1].startswith("optc fuzz: 3/3 models (100%), ") and lines[-1].endswith("mismatches=0"), err


def test_cli_fuzz_progress_is_a_bar_on_a_terminal(tmp_path, capsys, monkeypatch):
    from optc.tools.cli import main
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["fuzz", "--max-models", "1", "--backends", "", "--passes", "cse", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "\r" in err and "optc fuzz: 1 models [" in err



def test_reproducer_of_an_agreeing_model_exits_zero(tmp_path):
    spec = random_spec(11, kinds=["act", "linear"])
    m = fuzz.Mismatch("pass:cse", "numeric", "(none: a test of the writer)", spec, pipeline="cse")
    path = write_reproducer(m, tmp_path)
    run = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert textwrap.dedent(repr(spec)) in open(path).read()
