import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from optc.errors import PassError, PipelineError
from optc.ir.capture import capture
from optc.ir.printer import format_text
from optc.ir.verifier import compare_outputs, random_inputs_like, verify
from optc.passes.manager import PassManager
from optc.passes.prune_channels import zero_removed_channels
from optc.ir.channel_deps import analyze
from optc.testing import assert_golden

# The pruned program must equal the original with the consumers' weights for the removed
# channels zeroed: the same function up to float rounding (fewer terms in each sum).
SURGERY_RTOL = 1e-5


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def prune(pipeline: str, model: nn.Module, inputs: tuple, **capture_kw):
    """Capture and run ``pipeline`` checked (verify-each, honest ``modified``); returns (original, pruned, report)."""
    program = capture(model.eval(), inputs, **capture_kw)
    new, report = PassManager(pipeline, default="", verify_each=True, check_modified=True).run(program)
    verify(new, repropagate=True)
    return program, new, report


def assert_exact_surgery(original, pruned, seeds=(0, 1, 2)):
    """pruned == original with the removed channels' contributions zeroed (tight), and != original."""
    zeroed = zero_removed_channels(original, pruned.meta["prune_plan"])
    changed = 0.0
    for seed in seeds:
        args, kwargs = random_inputs_like(original, seed=seed)
        with torch.no_grad():
            got = pruned(*args, **kwargs)
            rep = compare_outputs(zeroed(*args, **kwargs), got)
            assert rep.max_rel_error <= SURGERY_RTOL, f"surgery is not exact: {rep}"
            changed = max(changed, compare_outputs(original(*args, **kwargs), got).max_rel_error)
    assert changed > 1e-3, "pruning removed nothing that mattered: the exact check would be vacuous"


# ---- the golden: residual add, BatchNorm, flatten into a linear ----------------------------------
class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), _bn(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), _bn(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), _bn(8)
        self.fc = nn.Linear(8 * 2 * 2, 4)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(h)))
        h = F.relu(h + self.bn2(self.conv2(y)))
        return self.fc(torch.flatten(F.max_pool2d(h, 2), 1))


def test_prune_channels_residual_flatten():
    original, new, report = prune("prune-channels{ratio=0.5}", Residual(), (torch.randn(2, 3, 4, 4),))
    assert_golden(format_text(new, with_source=False), """\
graph(%x : f32[2,3,4,4]):
  %stem_weight_pruned : f32[4,3,3,3] = get_attr stem_weight_pruned
  %bn0_weight_pruned : f32[4] = get_attr bn0_weight_pruned
  %bn0_bias_pruned : f32[4] = get_attr bn0_bias_pruned
  %conv1_weight_pruned_1 : f32[4,4,3,3] = get_attr conv1_weight_pruned
  %bn1_weight_pruned : f32[4] = get_attr bn1_weight_pruned
  %bn1_bias_pruned : f32[4] = get_attr bn1_bias_pruned
  %conv2_weight_pruned_1 : f32[4,4,3,3] = get_attr conv2_weight_pruned
  %bn2_weight_pruned : f32[4] = get_attr bn2_weight_pruned
  %bn2_bias_pruned : f32[4] = get_attr bn2_bias_pruned
  %fc_weight_pruned : f32[4,16] = get_attr fc_weight_pruned
  %fc_bias : f32[4] = get_attr fc.bias
  %bn0_running_mean_pruned : f32[4] = get_attr bn0_running_mean_pruned
  %bn0_running_var_pruned : f32[4] = get_attr bn0_running_var_pruned
  %bn0_num_batches_tracked : i64[] = get_attr bn0.num_batches_tracked
  %bn1_running_mean_pruned : f32[4] = get_attr bn1_running_mean_pruned
  %bn1_running_var_pruned : f32[4] = get_attr bn1_running_var_pruned
  %bn1_num_batches_tracked : i64[] = get_attr bn1.num_batches_tracked
  %bn2_running_mean_pruned : f32[4] = get_attr bn2_running_mean_pruned
  %bn2_running_var_pruned : f32[4] = get_attr bn2_running_var_pruned
  %bn2_num_batches_tracked : i64[] = get_attr bn2.num_batches_tracked
  %conv2d : f32[2,4,4,4] = aten.conv2d(%x, %stem_weight_pruned, None, [1, 1], [1, 1])
  %batch_norm : f32[2,4,4,4] = aten.batch_norm(%conv2d, %bn0_weight_pruned, %bn0_bias_pruned, %bn0_running_mean_pruned, %bn0_running_var_pruned, False, 0.1, 1e-05, False)
  %relu : f32[2,4,4,4] = aten.relu(%batch_norm)
  %conv2d_1 : f32[2,4,4,4] = aten.conv2d(%relu, %conv1_weight_pruned_1, None, [1, 1], [1, 1])
  %batch_norm_1 : f32[2,4,4,4] = aten.batch_norm(%conv2d_1, %bn1_weight_pruned, %bn1_bias_pruned, %bn1_running_mean_pruned, %bn1_running_var_pruned, False, 0.1, 1e-05, False)
  %relu_1 : f32[2,4,4,4] = aten.relu(%batch_norm_1)
  %conv2d_2 : f32[2,4,4,4] = aten.conv2d(%relu_1, %conv2_weight_pruned_1, None, [1, 1], [1, 1])
  %batch_norm_2 : f32[2,4,4,4] = aten.batch_norm(%conv2d_2, %bn2_weight_pruned, %bn2_bias_pruned, %bn2_running_mean_pruned, %bn2_running_var_pruned, False, 0.1, 1e-05, False)
  %add : f32[2,4,4,4] = aten.add.Tensor(%relu, %batch_norm_2)
  %relu_2 : f32[2,4,4,4] = aten.relu(%add)
  %max_pool2d : f32[2,4,2,2] = aten.max_pool2d(%relu_2, [2, 2])
  %flatten : f32[2,16] = aten.flatten.using_ints(%max_pool2d, 1)
  %linear : f32[2,4] = aten.linear(%flatten, %fc_weight_pruned, %fc_bias)
  return (%linear)
""")
    rec = report.record("prune-channels")
    assert rec.modified and not rec.exact
    assert rec.error is not None and rec.error.max_rel_error > 0      # lossy: the manager measured it
    st = report.stats("prune-channels")
    assert (st["groups"], st["refused"], st["pruned"]) == (3, 1, 2)   # {stem, conv2}, {conv1}; fc reaches the output
    assert (st["channels_before"], st["channels_after"]) == (20, 12)
    assert st["params_after"] < st["params_before"]
    assert any("model output" in why for _, _, why in rec.rejections)
    assert_exact_surgery(original, new)


def test_residual_ties_the_add_and_keeps_the_most_important_channels():
    model = Residual()
    with torch.no_grad():          # make channels 1, 3, 5, 7 of the residual stream negligible everywhere
        for w in (model.stem.weight, model.conv2.weight):
            w[1::2] *= 1e-3
        model.fc.weight.view(4, 8, 4)[:, 1::2] *= 1e-3
    cg = analyze(capture(model.eval(), (torch.randn(2, 3, 4, 4),)).graph_module)
    stream = next(g for g in cg.groups if "stem" in g.layers)
    assert sorted(stream.layers) == ["conv2", "stem"] and stream.prunable
    original, new, _ = prune("prune-channels{ratio=0.5}", model, (torch.randn(2, 3, 4, 4),))
    assert new.meta["prune_plan"].keep[stream.leader] == (0, 2, 4, 6)
    assert_exact_surgery(original, new)


# ---- concatenation, split, reordering, depthwise, squeeze-excite, transposed conv ----------------
class CatSplit(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.bn = _bn(14)
        self.c = nn.Conv2d(13, 10, 3, padding=1)
        self.fc = nn.Linear(10 * 2 * 2, 5)

    def forward(self, x):
        h = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        h1, h2 = torch.split(h, [7, 7], 1)             # cuts a's channels at 7
        h = self.c(torch.cat([h2, h1[:, 1:]], 1))       # reorder, and a slice
        return self.fc(torch.flatten(F.max_pool2d(h, 2), 1))


def test_concat_split_slice():
    original, new, report = prune("prune-channels{ratio=0.5}", CatSplit(), (torch.randn(2, 3, 4, 4),))
    plan = new.meta["prune_plan"]
    # a: segments [0, 1), [1, 7), [7, 8) (cut by the split and the slice) pruned separately, none emptied
    a = plan.keep["conv2d"]
    assert 0 in a and 7 in a and len([c for c in a if 1 <= c < 7]) == 3
    assert report.stats("prune-channels")["pruned"] == 3
    assert_exact_surgery(original, new)
    split = next(n for n in new.graph.nodes if n.target is torch.ops.aten.split_with_sizes.default)
    assert sum(split.args[1]) == new.graph.find_nodes(op="call_function", target=torch.ops.aten.cat.default)[0] \
        .meta["val"].shape[1]


class DepthwiseSE(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(3, 16, 1, bias=False), _bn(16)
        self.dw, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), _bn(16)
        self.se1, self.se2 = nn.Linear(16, 8), nn.Linear(8, 16)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        h = F.relu6(self.bn1(self.expand(x)))
        h = F.silu(self.bn2(self.dw(h)))
        h = h * torch.sigmoid(self.se2(F.relu(self.se1(h.mean((2, 3))))))[:, :, None, None]
        h = self.up(h) * self.scale                     # a constant operand indexed with the channels
        return self.head(h).mean((2, 3))


def test_depthwise_squeeze_excite_transposed():
    original, new, report = prune("prune-channels{ratio=0.5}", DepthwiseSE(), (torch.randn(2, 3, 6, 6),))
    cg = analyze(original.graph_module)
    tied = next(g for g in cg.groups if "expand" in g.layers)
    assert sorted(tied.layers) == ["expand", "se2"]     # the SE gate multiplies the depthwise output
    dw = next(n for n in new.graph.nodes if n.target is torch.ops.aten.conv2d.default and len(n.args) > 6)
    assert dw.args[6] == 8 and tuple(dw.args[1].meta["val"].shape) == (8, 1, 3, 3)
    scale = next(n for n in new.graph.nodes if n.op == "get_attr" and "scale" in n.target)
    assert tuple(scale.meta["val"].shape) == (1, 4, 1, 1)
    assert report.stats("prune-channels")["pruned"] == 3          # expand+se2, se1, up
    assert_exact_surgery(original, new)


# ---- attention heads -------------------------------------------------------------------------------
class TinyBlock(nn.Module):
    """4 heads of 4; explicit or sdpa attention; an MLP; the residual stream is the input."""

    def __init__(self, attention="explicit"):
        super().__init__()
        self.attention = attention
        self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = (m(x).view(b, t, 4, 4).transpose(1, 2) for m in (self.q, self.k, self.v))
        if self.attention == "explicit":
            a = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(x)))


def test_prune_heads_golden():
    original, new, report = prune("prune-heads{ratio=0.5}", TinyBlock(), (torch.randn(2, 3, 16),))
    assert_golden(format_text(new, with_source=False), """\
graph(%x : f32[2,3,16]):
  %q_weight_pruned : f32[8,16] = get_attr q_weight_pruned
  %q_bias_pruned : f32[8] = get_attr q_bias_pruned
  %k_weight_pruned : f32[8,16] = get_attr k_weight_pruned
  %k_bias_pruned : f32[8] = get_attr k_bias_pruned
  %v_weight_pruned : f32[8,16] = get_attr v_weight_pruned
  %v_bias_pruned : f32[8] = get_attr v_bias_pruned
  %o_weight_pruned : f32[16,8] = get_attr o_weight_pruned
  %o_bias : f32[16] = get_attr o.bias
  %fc1_weight : f32[32,16] = get_attr fc1.weight
  %fc1_bias : f32[32] = get_attr fc1.bias
  %fc2_weight : f32[16,32] = get_attr fc2.weight
  %fc2_bias : f32[16] = get_attr fc2.bias
  %linear : f32[2,3,8] = aten.linear(%x, %q_weight_pruned, %q_bias_pruned)
  %view : f32[2,3,2,4] = aten.view(%linear, [2, 3, 2, 4])
  %transpose : f32[2,2,3,4] = aten.transpose.int(%view, 1, 2)
  %linear_1 : f32[2,3,8] = aten.linear(%x, %k_weight_pruned, %k_bias_pruned)
  %view_1 : f32[2,3,2,4] = aten.view(%linear_1, [2, 3, 2, 4])
  %transpose_1 : f32[2,2,3,4] = aten.transpose.int(%view_1, 1, 2)
  %linear_2 : f32[2,3,8] = aten.linear(%x, %v_weight_pruned, %v_bias_pruned)
  %view_2 : f32[2,3,2,4] = aten.view(%linear_2, [2, 3, 2, 4])
  %transpose_2 : f32[2,2,3,4] = aten.transpose.int(%view_2, 1, 2)
  %transpose_3 : f32[2,2,4,3] = aten.transpose.int(%transpose_1, -1, -2)
  %matmul : f32[2,2,3,3] = aten.matmul(%transpose, %transpose_3)
  %div : f32[2,2,3,3] = aten.div.Tensor(%matmul, 2.0)
  %softmax : f32[2,2,3,3] = aten.softmax.int(%div, -1)
  %matmul_1 : f32[2,2,3,4] = aten.matmul(%softmax, %transpose_2)
  %transpose_4 : f32[2,3,2,4] = aten.transpose.int(%matmul_1, 1, 2)
  %reshape : f32[2,3,8] = aten.reshape(%transpose_4, [2, 3, 8])
  %linear_3 : f32[2,3,16] = aten.linear(%reshape, %o_weight_pruned, %o_bias)
  %add : f32[2,3,16] = aten.add.Tensor(%x, %linear_3)
  %linear_4 : f32[2,3,32] = aten.linear(%add, %fc1_weight, %fc1_bias)
  %gelu : f32[2,3,32] = aten.gelu(%linear_4)
  %linear_5 : f32[2,3,16] = aten.linear(%gelu, %fc2_weight, %fc2_bias)
  %add_1 : f32[2,3,16] = aten.add.Tensor(%add, %linear_5)
  return (%add_1)
""")
    st = report.stats("prune-heads")
    assert (st["groups"], st["pruned"], st["channels_before"], st["channels_after"]) == (1, 1, 16, 8)
    keep = new.meta["prune_plan"].keep["linear"]
    assert len(keep) == 8 and all(c % 4 == 0 for c in keep[::4]) and keep[1::4] == tuple(c + 1 for c in keep[::4])
    assert_exact_surgery(original, new)


@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
def test_prune_channels_prunes_heads_and_mlp(attention):
    original, new, report = prune("prune-channels{ratio=0.5}", TinyBlock(attention), (torch.randn(2, 3, 16),))
    st = report.stats("prune-channels")
    assert (st["pruned"], st["channels_after"]) == (2, 16 + 8 + 16)   # heads 16->8, MLP 32->16; o/fc2 refused
    assert any("no producer owns" in why for _, _, why in report.record("prune-channels").rejections)
    assert_exact_surgery(original, new)


# ---- options -----------------------------------------------------------------------------------------
class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 24, 1), _bn(24)
        self.c2 = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        return self.c2(F.relu(self.bn(self.c1(x)))).sum((2, 3))


def test_round_to_rounds_kept_channels_up():
    _, new, _ = prune("prune-channels{ratio=0.6,round_to=8}", Wide(), (torch.randn(1, 3, 2, 2),))
    assert len(new.meta["prune_plan"].keep["conv2d"]) == 16          # ceil(0.4 * 24 / 8) * 8
    _, new, _ = prune("prune-channels{ratio=0.9,round_to=8}", Wide(), (torch.randn(1, 3, 2, 2),))
    assert len(new.meta["prune_plan"].keep["conv2d"]) == 8           # never below round_to


def test_bn_scale_criterion_keeps_the_largest_gammas():
    model = Wide()
    with torch.no_grad():
        model.bn.weight.copy_(torch.linspace(0.1, 2.4, 24).flip(0))
    _, new, report = prune("prune-channels{ratio=0.5,criterion=bn-scale}", model, (torch.randn(1, 3, 2, 2),))
    assert new.meta["prune_plan"].keep["conv2d"] == tuple(range(12))
    assert report.stats("prune-channels")["bn-scale-fallback-l1"] == 0


def test_exclude_leaves_a_group_alone():
    original, new, report = prune("prune-channels{ratio=0.5,exclude=conv2}", Residual(), (torch.randn(2, 3, 4, 4),))
    assert list(new.meta["prune_plan"].keep) == ["conv2d_1"]         # {stem, conv2} is excluded through conv2
    assert any("excluded by 'conv2'" in why for _, _, why in report.record("prune-channels").rejections)
    assert_exact_surgery(original, new)


# ---- refusals and must-not-fire -------------------------------------------------------------------
class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c2 = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        return self.c2(F.relu(self.g(F.relu(self.c1(x)))))


def test_grouped_conv_is_refused_not_broken():
    _, new, report = prune("prune-channels{ratio=0.5}", Grouped(), (torch.randn(1, 3, 4, 4),))
    rec = report.record("prune-channels")
    assert not rec.modified
    reasons = [why for _, _, why in rec.rejections]
    assert any("grouped convolution (groups=2)" in why for why in reasons)
    assert report.stats("prune-channels")["nothing-to-prune"].startswith("all 2 channel groups refused")


class Fused(nn.Module):
    """q, k, v split out of one linear (GPT-2's ``c_attn``); ``whole``: the fused output is also read whole
    (then its parts are different channel ranges of one space, and refused)."""

    def __init__(self, whole=False):
        super().__init__()
        self.whole = whole
        self.qkv, self.o = nn.Linear(8, 24), nn.Linear(8, 8)

    def forward(self, x):
        qkv = self.qkv(x)
        q, k, v = (t.view(2, 3, 2, 4).transpose(1, 2) for t in qkv.split(8, -1))
        out = self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 3, 8))
        return out + qkv.mean(-1, keepdim=True) if self.whole else out


def test_fused_qkv_heads_are_pruned():
    # each part of the fused projection is a space of its own; q, k and v heads tie them into one group
    model = Fused()
    with torch.no_grad():
        model.qkv.weight[4:8] *= 10            # q head 1 carries the weight
    original, new, report = prune("prune-heads", model, (torch.randn(2, 3, 8),))
    st = report.stats("prune-heads")
    assert (st["groups"], st["pruned"], st["channels_before"], st["channels_after"]) == (1, 1, 8, 4)
    assert new.meta["prune_plan"].keep == {"linear[0:8]": (4, 5, 6, 7)}
    w = new.graph_module.qkv_weight_pruned
    assert torch.equal(w, original.graph_module.qkv.weight[[4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]])
    assert "aten.split_with_sizes(%linear, [4, 4, 4], -1)" in format_text(new, with_source=False)
    assert_exact_surgery(original, new)


class FusedGQASlices(nn.Module):
    """Phi-3: one ``qkv_proj`` sliced into 4 query heads and 2 key/value heads each, repeat_kv after."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(16, 32), nn.Linear(16, 16)

    def forward(self, x):
        b, s, _ = x.shape
        qkv = self.qkv(x)
        q, k, v = qkv[..., :16], qkv[..., 16:24], qkv[..., 24:]
        q = q.view(b, s, 4, 4).transpose(1, 2)
        k, v = (t.view(b, s, 2, 4).transpose(1, 2)[:, :, None].expand(b, 2, 2, s, 4).reshape(b, 4, s, 4)
                for t in (k, v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, 16))


def test_fused_grouped_query_projection_sliced_is_pruned():
    original, new, report = prune("prune-heads", FusedGQASlices(), (torch.randn(2, 5, 16),))
    st = report.stats("prune-heads")
    assert (st["pruned"], st["channels_before"], st["channels_after"]) == (1, 8, 4)
    assert tuple(new.graph_module.qkv_weight_pruned.shape) == (16, 16)     # 2 query heads + 1 k + 1 v head
    assert_exact_surgery(original, new)


def test_fused_qkv_read_whole_is_refused():
    _, _, report = prune("prune-heads", Fused(whole=True), (torch.randn(2, 3, 8),))
    rec = report.record("prune-heads")
    assert not rec.modified
    assert any("different channel ranges" in why for _, _, why in rec.rejections), rec.rejections


class NormedChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.ln, self.b = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)

    def forward(self, x):
        return self.b(F.gelu(self.ln(self.a(x))))


def test_layer_norm_over_the_channels_needs_norm_stats():
    _, _, report = prune("prune-channels{ratio=0.5}", NormedChannels(), (torch.randn(3, 8),))
    rec = report.record("prune-channels")
    assert not rec.modified and any("changes its statistics" in why for _, _, why in rec.rejections)
    _, new, report = prune("prune-channels{ratio=0.5,norm_stats=true}", NormedChannels(), (torch.randn(3, 8),))
    ln = next(n for n in new.graph.nodes if n.target is torch.ops.aten.layer_norm.default)
    assert ln.args[1] == [8] and tuple(ln.args[2].meta["val"].shape) == (8,)


class OnlyHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.tanh(x) * 2 + self.fc(x).sum(-1, keepdim=True)


class NoLayers(nn.Module):
    def forward(self, x):
        return torch.relu(x) + 1


@pytest.mark.parametrize("model,why", [(OnlyHead(), "all 1 channel groups refused"),
                                       (NoLayers(), "no convolution or linear layer")])
def test_nothing_to_prune(model, why):
    _, new, report = prune("prune-channels{ratio=0.5}", model, (torch.randn(2, 4),))
    assert not report.record("prune-channels").modified
    assert report.stats("prune-channels")["nothing-to-prune"].startswith(why)


def test_ratio_zero_does_not_fire():
    _, _, report = prune("prune-channels{ratio=0}", Residual(), (torch.randn(2, 3, 4, 4),))
    assert not report.record("prune-channels").modified


@pytest.mark.parametrize("pipeline,match", [
    ("prune-channels{ratio=1.0}", "ratio=1.0 is out of range"),
    ("prune-channels{ratio=-0.1}", "ratio=-0.1 is out of range"),
    ("prune-heads{ratio=2}", "ratio=2 is out of range"),
    ("prune-channels{round_to=0}", "round_to=0 must be >= 1"),
    ("prune-channels{criterion=l3}", "must be one of l1, l2, bn-scale"),
])
def test_bad_options_are_pipeline_errors(pipeline, match):
    with pytest.raises(PipelineError, match=match):
        PassManager(pipeline, default="")


def test_exclude_pattern_matching_nothing_is_an_error():
    program = capture(Residual().eval(), (torch.randn(2, 3, 4, 4),))
    with pytest.raises(PassError) as info:
        PassManager("prune-channels{exclude=layer9.*}", default="").run(program)
    assert isinstance(info.value.__cause__, PipelineError)
    assert "exclude pattern 'layer9.*' matches no layer (layers: stem, conv1, conv2, fc)" in str(info.value)


# ---- grouped-query attention: a key/value head and the query heads that share it are one group -----
class GQABlock(nn.Module):
    """4 query heads and 2 key/value heads of 4, written the ways real decoders write them: HF's repeat_kv
    (unsqueeze, expand, reshape), SDPA with ``enable_gqa``, or a tiled ``repeat`` (a different head map,
    which must not be pruned as if it were repeat_kv). ``within_head`` adds per-head work on the head dim:
    an RMSNorm over it (Qwen3's q/k norm) and a partial rotation of its first half (Phi's partial rotary)."""

    def __init__(self, repeat="repeat_kv", within_head=False):
        super().__init__()
        self.repeat, self.within_head = repeat, within_head
        self.q, self.o = nn.Linear(16, 16), nn.Linear(16, 16)
        self.k, self.v = nn.Linear(16, 8), nn.Linear(16, 8)
        self.norm_w = nn.Parameter(torch.rand(4) + 0.5)

    def _head_ops(self, t):
        t = F.rms_norm(t, (4,), self.norm_w, 1e-6)
        rot, rest = t[..., :2], t[..., 2:]
        return torch.cat([torch.cat([-rot[..., 1:], rot[..., :1]], -1), rest], -1)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, -1, 4).transpose(1, 2)
        k, v = (m(x).view(b, s, -1, 4).transpose(1, 2) for m in (self.k, self.v))
        if self.within_head:
            q, k = self._head_ops(q), self._head_ops(k)
        if self.repeat == "enable_gqa":
            a = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            if self.repeat == "repeat_kv":
                k, v = (t[:, :, None].expand(b, 2, 2, s, 4).reshape(b, 4, s, 4) for t in (k, v))
            else:
                k, v = (t.repeat(1, 2, 1, 1) for t in (k, v))
            a = F.scaled_dot_product_attention(q, k, v)
        return x + self.o(a.transpose(1, 2).reshape(b, s, 16))


@pytest.mark.parametrize("repeat", ["repeat_kv", "enable_gqa"])
@pytest.mark.parametrize("within_head", [False, True])
def test_prune_heads_through_grouped_query_attention(repeat, within_head):
    model = GQABlock(repeat, within_head)
    with torch.no_grad():   # key/value head 1 and the query heads 2 and 3 it serves carry the weight
        model.q.weight[8:] *= 10
        model.k.weight[4:] *= 10
    original, new, report = prune("prune-heads{ratio=0.5}", model, (torch.randn(2, 5, 16),))
    st = report.stats("prune-heads")
    assert (st["groups"], st["pruned"], st["channels_before"], st["channels_after"]) == (1, 1, 8, 4), \
        report.record("prune-heads").rejections
    # the group is counted in key/value channels; key/value head 1 kept, so query heads 2 and 3
    assert new.meta["prune_plan"].keep["linear"] == (4, 5, 6, 7)
    shapes = {n.name: tuple(n.meta["val"].shape) for n in new.graph.nodes if n.op == "get_attr"}
    assert shapes["q_weight_pruned"] == (8, 16) and shapes["k_weight_pruned"] == (4, 16)
    assert shapes["v_weight_pruned"] == (4, 16) and shapes["o_weight_pruned"] == (16, 8)
    assert torch.equal(new.graph_module.q_weight_pruned, original.graph_module.q.weight[8:])
    assert torch.equal(new.graph_module.k_weight_pruned, original.graph_module.k.weight[4:])
    assert_exact_surgery(original, new)


def test_prune_channels_prunes_grouped_query_heads_with_the_rest():
    original, new, report = prune("prune-channels{ratio=0.5}", GQABlock(within_head=True), (torch.randn(2, 5, 16),))
    assert report.stats("prune-channels")["pruned"] == 1
    assert_exact_surgery(original, new)


def test_a_tiled_key_value_repeat_is_not_taken_for_repeat_kv():
    # k.repeat(1, 2, 1, 1) gives query head h key/value head h % 2, not h // 2: tying them as repeat_kv
    # does would prune the wrong heads; the op is refused by name
    _, _, report = prune("prune-heads", GQABlock("tile"), (torch.randn(2, 5, 16),))
    rec = report.record("prune-heads")
    assert not rec.modified
    assert any("aten.repeat is not known to preserve channels" in why for _, _, why in rec.rejections), \
        rec.rejections


class MultiQuery(nn.Module):
    """Multi-query attention: 4 query heads of 4 and one key/value head, from one fused projection.
    ``form="bigcode"`` is GPT-BigCode's: the projection unsqueezed, split into q, k and v, the one
    key/value head repeated by HF's repeat_kv (unsqueeze, expand, reshape); ``"gqa"`` hands SDPA
    the one head with ``enable_gqa``."""

    def __init__(self, form="bigcode"):
        super().__init__()
        self.form = form
        self.qkv, self.o = nn.Linear(16, 24), nn.Linear(16, 16)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).unsqueeze(1).split([16, 4, 4], dim=3)
        q = q.view(b, s, -1, 4).transpose(1, 2)
        if self.form == "gqa":
            a = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            k, v = (t.unsqueeze(2).expand(b, 1, 4, s, 4).reshape(b, 4, s, 4) for t in (k, v))
            a = F.scaled_dot_product_attention(q, k, v)
        return x + self.o(a.transpose(1, 2).reshape(b, s, 16))


@pytest.mark.parametrize("form", ["bigcode", "gqa"])
def test_multi_query_attention_prunes_query_heads_and_keeps_the_key_value_head(form):
    """Every query head reads the one key/value head: the query heads prune on their own (the sizes
    that repeat the key/value head follow them), the key/value head stays whole."""
    model = MultiQuery(form)
    with torch.no_grad():
        model.qkv.weight[8:16] *= 10            # query heads 2 and 3 carry the weight
    original, new, report = prune("prune-heads{ratio=0.5}", model, (torch.randn(2, 5, 16),))
    rec = report.record("prune-heads")
    st = rec.stats
    assert (st["pruned"], st["channels_before"], st["channels_after"]) == (1, 16, 8), rec.rejections
    rows = list(range(8, 24))                   # query heads 2 and 3, then k and v whole
    assert torch.equal(new.graph_module.qkv_weight_pruned, original.graph_module.qkv.weight[rows])
    assert torch.equal(new.graph_module.o_weight_pruned, original.graph_module.o.weight[:, 8:])
    text = format_text(new, with_source=False)
    assert "[8, 4, 4]" in text                   # the split
    if form == "bigcode":
        assert "aten.expand(" in text and ", [2, 1, 2, 5, 4])" in text
    assert_exact_surgery(original, new)
    # the key/value channels are a group of prune-channels, refused with the reason
    _, _, report = prune("prune-channels{ratio=0.5}", MultiQuery(form), (torch.randn(2, 5, 16),))
    assert any("the one key/value head of multi-query attention is read by every query head" in why
               for _, _, why in report.record("prune-channels").rejections)


class FalconMultiQuery(nn.Module):
    """Falcon's multi-query attention: one projection viewed as 6 heads of 4 -- 4 query heads, then
    the key head and the value head -- the query heads sliced out, the key and value heads picked
    with constant index lists, and broadcast to the query heads by an expand (eager attention) or
    by SDPA itself (a heads dim of 1: transformers' sdpa attention)."""

    def __init__(self, expand=True):
        super().__init__()
        self.expand = expand
        self.qkv, self.o = nn.Linear(16, 24), nn.Linear(16, 16)
        self.register_buffer("k_at", torch.tensor([4]))
        self.register_buffer("v_at", torch.tensor([5]))

    def forward(self, x):
        b, s, _ = x.shape
        fused = self.qkv(x).view(b, s, 6, 4)
        q, k, v = fused[:, :, :-2], fused[:, :, self.k_at], fused[:, :, self.v_at]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.expand:
            k, v = (t.expand(-1, 4, -1, -1) for t in (k, v))
        return x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, 16))


@pytest.mark.parametrize("expand", [True, False])
def test_falcon_multi_query_attention_prunes_query_heads(expand):
    """The fused projection splits at its head slices and indexes (query, key, value parts); the
    query heads prune, the key and value heads stay, and the index lists and expand sizes follow."""
    model = FalconMultiQuery(expand)
    with torch.no_grad():
        model.qkv.weight[:8] *= 10              # query heads 0 and 1 carry the weight
    original, new, report = prune("prune-heads{ratio=0.5}", model, (torch.randn(2, 5, 16),))
    rec = report.record("prune-heads")
    # three head groups: the query heads (pruned), the key head and the value head (refused, whole)
    assert (rec.stats["groups"], rec.stats["pruned"], rec.stats["channels_before"],
            rec.stats["channels_after"]) == (3, 1, 24, 16), rec.rejections
    assert any("the one key/value head of multi-query attention" in why for _, _, why in rec.rejections)
    rows = list(range(8)) + list(range(16, 24))  # query heads 0 and 1, then the key and value heads
    assert torch.equal(new.graph_module.qkv_weight_pruned, original.graph_module.qkv.weight[rows])
    text = format_text(new, with_source=False)
    assert "[2, 5, 4, 4]" in text                # 4 heads left in the view: 2 query heads, the key, the value
    assert ("[-1, 2, -1, -1]" in text) == expand     # the key/value head broadcast to the 2 query heads
    picked = sorted(getattr(new.graph_module, n.args[1][2].target).tolist() for n in new.graph.nodes
                    if n.target is torch.ops.aten.index.Tensor)
    assert picked == [[2], [3]]                  # the key and value heads renumbered
    assert_exact_surgery(original, new)


class PerHeadFusedQKV(nn.Module):
    """GPT-NeoX: one projection viewed as ``[H, 3D]`` (each head's q, k and v rows together), chunked
    along the head dim; the attention output merged back from heads of ``D``."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 4, 12).transpose(1, 2).chunk(3, dim=-1)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, 16))


def test_per_head_fused_qkv_prunes_whole_heads():
    model = PerHeadFusedQKV()
    with torch.no_grad():
        model.qkv.weight[12:24] *= 10          # head 1 (its q, k and v rows) carries the weight
    original, new, report = prune("prune-heads{ratio=0.5}", model, (torch.randn(2, 5, 16),))
    st = report.stats("prune-heads")
    assert (st["pruned"], st["channels_before"], st["channels_after"]) == (1, 48, 24), \
        report.record("prune-heads").rejections
    keep = new.meta["prune_plan"].keep["linear"]
    assert len(keep) == 24 and set(range(12, 24)) <= set(keep)     # whole heads of 12 rows, head 1 among them
    kept_heads = sorted({c // 12 for c in keep})
    o_cols = [h * 4 + j for h in kept_heads for j in range(4)]
    assert torch.equal(new.graph_module.o_weight_pruned, original.graph_module.o.weight[:, o_cols])
    assert_exact_surgery(original, new)


class SharedHeadBias(nn.Module):
    """T5: one relative-position bias per head, computed once and read by the attention of every layer."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(8, 4)
        self.blocks = nn.ModuleList(TinyBlock("sdpa") for _ in range(2))

    def forward(self, x):
        b, s, c = x.shape
        pos = torch.arange(s)
        bias = self.table((pos[None, :] - pos[:, None]).clamp(-4, 3) + 4).permute(2, 0, 1).unsqueeze(0)
        for blk in self.blocks:
            q, k, v = (m(x).view(b, s, 4, 4).transpose(1, 2) for m in (blk.q, blk.k, blk.v))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            x = x + blk.o(a.transpose(1, 2).reshape(b, s, c))
        return x


def test_a_per_head_attention_bias_shared_by_layers_is_read_per_layer():
    model = SharedHeadBias()
    with torch.no_grad():                      # layer 0 keeps heads 0 and 1, layer 1 heads 2 and 3
        model.blocks[0].q.weight[:8] *= 10
        model.blocks[1].q.weight[8:] *= 10
    original, new, report = prune("prune-heads{ratio=0.5}", model, (torch.randn(2, 6, 16),))
    assert report.stats("prune-heads")["pruned"] == 2
    sel = [n for n in new.graph.nodes if n.target is torch.ops.aten.index_select.default]
    assert len(sel) == 2 and sel[0].args[0] is sel[1].args[0]          # one bias, read by each layer
    kept = [getattr(new.graph_module, n.args[2].target).tolist() for n in sel]
    assert kept == [[0, 1], [2, 3]]
    assert_exact_surgery(original, new)


class PerHeadFusedQKV3(nn.Module):
    """BLOOM: one projection viewed as ``[H, 3, D]`` (each head's q, k and v rows together), q, k and v
    picked by index along the ``3``."""

    def __init__(self):
        super().__init__()
        self.qkv, self.o = nn.Linear(16, 48), nn.Linear(16, 16)

    def forward(self, x):
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, 4, 3, 4)
        q, k, v = (qkv[..., i, :].transpose(1, 2) for i in range(3))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, 16))


def test_per_head_fused_qkv_viewed_in_three_dims_prunes_whole_heads():
    original, new, report = prune("prune-heads{ratio=0.5}", PerHeadFusedQKV3(), (torch.randn(2, 5, 16),))
    st = report.stats("prune-heads")
    assert (st["pruned"], st["channels_before"], st["channels_after"]) == (1, 48, 24), \
        report.record("prune-heads").rejections
    keep = new.meta["prune_plan"].keep["linear"]
    assert all(c % 12 == 0 for c in keep[::12]) and len(keep) == 24      # whole heads of 12 rows
    assert_exact_surgery(original, new)
