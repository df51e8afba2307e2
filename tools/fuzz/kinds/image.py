"""Image op kinds on (N, C, H, W): conv2d, conv_transpose2d, batchnorm2d, pool2d."""

from __future__ import annotations

from optc.tools.fuzz.kinds.base import _divisors, _ok, kind


def _conv_out(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _gen_conv2d(b, x):
    N, C, H, W = b.shape(x)
    mode = b.c.pick(["plain", "depthwise", "grouped", "pointwise"])
    if mode == "depthwise":
        groups, out = C, C * b.c.pick([1, 2])
    elif mode == "grouped" and len(_divisors(C)) > 1:
        groups = b.c.pick(_divisors(C)[1:])
        out = groups * b.c.integer(1, max(1, 12 // groups))
    else:
        groups, out = 1, b.c.integer(1, 12)
        mode = "plain" if mode == "grouped" else mode
    k = 1 if mode == "pointwise" else b.c.pick([3, 1, 2, 5])
    kw = k if not b.c.flag(15) else b.c.pick([1, 3])
    s = b.c.pick([1, 2])
    d = b.c.pick([1, 2]) if max(k, kw) > 1 else 1
    p = b.c.pick([d * (k - 1) // 2, 0, 1, 2])
    pw = p if kw == k else d * (kw - 1) // 2
    pm = b.c.pick(["zeros", "zeros", "reflect", "replicate", "circular"])
    if pm != "zeros" and (p >= H or pw >= W or (p == 0 and pw == 0)):
        pm = "zeros"
    if pm == "circular" and (p > H or pw > W):
        pm = "zeros"
    Ho, Wo = _conv_out(H, k, s, p, d), _conv_out(W, kw, s, pw, d)
    if Ho < 1 or Wo < 1:
        k = kw = 1
        p = pw = 0
        d = 1
        pm = "zeros"
        Ho, Wo = _conv_out(H, 1, s, 0, 1), _conv_out(W, 1, s, 0, 1)
    shape = (N, out, Ho, Wo)
    if not _ok(shape):
        return None
    return (x,), {"groups_mode": mode, "out": out, "k": (k, kw), "stride": s, "padding": (p, pw), "dilation": d,
                  "groups": groups, "bias": not b.c.flag(30), "padding_mode": pm}, shape


def _emit_conv2d(op, i, a, shapes, out):
    p, C = op.p, shapes[0][1]
    k, pad = tuple(p["k"]), tuple(p["padding"])
    extra = "" if p["padding_mode"] == "zeros" else f', padding_mode="{p["padding_mode"]}"'
    return ([f"self.m{i} = nn.Conv2d({C}, {p['out']}, {k!r}, stride={p['stride']}, padding={pad!r}, "
             f"dilation={p['dilation']}, groups={p['groups']}, bias={p['bias']}{extra})"],
            [f"{out} = self.m{i}({a[0]})"])


kind("conv2d", ranks=(4,), weight=4, doc="conv2d: grouped, depthwise, strided, dilated, padded")((_gen_conv2d, _emit_conv2d))


def _gen_conv_transpose2d(b, x):
    N, C, H, W = b.shape(x)
    groups = b.c.pick([1] + _divisors(C)[1:])
    out = groups * b.c.integer(1, max(1, 8 // groups))
    k, s = b.c.pick([2, 3, 1]), b.c.pick([2, 1])
    p = b.c.pick([0, 1]) if k > 1 else 0
    op_ = b.c.pick([0, 1]) if s > 1 else 0
    Ho, Wo = (H - 1) * s - 2 * p + (k - 1) + op_ + 1, (W - 1) * s - 2 * p + (k - 1) + op_ + 1
    shape = (N, out, Ho, Wo)
    if not _ok(shape):
        return None
    return (x,), {"out": out, "k": k, "stride": s, "padding": p, "output_padding": op_, "groups": groups,
                  "bias": not b.c.flag(30)}, shape


def _emit_conv_transpose2d(op, i, a, shapes, out):
    p, C = op.p, shapes[0][1]
    return ([f"self.m{i} = nn.ConvTranspose2d({C}, {p['out']}, {p['k']}, stride={p['stride']}, padding={p['padding']}, "
             f"output_padding={p['output_padding']}, groups={p['groups']}, bias={p['bias']})"],
            [f"{out} = self.m{i}({a[0]})"])


kind("conv_transpose2d", ranks=(4,), weight=0.8, doc="transposed conv2d")((_gen_conv_transpose2d, _emit_conv_transpose2d))


def _gen_bn(b, x):
    return (x,), {"affine": not b.c.flag(20), "eps": b.c.pick([1e-5, 1e-3, 0.1])}, b.shape(x)


def _emit_bn2d(op, i, a, shapes, out):
    p = op.p
    return ([f"self.m{i} = nn.BatchNorm2d({shapes[0][1]}, eps={p['eps']!r}, affine={p['affine']})"],
            [f"{out} = self.m{i}({a[0]})"])


kind("batchnorm2d", ranks=(4,), weight=2.5, doc="eval-mode BatchNorm2d")((_gen_bn, _emit_bn2d))


def _pool_out(n, k, s, p, ceil):
    if ceil:
        o = -(-(n + 2 * p - k) // s) + 1
        if (o - 1) * s >= n + p:
            o -= 1
        return o
    return (n + 2 * p - k) // s + 1


def _gen_pool2d(b, x):
    N, C, H, W = b.shape(x)
    kind_ = b.c.pick(["max", "avg", "adaptive_avg", "adaptive_max"])
    if kind_.startswith("adaptive"):
        o = b.c.pick([1, 2, 3])
        return (x,), {"pool": kind_, "out": o}, (N, C, o, o)
    k = b.c.pick([2, 3, 1])
    s = b.c.pick([k, 1, 2])
    p = b.c.pick([0, 1]) if k >= 2 else 0
    ceil = b.c.flag(25)
    Ho, Wo = _pool_out(H, k, s, p, ceil), _pool_out(W, k, s, p, ceil)
    if Ho < 1 or Wo < 1 or k > H + 2 * p or k > W + 2 * p:
        return None
    return (x,), {"pool": kind_, "k": k, "stride": s, "padding": p, "ceil": ceil,
                  "count_include_pad": not b.c.flag(30)}, (N, C, Ho, Wo)


def _emit_pool2d(op, i, a, shapes, out):
    p, x = op.p, a[0]
    if p["pool"] == "adaptive_avg":
        return [], [f"{out} = F.adaptive_avg_pool2d({x}, {p['out']})"]
    if p["pool"] == "adaptive_max":
        return [], [f"{out} = F.adaptive_max_pool2d({x}, {p['out']})"]
    if p["pool"] == "max":
        return ([f"self.m{i} = nn.MaxPool2d({p['k']}, stride={p['stride']}, padding={p['padding']}, "
                 f"ceil_mode={p['ceil']})"], [f"{out} = self.m{i}({x})"])
    return [], [f"{out} = F.avg_pool2d({x}, {p['k']}, stride={p['stride']}, padding={p['padding']}, "
                f"ceil_mode={p['ceil']}, count_include_pad={p['count_include_pad']})"]


kind("pool2d", ranks=(4,), weight=1.5, doc="max/avg/adaptive pooling")((_gen_pool2d, _emit_pool2d))
