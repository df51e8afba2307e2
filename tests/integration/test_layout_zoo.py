"""convert-layout on every zoo CNN (tiny configurations): NHWC after the default pipeline keeps
the numerics (as close to float64 as eager float32 is), converts every convolution, and leaves
ResNet-50 and MobileNetV2 with at most two permutes -- one at the input, one at the output.
The full-size ResNet-50 and MobileNetV2 are checked too, marked ``slow``."""

from __future__ import annotations

import copy

import pytest
import torch

import optc
import optc.ir.ops  # noqa: F401  (registers the optc:: ops)
from optc.ir.verifier import compare_outputs, random_inputs_like, verify
from optc.tools import zoo

aten = torch.ops.aten
CNNS = [n for n in ("small_cnn", "resnet18", "resnet50", "mobilenet_v2", "hf_resnet50", "hf_mobilenet_v2")
        if zoo.is_available(n)]


def _nhwc(name: str, config: dict, **capture):
    model, inputs = zoo.load(name, **config)
    program = optc.capture(model, inputs, **capture)
    nchw, _ = optc.optimize(program, "default", target="cpu")
    nhwc, report = optc.optimize(nchw, "convert-layout", verify_each=True, check_numerics=True)
    verify(nhwc, repropagate=True)
    return model, program, nchw, nhwc, report


def _permutes(program) -> list:
    return [n for n in program.graph.nodes if n.op == "call_function"
            and n.target in (aten.permute.default, aten.transpose.int)]


def _assert_close_to_fp64(model, program, args) -> None:
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(*[a.double() for a in args])
        eager_err = compare_outputs(ref, model(*args)).max_rel_error
        err = compare_outputs(ref, program(*args)).max_rel_error
    assert err <= 2e-6 + 4 * eager_err, (err, eager_err)


@pytest.mark.parametrize("name", CNNS)
def test_zoo_cnn_in_nhwc_matches_eager(name):
    model, program, nchw, nhwc, report = _nhwc(name, zoo.tiny_config(name))
    convs = sum(1 for n in nchw.graph.nodes if n.target is aten.conv2d.default)
    assert report.stats("convert-layout")["conv2d"] == convs > 0
    assert not any(n.target is aten.conv2d.default for n in nhwc.graph.nodes)
    for args, _ in [(program.example_args, {}), random_inputs_like(program, seed=3)]:
        _assert_close_to_fp64(model, nhwc, args)


_CONVS = (aten.conv2d.default, torch.ops.optc.conv2d_nhwc.default)


def _reaches_conv(node, forward: bool) -> bool:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for m in (n.users if forward else n.all_input_nodes):
            if m not in seen:
                if m.target in _CONVS:
                    return True
                seen.add(m)
                todo.append(m)
    return False


def _boundary_only(program) -> None:
    """At most 2 permutes, each at the boundary: no convolution before it (the input side) or
    none after it (the output side)."""
    perms = _permutes(program)
    assert len(perms) <= 2, [p.format_node() for p in perms]
    for p in perms:
        assert not _reaches_conv(p, forward=False) or not _reaches_conv(p, forward=True), p.format_node()


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"] + [n for n in ("hf_resnet50", "hf_mobilenet_v2")
                                                                  if n in CNNS])
def test_nhwc_resnet50_and_mobilenet_v2_permute_only_at_the_boundary(name):
    *_, nhwc, report = _nhwc(name, zoo.tiny_config(name))
    _boundary_only(nhwc)
    assert report.stats("convert-layout")["permutes"] == len(_permutes(nhwc)) == 1   # the output is a flat [N, classes]


def test_nhwc_with_a_dynamic_batch():
    model, program, _, nhwc, _ = _nhwc("resnet18", zoo.tiny_config("resnet18"), dynamic_shapes="batch")
    assert str(nhwc.input_specs[0].shape[0]).startswith("s")
    for batch in (1, 3):
        _, inputs = zoo.load("resnet18", batch=batch, **zoo.tiny_config("resnet18"))
        _assert_close_to_fp64(model, nhwc, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_full_size_nhwc_permute_only_at_the_boundary(name):
    model, program, _, nhwc, _ = _nhwc(name, {})
    _boundary_only(nhwc)
    _assert_close_to_fp64(model, nhwc, program.example_args)
