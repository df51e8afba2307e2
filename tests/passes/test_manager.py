import os

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import optc
from optc.errors import PassError, PipelineError
from optc.ir.printer import format_text
from optc.passes import PassManager, PassResult, register_pass
from optc.passes import base


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        dead = x * 3  # noqa: F841
        return torch.relu(self.fc(x)) + 1


def _program():
    torch.manual_seed(0)
    return optc.capture(Net().eval(), (torch.randn(2, 4),))


@pytest.fixture
def scratch_pass():
    """Register test-only passes and remove them afterwards."""
    added = []

    def add(name, fn, exact=True):
        register_pass(name, exact=exact, description="test pass")(fn)
        added.append(name)
    yield add
    for name in added:
        base._REGISTRY.pop(name, None)


def _relu_node(gm):
    return next(n for n in gm.graph.nodes if n.target is torch.ops.aten.relu.default)


def test_report_has_timing_and_stats():
    new, report = PassManager("dce", default="").run(_program())
    rec = report.record("dce")
    assert rec.modified and rec.stats == {"removed": 1} and rec.time_s > 0
    assert rec.nodes_after == rec.nodes_before - 1
    assert "dce" in report.format() and "removed=1" in report.format()


def test_input_program_is_never_modified():
    program = _program()
    text = format_text(program)
    PassManager("dce", default="").run(program)
    assert format_text(program) == text


def test_failed_pass_names_pass_previous_and_node_and_leaves_program_intact(scratch_pass):
    def boom(gm, ctx):
        relu = _relu_node(gm)
        ctx.current_node = relu.name
        relu.target = torch.ops.aten.sigmoid.default   # half-done mutation...
        raise RuntimeError("kaboom")                    # ...then failure
    scratch_pass("test-boom", boom)
    program = _program()
    text = format_text(program)
    with pytest.raises(PassError) as info:
        PassManager("dce,test-boom", default="").run(program)
    err = info.value
    assert err.pass_name == "test-boom" and err.previous == ["dce"] and err.node == "relu"
    assert "while running 'test-boom' after [dce]" in str(err) and "%relu" in str(err) and "kaboom" in str(err)
    assert format_text(program) == text
    # the last good program (after dce) is attached and untouched by the failed pass
    assert "aten.relu" in format_text(err.program) and "sigmoid" not in format_text(err.program)


def test_dishonest_modified_is_caught(scratch_pass):
    def liar(gm, ctx):
        _relu_node(gm).target = torch.ops.aten.sigmoid.default
        return PassResult(gm, False, {})
    scratch_pass("test-liar", liar)
    with pytest.raises(PassError, match="reported 'unchanged' but changed the graph"):
        PassManager("test-liar", default="", check_modified=True).run(_program())


def test_numeric_check_catches_a_wrong_exact_pass(scratch_pass):
    def wrong(gm, ctx):
        _relu_node(gm).target = torch.ops.aten.sigmoid.default
        return PassResult(gm, True, {})
    scratch_pass("test-wrong", wrong)
    PassManager("test-wrong", default="").run(_program())   # unchecked: runs
    with pytest.raises(PassError, match="exact pass changed the numerics"):
        PassManager("test-wrong", default="", check_numerics=True).run(_program())


def test_lossy_pass_error_is_reported(scratch_pass):
    def lossy(gm, ctx):
        _relu_node(gm).target = torch.ops.aten.sigmoid.default
        return PassResult(gm, True, {})
    scratch_pass("test-lossy", lossy, exact=False)
    _, report = PassManager("test-lossy", default="").run(_program())
    err = report.record("test-lossy").error
    assert err is not None and err.max_rel_error > 1e-3 and err.cosine < 1.0


def test_verify_each_catches_broken_metadata(scratch_pass):
    def bad_meta(gm, ctx):
        relu = _relu_node(gm)
        relu.meta["val"] = relu.meta["val"].new_empty((7,))
        return PassResult(gm, True, {})
    scratch_pass("test-badmeta", bad_meta)
    with pytest.raises(PassError, match="meta\\['val'\\] says"):
        PassManager("test-badmeta", default="", verify_each=True).run(_program())


def test_bisect_limit_and_disable():
    _, report = PassManager("cse,dce,dce", default="", bisect_limit=1).run(_program())
    assert [r.status for r in report.records] == ["ran", "bisected", "bisected"]
    new, report = PassManager("cse,dce", default="", disable=["dce"]).run(_program())
    assert [r.status for r in report.records] == ["ran", "disabled"]
    assert "aten.mul" in format_text(new)
    with pytest.raises(PipelineError, match="cannot disable unknown pass 'nope'"):
        PassManager("dce", default="", disable=["nope"])


def test_print_after_all_writes_one_file_per_pass(tmp_path):
    PassManager("cse,dce", default="", dump_dir=str(tmp_path), print_after_all=True).run(_program())
    files = sorted(os.listdir(tmp_path))
    assert files == ["00_input.txt", "01_cse.txt", "02_dce.txt", "pipeline.txt"]
    assert "aten.mul" not in (tmp_path / "02_dce.txt").read_text()


def test_print_changed_writes_diffs_only_for_changed_passes(tmp_path):
    PassManager("cse,dce", default="", dump_dir=str(tmp_path), print_changed=True).run(_program())
    files = sorted(os.listdir(tmp_path))
    assert files == ["00_input.txt", "02_dce.txt", "pipeline.txt"]
    diff = (tmp_path / "02_dce.txt").read_text()
    assert diff.startswith("--- before dce") and "\n-  %mul" in diff


def test_failure_writes_reproducer(tmp_path, scratch_pass):
    def boom(gm, ctx):
        raise ValueError("nope")
    scratch_pass("test-boom2", boom)
    with pytest.raises(PassError):
        PassManager("test-boom2", default="", dump_dir=str(tmp_path)).run(_program())
    text = (tmp_path / "failure_reproducer.txt").read_text()
    assert "test-boom2" in text and "graph(" in text


def test_optimize_public_api():
    program = _program()
    new, report = optc.optimize(program, "dce", target="cpu")
    assert isinstance(new, optc.Program) and report.record("dce").modified
    x = torch.randn(2, 4)
    torch.testing.assert_close(new(x), program(x))
    with pytest.raises(TypeError, match="takes a Program"):
        optc.optimize(Net(), "dce")


def test_a_pass_that_makes_a_dynamic_dim_static_fails_and_names_it(scratch_pass):
    """Comparing a symbolic size with == in Python guards on the example's size: the ShapeEnv
    then specialises the dim, and the compiled model would refuse every other size."""
    def specialise(gm, ctx):
        x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        if x.meta["val"].shape[0] == 2:        # the bug: a guard on a dynamic dim
            pass
        return PassResult(gm, False)
    scratch_pass("test-specialise", specialise)
    program = optc.capture(Net().eval(), (torch.randn(2, 4),), dynamic_shapes="batch")
    with pytest.raises(PassError, match=r"made dynamic dim x\[0\] static"):
        optc.optimize(program, "test-specialise")


def test_the_default_pipeline_keeps_a_dynamic_sequence_length():
    """drop-noop-view compared a slice's shape with its input's with ==: on a dynamic sequence
    length that guard made the dim static (found on HF Llama)."""
    class Pos(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("pos", torch.arange(16.0)[None, :, None])   # as long as the example
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x + self.pos[:, : x.shape[1]])

    seq = torch.export.Dim("seq", min=2, max=16)
    model = Pos().eval()
    program = optc.capture(model, (torch.randn(1, 16, 4),), dynamic_shapes=({1: seq},))
    out, _ = optc.optimize(program)
    assert isinstance(out.input_specs[0].shape[1], str)
    x = torch.randn(1, 9, 4)
    torch.testing.assert_close(out(x), model(x))
