import torch
import torch.nn as nn

from optc.ir.capture import capture
from optc.ir.program import attr_tensors, get_attr
from optc.passes import PassManager
from optc.testing import check_pass, run_pass


class WeightPrep(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6))
        self.register_buffer("scale", torch.rand(6) + 0.5)

    def forward(self, x):
        w = (self.w * self.scale).t()                      # constant: folded into one parameter
        return x @ w + torch.tensor([1.0, 2.0, 3.0, 4.0])  # a literal: lift_fresh_copy folded


def test_constant_fold_folds_weight_preparation():
    out = check_pass("constant-fold", WeightPrep(), (torch.randn(2, 6),), """\
graph(%x : f32[2,6]):
  %w_t : f32[6,4] = get_attr w_t
  %matmul : f32[2,4] = aten.matmul(%x, %w_t)
  %lifted_tensor_0_clone : f32[4] = get_attr lifted_tensor_0_clone
  %add : f32[2,4] = aten.add.Tensor(%matmul, %lifted_tensor_0_clone)
  return (%add)
""", modified=True, stats={"constant-fold": {"folded": 3, "constants": 2}})
    gm = out.program.graph_module
    assert isinstance(get_attr(gm, "w_t"), nn.Parameter)       # derives from a parameter: trainable
    assert not isinstance(get_attr(gm, "lifted_tensor_0_clone"), nn.Parameter)
    assert get_attr(gm, "w_t").is_contiguous()
    assert sorted(attr_tensors(gm)) == ["lifted_tensor_0_clone", "w_t"]


class SharedMask(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mask", torch.ones(8, 8, dtype=torch.bool).tril())

    def forward(self, x):
        a = x.masked_fill(~self.mask[:4, :4], 0.0)        # computed twice, as two layers would
        b = x.masked_fill(~self.mask[:4, :4], 1.0)
        return a * b


def test_constant_fold_makes_one_attribute_per_value():
    check_pass("constant-fold", SharedMask(), (torch.randn(4, 4),), """\
graph(%x : f32[4,4]):
  %mask_bitwise_not : bool[4,4] = get_attr mask_bitwise_not
  %masked_fill : f32[4,4] = aten.masked_fill.Scalar(%x, %mask_bitwise_not, 0.0)
  %masked_fill_1 : f32[4,4] = aten.masked_fill.Scalar(%x, %mask_bitwise_not, 1.0)
  %mul : f32[4,4] = aten.mul.Tensor(%masked_fill, %masked_fill_1)
  return (%mul)
""", modified=True, stats={"constant-fold": {"folded": 6, "constants": 1}})


class NothingConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.relu(self.fc(x)) + torch.rand(4)      # rand: random, never folded


def test_constant_fold_must_not_fire_without_constant_subgraphs():
    out = run_pass("constant-fold", NothingConstant(), (torch.randn(2, 4),))
    assert not out.report.record("constant-fold").modified
    assert out.stats("constant-fold") == {"folded": 0, "constants": 0}
    assert out.rejections("constant-fold") == []


class Broadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("row", torch.randn(1, 512))

    def forward(self, x):
        return x + self.row.expand(1024, 512) * 2          # 2 KiB of constants -> 2 MiB folded


def test_constant_fold_must_not_fire_past_the_growth_cap():
    out = run_pass("constant-fold", Broadcast(), (torch.randn(1024, 512),))
    assert not out.report.record("constant-fold").modified
    assert out.stats("constant-fold") == {"folded": 0, "constants": 0, "not-fired": 2}
    reason = "folded value [1024, 512] would grow the model by 2095104 bytes (max_bytes=1048576)"
    assert out.rejections("constant-fold") == [("fold", "mul", reason), ("fold", "expand", reason)]
    # with a larger cap the same subgraph folds
    out = run_pass("constant-fold{max_bytes=4194304}", Broadcast(), (torch.randn(1024, 512),))
    assert out.stats("constant-fold") == {"folded": 2, "constants": 1}


def test_constant_fold_does_not_modify_the_original_tensors():
    program = capture(WeightPrep().eval(), (torch.randn(2, 6),))
    before = {k: (t, t._version, t.clone()) for k, t in attr_tensors(program.graph_module).items()}
    new, _ = PassManager("constant-fold", default="").run(program)
    for k, (t, version, copy) in before.items():
        assert get_attr(program.graph_module, k) is t
        assert t._version == version and torch.equal(t, copy)
    assert all(all(t is not o for o, _, _ in before.values()) for t in attr_tensors(new.graph_module).values())
