import torch
import torch.nn as nn
import torch.nn.functional as F

from optc.ir.capture import capture
from optc.ir.program import attr_tensors
from optc.passes import PassManager
from optc.testing import check_pass, run_pass

NO_RULE_FIRED = {"drop-eval-dropout": 0, "drop-detach": 0, "drop-alias": 0, "drop-clone": 0, "drop-noop-to": 0,
                 "drop-noop-view": 0, "cancel-view-chain": 0, "mm-add-to-addmm": 0, "constant-matmul-to-linear": 0,
                 "recompose-batch-norm": 0,
                 "drop-assert": 0, "drop-softmax-dtype": 0, "drop-empty-cat-operand": 0,
                 "drop-arith-identity": 0, "expand-as-to-expand": 0}


class NoOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        y = self.drop(torch.relu(x))                               # eval-mode dropout
        y = F.dropout(y, 0.5, training=False).clone().detach()
        y = y.reshape(2, 3).to(torch.float32)                      # same shape, same dtype
        y = y.unsqueeze(0).view(6).view(2, 3)                      # back to y's shape
        return y * 2


def test_canonicalize_drops_noops():
    check_pass("canonicalize", NoOps(), (torch.randn(2, 3),), """\
graph(%x : f32[2,3]):
  %relu : f32[2,3] = aten.relu(%x)
  %mul : f32[2,3] = aten.mul.Tensor(%relu, 2)
  return (%mul)
""", modified=True, stats={"canonicalize": {**NO_RULE_FIRED, "drop-eval-dropout": 2, "drop-clone": 1,
                                            "drop-detach": 1, "drop-noop-view": 1, "drop-noop-to": 1,
                                            "cancel-view-chain": 1, "drop-assert": 1}})


class ExportLeftovers(nn.Module):
    """What transformers and torch's functionalization leave: softmax(dtype=float32) of float32
    scores, an empty cache tensor concatenated, an in-place write (which makes capture
    functionalise the graph: its BatchNorm becomes _native_batch_norm_legit_no_training)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(4).eval()
        self.register_buffer("cache", torch.tensor([]))

    def forward(self, x):
        y = torch.softmax(x, dim=-1, dtype=torch.float32).to(x.dtype)
        y = torch.cat([self.cache, y], dim=-2)
        z = self.bn(y)
        z[:, 0] = 1.0
        return z


def test_canonicalize_normalises_what_export_and_transformers_leave():
    out = check_pass("canonicalize", ExportLeftovers(), (torch.randn(2, 4),), """\
graph(%x : f32[2,4]):
  %bn_weight : f32[4] = get_attr bn.weight
  %bn_bias : f32[4] = get_attr bn.bias
  %cache : f32[0] = get_attr cache
  %lifted_tensor_0 : f32[] = get_attr lifted_tensor_0
  %bn_running_mean : f32[4] = get_attr bn.running_mean
  %bn_running_var : f32[4] = get_attr bn.running_var
  %bn_num_batches_tracked : i64[] = get_attr bn.num_batches_tracked
  %softmax : f32[2,4] = aten.softmax.int(%x, -1)
  %batch_norm : f32[2,4] = aten.batch_norm(%softmax, %bn_weight, %bn_bias, %bn_running_mean, %bn_running_var, False, 0.1, 1e-05, True)
  %select : f32[2] = aten.select.int(%batch_norm, 1, 0)
  %fill : f32[2] = aten.fill.Tensor(%select, %lifted_tensor_0)
  %select_scatter : f32[2,4] = aten.select_scatter(%batch_norm, %fill, 1, 0)
  return (%select_scatter)
""", modified=True)
    stats = out.stats("canonicalize")
    assert stats["drop-softmax-dtype"] == 1 and stats["drop-empty-cat-operand"] == 1
    assert stats["recompose-batch-norm"] == 1 and stats["drop-assert"] >= 1


class MatmulBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4))
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return torch.relu(x @ self.w + self.b)


class MatmulInputBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x, w):
        return torch.relu(x @ w + self.b)


def test_canonicalize_mm_add_to_addmm():
    # a product with a weight computed at run time: addmm, and no linear layer
    check_pass("canonicalize", MatmulInputBias(), (torch.randn(3, 8), torch.randn(8, 4)), """\
graph(%x : f32[3,8], %w : f32[8,4]):
  %b : f32[4] = get_attr b
  %addmm : f32[3,4] = aten.addmm(%b, %x, %w)
  %relu : f32[3,4] = aten.relu(%addmm)
  return (%relu)
""", modified=True, stats={"canonicalize": {**NO_RULE_FIRED, "mm-add-to-addmm": 1}})


def test_canonicalize_product_with_a_constant_matrix_to_linear():
    # x @ W + b with W a constant: the bias joins the product first (addmm), then it is a linear layer
    # whose weight is a transposed view of W (the same storage: no copy)
    model = MatmulBias()
    out = check_pass("canonicalize", model, (torch.randn(3, 8),), """\
graph(%x : f32[3,8]):
  %b : f32[4] = get_attr b
  %w_t : f32[4,8] = get_attr w_t
  %linear : f32[3,4] = aten.linear(%x, %w_t, %b)
  %relu : f32[3,4] = aten.relu(%linear)
  return (%relu)
""", modified=True, stats={"canonicalize": {**NO_RULE_FIRED, "mm-add-to-addmm": 1, "constant-matmul-to-linear": 1}})
    w_t = out.program.graph_module.w_t
    assert w_t.untyped_storage().data_ptr() == model.w.untyped_storage().data_ptr() and torch.equal(w_t, model.w.t())


class GPT2Conv1D(nn.Module):
    """HF GPT-2's ``Conv1D`` (``addmm(bias, x.view(-1, nx), weight).view(...)``, weight ``[nx, nf]``), a
    3-D ``x @ weight``, and Falcon's ``FalconLinear`` (``x @ self.weight.T``, weight ``[out, in]``)."""

    def __init__(self):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(8, 12)), nn.Parameter(torch.randn(12))
        self.proj = nn.Parameter(torch.randn(12, 8))
        self.falcon = nn.Parameter(torch.randn(6, 8))

    def forward(self, x):
        size_out = x.size()[:-1] + (12,)
        h = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)
        return torch.tanh(torch.tanh(h) @ self.proj) @ self.falcon.T


def test_gpt2_conv1d_and_falcon_linear_become_linear_layers():
    out = run_pass("canonicalize", GPT2Conv1D(), (torch.randn(2, 5, 8),))
    assert out.stats("canonicalize")["constant-matmul-to-linear"] == 3
    assert out.text.count("aten.linear(") == 3 and "addmm" not in out.text and "matmul" not in out.text
    assert "aten.linear(%tanh_1, %falcon)" in out.text and "permute" not in out.text   # W.T read as W itself


class ConstantMatmulRefused(nn.Module):
    def __init__(self):
        super().__init__()
        self.w, self.b, self.full = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4)), \
            nn.Parameter(torch.randn(4, 4))
        self.w3 = nn.Parameter(torch.randn(2, 4, 4))

    def forward(self, x):
        return (torch.addmm(self.b, x, self.w, beta=2.0), torch.addmm(self.full, x, self.w),
                x.expand(2, 4, 4) @ self.w3)


def test_constant_matmul_to_linear_must_not_fire_where_it_does_not_hold():
    out = run_pass("canonicalize", ConstantMatmulRefused(), (torch.randn(4, 4),))
    assert out.stats("canonicalize")["constant-matmul-to-linear"] == 0
    assert [r for r in out.rejections("canonicalize") if r[0] == "constant-matmul-to-linear"] == [
        ("constant-matmul-to-linear", "addmm", "addmm with beta or alpha other than 1"),
        ("constant-matmul-to-linear", "addmm_1", "addmm's input is not a bias vector of 4 (shape [4, 4])"),
        ("constant-matmul-to-linear", "matmul", "not an activation times a constant matrix (3-D x 3-D)"),
    ]


class Refused(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x, y, w):
        h = x @ w
        full = x @ w.t() + y                                 # a full matrix, not a bias vector
        z = x.transpose(0, 1).contiguous().view(16)          # the copy makes the view legal
        noisy = F.dropout(x, 0.5, training=True)             # training mode
        return h + self.b, h, full, z, x.transpose(0, 1), noisy, x.clone()


def test_canonicalize_must_not_fire_where_rewrites_do_not_hold():
    out = run_pass("canonicalize", Refused(), (torch.randn(4, 4), torch.randn(4, 4), torch.randn(4, 4)))
    assert not out.report.record("canonicalize").modified
    assert out.stats("canonicalize") == {**NO_RULE_FIRED, "not-fired": 5}
    assert out.text.count("aten.transpose.int(%x, 0, 1)") == 2    # same shape, other data: no no-op
    assert out.rejections("canonicalize") == [
        ("mm-add-to-addmm", "add", "add operand is not a bias vector (shape [4, 4] for a [4, 4] product)"),
        ("drop-clone", "contiguous", "changes strides [1, 4] -> [4, 1]"),
        ("drop-eval-dropout", "dropout", "dropout in training mode (p=0.5)"),
        ("mm-add-to-addmm", "add_1", "mm has 2 users"),
        ("drop-clone", "clone", "the copy is a graph output (it would alias another tensor)"),
    ]


def test_canonicalize_does_not_modify_the_original_tensors():
    program = capture(MatmulBias().eval(), (torch.randn(3, 8),))
    before = {k: (t, t._version, t.clone()) for k, t in attr_tensors(program.graph_module).items()}
    PassManager("canonicalize", default="").run(program)
    for t, version, copy in before.values():
        assert t._version == version and torch.equal(t, copy)


class ArithIdentities(nn.Module):
    """DeBERTa's ``scores + 0`` (relative attention off), ``x * 1``; and look-alikes that must stay:
    an int ``* 1.0`` (promotes the dtype), ``+ 1``, and ``- 0`` as a graph output (would alias ``x``)."""

    def forward(self, x, n):
        a = torch.relu((x + 0) * 1 / 1)
        return a, n * 1.0, x + 1, x - 0


def test_canonicalize_drops_arithmetic_identities_only():
    out = check_pass("canonicalize", ArithIdentities(), (torch.randn(2, 4), torch.arange(4)), """\
graph(%x : f32[2,4], %n : i64[4]):
  %relu : f32[2,4] = aten.relu(%x)
  %mul_1 : f32[4] = aten.mul.Tensor(%n, 1.0)
  %add_1 : f32[2,4] = aten.add.Tensor(%x, 1)
  %sub : f32[2,4] = aten.sub.Tensor(%x, 0)
  return (%relu, %mul_1, %add_1, %sub)
""", modified=True)
    assert out.stats("canonicalize")["drop-arith-identity"] == 3


class ExpandAs(nn.Module):
    def forward(self, scores, keep):
        return scores.masked_fill(keep.expand_as(scores), 0.0)


def test_canonicalize_expand_as_reads_only_the_shape():
    out = check_pass("canonicalize", ExpandAs(), (torch.randn(2, 3, 4), torch.rand(1, 1, 4) > 0.5), """\
graph(%scores : f32[2,3,4], %keep : bool[1,1,4]):
  %expand : bool[2,3,4] = aten.expand(%keep, [2, 3, 4])
  %masked_fill : f32[2,3,4] = aten.masked_fill.Scalar(%scores, %expand, 0.0)
  return (%masked_fill)
""", modified=True)
    assert out.stats("canonicalize")["expand-as-to-expand"] == 1
