import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from optc.errors import PassError, PipelineError
from optc.ir.capture import capture
from optc.ir.printer import format_text
from optc.ir.verifier import compare_outputs, random_inputs_like, verify
from optc.passes.manager import PassManager
from optc.testing import assert_golden


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.dw(F.relu(self.conv(x))))
        return self.fc(h.mean((2, 3)))


def run(pipeline: str, model: nn.Module, inputs: tuple):
    program = capture(model.eval(), inputs)
    new, report = PassManager(pipeline, default="", verify_each=True, check_modified=True).run(program)
    verify(new, repropagate=True)
    return program, new, report


def masks_by_layer(program) -> dict[str, torch.Tensor]:
    out = {}
    for n in program.graph.nodes:
        if n.op == "get_attr" and "prune_mask" in n.meta:
            user = next(iter(n.users))
            out[list(user.meta["nn_module_stack"].values())[-1][0]] = n.meta["prune_mask"]
    return out


def sparse_weights(program) -> dict[str, torch.Tensor]:
    gm = program.graph_module
    return {n.target: getattr(gm, n.target) for n in program.graph.nodes
            if n.op == "get_attr" and n.target.endswith("_sparse")}


def assert_equals_masked_model(model: nn.Module, program, new):
    """The pruned program is exactly the eager model with the masked weights set to zero."""
    ref = copy.deepcopy(model)
    sparse = sparse_weights(new)
    for name, p in ref.named_parameters():
        key = name.replace(".", "_") + "_sparse"
        if key in sparse:
            with torch.no_grad():
                p.copy_(sparse[key])
    for seed in (0, 1):
        args, kwargs = random_inputs_like(program, seed=seed)
        with torch.no_grad():
            rep = compare_outputs(ref(*args, **kwargs), new(*args, **kwargs))
        assert rep.max_rel_error <= 2e-6, rep


def test_prune_magnitude_global_golden():
    model = Net()
    program, new, report = run("prune-magnitude{ratio=0.5}", model, (torch.randn(2, 2, 5, 5),))
    assert_golden(format_text(new, with_source=False), """\
graph(%x : f32[2,2,5,5]):
  %conv_weight_sparse : f32[4,2,3,3] = get_attr conv_weight_sparse
  %conv_bias : f32[4] = get_attr conv.bias
  %dw_weight_sparse : f32[4,1,3,3] = get_attr dw_weight_sparse
  %dw_bias : f32[4] = get_attr dw.bias
  %fc_weight_sparse : f32[3,4] = get_attr fc_weight_sparse
  %fc_bias : f32[3] = get_attr fc.bias
  %conv2d : f32[2,4,5,5] = aten.conv2d(%x, %conv_weight_sparse, %conv_bias, [1, 1], [1, 1])
  %relu : f32[2,4,5,5] = aten.relu(%conv2d)
  %conv2d_1 : f32[2,4,5,5] = aten.conv2d(%relu, %dw_weight_sparse, %dw_bias, [1, 1], [1, 1], [1, 1], 4)
  %relu_1 : f32[2,4,5,5] = aten.relu(%conv2d_1)
  %mean : f32[2,4] = aten.mean.dim(%relu_1, [2, 3])
  %linear : f32[2,3] = aten.linear(%mean, %fc_weight_sparse, %fc_bias)
  return (%linear)
""")
    rec = report.record("prune-magnitude")
    assert rec.modified and not rec.exact and rec.error.max_rel_error > 0   # lossy: error measured and reported
    st = report.stats("prune-magnitude")
    n = 4 * 2 * 9 + 4 * 9 + 3 * 4
    assert (st["layers"], st["weights"], st["zeroed"]) == (3, n, n // 2)
    assert st["sparsity"] == pytest.approx((n // 2) / n)
    assert set(st["per_layer"]) == {"conv", "dw", "fc"}
    # the zeroed weights are exactly the smallest ones, over all layers together
    dense = torch.cat([m.weight.detach().flatten() for m in (model.conv, model.dw, model.fc)]).abs()
    mask = torch.cat([m.flatten() for m in masks_by_layer(new).values()])
    assert int((~mask).sum()) == n // 2
    assert float(dense[~mask].max()) <= float(dense[mask].min())
    for t, m in zip(sparse_weights(new).values(), masks_by_layer(new).values()):
        assert bool((t[~m] == 0).all()) and bool((t[m] != 0).all())
    assert_equals_masked_model(model, program, new)


def test_layer_scope_reaches_the_ratio_in_every_layer():
    _, new, report = run("prune-magnitude{ratio=0.3,scope=layer}", Net(), (torch.randn(2, 2, 5, 5),))
    per = report.stats("prune-magnitude")["per_layer"]
    assert per == {"conv": int(0.3 * 72) / 72, "dw": int(0.3 * 36) / 36, "fc": int(0.3 * 12) / 12}
    assert "3 layers, min" in str(per)      # one line in the pass report


def test_exclude_by_glob_and_regex():
    model = Net()
    program, new, report = run("prune-magnitude{ratio=0.5,exclude=fc|d*}", model, (torch.randn(2, 2, 5, 5),))
    assert set(report.stats("prune-magnitude")["per_layer"]) == {"conv"}
    assert {n.target for n in new.graph.nodes if n.op == "get_attr"} >= {"fc.weight", "dw.weight"}
    assert len(report.record("prune-magnitude").rejections) == 2
    _, _, report = run('prune-magnitude{ratio=0.5,exclude="re:(conv|dw)"}', model, (torch.randn(2, 2, 5, 5),))
    assert set(report.stats("prune-magnitude")["per_layer"]) == {"fc"}


def test_masks_compose_and_survive_a_second_run():
    model = Net()
    _, first, _ = run("prune-magnitude{ratio=0.3,scope=layer}", model, (torch.randn(2, 2, 5, 5),))
    _, both, report = run("prune-magnitude{ratio=0.3,scope=layer},prune-magnitude{ratio=0.6,scope=layer}", model,
                          (torch.randn(2, 2, 5, 5),))
    m1, m2 = masks_by_layer(first), masks_by_layer(both)
    for layer in m1:
        assert bool((m2[layer] <= m1[layer]).all())          # once pruned, stays pruned
    assert report.records[1].stats["per_layer"]["conv"] == int(0.6 * 72) / 72


def test_ratio_zero_does_not_fire():
    _, _, report = run("prune-magnitude{ratio=0}", Net(), (torch.randn(2, 2, 5, 5),))
    assert not report.record("prune-magnitude").modified
    assert report.stats("prune-magnitude")["zeroed"] == 0


class NoLayers(nn.Module):
    def forward(self, x):
        return x.relu() * 2


def test_nothing_to_prune():
    _, _, report = run("prune-magnitude{ratio=0.5}", NoLayers(), (torch.randn(3),))
    assert not report.record("prune-magnitude").modified
    assert report.stats("prune-magnitude")["nothing-to-prune"] == "no convolution or linear weights"


@pytest.mark.parametrize("options,match", [
    ("ratio=1", "ratio=1 is out of range"),
    ("ratio=-0.5", "ratio=-0.5 is out of range"),
    ("ratio=nan", "ratio=nan is out of range"),
    ("scope=model", "must be one of global, layer"),
    ("sparsity=0.5", "has no option 'sparsity'"),
])
def test_bad_options(options, match):
    with pytest.raises(PipelineError, match=match):
        PassManager(f"prune-magnitude{{{options}}}", default="")


def test_exclude_matching_no_layer_names_the_pattern_and_the_layers():
    program = capture(Net().eval(), (torch.randn(2, 2, 5, 5),))
    with pytest.raises(PassError, match=r"exclude pattern 'conv9' matches no layer \(layers: conv, dw, fc\)") as e:
        PassManager("prune-magnitude{exclude=fc|conv9}", default="").run(program)
    assert isinstance(e.value.__cause__, PipelineError)
