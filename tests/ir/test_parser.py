"""optc.ir.parser: the canonical printer's text reads back into the same Program.

Round trip on every zoo model (tiny configs), as captured and after the cpu target's 'default'
pipeline: the text prints back identically and the parsed Program computes the same outputs,
bit for bit, on the example inputs. Then the argument syntax, dynamic dims, the on-disk form and
the errors (file:line:column)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

import optc
from optc.errors import ParseError, WeightsError
from optc.ir.parser import WEIGHTS_SUFFIX, load_program, parse_program, program_tensors, save_program_text
from optc.ir.printer import format_text
from optc.ir.verifier import verify
from optc.tools import zoo


def _outputs(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _round_trip(program: optc.Program) -> optc.Program:
    """Parse ``program``'s text with its tensors; assert the text prints back and the outputs match."""
    text = format_text(program)
    parsed = parse_program(text, program_tensors(program), filename=f"{program.name}.optc")
    assert format_text(parsed) == text
    verify(parsed, repropagate=True)
    for got, want in zip(parsed.example_args, program.example_flat_inputs()):
        assert torch.equal(got, want)
    with torch.no_grad():
        want = _outputs(program(*program.example_args, **program.example_kwargs))
        got = _outputs(parsed(*parsed.example_args))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)   # same graph, same kernels: exact
    return parsed


# ---- every zoo model ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", zoo.names())
def test_zoo_model_round_trips_captured_and_after_default(name):
    model, args = zoo.load(name, batch=1, **zoo.tiny_config(name))
    captured = optc.capture(model.eval(), args, name=name)
    _round_trip(captured)
    optimized, _ = optc.optimize(captured, pipeline="default", target="cpu")
    assert format_text(optimized) != format_text(captured)   # the pipeline did something to round-trip
    _round_trip(optimized)


# ---- dynamic dims ---------------------------------------------------------------------------------------------
class Padded(nn.Module):
    def forward(self, x):
        return nn.functional.pad(x, [0, 1, 0, 1]).flatten(1).softmax(-1)


@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_dynamic_batch_round_trips_with_its_symbols(name):
    model, args = zoo.load(name, batch=1, **zoo.tiny_config(name))
    captured = optc.capture(model.eval(), args, dynamic_shapes="batch")
    text = format_text(captured)
    sym = text.splitlines()[0].split("[")[1].split(",")[0]
    assert sym.startswith("s") and sym[1:].isdigit()   # graph(%x : f32[s77,64]) ...
    parsed = _round_trip(captured)
    optimized, _ = optc.optimize(parsed, pipeline="default", target="cpu")
    _round_trip(optimized)
    # the symbol stays free: the parsed program runs another batch size
    x = args[0].repeat(3, *[1] * (args[0].dim() - 1))
    with torch.no_grad():
        torch.testing.assert_close(_outputs(parsed(x))[0], _outputs(model(x))[0], rtol=1e-5, atol=1e-5)


def test_a_composite_op_keeps_a_symbolic_dim():
    """aten.pad's C++ kernel reads sizes as ints; run as torch.export runs it, the dim stays s*."""
    captured = optc.capture(Padded(), (torch.randn(2, 3, 4, 4),), dynamic_shapes="batch")
    text = format_text(captured)
    assert ",3,5,5] = aten.pad(%x, [0, 1, 0, 1])" in text
    _round_trip(captured)


def test_a_symbolic_input_dim_must_be_a_plain_symbol():
    with pytest.raises(ParseError, match=r"^<text>:1:12: the input dim '2\*s0' of 'f32\[2\*s0,3\]' is not a plain "
                                         r"symbol"):
        parse_program("graph(%x : f32[2*s0,3]):\n  return (%x)\n")


# ---- the argument syntax --------------------------------------------------------------------------------------
ARGS = """\
graph(%x : f32[2,3,4,4], %i : i64[2]):
  %s : f32[3] = get_attr scale
  %b : f32[3] = get_attr norm.shift
  %to : f64[2,3,4,4] = aten.to.dtype_layout(%x, dtype=f64, layout=strided, device=device(cpu))  # m.py:1
  %clone : f32[2,3,4,4] = aten.clone(%x, memory_format=channels_last)
  %full : f32[2] = aten.full([2], -inf, dtype=f32, pin_memory=False)
  %nan_to_num : f32[2,3,4,4] = aten.nan_to_num(%x, nan, inf, -inf)
  %gelu : f32[2,3,4,4] = aten.gelu(%clone, approximate='tanh')
  %clamp : f32[2,3,4,4] = aten.clamp(%gelu, None, 1.5)
  %split : (f32[1,3,4,4], f32[1,3,4,4]) = aten.split.Tensor(%clamp, 1)
  %getitem : f32[1,3,4,4] = getitem(%split, 1)
  %permute : f32[1,4,4,3] = aten.permute(%getitem, [0, 2, 3, 1])
  %index : f32[2,3,4,4] = aten.index.Tensor(%x, [%i])
  %affine : f32[2,3,4,4] = optc.channel_affine(%index, %s, %b, 1)  # m.py:9; from %a, %b by fold-conv-bn (rule r1)
  %ones : bool[2,2] = aten.ones([2, 2], dtype=bool)
  %amax : f32[2,3,1,1] = aten.amax(%x, [2, 3], True)
  %eq : bool[2] = aten.eq.Scalar(%full, 1e-05)
  %view : f32[2,3,16] = aten.view(%x, (2, 3, -1))
  %cat : f32[2,6,4,4] = aten.cat((%x, %x), 1)
  %stack : f32[1,2,3,4,4] = aten.stack((%x,))
  return (%to, %permute, %affine, %nan_to_num, %ones, %eq, %view, %amax, %cat, %stack)
"""


def _args_tensors():
    return {"scale": torch.randn(3), "norm.shift": torch.randn(3), "%x": torch.randn(2, 3, 4, 4),
            "%i": torch.tensor([1, 0])}


def test_every_kind_of_argument_reads_back():
    w = _args_tensors()
    p = parse_program(ARGS, w, filename="args.optc")
    assert format_text(p, with_provenance=True) == ARGS
    nodes = {n.name: n for n in p.graph.nodes}
    assert nodes["to"].target is torch.ops.aten.to.dtype_layout
    assert nodes["to"].kwargs == {"dtype": torch.float64, "layout": torch.strided, "device": torch.device("cpu")}
    assert nodes["clone"].kwargs == {"memory_format": torch.channels_last}
    assert nodes["full"].args == ([2], -float("inf"))
    assert nodes["gelu"].kwargs == {"approximate": "tanh"} and nodes["clamp"].args[1:] == (None, 1.5)
    assert nodes["getitem"].target.__name__ == "getitem" and nodes["getitem"].args == (nodes["split"], 1)
    assert nodes["view"].args[1] == (2, 3, -1) and isinstance(nodes["permute"].args[1], list)
    assert nodes["stack"].args == ((nodes["x"],),)
    assert nodes["affine"].target is torch.ops.optc.channel_affine.default
    assert nodes["affine"].meta["optc_source"] == "m.py:9"
    assert nodes["affine"].meta["optc_origin"] == ("a", "b") and nodes["affine"].meta["optc_pass"] == "fold-conv-bn"
    assert nodes["affine"].meta["optc_rule"] == "r1"
    assert nodes["clamp"].meta["optc_origin"] == ("clamp",)   # no note: derives from itself
    assert nodes["clone"].meta["val"].is_contiguous(memory_format=torch.channels_last)
    x, i = w["%x"], w["%i"]
    out = p(x, i)
    torch.testing.assert_close(out[2], x[i] * w["scale"].view(1, 3, 1, 1) + w["norm.shift"].view(1, 3, 1, 1))
    torch.testing.assert_close(out[7], x.amax((2, 3), keepdim=True), rtol=0, atol=0)


def test_blank_lines_and_comment_lines_are_skipped():
    text = "# a reproducer\n\ngraph(%x : f32[2]):\n  # the op\n  %relu : f32[2] = aten.relu(%x)\n\n  return (%relu)\n"
    p = parse_program(text)
    assert format_text(p) == "graph(%x : f32[2]):\n  %relu : f32[2] = aten.relu(%x)\n  return (%relu)\n"


# ---- on disk --------------------------------------------------------------------------------------------------
def test_save_and_load_the_text_and_its_side_file(tmp_path):
    model, args = zoo.load("small_cnn", batch=1, **zoo.tiny_config("small_cnn"))
    program = optc.capture(model.eval(), args, name="small_cnn")
    path = str(tmp_path / "cnn.optc")
    assert save_program_text(program, path) == [path, path + WEIGHTS_SUFFIX]
    assert sorted(os.listdir(tmp_path)) == ["cnn.optc", "cnn.optc.weights"]   # no temporaries left
    assert open(path).read() == format_text(program)
    saved = torch.load(path + WEIGHTS_SUFFIX, weights_only=True)
    assert set(saved) == {n.target for n in program.graph.nodes if n.op == "get_attr"} | {"%x"}
    loaded = load_program(path)
    assert loaded.name == "cnn" and format_text(loaded) == format_text(program)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*loaded.example_args), program(*args), rtol=0, atol=0)


def test_a_missing_side_file_is_named(tmp_path):
    model, args = zoo.load("mlp", batch=1, **zoo.tiny_config("mlp"))
    path = tmp_path / "mlp.optc"
    path.write_text(format_text(optc.capture(model.eval(), args)))
    with pytest.raises(WeightsError, match=r"mlp\.optc:2: no weight '.*' for %.* \(the side file '.*mlp\.optc\."
                                           r"weights' does not exist\)"):
        load_program(str(path))


def test_inputs_without_example_values_are_random_of_their_type():
    p = parse_program("graph(%x : f32[2,3], %i : i64[4]):\n  return (%x, %i)\n")
    x, i = p.example_args
    assert x.shape == (2, 3) and x.dtype == torch.float32 and x.std() > 0
    assert i.dtype == torch.int64 and 0 <= int(i.min()) and int(i.max()) < 100


# ---- errors ---------------------------------------------------------------------------------------------------
SMALL = """\
graph(%x : f32[2,3]):
  %w : f32[4,3] = get_attr fc.weight
  %linear : f32[2,4] = aten.linear(%x, %w)  # m.py:3
  %relu : f32[2,4] = aten.relu(%linear)
  return (%relu)
"""


def _error(text: str, weights=None, kind=ParseError) -> str:
    with pytest.raises(kind) as info:
        parse_program(text, {"fc.weight": torch.randn(4, 3)} if weights is None else weights, filename="r.optc")
    return str(info.value)


def test_small_program_parses():
    w = torch.randn(4, 3)
    p = parse_program(SMALL, {"fc.weight": w})
    x = p.example_args[0]
    torch.testing.assert_close(p(x), torch.relu(x @ w.T), rtol=0, atol=0)


@pytest.mark.parametrize("old, new, message", [
    ("aten.relu(%linear)", "aten.relu(%linear",
     "r.optc:4:39: expected ',' or ')' in the argument list, found end of line"),
    ("aten.relu(%linear)", "aten.relu(@)", "r.optc:4:32: expected an argument (%value, number, string, list, tuple, "
                                           "dtype, device(...), None), found '@)'"),
    ("aten.relu(%linear)", "aten.relu((%linear))", "r.optc:4:40: a one-element tuple is written (x,)"),
    ("graph(", "grph(", "r.optc:1:1: expected 'graph(' at the start of the program, found 'grph(%x : f32[2,3]):'"),
    ("%x : f32[2,3]", "%x f32[2,3]", "r.optc:1:10: expected ':' and the type of input %x, found 'f32[2,3]):'"),
    ("  return (%relu)\n", "", "r.optc:5:1: expected 'return (...)' ending the graph, found the end of the text"),
    ("# m.py:3", "junk", "r.optc:3:45: expected '#' or the end of the line, found 'junk'"),
    ("%relu : f32[2,4]", "%relu : q9[2,4]", "r.optc:4:11: unknown dtype 'q9' in type 'q9[2,4]'"),
    ("aten.relu(%linear)", "aten.relu(%lin)", "r.optc:4:32: undefined value %lin (not an input nor defined on an "
                                              "earlier line)"),
    ("%relu : f32[2,4] = aten.relu", "%linear : f32[2,4] = aten.relu", "r.optc:4:3: %linear is defined twice"),
    ("%relu : f32[2,4]", "%relu : f32[2,5]", "r.optc:4:11: %relu is declared f32[2,5] but aten.relu computes f32[2,4]"),
    ("aten.relu(%linear)", "aten.relu(%linear, nope)", "r.optc:4:41: unknown name 'nope' in an argument"),
])
def test_syntax_errors_name_the_line_and_column(old, new, message):
    assert old in SMALL
    assert _error(SMALL.replace(old, new)).startswith(message)


def test_errors_are_typed_and_exported():
    with pytest.raises(optc.ParseError) as info:
        parse_program(SMALL.replace("aten.relu(%linear)", "aten.relu(%lin)"), {"fc.weight": torch.randn(4, 3)})
    assert isinstance(info.value, optc.OptcError)
    assert (info.value.filename, info.value.line, info.value.column) == ("<text>", 4, 32)


@pytest.mark.parametrize("op, why", [
    ("aten.frobnicate", "torch.ops.aten has no operator 'frobnicate'"),
    ("aten.relu.Bogus", "aten.relu has no overload 'Bogus' (it has: default"),
    ("optc.no_such_op", "torch.ops.optc has no operator 'no_such_op'"),
    ("frobnicate", "a bare name is one of the Python callables"),
])
def test_an_unknown_op_is_named_with_its_line(op, why):
    message = _error(SMALL.replace("aten.relu(", f"{op}("))
    assert message.startswith(f"r.optc:4:22: unknown op '{op}': {why}")


def test_a_missing_weight_is_named():
    assert _error(SMALL, {}, WeightsError) == "r.optc:2: no weight 'fc.weight' for %w (f32[4,3]) in the weights given"


@pytest.mark.parametrize("tensor, got", [(torch.randn(3, 4), "f32[3,4]"), (torch.randn(4, 3).double(), "f64[4,3]")])
def test_a_weight_of_another_shape_or_dtype_is_named(tensor, got):
    assert _error(SMALL, {"fc.weight": tensor}, WeightsError) == \
        f"r.optc:2: weight 'fc.weight' is {got}, the text declares %w : f32[4,3]"


def test_an_example_input_of_another_shape_is_named():
    message = _error(SMALL, {"fc.weight": torch.randn(4, 3), "%x": torch.randn(3, 3)}, WeightsError)
    assert message == "r.optc:1: the example value of input %x is f32[3,3], the text declares f32[2,3]"
