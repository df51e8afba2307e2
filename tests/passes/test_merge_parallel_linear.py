import torch
import torch.nn as nn
import torch.nn.functional as F

from optc.testing import check_pass, run_pass


class QKVAndGateUp(nn.Module):
    """Q/K/V projections of x (viewed as heads); gate and up projections of h, up without bias."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.gate, self.up = nn.Linear(8, 6), nn.Linear(8, 6, bias=False)

    def forward(self, x, h):
        q = self.q(x).view(2, 3, 2, 4)
        return q, self.k(x), self.v(x), F.silu(self.gate(h)) * self.up(h)


def test_merge_parallel_linear_qkv_and_gate_up():
    out = check_pass("merge-parallel-linear", QKVAndGateUp(), (torch.randn(2, 3, 8), torch.randn(5, 8)), """\
graph(%x : f32[2,3,8], %h : f32[5,8]):
  %gate_weight_merged : f32[12,8] = get_attr gate_weight_merged
  %gate_bias_merged : f32[12] = get_attr gate_bias_merged
  %q_weight_merged : f32[20,8] = get_attr q_weight_merged
  %q_bias_merged : f32[20] = get_attr q_bias_merged
  %linear_5 : f32[2,3,20] = aten.linear(%x, %q_weight_merged, %q_bias_merged)
  %split : (f32[2,3,8], f32[2,3,8], f32[2,3,4]) = aten.split_with_sizes(%linear_5, [8, 8, 4], -1)
  %getitem : f32[2,3,8] = getitem(%split, 0)
  %getitem_1 : f32[2,3,8] = getitem(%split, 1)
  %getitem_2 : f32[2,3,4] = getitem(%split, 2)
  %view : f32[2,3,2,4] = aten.view(%getitem, [2, 3, 2, 4])
  %linear_6 : f32[5,12] = aten.linear(%h, %gate_weight_merged, %gate_bias_merged)
  %split_1 : (f32[5,6], f32[5,6]) = aten.split_with_sizes(%linear_6, [6, 6], -1)
  %getitem_3 : f32[5,6] = getitem(%split_1, 0)
  %getitem_4 : f32[5,6] = getitem(%split_1, 1)
  %silu : f32[5,6] = aten.silu(%getitem_3)
  %mul : f32[5,6] = aten.mul.Tensor(%silu, %getitem_4)
  return (%view, %getitem_1, %getitem_2, %mul)
""", modified=True, stats={"merge-parallel-linear": {"merged_groups": 2, "merged_linears": 5}})
    assert out.program.num_parameters() == 20 * 8 + 20 + 12 * 8 + 12   # the old weights are gone


def test_merge_parallel_linear_min_group():
    out = check_pass("merge-parallel-linear{min_group=3}", QKVAndGateUp(), (torch.randn(2, 3, 8), torch.randn(5, 8)),
                     """\
graph(%x : f32[2,3,8], %h : f32[5,8]):
  %q_weight_merged : f32[20,8] = get_attr q_weight_merged
  %q_bias_merged : f32[20] = get_attr q_bias_merged
  %gate_weight : f32[6,8] = get_attr gate.weight
  %gate_bias : f32[6] = get_attr gate.bias
  %up_weight : f32[6,8] = get_attr up.weight
  %linear_5 : f32[2,3,20] = aten.linear(%x, %q_weight_merged, %q_bias_merged)
  %split : (f32[2,3,8], f32[2,3,8], f32[2,3,4]) = aten.split_with_sizes(%linear_5, [8, 8, 4], -1)
  %getitem : f32[2,3,8] = getitem(%split, 0)
  %getitem_1 : f32[2,3,8] = getitem(%split, 1)
  %getitem_2 : f32[2,3,4] = getitem(%split, 2)
  %view : f32[2,3,2,4] = aten.view(%getitem, [2, 3, 2, 4])
  %linear_3 : f32[5,6] = aten.linear(%h, %gate_weight, %gate_bias)
  %silu : f32[5,6] = aten.silu(%linear_3)
  %linear_4 : f32[5,6] = aten.linear(%h, %up_weight)
  %mul : f32[5,6] = aten.mul.Tensor(%silu, %linear_4)
  return (%view, %getitem_1, %getitem_2, %mul)
""", modified=True, stats={"merge-parallel-linear": {"merged_groups": 1, "merged_linears": 3}})
    assert out.rejections("merge-parallel-linear") == [
        ("merge-parallel-linear", "h", "2 compatible linears read %h, fewer than min_group=3")]


class NotParallel(nn.Module):
    """Linears reading different inputs; two reading x, one with a weight given at run time;
    two reading y, one result viewed across its last dim (needs a contiguous result)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 4)
        self.d, self.e = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x, y, z, w):
        flat = self.d(y).view(2, 12)
        return self.a(x), F.linear(x, w), self.b(z), self.c(torch.relu(x)), flat, self.e(y)


def test_merge_parallel_linear_must_not_fire():
    out = run_pass("merge-parallel-linear", NotParallel(),
                   (torch.randn(8), torch.randn(2, 3, 8), torch.randn(8), torch.randn(4, 8)))
    assert not out.report.record("merge-parallel-linear").modified
    assert out.stats("merge-parallel-linear") == {"merged_groups": 0, "merged_linears": 0, "not-fired": 2}
    assert out.rejections("merge-parallel-linear") == [
        ("merge-parallel-linear", "x", "%linear_2: weight %w is not a constant"),
        ("merge-parallel-linear", "y", "%linear: %view views it as [2, 12], which a split part does not allow"),
    ]   # b reads z and c reads relu(x): linears reading different inputs are not candidates
