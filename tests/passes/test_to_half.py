"""to-half: goldens for float16 and bfloat16, numerics of a lossy pass, keep=..., outputs keeping
their dtypes, must-not-fire cases."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import optc
from optc.errors import PipelineError
from optc.ir.verifier import compare_outputs, random_inputs_like
from optc.passes.to_half import KEEP_OPS, parse_keep
from optc.testing import check_pass, run_pass

# Half precision's unit roundoff: 2^-11 (float16), 2^-8 (bfloat16). Each half layer rounds its
# input, its converted weights and its output once (it accumulates in float32), so a value picks up
# about 3u of relative error per half layer; two half layers in a row: ~6u of the output scale.
# 8u is the bound -- the float32 result would be exact to 1e-7, a layer computed from a mis-cast
# (e.g. weights left float32 against a half input) would not run at all.
RTOL = {"float16": 8 * 2.0 ** -11, "bfloat16": 8 * 2.0 ** -8}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = F.relu(self.conv(x)) + x.mean(1, keepdim=True)   # a half branch added to a float32 value
        return torch.softmax(self.fc(self.ln(h.mean((2, 3)))), -1)


def test_float16_golden():
    out = check_pass("to-half", Net(), torch.randn(2, 3, 5, 5), """\
graph(%x : f32[2,3,5,5]):
  %ln_weight : f32[8] = get_attr ln.weight
  %ln_bias : f32[8] = get_attr ln.bias
  %x_f16 : f16[2,3,5,5] = aten.to.dtype(%x, f16)
  %conv_weight_f16 : f16[8,3,3,3] = get_attr conv_weight_f16
  %conv_bias_f16 : f16[8] = get_attr conv_bias_f16
  %conv2d : f16[2,8,5,5] = aten.conv2d(%x_f16, %conv_weight_f16, %conv_bias_f16, [1, 1], [1, 1])
  %relu : f16[2,8,5,5] = aten.relu(%conv2d)
  %relu_f32 : f32[2,8,5,5] = aten.to.dtype(%relu, f32)
  %mean : f32[2,1,5,5] = aten.mean.dim(%x, [1], True)
  %add : f32[2,8,5,5] = aten.add.Tensor(%relu_f32, %mean)
  %mean_1 : f32[2,8] = aten.mean.dim(%add, [2, 3])
  %layer_norm : f32[2,8] = aten.layer_norm(%mean_1, [8], %ln_weight, %ln_bias, 1e-05, False)
  %layer_norm_f16 : f16[2,8] = aten.to.dtype(%layer_norm, f16)
  %fc_weight_f16 : f16[4,8] = get_attr fc_weight_f16
  %fc_bias_f16 : f16[4] = get_attr fc_bias_f16
  %linear : f16[2,4] = aten.linear(%layer_norm_f16, %fc_weight_f16, %fc_bias_f16)
  %linear_f32 : f32[2,4] = aten.to.dtype(%linear, f32)
  %softmax : f32[2,4] = aten.softmax.int(%linear_f32, -1)
  return (%softmax)
""", modified=True, rtol=RTOL["float16"],
        stats={"to-half": {"half": 2, "follow_half": 1, "kept": 2, "casts": 4, "weights": 4, "dtype": "float16"}})
    assert not out.report.record("to-half").exact


def test_bfloat16_golden():
    check_pass("to-half{dtype=bfloat16}", Net(), torch.randn(2, 3, 5, 5), """\
graph(%x : f32[2,3,5,5]):
  %ln_weight : f32[8] = get_attr ln.weight
  %ln_bias : f32[8] = get_attr ln.bias
  %x_bf16 : bf16[2,3,5,5] = aten.to.dtype(%x, bf16)
  %conv_weight_bf16 : bf16[8,3,3,3] = get_attr conv_weight_bf16
  %conv_bias_bf16 : bf16[8] = get_attr conv_bias_bf16
  %conv2d : bf16[2,8,5,5] = aten.conv2d(%x_bf16, %conv_weight_bf16, %conv_bias_bf16, [1, 1], [1, 1])
  %relu : bf16[2,8,5,5] = aten.relu(%conv2d)
  %relu_f32 : f32[2,8,5,5] = aten.to.dtype(%relu, f32)
  %mean : f32[2,1,5,5] = aten.mean.dim(%x, [1], True)
  %add : f32[2,8,5,5] = aten.add.Tensor(%relu_f32, %mean)
  %mean_1 : f32[2,8] = aten.mean.dim(%add, [2, 3])
  %layer_norm : f32[2,8] = aten.layer_norm(%mean_1, [8], %ln_weight, %ln_bias, 1e-05, False)
  %layer_norm_bf16 : bf16[2,8] = aten.to.dtype(%layer_norm, bf16)
  %fc_weight_bf16 : bf16[4,8] = get_attr fc_weight_bf16
  %fc_bias_bf16 : bf16[4] = get_attr fc_bias_bf16
  %linear : bf16[2,4] = aten.linear(%layer_norm_bf16, %fc_weight_bf16, %fc_bias_bf16)
  %linear_f32 : f32[2,4] = aten.to.dtype(%linear, f32)
  %softmax : f32[2,4] = aten.softmax.int(%linear_f32, -1)
  return (%softmax)
""", modified=True, rtol=RTOL["bfloat16"], stats={"to-half": {"half": 2, "dtype": "bfloat16"}})


class Block(nn.Module):
    """A transformer block: linears in half, softmax / layer norm / SDPA in float32."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.out = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x):
        q, k, v = self.qkv(x).split(8, -1)
        a = F.scaled_dot_product_attention(q, k, v)
        h = self.norm(x + self.out(a))
        return h + self.fc2(F.gelu(self.fc1(h)))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_transformer_block_keeps_sdpa_and_norm_in_float32(dtype):
    model = Block().eval()
    out = run_pass(f"to-half{{dtype={dtype}}}", model, (torch.randn(2, 5, 8),))
    half = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    dt = {n.name: n.meta["val"].dtype for n in out.program.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}
    assert dt["linear"] == dt["linear_1"] == dt["linear_2"] == dt["linear_3"] == half
    assert dt["gelu"] == half                                    # follows its half input
    assert dt["scaled_dot_product_attention"] == dt["layer_norm"] == torch.float32
    assert out.report.stats("to-half")["half"] == 4
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        got = out.program(x)
        rep = compare_outputs(model(x), got)
    assert got.dtype == torch.float32 and rep.max_rel_error < RTOL[dtype]


def test_keep_replaces_the_default_list_and_names_modules():
    assert parse_keep("default") == list(KEEP_OPS)
    assert parse_keep("softmax|head,fc*") == ["softmax", "head", "fc*"]
    assert parse_keep("default|fc")[-1] == "fc" and len(parse_keep("default|fc")) == len(KEEP_OPS) + 1
    model, x = Net(), torch.randn(2, 3, 5, 5)
    out = run_pass("to-half{keep=default|fc}", model, (x,))
    assert out.report.stats("to-half")["half"] == 1                 # only the conv
    assert ("half", "linear", "kept in float32 by keep='fc'") in out.rejections("to-half")
    # keep=conv drops the default list: layer norm and softmax then follow their inputs
    out = run_pass("to-half{keep=conv}", model, (x,))
    dt = {n.name: n.meta["val"].dtype for n in out.program.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)}
    assert dt["conv2d"] == torch.float32 and dt["linear"] == torch.float16


def test_outputs_and_inputs_keep_their_dtypes():
    class TwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, idx):
            y = self.fc(x)
            return y, y.argmax(-1) + idx
    out = run_pass("to-half", TwoOut(), (torch.randn(3, 4), torch.tensor([1, 2, 3])))
    placeholders = [n for n in out.program.graph.nodes if n.op == "placeholder"]
    assert [p.meta["val"].dtype for p in placeholders] == [torch.float32, torch.int64]
    y, i = out.program(torch.randn(3, 4), torch.tensor([1, 2, 3]))
    assert y.dtype == torch.float32 and i.dtype == torch.int64


def test_half_model_stays_half_at_its_outputs():
    # a model already in float16: kept ops go to float32 and come back, the output stays float16
    model = nn.Sequential(nn.Linear(4, 4), nn.Softmax(-1)).half()
    out = run_pass("to-half", model, (torch.randn(3, 4, dtype=torch.float16),))
    (o,) = [a for a in out.program.graph.output_node().args[0]]
    assert o.meta["val"].dtype == torch.float16
    assert out.report.stats("to-half")["kept"] == 1          # the softmax, in float32


# ---- must not fire -------------------------------------------------------------------------------
def test_no_conv_linear_or_matmul_does_not_fire():
    class NoLayers(nn.Module):
        def forward(self, x):
            return torch.softmax(x.relu() * 2, -1)
    out = run_pass("to-half", NoLayers(), (torch.randn(3, 4),))
    rec = out.report.record("to-half")
    assert not rec.modified and rec.stats["nothing-to-do"] == "no conv, linear or matmul computes in float32"


def test_everything_kept_does_not_fire():
    out = run_pass("to-half{keep=linear|conv2d}", Net(), (torch.randn(2, 3, 5, 5),))
    rec = out.report.record("to-half")
    assert not rec.modified and rec.stats["nothing-to-do"] == "every conv, linear and matmul is kept in float32"


def test_float64_and_integer_compute_is_untouched():
    model = nn.Linear(4, 2).double()
    out = run_pass("to-half", model, (torch.randn(3, 4, dtype=torch.float64),))
    assert not out.report.record("to-half").modified


def test_quantized_layers_stay_float32():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.b(F.relu(self.a(x)))
    x = torch.randn(3, 6)
    with pytest.warns(UserWarning, match="no calibration_data"):
        out = run_pass("insert-qdq,to-half", MLP(), (x,))
    assert not out.report.record("to-half").modified
    reasons = {r[2] for r in out.rejections("to-half")}
    assert reasons == {"reads a dequantized value: stays float32 for the backend's integer kernel"}


def test_bad_dtype_is_a_pipeline_error():
    with pytest.raises(PipelineError, match="dtype='float8' is not a valid choice: must be one of float16, bfloat16"):
        run_pass("to-half{dtype=float8}", Net(), (torch.randn(2, 3, 5, 5),))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fresh_inputs(dtype):
    model, x = Net().eval(), torch.randn(2, 3, 5, 5)
    out = run_pass(f"to-half{{dtype={dtype}}}", model, (x,))
    for seed in (5, 6):
        args, _ = random_inputs_like(out.program, seed=seed)
        with torch.no_grad():
            assert compare_outputs(model(*args), out.program(*args)).max_rel_error < RTOL[dtype]


def test_cat_of_a_half_and_a_float32_value_computes_in_float32():
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.token = nn.Parameter(torch.randn(1, 1, 4))

        def forward(self, x):
            return torch.cat([self.token.expand(x.shape[0], -1, -1), self.fc(x)], 1)
    out = run_pass("to-half", Cat(), (torch.randn(2, 3, 4),))
    cat = next(n for n in out.program.graph.nodes if n.target is torch.ops.aten.cat.default)
    assert [a.meta["val"].dtype for a in cat.args[0]] == [torch.float32, torch.float32]   # the half one cast up


# ---- found by optc fuzz ----------------------------------------------------------------------------
class FinfoMask(nn.Module):
    """Attention scores masked with finfo(float32).min: the scalar does not fit in half."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        s = self.q(x) @ self.k(x).transpose(-1, -2)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).triu(1)
        return torch.softmax(s.masked_fill(mask, torch.finfo(torch.float32).min), -1)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_scalar_beyond_the_half_range_keeps_its_op_in_float32(dtype):
    model, x = FinfoMask().eval(), torch.randn(2, 3, 4)
    out = run_pass(f"to-half{{dtype={dtype}}}", model, (x,))
    fill = next(n for n in out.program.graph.nodes if n.target is torch.ops.aten.masked_fill.Scalar)
    assert fill.meta["val"].dtype == torch.float32 and fill.args[0].meta["val"].dtype == torch.float32
    with torch.no_grad():
        assert compare_outputs(model(x), out.program(x)).max_rel_error < RTOL[dtype]


class ToFloat(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return (self.fc(x) * 2).to(torch.float32)     # torch.export checks the dtype of the .to()


def test_torch_exports_dtype_assert_follows_the_new_dtype():
    out = run_pass("to-half", ToFloat(), (torch.randn(3, 4),))
    asserts = [n for n in out.program.graph.nodes if n.target is torch.ops.aten._assert_tensor_metadata.default]
    assert asserts and all(n.kwargs["dtype"] == n.args[0].meta["val"].dtype for n in asserts)
    assert out.program(torch.randn(3, 4)).dtype == torch.float32


class Wide(nn.Module):
    """Values beyond float16's range (found by optc fuzz, shrunk: seed 20261201, model 5326): h in
    [-24, 552], y = fc(h) * 4 about 455, y * y about 2e5 > 65504; h * h about 3e5 into a linear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(48, 1)
        self.narrow = nn.Linear(48, 1)
        self.wide_in = nn.Linear(48, 2)

    def forward(self, x):
        h = x.clamp(-1, 6) / -0.25
        h = h + h * h
        y = self.fc(h) * 4
        return y * y, self.narrow(x), self.wide_in(h * h) / 1e4


def test_values_beyond_the_float16_range_stay_float32():
    torch.manual_seed(0)
    model, x = Wide().eval(), torch.randn(3, 48) * 4
    with torch.no_grad():
        ref = model(x)
    assert ref[0].abs().max() > torch.finfo(torch.float16).max    # float16 would overflow here
    out = run_pass("to-half", model, (x,))
    dtypes = {n.name: n.meta["val"].dtype for n in out.program.graph.nodes
              if isinstance(n.meta.get("val"), torch.Tensor)}
    assert dtypes["linear"] == dtypes["linear_1"] == dtypes["mul_1"] == torch.float16   # in range: half
    assert dtypes["mul_2"] == torch.float32                      # y * y: computed from y cast up
    assert dtypes["linear_2"] == dtypes["mul_3"] == torch.float32   # h * h and the linear reading it
    stats = out.report.stats("to-half")
    assert stats["half"] == 2 and stats["kept_range"] == 2       # mul_2 and linear_2
    (rej,) = [r for r in out.report.record("to-half").rejections if "range_check" in r[2]]
    assert rej[1] == "linear_2" and "beyond 1.64e+04" in rej[2]
    with torch.no_grad():
        got = out.program(x)
    assert all(torch.isfinite(g).all() for g in got)
    assert compare_outputs(ref, got).max_rel_error < RTOL["float16"]
    # without the check the same graph overflows; bfloat16 has float32's range and needs no check
    off = run_pass("to-half{range_check=false}", model, (x,))
    with torch.no_grad():
        assert not torch.isfinite(off.program(x)[0]).all()
    bf = run_pass("to-half{dtype=bfloat16}", model, (x,))
    assert "kept_range" not in bf.report.stats("to-half")
