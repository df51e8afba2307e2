"""Elementwise op kinds: activations, hand-written GELU, clips, scalars, per-channel constants,
dropout, no-ops, repeated subexpressions, constant expressions, residuals, reductions
broadcast back, softmax."""

from __future__ import annotations

from optc.tools.fuzz.kinds.base import _f, kind


_ACTS = {
    "relu": "torch.relu({x})", "gelu": "F.gelu({x})", "gelu_tanh": 'F.gelu({x}, approximate="tanh")',
    "silu": "F.silu({x})", "sigmoid": "torch.sigmoid({x})", "tanh": "torch.tanh({x})",
    "leaky_relu": "F.leaky_relu({x}, 0.1)", "hardswish": "F.hardswish({x})", "elu": "F.elu({x})",
    "softplus": "F.softplus({x})", "hardsigmoid": "F.hardsigmoid({x})", "silu_manual": "{x} * torch.sigmoid({x})",
    "quick_gelu": "{x} * torch.sigmoid(1.702 * {x})", "relu_module": "self.m{i}({x})",
}


def _gen_act(b, x):
    return (x,), {"fn": b.c.pick(list(_ACTS))}, b.shape(x)


def _emit_act(op, i, a, shapes, out):
    fn = op.p["fn"]
    init = [f"self.m{i} = nn.ReLU()"] if fn == "relu_module" else []
    return init, [f"{out} = " + _ACTS[fn].format(x=a[0], i=i)]


kind("act", weight=4, doc="relu, gelu (erf/tanh), silu, sigmoid, tanh, ...")((_gen_act, _emit_act))

_GELU_MANUAL = {
    "erf_div": "0.5 * {x} * (1.0 + torch.erf({x} / math.sqrt(2.0)))",
    "erf_mul": "{x} * 0.5 * (1.0 + torch.erf({x} * 0.7071067811865476))",
    "erf_half_first": "{x} * (torch.erf({x} / 1.4142135623730951) + 1.0) / 2.0",
    "tanh_pow": "0.5 * {x} * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * ({x} + 0.044715 * torch.pow({x}, 3.0))))",
    "tanh_cube": "0.5 * {x} * (1.0 + torch.tanh(0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})))",
    "tanh_factored": "0.5 * {x} * (1.0 + torch.tanh(0.7978845608 * {x} * (1.0 + 0.044715 * {x} * {x})))",
    "near_miss_sqrt2": "0.5 * {x} * (1.0 + torch.erf({x} / 1.4142))",   # truncated constant: not GELU
}


def _gen_gelu_manual(b, x):
    return (x,), {"form": b.c.pick(list(_GELU_MANUAL))}, b.shape(x)


def _emit_gelu_manual(op, i, a, shapes, out):
    return [], [f"{out} = " + _GELU_MANUAL[op.p["form"]].format(x=a[0])]


kind("gelu_manual", weight=1.5, doc="GELU written out (erf and tanh forms)")((_gen_gelu_manual, _emit_gelu_manual))

_CLIPS = ("clamp", "hardtanh", "relu6", "clamp_min", "clamp_max", "clip")


def _gen_clip(b, x):
    form = b.c.pick(_CLIPS)
    lo, hi = b.c.pick([-1.0, 0.0, -0.5, -2.0]), b.c.pick([1.0, 0.5, 6.0, 2.0])
    return (x,), {"form": form, "lo": lo, "hi": hi}, b.shape(x)


def _emit_clip(op, i, a, shapes, out):
    p, x = op.p, a[0]
    lo, hi = _f(p["lo"]), _f(p["hi"])
    expr = {"clamp": f"torch.clamp({x}, {lo}, {hi})", "hardtanh": f"F.hardtanh({x}, {lo}, {hi})",
            "relu6": f"F.relu6({x})", "clamp_min": f"{x}.clamp(min={lo})", "clamp_max": f"{x}.clamp(max={hi})",
            "clip": f"torch.clip({x}, {lo}, {hi})"}[p["form"]]
    return [], [f"{out} = {expr}"]


kind("clip", weight=1, doc="clamp, hardtanh, relu6")((_gen_clip, _emit_clip))

_SCALAR_OPS = ("mul", "div", "add", "sub", "rsub", "rmul", "radd", "mul_method")


def _gen_scalar(b, x):
    op = b.c.pick(_SCALAR_OPS)
    c = b.c.pick([2.0, 0.5, -1.5, 3.0, 0.125, 1.0, -0.25])
    return (x,), {"op": op, "c": c}, b.shape(x)


def _emit_scalar(op, i, a, shapes, out):
    x, c = a[0], _f(op.p["c"])
    expr = {"mul": f"{x} * {c}", "div": f"{x} / {c}", "add": f"{x} + {c}", "sub": f"{x} - {c}",
            "rsub": f"{c} - {x}", "rmul": f"{c} * {x}", "radd": f"{c} + {x}",
            "mul_method": f"{x}.mul({c})"}[op.p["op"]]
    return [], [f"{out} = {expr}"]


kind("scalar", weight=2, doc="x * c, x / c, x + c, c - x")((_gen_scalar, _emit_scalar))


def _channel_shapes(shape) -> dict[str, tuple[int, ...]]:
    r = len(shape)
    if r == 2:
        return {"last": (shape[1],), "full_row": (1, shape[1])}
    if r == 3:
        return {"last": (shape[2],), "dim1": (shape[1], 1), "dim2_of3": (1, 1, shape[2])}
    return {"channel": (shape[1], 1, 1), "channel4": (1, shape[1], 1, 1), "last": (shape[3],),
            "spatial": (shape[2], shape[3])}


def _gen_channel_const(b, x):
    shapes = _channel_shapes(b.shape(x))
    where = b.c.pick(list(shapes))
    return (x,), {"op": b.c.pick(["mul", "add", "sub", "div", "rmul"]), "where": where,
                  "cshape": shapes[where], "storage": b.c.pick(["buffer", "param"])}, b.shape(x)


def _emit_channel_const(op, i, a, shapes, out):
    p, x = op.p, a[0]
    cs = p["cshape"]
    value = f"_away_from_zero(g, {cs!r})" if p["op"] in ("mul", "div", "rmul") else f"_normal(g, {cs!r}, 0.5)"
    init = ([f"self.c{i} = nn.Parameter({value})"] if p["storage"] == "param"
            else [f'self.register_buffer("c{i}", {value})'])
    expr = {"mul": f"{x} * self.c{i}", "add": f"{x} + self.c{i}", "sub": f"{x} - self.c{i}",
            "div": f"{x} / self.c{i}", "rmul": f"self.c{i} * {x}"}[p["op"]]
    return init, [f"{out} = {expr}"]


kind("channel_const", weight=2, doc="per-channel constant scale/shift")((_gen_channel_const, _emit_channel_const))


def _gen_dropout(b, x):
    form = b.c.pick(["module", "functional_training", "functional_false", "feature"] if len(b.shape(x)) == 4
                    else ["module", "functional_training", "functional_false"])
    return (x,), {"form": form, "prob": b.c.pick([0.1, 0.5, 0.0])}, b.shape(x)


def _emit_dropout(op, i, a, shapes, out):
    p, x = op.p, a[0]
    pr = _f(p["prob"])
    if p["form"] == "module":
        return [f"self.m{i} = nn.Dropout({pr})"], [f"{out} = self.m{i}({x})"]
    if p["form"] == "feature":
        return [f"self.m{i} = nn.Dropout2d({pr})"], [f"{out} = self.m{i}({x})"]
    train = "self.training" if p["form"] == "functional_training" else "False"
    return [], [f"{out} = F.dropout({x}, {pr}, {train})"]


kind("dropout", weight=1, doc="dropout in eval mode")((_gen_dropout, _emit_dropout))

_NOOPS = ("contiguous", "clone", "detach", "to_dtype", "reshape_same", "view_roundtrip", "unsqueeze_squeeze",
          "double_transpose", "expand_same", "slice_full", "narrow_full", "flatten_unflatten", "mul_one")


def _gen_noop(b, x):
    return (x,), {"form": b.c.pick(_NOOPS)}, b.shape(x)


def _emit_noop(op, i, a, shapes, out):
    x, s = a[0], list(shapes[0])
    r = len(s)
    expr = {
        "contiguous": f"{x}.contiguous()", "clone": f"{x}.clone()", "detach": f"{x}.detach()",
        "to_dtype": f"{x}.to(torch.float32 if {x}.dtype == torch.float32 else {x}.dtype)",
        "reshape_same": f"{x}.reshape({s})", "view_roundtrip": f"{x}.reshape({s[0]}, -1).reshape({s})",
        "unsqueeze_squeeze": f"{x}.unsqueeze(1).squeeze(1)", "double_transpose": f"{x}.transpose(-1, -2).transpose(-1, -2)",
        "expand_same": f"{x}.expand({s})", "slice_full": f"{x}[:, :{s[1]}]", "narrow_full": f"{x}.narrow(-1, 0, {s[-1]})",
        "flatten_unflatten": f"{x}.flatten(1).unflatten(1, {tuple(s[1:])!r})" if r > 2 else f"{x}.flatten(1)",
        "mul_one": f"{x} * 1.0",
    }[op.p["form"]]
    return [], [f"{out} = {expr}"]


kind("noop", weight=1.5, doc="no-op copies and views (canonicalize)")((_gen_noop, _emit_noop))

_DUP_FNS = {"relu": "torch.relu({x})", "sigmoid": "torch.sigmoid({x})", "scale": "({x} * 2.0)",
            "tanh": "torch.tanh({x})", "square": "({x} * {x})"}


def _gen_dup(b, x):
    return (x,), {"fn": b.c.pick(list(_DUP_FNS)), "op": b.c.pick(["add", "mul", "sub_then_add"])}, b.shape(x)


def _emit_dup(op, i, a, shapes, out):
    f = _DUP_FNS[op.p["fn"]].format(x=a[0])
    if op.p["op"] == "add":
        return [], [f"{out} = {f} + {f}"]
    if op.p["op"] == "mul":
        return [], [f"{out} = {f} * {f}"]
    return [], [f"{out} = ({f} - {a[0]}) + ({f} - {a[0]})"]


kind("dup", weight=1, doc="a repeated subexpression (cse)")((_gen_dup, _emit_dup))


def _gen_const_expr(b, x):
    shapes = _channel_shapes(b.shape(x))
    where = b.c.pick(list(shapes))
    return (x,), {"form": b.c.pick(["sigmoid", "affine", "exp_neg", "softmax", "outer"]),
                  "where": where, "cshape": shapes[where]}, b.shape(x)


def _emit_const_expr(op, i, a, shapes, out):
    p, x = op.p, a[0]
    cs = p["cshape"]
    init = [f"self.c{i} = nn.Parameter(_normal(g, {cs!r}))"]
    expr = {"sigmoid": f"{x} * torch.sigmoid(self.c{i})", "affine": f"{x} + (self.c{i} * 2.0 + 1.0) * 0.5",
            "exp_neg": f"{x} * torch.exp(-self.c{i}.abs())", "softmax": f"{x} * torch.softmax(self.c{i}, dim=-1)",
            "outer": f"{x} + self.c{i}.reshape(-1).sum() * 0.1"}[p["form"]]
    return init, [f"{out} = {expr}"]


kind("const_expr", weight=1, doc="arithmetic on weights (constant-fold)")((_gen_const_expr, _emit_const_expr))


def _gen_residual(b, x):
    s = b.shape(x)
    others = [v for v in range(b.n_values) if b.shape(v) == s]
    other = b.c.pick(others[::-1])     # shrinks towards the most recent (x itself)
    # x - x is exactly zero: what follows it (a norm of a constant) is ill-conditioned, and any
    # reordered float32 sum then differs by more than the oracle allows without being wrong
    ops = ["add", "mul", "add_fn", "add_alpha"] if other == x else ["add", "mul", "sub", "add_fn", "add_alpha"]
    return (x, other), {"op": b.c.pick(ops)}, s


def _emit_residual(op, i, a, shapes, out):
    x, y = a
    expr = {"add": f"{x} + {y}", "mul": f"{x} * {y}", "sub": f"{x} - {y}", "add_fn": f"torch.add({x}, {y})",
            "add_alpha": f"torch.add({x}, {y}, alpha=0.5)"}[op.p["op"]]
    return [], [f"{out} = {expr}"]


kind("residual", weight=2.5, doc="residual add/mul with an earlier value")((_gen_residual, _emit_residual))


def _gen_center(b, x):
    r = len(b.shape(x))
    return (x,), {"form": b.c.pick(["center", "absmean", "sum_tanh", "amax"]),
                  "dim": b.c.pick(list(range(r - 1, 0, -1)))}, b.shape(x)


def _emit_center(op, i, a, shapes, out):
    x, d = a[0], op.p["dim"]
    expr = {"center": f"{x} - {x}.mean({d}, keepdim=True)",
            "absmean": f"{x} / ({x}.abs().mean({d}, keepdim=True) + 1.0)",
            # tanh, not sigmoid: sigmoid of a large negative sum is a vanishing output, where ONNX
            # Runtime's Sigmoid (absolute error 6e-8, zero below -18) differs by 100% of it
            "sum_tanh": f"{x} * torch.tanh({x}.sum({d}, keepdim=True))",
            "amax": f"{x} - {x}.amax({d}, keepdim=True)"}[op.p["form"]]
    return [], [f"{out} = {expr}"]


kind("center", weight=1, doc="reductions broadcast back (mean/amax/sum)")((_gen_center, _emit_center))


def _gen_softmax(b, x):
    shape = b.shape(x)
    r = len(shape)
    # a dim of size 1 makes the softmax a constant (1, or 0 for log_softmax): a later norm of that
    # constant row is ill-conditioned (oracle-softmax-size-one, docs/fuzzing.md), not a finding
    dims = [d for d in [-1] + list(range(1, r - 1)) + [0] if shape[d] > 1] or [-1]
    return (x,), {"dim": b.c.pick(dims),
                  "form": b.c.pick(["torch", "functional", "method", "log_softmax"])}, b.shape(x)


def _emit_softmax(op, i, a, shapes, out):
    x, d = a[0], op.p["dim"]
    expr = {"torch": f"torch.softmax({x}, dim={d})", "functional": f"F.softmax({x}, dim={d})",
            "method": f"{x}.softmax({d})", "log_softmax": f"F.log_softmax({x}, dim={d})"}[op.p["form"]]
    return [], [f"{out} = {expr}"]


kind("softmax", weight=1.5, doc="softmax / log_softmax on any dim")((_gen_softmax, _emit_softmax))
