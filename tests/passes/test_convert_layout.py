import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import optc
from optc.errors import PassError, PipelineError
from optc.ir.printer import format_text
from optc.ir.verifier import compare_outputs
from optc.passes import convert_layout as cl
from optc.testing import check_pass, run_pass

aten = torch.ops.aten


def _randomize(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.25, 4)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    return bn


def _permutes(program) -> list:
    return [n for n in program.graph.nodes if n.op == "call_function"
            and n.target in (aten.permute.default, aten.transpose.int)]


class ConvBNPool(nn.Module):
    """conv -> unfolded BN -> ReLU -> max-pool -> global pool -> flatten -> linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = _randomize(nn.BatchNorm2d(4))
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def test_conv_bn_pool_to_nhwc():
    # one permute at the input; the global pool is a mean over H, W, after which NHWC [2,1,1,4]
    # flattens like NCHW: the linear reads it without a permute back. BN -> channel_affine(dim=3)
    check_pass("convert-layout", ConvBNPool(), (torch.randn(2, 3, 8, 8),), """\
graph(%x : f32[2,3,8,8]):
  %conv_bias : f32[4] = get_attr conv.bias
  %fc_weight : f32[5,4] = get_attr fc.weight
  %fc_bias : f32[5] = get_attr fc.bias
  %bn_num_batches_tracked : i64[] = get_attr bn.num_batches_tracked
  %permute : f32[2,8,8,3] = aten.permute(%x, [0, 2, 3, 1])
  %conv_weight_nhwc : f32[4,3,3,3] = get_attr conv_weight_nhwc
  %conv2d : f32[2,8,8,4] = optc.conv2d_nhwc(%permute, %conv_weight_nhwc, %conv_bias, [1, 1], [1, 1], [1, 1], 1)
  %batch_norm_scale : f32[4] = get_attr batch_norm_scale
  %batch_norm_shift : f32[4] = get_attr batch_norm_shift
  %batch_norm : f32[2,8,8,4] = optc.channel_affine(%conv2d, %batch_norm_scale, %batch_norm_shift, 3)
  %relu : f32[2,8,8,4] = aten.relu(%batch_norm)
  %max_pool2d : f32[2,4,4,4] = optc.max_pool2d_nhwc(%relu, [2, 2], [], [0, 0], [1, 1], False)
  %adaptive_avg_pool2d : f32[2,1,1,4] = aten.mean.dim(%max_pool2d, [1, 2], True)
  %flatten : f32[2,4] = aten.flatten.using_ints(%adaptive_avg_pool2d, 1)
  %linear : f32[2,5] = aten.linear(%flatten, %fc_weight, %fc_bias)
  return (%linear)
""", modified=True, stats={"convert-layout": {"converted": 2, "conv2d": 1, "max_pool2d": 1, "permutes": 1,
                                              "constants": 3}}, reference="fp64")


class ChannelOps(nn.Module):
    """Split and concatenation on the channel axis, a per-channel constant, an asymmetric pad,
    a depthwise and a grouped conv, a residual, average pooling, nearest and bilinear
    upsampling, a softmax and a mean over channels, an adaptive pool to 2x2."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 1, groups=2)
        self.dw = nn.Conv2d(8, 8, 3, groups=8, bias=False)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)

    def forward(self, x):
        y = F.relu(self.c1(x))
        a, b = y.chunk(2, dim=1)
        z = torch.cat([b, a], dim=1) * self.scale
        z = self.dw(F.pad(z, [1, 1, 0, 2])) + self.c2(y)
        u = F.interpolate(F.avg_pool2d(z, 2), scale_factor=2.0, mode="nearest")
        s = torch.softmax(u, dim=1) + z.mean(dim=1, keepdim=True)
        return F.interpolate(F.adaptive_avg_pool2d(s, 2), size=(4, 4), mode="bilinear", align_corners=False)


def test_channel_axis_ops_propagate_with_one_permute_each_way():
    out = check_pass("convert-layout", ChannelOps(), (torch.randn(2, 3, 8, 8),), """\
graph(%x : f32[2,3,8,8]):
  %c1_bias : f32[8] = get_attr c1.bias
  %c2_bias : f32[8] = get_attr c2.bias
  %permute : f32[2,8,8,3] = aten.permute(%x, [0, 2, 3, 1])
  %c1_weight_nhwc : f32[8,3,3,3] = get_attr c1_weight_nhwc
  %conv2d : f32[2,8,8,8] = optc.conv2d_nhwc(%permute, %c1_weight_nhwc, %c1_bias, [1, 1], [1, 1], [1, 1], 1)
  %relu : f32[2,8,8,8] = aten.relu(%conv2d)
  %chunk : (f32[2,8,8,4], f32[2,8,8,4]) = aten.chunk(%relu, 2, 3)
  %getitem : f32[2,8,8,4] = getitem(%chunk, 0)
  %getitem_1 : f32[2,8,8,4] = getitem(%chunk, 1)
  %cat : f32[2,8,8,8] = aten.cat([%getitem_1, %getitem], 3)
  %scale_nhwc : f32[1,1,1,8] = get_attr scale_nhwc
  %mul : f32[2,8,8,8] = aten.mul.Tensor(%cat, %scale_nhwc)
  %pad : f32[2,10,10,8] = aten.pad(%mul, [0, 0, 1, 1, 0, 2])
  %dw_weight_nhwc : f32[8,3,3,1] = get_attr dw_weight_nhwc
  %conv2d_1 : f32[2,8,8,8] = optc.conv2d_nhwc(%pad, %dw_weight_nhwc, None, [1, 1], [0, 0], [1, 1], 8)
  %c2_weight_nhwc : f32[8,1,1,4] = get_attr c2_weight_nhwc
  %conv2d_2 : f32[2,8,8,8] = optc.conv2d_nhwc(%relu, %c2_weight_nhwc, %c2_bias, [1, 1], [0, 0], [1, 1], 2)
  %add : f32[2,8,8,8] = aten.add.Tensor(%conv2d_1, %conv2d_2)
  %avg_pool2d : f32[2,4,4,8] = optc.avg_pool2d_nhwc(%add, [2, 2], [], [0, 0], False, True, None)
  %upsample_nearest2d : f32[2,8,8,8] = optc.upsample_nearest2d_nhwc(%avg_pool2d, None, [2.0, 2.0])
  %softmax : f32[2,8,8,8] = aten.softmax.int(%upsample_nearest2d, 3)
  %mean : f32[2,8,8,1] = aten.mean.dim(%add, [3], True)
  %add_1 : f32[2,8,8,8] = aten.add.Tensor(%softmax, %mean)
  %adaptive_avg_pool2d : f32[2,2,2,8] = optc.adaptive_avg_pool2d_nhwc(%add_1, [2, 2])
  %upsample_bilinear2d : f32[2,4,4,8] = optc.upsample_bilinear2d_nhwc(%adaptive_avg_pool2d, [4, 4], False, None)
  %permute_2 : f32[2,8,4,4] = aten.permute(%upsample_bilinear2d, [0, 3, 1, 2])
  %clone : f32[2,8,4,4] = aten.clone(%permute_2, memory_format=contiguous_format)
  return (%clone)
""", modified=True, stats={"convert-layout": {"converted": 7, "permutes": 2}})
    # the two permutes: the input, and the output back to NCHW (as a contiguous copy)
    perms = _permutes(out.program)
    assert [p.args[0].op for p in perms] == ["placeholder", "call_function"]
    assert list(perms[1].users)[0].target is aten.clone.default


def test_nhwc_then_nchw_round_trip_has_no_permute():
    out = check_pass("convert-layout,convert-layout{layout=NCHW}", ChannelOps(), (torch.randn(2, 3, 8, 8),), """\
graph(%x : f32[2,3,8,8]):
  %c1_bias : f32[8] = get_attr c1.bias
  %c2_bias : f32[8] = get_attr c2.bias
  %c1_weight_nchw : f32[8,3,3,3] = get_attr c1_weight_nchw
  %conv2d : f32[2,8,8,8] = aten.conv2d(%x, %c1_weight_nchw, %c1_bias, [1, 1], [1, 1], [1, 1], 1)
  %relu : f32[2,8,8,8] = aten.relu(%conv2d)
  %chunk : (f32[2,4,8,8], f32[2,4,8,8]) = aten.chunk(%relu, 2, 1)
  %getitem : f32[2,4,8,8] = getitem(%chunk, 0)
  %getitem_1 : f32[2,4,8,8] = getitem(%chunk, 1)
  %cat : f32[2,8,8,8] = aten.cat([%getitem_1, %getitem], 1)
  %scale_nchw : f32[1,8,1,1] = get_attr scale_nchw
  %mul : f32[2,8,8,8] = aten.mul.Tensor(%cat, %scale_nchw)
  %pad : f32[2,8,10,10] = aten.pad(%mul, [1, 1, 0, 2])
  %dw_weight_nchw : f32[8,1,3,3] = get_attr dw_weight_nchw
  %conv2d_1 : f32[2,8,8,8] = aten.conv2d(%pad, %dw_weight_nchw, None, [1, 1], [0, 0], [1, 1], 8)
  %c2_weight_nchw : f32[8,4,1,1] = get_attr c2_weight_nchw
  %conv2d_2 : f32[2,8,8,8] = aten.conv2d(%relu, %c2_weight_nchw, %c2_bias, [1, 1], [0, 0], [1, 1], 2)
  %add : f32[2,8,8,8] = aten.add.Tensor(%conv2d_1, %conv2d_2)
  %avg_pool2d : f32[2,8,4,4] = aten.avg_pool2d(%add, [2, 2], [], [0, 0], False, True, None)
  %upsample_nearest2d : f32[2,8,8,8] = aten.upsample_nearest2d.vec(%avg_pool2d, None, [2.0, 2.0])
  %softmax : f32[2,8,8,8] = aten.softmax.int(%upsample_nearest2d, 1)
  %mean : f32[2,1,8,8] = aten.mean.dim(%add, [1], True)
  %add_1 : f32[2,8,8,8] = aten.add.Tensor(%softmax, %mean)
  %adaptive_avg_pool2d : f32[2,8,2,2] = aten.adaptive_avg_pool2d(%add_1, [2, 2])
  %upsample_bilinear2d : f32[2,8,4,4] = aten.upsample_bilinear2d.vec(%adaptive_avg_pool2d, [4, 4], False, None)
  %clone : f32[2,8,4,4] = aten.clone(%upsample_bilinear2d, memory_format=contiguous_format)
  return (%clone)
""", modified=True)
    assert _permutes(out.program) == []


class NHWCModel(nn.Module):
    """A model written for NHWC input with explicit permutes (TensorFlow style)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):                      # x: [N, H, W, C]
        y = F.relu(self.conv(x.permute(0, 3, 1, 2)))
        return y.permute(0, 2, 3, 1) + 1.0


def test_the_models_own_permutes_cancel():
    check_pass("convert-layout", NHWCModel(), (torch.randn(2, 6, 6, 3),), """\
graph(%x : f32[2,6,6,3]):
  %conv_bias : f32[4] = get_attr conv.bias
  %conv_weight_nhwc : f32[4,3,3,3] = get_attr conv_weight_nhwc
  %conv2d : f32[2,4,4,4] = optc.conv2d_nhwc(%x, %conv_weight_nhwc, %conv_bias, [1, 1], [0, 0], [1, 1], 1)
  %relu : f32[2,4,4,4] = aten.relu(%conv2d)
  %add : f32[2,4,4,4] = aten.add.Tensor(%relu, 1.0)
  return (%add)
""", modified=True, stats={"convert-layout": {"converted": 1, "permutes": 0, "absorbed": 1}})


# ---- where propagation stops ---------------------------------------------------------------------
@torch.library.custom_op("layout_test::mirror_w", mutates_args=())
def mirror_w(x: torch.Tensor) -> torch.Tensor:
    """An op whose layout semantics the pass cannot know: reverses the last axis."""
    return x.flip(-1)


@mirror_w.register_fake
def _(x):
    return torch.empty_like(x)


class UnknownOpBetweenConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        y = torch.ops.layout_test.mirror_w(F.relu(self.c1(x)))
        return self.norm(self.c2(y))          # layer norm over the last (W) axis


def test_unknown_ops_stop_propagation_with_a_permute():
    out = check_pass("convert-layout", UnknownOpBetweenConvs(), (torch.randn(2, 3, 8, 8),), """\
graph(%x : f32[2,3,8,8]):
  %c1_bias : f32[4] = get_attr c1.bias
  %c2_bias : f32[4] = get_attr c2.bias
  %norm_weight : f32[8] = get_attr norm.weight
  %norm_bias : f32[8] = get_attr norm.bias
  %permute : f32[2,8,8,3] = aten.permute(%x, [0, 2, 3, 1])
  %c1_weight_nhwc : f32[4,3,3,3] = get_attr c1_weight_nhwc
  %conv2d : f32[2,8,8,4] = optc.conv2d_nhwc(%permute, %c1_weight_nhwc, %c1_bias, [1, 1], [1, 1], [1, 1], 1)
  %relu : f32[2,8,8,4] = aten.relu(%conv2d)
  %permute_1 : f32[2,4,8,8] = aten.permute(%relu, [0, 3, 1, 2])
  %mirror_w : f32[2,4,8,8] = layout_test.mirror_w(%permute_1)
  %permute_2 : f32[2,8,8,4] = aten.permute(%mirror_w, [0, 2, 3, 1])
  %c2_weight_nhwc : f32[4,3,3,4] = get_attr c2_weight_nhwc
  %conv2d_1 : f32[2,8,8,4] = optc.conv2d_nhwc(%permute_2, %c2_weight_nhwc, %c2_bias, [1, 1], [1, 1], [1, 1], 1)
  %permute_3 : f32[2,4,8,8] = aten.permute(%conv2d_1, [0, 3, 1, 2])
  %layer_norm : f32[2,4,8,8] = aten.layer_norm(%permute_3, [8], %norm_weight, %norm_bias, 1e-05, False)
  return (%layer_norm)
""", modified=True, stats={"convert-layout": {"converted": 2, "permutes": 4}})
    assert ("propagate", "mirror_w", "layout_test.mirror_w has no layout rule: its inputs are permuted back to "
            "the logical layout") in out.rejections("convert-layout")
    assert any(r[:2] == ("propagate", "layer_norm") for r in out.rejections("convert-layout"))


class NoLayoutOp(nn.Module):
    """Linear layers, a transpose and a softmax: nothing layout-sensitive."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(6, 6)

    def forward(self, x):                      # [N, 6, 8]
        y = torch.softmax(self.a(x), dim=1).transpose(1, 2)
        return self.b(y).permute(0, 2, 1)


def test_must_not_fire_without_a_layout_sensitive_op():
    model = NoLayoutOp()
    x = torch.randn(2, 6, 8)
    before = format_text(optc.capture(model, (x,)), with_source=False)
    out = run_pass("convert-layout", model, (x,))
    assert not out.report.record("convert-layout").modified
    assert out.stats("convert-layout") == {"converted": 0}
    assert format_text(out.program, with_source=False) == before


class WeightInput(nn.Module):
    def forward(self, x, w):
        return F.relu(F.conv2d(x, w))


def test_must_not_fire_on_a_conv_whose_weight_is_an_input():
    out = run_pass("convert-layout", WeightInput(), (torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3)))
    assert not out.report.record("convert-layout").modified
    assert out.rejections("convert-layout") == [
        ("conv2d", "conv2d", "weight %w is not a constant (permuting it would run on every call)")]
    assert "aten.conv2d(%x, %w)" in out.text


class TransposedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.c2 = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.c2(self.up(self.c1(x)))


def test_an_op_without_nhwc_form_runs_in_nchw_between_permutes():
    model = TransposedConv().eval()
    out = run_pass("convert-layout", model, (torch.randn(1, 3, 6, 6),))
    assert out.stats("convert-layout")["converted"] == 2
    assert any(r[:2] == ("propagate", "conv_transpose2d") for r in out.rejections("convert-layout"))
    assert "aten.conv_transpose2d.input(%permute_1" in out.text
    _check_fp64(model, out.program, torch.randn(1, 3, 6, 6))


class CeilPools(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):                      # [1, 3, 3, 5]
        y = self.conv(x)
        # H: a ceil window would start in the padding, so torch drops it: the floor length
        same = F.max_pool2d(y, 2, stride=2, padding=1, ceil_mode=True)                  # [1, 4, 2, 3]
        longer = F.avg_pool2d(y, 2, stride=2, ceil_mode=True)                             # [1, 4, 2, 3]
        return same, longer


def test_ceil_mode_that_changes_nothing_is_written_as_floor():
    # the same windows, and the form ONNX's shape inference agrees with (it counts the dropped
    # window): backends/workarounds.py does this for ATen pools, the pass for the ops it writes
    model = CeilPools().eval()
    out = run_pass("convert-layout", model, (torch.randn(1, 3, 3, 5),))
    assert "optc.max_pool2d_nhwc(%conv2d, [2, 2], [2, 2], [1, 1], [1, 1], False)" in out.text
    assert "optc.avg_pool2d_nhwc(%conv2d, [2, 2], [2, 2], [0, 0], True, True, None)" in out.text
    _check_fp64(model, out.program, torch.randn(1, 3, 3, 5))


# ---- failures, the user's model ------------------------------------------------------------------
def test_a_failed_conversion_leaves_the_program_unchanged(monkeypatch):
    model = ConvBNPool().eval()
    x = torch.randn(2, 3, 8, 8)
    program = optc.capture(model, (x,))
    text = format_text(program, with_source=False)

    def wrong(self, node, m, rw):     # a rule that claims the wrong result layout
        built = real(self, node, m, rw)
        return cl.Built(built.target, built.args, built.kwargs, cl.identity(4))

    real = cl.Sensitive.build
    monkeypatch.setattr(cl.Sensitive, "build", wrong)
    with pytest.raises(PassError, match=r"while running 'convert-layout' .* rewriting %conv2d gave \[2, 8, 8, 4\], "
                                        r"expected the logical \[2, 4, 8, 8\] in layout \(0, 1, 2, 3\)"):
        optc.optimize(program, "convert-layout")
    assert format_text(program, with_source=False) == text
    with torch.no_grad():
        assert compare_outputs(model(x), program(x)).max_rel_error == 0


def test_the_users_model_is_never_modified():
    model = ConvBNPool().eval()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    program = optc.capture(model, (x,))
    text = format_text(program, with_source=False)
    new, _ = optc.optimize(program, "convert-layout")
    assert _permutes(new) and format_text(program, with_source=False) == text
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert model.conv.weight.shape == (4, 3, 3, 3) and model.conv.weight.is_contiguous()


def test_pipeline_order_is_declared():
    with pytest.raises(PipelineError, match="'convert-layout' must run after 'prune-channels'"):
        optc.optimize(optc.capture(ConvBNPool().eval(), (torch.randn(1, 3, 8, 8),)),
                      "convert-layout,prune-channels{ratio=0.5}")
    with pytest.raises(PipelineError, match="'convert-layout' must run after 'fold-conv-bn'"):
        optc.optimize(optc.capture(ConvBNPool().eval(), (torch.randn(1, 3, 8, 8),)), "convert-layout,fold-conv-bn")


# ---- quantized programs ---------------------------------------------------------------------------
class ConvReLUConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.c2(F.relu(self.c1(x)))


def test_quantized_program_converts_with_its_weight_dequantize():
    # insert-qdq first: per-tensor Q/DQ are pointwise; each per-channel weight dequantize is a
    # constant subgraph, re-emitted on the OHWI int8 weight (its axis 0 stays the output channels)
    model = ConvReLUConv().eval()
    x = torch.randn(2, 3, 8, 8)
    program = optc.capture(model, (x,))
    quant, _ = optc.optimize(program, "insert-qdq{samples=4}")
    nhwc, report = optc.optimize(quant, "convert-layout")
    assert report.stats("convert-layout")["converted"] == 2
    convs = [n for n in nhwc.graph.nodes if n.target is torch.ops.optc.conv2d_nhwc.default]
    for conv in convs:
        w = conv.args[1]
        assert w.target is torch.ops.optc.dequantize_per_channel.default and w.args[3] == 0
        assert w.args[0].op == "get_attr" and w.args[0].meta["val"].dtype == torch.int8
        assert w.args[0].meta["val"].shape[1:] == (3, 3, w.args[0].meta["val"].shape[3])   # OHWI
    assert len(_permutes(nhwc)) == 2
    with torch.no_grad():
        for seed in (1, 2):
            xi = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
            ref, got = quant(xi), nhwc(xi)
            # the pass moves data; the only float difference is the convs' summation order, which
            # can flip a rounding of the last quantize by one step (its scale) on rare elements
            step = [n for n in quant.graph.nodes if n.target is torch.ops.optc.quantize_per_tensor.default][-1].args[1]
            assert (ref - got).abs().max() <= step * 1.001
            assert (ref == got).float().mean() >= 0.99


def test_insert_qdq_after_convert_layout_still_finds_the_convolutions():
    # the order of tvm:cpu's default pipeline followed by insert-qdq: the NHWC convs are sites,
    # and the result computes what quantizing the NCHW program computes
    model = ConvReLUConv().eval()
    x = torch.randn(2, 3, 8, 8)
    program = optc.capture(model, (x,))
    calib = [(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(s)),) for s in range(4)]
    late, report = optc.optimize(program, "convert-layout,insert-qdq", calibration_data=calib)
    assert report.stats("insert-qdq")["layers"] == 2
    nchw, _ = optc.optimize(program, "insert-qdq", calibration_data=calib)
    step = [n for n in nchw.graph.nodes if n.target is torch.ops.optc.quantize_per_tensor.default][-1].args[1]
    with torch.no_grad():
        ref, got = nchw(x), late(x)
    assert (ref - got).abs().max() <= step * 1.001 and (ref == got).float().mean() >= 0.99


def _check_fp64(model, program, x):
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        eager_err = compare_outputs(ref, model(x)).max_rel_error
        err = compare_outputs(ref, program(x)).max_rel_error
    assert err <= 2e-6 + 4 * eager_err, (err, eager_err)
