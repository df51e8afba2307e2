import torch
import torch.nn as nn

from optc.testing import check_pass, run_pass


class DeadBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        unused = torch.relu(self.fc(x)) * 2   # noqa: F841 -- a dead chain
        return x + 1


def test_dce_removes_dead_chain():
    out = check_pass("dce", DeadBranch(), (torch.randn(2, 4),), """\
graph(%x : f32[2,4]):
  %add : f32[2,4] = aten.add.Tensor(%x, 1)
  return (%add)
""", modified=True, stats={"dce": {"removed": 5}})
    assert out.program.num_parameters() == 0   # fc's weights are gone with their get_attrs


class AllLive(nn.Module):
    def forward(self, x):
        return torch.relu(x) + 1


def test_dce_must_not_fire_when_everything_is_used():
    out = run_pass("dce", AllLive(), (torch.randn(3),))
    assert not out.report.record("dce").modified
    assert out.stats("dce") == {"removed": 0}
