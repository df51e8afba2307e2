"""Sequence (N, A, B) and vector (N, D) op kinds: linear, parallel_linear, matmul_weight,
bmm_self, layernorm, layernorm_manual, hand-written attention, batchnorm1d, conv1d, pool1d."""

from __future__ import annotations

import math

from optc.tools.fuzz.kinds.base import _divisors, _f, _ok, kind
from optc.tools.fuzz.kinds.image import _conv_out, _gen_bn
from optc.tools.fuzz.spec import MAX_NUMEL


def _gen_linear(b, x):
    s = b.shape(x)
    out = b.c.integer(1, 24)
    shape = (*s[:-1], out)
    if not _ok(shape):
        return None
    return (x,), {"out": out, "bias": not b.c.flag(25), "form": b.c.pick(["module", "functional"])}, shape


def _emit_linear(op, i, a, shapes, out):
    p = op.p
    init = [f"self.m{i} = nn.Linear({shapes[0][-1]}, {p['out']}, bias={p['bias']})"]
    if p["form"] == "functional":
        return init, [f"{out} = F.linear({a[0]}, self.m{i}.weight, self.m{i}.bias)"]
    return init, [f"{out} = self.m{i}({a[0]})"]


kind("linear", ranks=(2, 3, 4), weight=4, doc="nn.Linear on the last dim")((_gen_linear, _emit_linear))


def _gen_parallel_linear(b, x):
    s = b.shape(x)
    n = b.c.pick([2, 3])
    combine = b.c.pick(["add", "cat", "gate", "mul"])
    outs = [b.c.integer(1, 16)] * n if combine != "cat" else [b.c.integer(1, 12) for _ in range(n)]
    shape = (*s[:-1], sum(outs) if combine == "cat" else outs[0])
    if not _ok(shape) or not _ok((*s[:-1], sum(outs))):
        return None
    return (x,), {"n": n, "combine": combine, "outs": tuple(outs), "bias": tuple(not b.c.flag(25) for _ in range(n))}, shape


def _emit_parallel_linear(op, i, a, shapes, out):
    p, x = op.p, a[0]
    init = [f"self.m{i}_{j} = nn.Linear({shapes[0][-1]}, {o}, bias={bias})"
            for j, (o, bias) in enumerate(zip(p["outs"], p["bias"]))]
    fwd = [f"t{i}_{j} = self.m{i}_{j}({x})" for j in range(p["n"])]
    ts = [f"t{i}_{j}" for j in range(p["n"])]
    if p["combine"] == "add":
        fwd.append(f"{out} = {' + '.join(ts)}")
    elif p["combine"] == "cat":
        fwd.append(f"{out} = torch.cat([{', '.join(ts)}], dim=-1)")
    elif p["combine"] == "gate":
        fwd.append(f"{out} = F.silu({ts[0]}) * {' * '.join(ts[1:])}")
    else:
        fwd.append(f"{out} = {' * '.join(ts)}")
    return init, fwd


kind("parallel_linear", ranks=(2, 3), weight=1.5, doc="linears reading the same input")(
    (_gen_parallel_linear, _emit_parallel_linear))


def _gen_matmul_weight(b, x):
    s = b.shape(x)
    out = b.c.integer(1, 16)
    shape = (*s[:-1], out)
    if not _ok(shape):
        return None
    forms = ["matmul", "matmul_t", "mm"] if len(s) == 2 else ["matmul", "matmul_t", "einsum"]
    return (x,), {"out": out, "form": b.c.pick(forms), "bias": not b.c.flag(40)}, shape


def _emit_matmul_weight(op, i, a, shapes, out):
    p, x, K = op.p, a[0], shapes[0][-1]
    f = p["form"]
    wshape = (p["out"], K) if f == "matmul_t" else (K, p["out"])
    init = [f"self.w{i} = nn.Parameter(_normal(g, {wshape!r}, {1 / math.sqrt(K)!r}))"]
    if p["bias"]:
        init.append(f"self.b{i} = nn.Parameter(_normal(g, ({p['out']},), 0.2))")
    expr = {"matmul": f"{x} @ self.w{i}", "matmul_t": f"torch.matmul({x}, self.w{i}.t())",
            "mm": f"torch.mm({x}, self.w{i})", "einsum": f'torch.einsum("...k,kn->...n", {x}, self.w{i})'}[f]
    if p["bias"]:
        expr += f" + self.b{i}"
    return init, [f"{out} = {expr}"]


kind("matmul_weight", ranks=(2, 3), weight=1.5, doc="x @ W (+ b): matmul, mm, addmm")((_gen_matmul_weight, _emit_matmul_weight))


def _gen_bmm_self(b, x):
    N, A, B = b.shape(x)
    shape = (N, A, A)
    if not _ok(shape):
        return None
    return (x,), {"form": b.c.pick(["matmul", "bmm", "at"])}, shape


def _emit_bmm_self(op, i, a, shapes, out):
    x, B = a[0], shapes[0][2]
    expr = {"matmul": f"torch.matmul({x}, {x}.transpose(1, 2))", "bmm": f"torch.bmm({x}, {x}.transpose(1, 2))",
            "at": f"{x} @ {x}.transpose(-1, -2)"}[op.p["form"]]
    return [], [f"{out} = {expr} * {_f(1.0 / B)}"]


kind("bmm_self", ranks=(3,), weight=0.8, doc="x @ x^T (matmul / bmm)")((_gen_bmm_self, _emit_bmm_self))


def _gen_layernorm(b, x):
    s = b.shape(x)
    k = b.c.pick([1, 2]) if len(s) >= 3 else 1
    return (x,), {"dims": k, "affine": not b.c.flag(20), "bias": not b.c.flag(20),
                  "eps": b.c.pick([1e-5, 1e-6, 1e-3]), "form": b.c.pick(["module", "functional"])}, s


def _emit_layernorm(op, i, a, shapes, out):
    p = op.p
    ns = tuple(shapes[0][-p["dims"]:])
    init = [f"self.m{i} = nn.LayerNorm({ns!r}, eps={p['eps']!r}, elementwise_affine={p['affine']}, bias={p['bias']})"]
    if p["form"] == "functional":
        return init, [f"{out} = F.layer_norm({a[0]}, {ns!r}, self.m{i}.weight, self.m{i}.bias, {p['eps']!r})"]
    return init, [f"{out} = self.m{i}({a[0]})"]


kind("layernorm", ranks=(2, 3, 4), weight=2, doc="nn.LayerNorm")((_gen_layernorm, _emit_layernorm))


def _gen_layernorm_manual(b, x):
    s = b.shape(x)
    return (x,), {"var": b.c.pick(["pow_mean", "mul_mean", "var", "var_mean"]),
                  "norm": b.c.pick(["rsqrt", "div_sqrt", "pow_neg_half", "eps_outside"]),
                  "affine": b.c.pick(["both", "none", "scale"]), "eps": b.c.pick([1e-5, 1e-6, 1e-12])}, s


def _emit_layernorm_manual(op, i, a, shapes, out):
    p, x, D = op.p, a[0], shapes[0][-1]
    fwd, init = [], []
    if p["var"] == "var_mean":
        fwd.append(f"t{i}v, t{i}u = torch.var_mean({x}, -1, correction=0, keepdim=True)")
        fwd.append(f"t{i}d = {x} - t{i}u")
    else:
        fwd.append(f"t{i}u = {x}.mean(-1, keepdim=True)")
        fwd.append(f"t{i}d = {x} - t{i}u")
        fwd.append({"pow_mean": f"t{i}v = t{i}d.pow(2).mean(-1, keepdim=True)",
                    "mul_mean": f"t{i}v = (t{i}d * t{i}d).mean(-1, keepdim=True)",
                    "var": f"t{i}v = {x}.var(-1, keepdim=True, unbiased=False)"}[p["var"]])
    eps = repr(p["eps"])
    fwd.append({"rsqrt": f"t{i}y = t{i}d * torch.rsqrt(t{i}v + {eps})",
                "div_sqrt": f"t{i}y = t{i}d / torch.sqrt(t{i}v + {eps})",
                "pow_neg_half": f"t{i}y = t{i}d * (t{i}v + {eps}).pow(-0.5)",
                "eps_outside": f"t{i}y = t{i}d / (torch.sqrt(t{i}v) + {eps})"}[p["norm"]])
    if p["affine"] == "none":
        fwd.append(f"{out} = t{i}y")
    else:
        init.append(f"self.g{i} = nn.Parameter(_normal(g, ({D},), 0.2, 1.0))")
        if p["affine"] == "both":
            init.append(f"self.b{i} = nn.Parameter(_normal(g, ({D},), 0.2))")
            fwd.append(f"{out} = t{i}y * self.g{i} + self.b{i}")
        else:
            fwd.append(f"{out} = self.g{i} * t{i}y")
    return init, fwd


kind("layernorm_manual", ranks=(2, 3, 4), weight=1.5, doc="layer norm written out")(
    (_gen_layernorm_manual, _emit_layernorm_manual))

_MASKS = ("none", "causal_inf", "causal_finfo", "causal_where", "causal_1e9", "additive", "additive4d")


def _gen_attention(b, x):
    N, L, D = b.shape(x)
    kv_candidates = [v for v in range(b.n_values) if len(b.shape(v)) == 3 and b.shape(v)[0] == N
                     and b.shape(v)[2] == D]
    y = b.c.pick(kv_candidates[::-1]) if b.c.flag(25) else x
    S = b.shape(y)[1]
    heads = b.c.pick(_divisors(D))
    qkv = b.c.pick(["separate", "fused", "noproj"])
    if qkv == "fused" and y != x:
        qkv = "separate"
    mask = b.c.pick(_MASKS)
    if mask.startswith("causal") and S != L:
        mask = "additive"
    if mask == "additive4d" and heads == 1 and not b.c.flag(50):
        mask = "additive"
    if N * heads * L * S > MAX_NUMEL:
        return None
    return ((x, y), {"heads": heads, "qkv": qkv, "mask": mask,
                     "scale": b.c.pick(["div_sqrt", "mul", "prescale_q", "none"]),
                     "k_form": b.c.pick(["transpose", "permute"]),
                     "dropout": b.c.pick(["none", "functional", "module"]),
                     "softmax": b.c.pick(["torch", "functional", "method"]),
                     "merge": b.c.pick(["reshape", "contiguous_view"]),
                     "out_proj": not b.c.flag(30), "bias": not b.c.flag(30)}, (N, L, D))


def _emit_attention(op, i, a, shapes, out):
    p = op.p
    x, y = a
    N, L, D = shapes[0]
    S = shapes[1][1]
    h = p["heads"]
    d = D // h
    init, fwd = [], []
    bias = p["bias"]
    if p["qkv"] == "separate":
        init += [f"self.m{i}_{n} = nn.Linear({D}, {D}, bias={bias})" for n in "qkv"]
        fwd += [f"t{i}q = self.m{i}_q({x})", f"t{i}k = self.m{i}_k({y})", f"t{i}v = self.m{i}_v({y})"]
    elif p["qkv"] == "fused":
        init.append(f"self.m{i}_qkv = nn.Linear({D}, {3 * D}, bias={bias})")
        fwd.append(f"t{i}q, t{i}k, t{i}v = self.m{i}_qkv({x}).split({D}, dim=-1)")
    else:
        fwd += [f"t{i}q = {x}", f"t{i}k = {y}", f"t{i}v = {y}"]
    scale = 1.0 / math.sqrt(d)
    if h > 1 or p["k_form"] == "permute":
        fwd.append(f"t{i}q = t{i}q.reshape({N}, {L}, {h}, {d}).transpose(1, 2)")
        if p["k_form"] == "permute":
            fwd.append(f"t{i}kt = t{i}k.reshape({N}, {S}, {h}, {d}).permute(0, 2, 3, 1)")
        else:
            fwd.append(f"t{i}kt = t{i}k.reshape({N}, {S}, {h}, {d}).transpose(1, 2).transpose(-2, -1)")
        fwd.append(f"t{i}v = t{i}v.reshape({N}, {S}, {h}, {d}).transpose(1, 2)")
        multi = True
    else:
        fwd.append(f"t{i}kt = t{i}k.transpose(-2, -1)")
        multi = False
    if p["scale"] == "prescale_q":
        fwd.append(f"t{i}q = t{i}q * {_f(scale)}")
    fwd.append(f"t{i}s = torch.matmul(t{i}q, t{i}kt)")
    if p["scale"] == "div_sqrt":
        fwd.append(f"t{i}s = t{i}s / math.sqrt({d})")
    elif p["scale"] == "mul":
        fwd.append(f"t{i}s = t{i}s * {_f(scale)}")
    m = p["mask"]
    if m.startswith("causal"):
        init.append(f'self.register_buffer("mask{i}", torch.tril(torch.ones({L}, {L}, dtype=torch.bool)))')
        fill = {"causal_inf": 'float("-inf")', "causal_finfo": f"torch.finfo(t{i}s.dtype).min",
                "causal_where": 'float("-inf")', "causal_1e9": "-1e9"}[m]
        if m == "causal_where":
            fwd.append(f"t{i}s = torch.where(self.mask{i}, t{i}s, {fill})")
        else:
            fwd.append(f"t{i}s = t{i}s.masked_fill(~self.mask{i}, {fill})")
    elif m.startswith("additive"):
        ms = (1, 1, L, S) if m == "additive4d" and multi else (L, S)
        init.append(f'self.register_buffer("mask{i}", _normal(g, {ms!r}, 0.5))')
        fwd.append(f"t{i}s = t{i}s + self.mask{i}")
    sm = {"torch": f"torch.softmax(t{i}s, dim=-1)", "functional": f"F.softmax(t{i}s, dim=-1)",
          "method": f"t{i}s.softmax(dim=-1)"}[p["softmax"]]
    fwd.append(f"t{i}p = {sm}")
    if p["dropout"] == "functional":
        fwd.append(f"t{i}p = F.dropout(t{i}p, 0.1, self.training)")
    elif p["dropout"] == "module":
        init.append(f"self.m{i}_drop = nn.Dropout(0.1)")
        fwd.append(f"t{i}p = self.m{i}_drop(t{i}p)")
    fwd.append(f"t{i}o = torch.matmul(t{i}p, t{i}v)")
    if multi:
        if p["merge"] == "reshape":
            fwd.append(f"t{i}o = t{i}o.transpose(1, 2).reshape({N}, {L}, {D})")
        else:
            fwd.append(f"t{i}o = t{i}o.transpose(1, 2).contiguous().view({N}, {L}, {D})")
    if p["out_proj"]:
        init.append(f"self.m{i}_o = nn.Linear({D}, {D}, bias={bias})")
        fwd.append(f"{out} = self.m{i}_o(t{i}o)")
    else:
        fwd.append(f"{out} = t{i}o")
    return init, fwd


kind("attention", ranks=(3,), weight=2.5, doc="hand-written (multi-head) attention")((_gen_attention, _emit_attention))


def _gen_bn1d(b, x):
    return _gen_bn(b, x)


def _emit_bn1d(op, i, a, shapes, out):
    p = op.p
    return ([f"self.m{i} = nn.BatchNorm1d({shapes[0][1]}, eps={p['eps']!r}, affine={p['affine']})"],
            [f"{out} = self.m{i}({a[0]})"])


kind("batchnorm1d", ranks=(2, 3), weight=2, doc="eval-mode BatchNorm1d on (N, C) or (N, C, L)")((_gen_bn1d, _emit_bn1d))


def _gen_conv1d(b, x):
    N, C, L = b.shape(x)
    groups = b.c.pick([1, C] + _divisors(C)[1:])
    out = groups * b.c.integer(1, max(1, 12 // groups))
    k, s = b.c.pick([3, 1, 2]), b.c.pick([1, 2])
    p = b.c.pick([k // 2, 0, 1])
    Lo = _conv_out(L, k, s, p, 1)
    if Lo < 1:
        k, p = 1, 0
        Lo = _conv_out(L, 1, s, 0, 1)
    shape = (N, out, Lo)
    if not _ok(shape):
        return None
    return (x,), {"out": out, "k": k, "stride": s, "padding": p, "groups": groups, "bias": not b.c.flag(30)}, shape


def _emit_conv1d(op, i, a, shapes, out):
    p = op.p
    return ([f"self.m{i} = nn.Conv1d({shapes[0][1]}, {p['out']}, {p['k']}, stride={p['stride']}, "
             f"padding={p['padding']}, groups={p['groups']}, bias={p['bias']})"], [f"{out} = self.m{i}({a[0]})"])


kind("conv1d", ranks=(3,), weight=1, doc="conv1d on (N, C, L)")((_gen_conv1d, _emit_conv1d))


def _gen_pool1d(b, x):
    N, C, L = b.shape(x)
    k = b.c.pick([2, 3])
    s = b.c.pick([k, 1])
    if L < k:
        return None
    return (x,), {"pool": b.c.pick(["avg", "max"]), "k": k, "stride": s}, (N, C, (L - k) // s + 1)


def _emit_pool1d(op, i, a, shapes, out):
    p = op.p
    fn = "F.avg_pool1d" if p["pool"] == "avg" else "F.max_pool1d"
    return [], [f"{out} = {fn}({a[0]}, {p['k']}, stride={p['stride']})"]


kind("pool1d", ranks=(3,), weight=0.7, doc="avg/max pool over the last dim")((_gen_pool1d, _emit_pool1d))
