"""Shape op kinds: concat, split, permute, reshape, and rank changes (to2, to3, to4)."""

from __future__ import annotations

from optc.tools.fuzz.kinds.base import _divisors, _numel, _ok, kind


def _gen_concat(b, x):
    s = b.shape(x)
    r = len(s)
    d = b.c.pick([1, r - 1] + list(range(r)))
    others = [v for v in range(b.n_values)
              if len(b.shape(v)) == r and all(b.shape(v)[k] == s[k] for k in range(r) if k != d)]
    y = b.c.pick(others[::-1])
    shape = list(s)
    shape[d] += b.shape(y)[d]
    shape = tuple(shape)
    if not _ok(shape):
        return None
    return (x, y), {"dim": d, "order": b.c.pick(["xy", "yx"]), "form": b.c.pick(["cat", "concat"])}, shape


def _emit_concat(op, i, a, shapes, out):
    x, y = a if op.p["order"] == "xy" else a[::-1]
    fn = "torch.cat" if op.p["form"] == "cat" else "torch.concat"
    return [], [f"{out} = {fn}([{x}, {y}], dim={op.p['dim']})"]


kind("concat", weight=1.5, doc="concatenate with an earlier value")((_gen_concat, _emit_concat))


def _gen_split(b, x):
    s = b.shape(x)
    r = len(s)
    dims = [d for d in range(1, r) if s[d] >= 2]
    if not dims:
        return None
    d = b.c.pick(dims[::-1])
    n = s[d]
    forms = ["rotate", "pick_first", "unbind_sum"] + (["glu", "add_halves", "chunk_mul"] if n % 2 == 0 else [])
    form = b.c.pick(forms)
    first = b.c.integer(1, n - 1)
    shape = list(s)
    if form in ("glu", "add_halves", "chunk_mul"):
        shape[d] = n // 2
    elif form == "pick_first":
        shape[d] = first
    elif form == "unbind_sum":
        del shape[d]
        if len(shape) < 2:
            return None
    return (x,), {"dim": d, "form": form, "first": first}, tuple(shape)


def _emit_split(op, i, a, shapes, out):
    p, x = op.p, a[0]
    d, n = p["dim"], shapes[0][p["dim"]]
    f = p["form"]
    if f == "rotate":
        return [], [f"t{i}a, t{i}b = torch.split({x}, [{p['first']}, {n - p['first']}], dim={d})",
                    f"{out} = torch.cat([t{i}b, t{i}a], dim={d})"]
    if f == "pick_first":
        return [], [f"{out} = {x}.split({p['first']}, dim={d})[0]"]
    if f == "unbind_sum":
        return [], [f"t{i} = torch.unbind({x}, dim={d})", f"{out} = t{i}[0] + t{i}[-1]"]
    if f == "glu":
        return [], [f"t{i}a, t{i}b = {x}.chunk(2, dim={d})", f"{out} = t{i}a * torch.sigmoid(t{i}b)"]
    if f == "add_halves":
        return [], [f"t{i}a, t{i}b = torch.split({x}, {n // 2}, dim={d})", f"{out} = t{i}a + t{i}b"]
    return [], [f"{out} = F.glu({x}, dim={d})"]


kind("split", weight=1.5, doc="split/chunk/unbind and recombine")((_gen_split, _emit_split))


def _gen_permute(b, x):
    s = b.shape(x)
    r = len(s)
    perm = list(range(r))
    for k in range(r - 1, 0, -1):          # Fisher-Yates; all-zero choices keep the identity
        j = b.c.integer(0, k)
        perm[k], perm[j] = perm[j], perm[k]
    if perm == list(range(r)):
        perm[-1], perm[-2] = perm[-2], perm[-1]
    form = b.c.pick(["permute", "permute_contiguous"] + (["transpose"] if sorted(
        k for k in range(r) if perm[k] != k).__len__() == 2 else []))
    return (x,), {"perm": tuple(perm), "form": form}, tuple(s[k] for k in perm)


def _emit_permute(op, i, a, shapes, out):
    x, perm = a[0], op.p["perm"]
    if op.p["form"] == "transpose":
        d0, d1 = [k for k in range(len(perm)) if perm[k] != k]
        return [], [f"{out} = {x}.transpose({d0}, {d1})"]
    suffix = ".contiguous()" if op.p["form"] == "permute_contiguous" else ""
    return [], [f"{out} = {x}.permute{tuple(perm)!r}{suffix}"]


kind("permute", weight=1, doc="permute / transpose")((_gen_permute, _emit_permute))


def _factor(b, n: int, parts: int) -> list[int]:
    """``parts`` positive ints whose product is ``n`` (chosen by ``b``'s chooser)."""
    out = []
    for _ in range(parts - 1):
        d = b.c.pick(_divisors(n))
        out.append(d)
        n //= d
    return out + [n]


def _gen_reshape(b, x):
    s = b.shape(x)
    rest = _factor(b, _numel(s[1:]), len(s) - 1)
    return (x,), {"to": (s[0], *rest), "form": b.c.pick(["reshape", "contiguous_view", "neg_one"])}, (s[0], *rest)


def _emit_reshape(op, i, a, shapes, out):
    x, to = a[0], list(op.p["to"])
    if op.p["form"] == "contiguous_view":
        return [], [f"{out} = {x}.contiguous().view({to})"]
    if op.p["form"] == "neg_one":
        return [], [f"{out} = {x}.reshape({[to[0], -1] + to[2:]})"]
    return [], [f"{out} = {x}.reshape({to})"]


kind("reshape", weight=0.7, doc="reshape to another factorisation")((_gen_reshape, _emit_reshape))


def _gen_to2(b, x):
    s = b.shape(x)
    form = b.c.pick(["flatten", "view", "mean"] + (["amax_spatial"] if len(s) == 4 else []))
    if form in ("mean", "amax_spatial"):
        shape = (s[0], s[1]) if len(s) == 4 else (s[0], s[2])
    else:
        shape = (s[0], _numel(s[1:]))
    return (x,), {"form": form}, shape


def _emit_to2(op, i, a, shapes, out):
    x, s, f = a[0], shapes[0], op.p["form"]
    if f == "flatten":
        return [], [f"{out} = torch.flatten({x}, 1)"]
    if f == "view":
        return [], [f"{out} = {x}.reshape({x}.size(0), -1)"]
    if f == "mean":
        return [], [f"{out} = {x}.mean(({2}, {3}))" if len(s) == 4 else f"{out} = {x}.mean(1)"]
    return [], [f"{out} = torch.amax({x}, dim=(2, 3))"]


kind("to2", ranks=(3, 4), weight=1, doc="flatten / pool to (N, D)")((_gen_to2, _emit_to2))


def _gen_to3(b, x):
    s = b.shape(x)
    if len(s) == 4:
        form = b.c.pick(["flatten_transpose", "flatten", "permute_reshape"])
        shape = (s[0], s[2] * s[3], s[1]) if form != "flatten" else (s[0], s[1], s[2] * s[3])
        return (x,), {"form": form}, shape
    form = b.c.pick(["unsqueeze", "reshape", "unsqueeze_last"])
    if form == "unsqueeze":
        return (x,), {"form": form}, (s[0], 1, s[1])
    if form == "unsqueeze_last":
        return (x,), {"form": form}, (s[0], s[1], 1)
    a0 = b.c.pick(_divisors(s[1]))
    return (x,), {"form": form}, (s[0], a0, s[1] // a0)


def _emit_to3(op, i, a, shapes, out):
    x, f, sh = a[0], op.p["form"], list(op.shape)
    expr = {"flatten_transpose": f"{x}.flatten(2).transpose(1, 2)", "flatten": f"{x}.flatten(2)",
            "permute_reshape": f"{x}.permute(0, 2, 3, 1).reshape({sh})", "unsqueeze": f"{x}.unsqueeze(1)",
            "unsqueeze_last": f"{x}[:, :, None]", "reshape": f"{x}.reshape({sh})"}[f]
    return [], [f"{out} = {expr}"]


kind("to3", ranks=(2, 4), weight=1, doc="to a sequence (N, A, B)")((_gen_to3, _emit_to3))


def _gen_to4(b, x):
    s = b.shape(x)
    if len(s) == 2:
        form = b.c.pick(["none_none", "reshape"])
        if form == "none_none":
            return (x,), {"form": form}, (s[0], s[1], 1, 1)
        c, h, w = _factor(b, s[1], 3)
        return (x,), {"form": form}, (s[0], c, h, w)
    form = b.c.pick(["unsqueeze", "split_last", "seq_to_image"])
    if form == "unsqueeze":
        return (x,), {"form": form}, (s[0], 1, s[1], s[2])
    if form == "split_last":
        h = b.c.pick(_divisors(s[2]))
        return (x,), {"form": form}, (s[0], s[1], h, s[2] // h)
    h = b.c.pick(_divisors(s[1]))
    return (x,), {"form": form}, (s[0], s[2], h, s[1] // h)


def _emit_to4(op, i, a, shapes, out):
    x, f, sh = a[0], op.p["form"], list(op.shape)
    expr = {"none_none": f"{x}[:, :, None, None]", "reshape": f"{x}.reshape({sh})", "unsqueeze": f"{x}.unsqueeze(1)",
            "split_last": f"{x}.reshape({sh})",
            "seq_to_image": f"{x}.transpose(1, 2).reshape({sh})"}[f]
    return [], [f"{out} = {expr}"]


kind("to4", ranks=(2, 3), weight=0.8, doc="to an image (N, C, H, W)")((_gen_to4, _emit_to4))
