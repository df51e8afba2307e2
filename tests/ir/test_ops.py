import pytest
import torch
import torch.nn as nn

import optc
from optc.ir import ops
from optc.ir.printer import format_text


def test_channel_affine_reference_matches_hand_calculation():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])            # (1, 2, 2): channels on dim 1
    scale = torch.tensor([2.0, -1.0])
    shift = torch.tensor([0.5, 10.0])
    got = torch.ops.optc.channel_affine(x, scale, shift, 1)
    expected = torch.tensor([[[2.5, 4.5], [7.0, 6.0]]])
    assert torch.equal(got, expected)


def test_channel_affine_rejects_bad_shapes():
    with pytest.raises(ValueError, match="axis 1 of x has 3"):
        torch.ops.optc.channel_affine(torch.randn(1, 3, 2), torch.ones(2), torch.ones(2), 1)


def test_fake_kernel_and_decomposition_agree_with_reference():
    x, s, b = torch.randn(2, 5, 3, 3), torch.randn(5), torch.randn(5)
    ref = torch.ops.optc.channel_affine(x, s, b, 1)
    torch.testing.assert_close(ops.OPS["channel_affine"].decomposition(x, s, b, 1), ref, rtol=0, atol=0)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fx_ = mode.from_tensor(x)
        out = torch.ops.optc.channel_affine(fx_, mode.from_tensor(s), mode.from_tensor(b), 1)
        assert out.shape == x.shape and out.dtype == x.dtype


class UsesOp(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(4))
        self.shift = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.ops.optc.channel_affine(x, self.scale, self.shift, 1).relu()


def test_optc_op_survives_export_and_prints():
    model = UsesOp().eval()
    x = torch.randn(2, 4, 3)
    program = optc.capture(model, (x,))
    text = format_text(program, with_source=False)
    assert "optc.channel_affine(%x, %scale, %shift, 1)" in text
    torch.testing.assert_close(program(x), model(x))
    assert ops.is_optc_op(torch.ops.optc.channel_affine.default)
    assert torch.ops.optc.channel_affine.default in ops.decomposition_table()
