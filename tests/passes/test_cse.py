import torch
import torch.nn as nn

from optc.ir.capture import capture
from optc.ir.program import attr_tensors
from optc.ir.rewrite import attr_node
from optc.passes import PassManager
from optc.testing import check_pass, run_pass


class Repeated(nn.Module):
    def forward(self, x):
        a = torch.relu(x).sum(dim=[0], keepdim=True) * 0.5
        b = torch.relu(x).sum(dim=[0], keepdim=True) * 0.5    # the same subtree again
        c = torch.relu(x).sum(dim=[1], keepdim=True) * 0.5    # other dims: kept
        return a + b + c


def test_cse_merges_repeated_subtree():
    check_pass("cse", Repeated(), (torch.randn(3, 3),), """\
graph(%x : f32[3,3]):
  %relu : f32[3,3] = aten.relu(%x)
  %sum_1 : f32[1,3] = aten.sum.dim_IntList(%relu, [0], True)
  %mul : f32[1,3] = aten.mul.Tensor(%sum_1, 0.5)
  %sum_3 : f32[3,1] = aten.sum.dim_IntList(%relu, [1], True)
  %mul_2 : f32[3,1] = aten.mul.Tensor(%sum_3, 0.5)
  %add : f32[1,3] = aten.add.Tensor(%mul, %mul)
  %add_1 : f32[3,3] = aten.add.Tensor(%add, %mul_2)
  return (%add_1)
""", modified=True, stats={"cse": {"merged": 4}})


def test_cse_merges_repeated_get_attr():
    program = capture(nn.Linear(4, 2).eval(), (torch.randn(1, 4),))
    gm = program.graph_module
    linear = next(n for n in gm.graph.nodes if n.op == "call_function")
    with gm.graph.inserting_before(linear):
        dup = attr_node(gm, "weight")
    linear.replace_input_with(linear.args[1], dup)
    new, report = PassManager("cse", default="", verify_each=True).run(program)
    assert report.stats("cse") == {"merged": 1}
    assert [n.target for n in new.graph.nodes if n.op == "get_attr"] == ["weight", "bias"]


class Different(nn.Module):
    def forward(self, x, i):
        noise = torch.rand_like(x) + torch.rand_like(x)      # random: never merged
        return noise, x * 2 + x * 3, i + 1, i + 1.0           # i + 1 is int64, i + 1.0 float32


def test_cse_must_not_fire_on_random_or_different_literals():
    out = run_pass("cse", Different(), (torch.randn(3), torch.arange(3)))
    assert not out.report.record("cse").modified
    assert out.stats("cse") == {"merged": 0}
    assert out.text.count("aten.rand_like") == 2


def test_cse_does_not_modify_the_original_tensors():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    program = capture(model, (torch.randn(2, 4),))
    before = {k: (t, t._version, t.clone()) for k, t in attr_tensors(program.graph_module).items()}
    PassManager("cse", default="").run(program)
    for t, version, copy in before.values():
        assert t._version == version and torch.equal(t, copy)
