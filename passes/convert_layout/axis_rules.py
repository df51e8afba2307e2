"""convert-layout's rules for ops with axis arguments: the op runs on the permuted value with its axes
renumbered (softmax, cat, split, reductions, select/squeeze/unsqueeze, sym_size, pad...), a global
average pool becomes a mean over the spatial axes, and a reshape keeps the layout where the element
order allows.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from optc.ir import ops as _ops  # noqa: F401  (registers the optc:: ops the table below names)
from optc.ir.rewrite import MatchResult, arg, is_op
from optc.passes.convert_layout.perm import drop_dims, identity, inverse, is_identity, is_one, pair, static_dim
from optc.passes.convert_layout.rewriter import Built, LayoutRule

aten = torch.ops.aten
optc_ops = torch.ops.optc


_SAME_RANK_AXIS = {   # op -> (index of the axis argument, its keyword, default)
    aten.softmax.int: (1, "dim", None), aten._softmax.default: (1, "dim", None),
    aten.log_softmax.int: (1, "dim", None), aten._log_softmax.default: (1, "dim", None),
    aten.glu.default: (1, "dim", -1), aten.cumsum.default: (1, "dim", None),
    aten.slice.Tensor: (1, "dim", 0), aten.narrow.default: (1, "dim", None),
    optc_ops.channel_affine.default: (3, "dim", None),
    optc_ops.quantize_per_channel.default: (3, "axis", None),
    optc_ops.dequantize_per_channel.default: (3, "axis", None),
}


class Axis(LayoutRule):
    """Ops along one axis that keep the rank: the axis is renumbered."""

    name = "axis"
    same_rank = True

    def match(self, node, rw):
        if node.target not in _SAME_RANK_AXIS or not rw.moving(node.args[0]):
            return None
        return self.match_in(node, rw.perm(node.args[0]), rw)

    def match_in(self, node, p, rw):
        if node.target not in _SAME_RANK_AXIS or rw.rank(node.args[0]) != len(p):
            return None
        i, key, default = _SAME_RANK_AXIS[node.target]
        d = arg(node, i, key, default)
        if not isinstance(d, int):
            return MatchResult.fail("axis is not a constant int")
        return MatchResult.success(p=p, i=i, key=key, d=inverse(p)[d % len(p)])

    def build(self, node, m, rw):
        p = m["p"]
        args = [rw.plain(a) for a in node.args]
        kwargs = rw.plain(dict(node.kwargs))
        args[0] = rw.request(node.args[0], p)
        if len(args) > m["i"]:
            args[m["i"]] = m["d"]
        else:
            kwargs[m["key"]] = m["d"]
        return Built(node.target, tuple(args), kwargs, p)


class Concat(LayoutRule):
    name = "cat"

    def match(self, node, rw):
        if not is_op(node, aten.cat.default, aten.concat.default, aten.concatenate.default):
            return None
        ins = node.args[0]
        lead = next((a for a in ins if rw.moving(a)), None)
        if lead is None:
            return None
        p = rw.perm(lead)
        if any(rw.rank(a) != len(p) for a in ins):
            return MatchResult.fail("operands of different ranks")
        return MatchResult.success(p=p, d=inverse(p)[arg(node, 1, "dim", 0) % len(p)])

    def build(self, node, m, rw):
        p = m["p"]
        return Built(aten.cat.default, ([rw.request(a, p) for a in node.args[0]], m["d"]), {}, p)


class Split(LayoutRule):
    """``split``/``split_with_sizes``/``chunk`` (each piece in the input's layout) and ``unbind``."""

    name = "split"
    OPS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int)

    def match(self, node, rw):
        if not (is_op(node, *self.OPS) and rw.moving(node.args[0])):
            return None
        p = rw.perm(node.args[0])
        idx = 1 if is_op(node, aten.unbind.int) else 2
        d = arg(node, idx, "dim", 0) % len(p)
        return MatchResult.success(p=p, idx=idx, d=d)

    def build(self, node, m, rw):
        p, d = m["p"], m["d"]
        args = list(node.args)
        args[0] = rw.request(node.args[0], p)
        while len(args) <= m["idx"]:
            args.append(node.kwargs.get("dim", 0))
        args[m["idx"]] = inverse(p)[d]
        kwargs = {k: v for k, v in node.kwargs.items() if k != "dim"}
        n = len(rw.logical[node])
        piece = drop_dims(p, [d]) if is_op(node, aten.unbind.int) else p
        return Built(node.target, tuple(args), kwargs, [piece] * n)


class GetItem(LayoutRule):
    name = "getitem"

    def match(self, node, rw):
        if node.target is not operator.getitem or not isinstance(node.args[0], fx.Node):
            return None
        perms = rw.perm(node.args[0])
        if not isinstance(perms, list) or is_identity(perms[node.args[1]]):
            return None
        return MatchResult.success(p=perms[node.args[1]])

    def build(self, node, m, rw):
        return Built(node.target, (rw.env[node.args[0]][0], node.args[1]), {}, m["p"])


_REDUCTIONS = {   # op -> (index of the dims argument, index of keepdim)
    aten.sum.dim_IntList: (1, 2), aten.mean.dim: (1, 2), aten.amax.default: (1, 2), aten.amin.default: (1, 2),
    aten.var.correction: (1, 3), aten.std.correction: (1, 3), aten.prod.dim_int: (1, 2),
    aten.logsumexp.default: (1, 2), aten.any.dim: (1, 2), aten.all.dim: (1, 2),
}


class Reduce(LayoutRule):
    """Reductions over axes: renumbered; without ``keepdim`` the result drops them."""

    name = "reduce"

    def match(self, node, rw):
        if node.target not in _REDUCTIONS or not rw.moving(node.args[0]):
            return None
        p = rw.perm(node.args[0])
        i, k = _REDUCTIONS[node.target]
        key = "dim"
        dims = arg(node, i, key)
        if isinstance(dims, int):
            dims = [dims]
        if not dims:   # None or []: every axis (a scalar result unless keepdim)
            dims = list(range(len(p)))
        keep = bool(arg(node, k, "keepdim", False))
        dims = sorted(d % len(p) for d in dims)
        return MatchResult.success(p=p, i=i, dims=dims, keep=keep)

    def build(self, node, m, rw):
        p = m["p"]
        args = list(node.args)
        kwargs = dict(node.kwargs)
        args[0] = rw.request(node.args[0], p)
        new = sorted(inverse(p)[d] for d in m["dims"])
        if len(args) > m["i"]:
            args[m["i"]] = new
        else:
            kwargs["dim"] = new
        if is_op(node, aten.prod.dim_int) or (len(new) == 1 and isinstance(arg(node, m["i"], "dim"), int)):
            new = new[0]
            if len(args) > m["i"]:
                args[m["i"]] = new
            else:
                kwargs["dim"] = new
        return Built(node.target, tuple(args), kwargs, p if m["keep"] else drop_dims(p, m["dims"]))


class GlobalPool(LayoutRule):
    """``adaptive_avg_pool2d(x, [1, 1])`` of a permuted value: a mean over its spatial axes."""

    name = "global_pool"

    def match(self, node, rw):
        if not (is_op(node, aten.adaptive_avg_pool2d.default) and pair(node.args[1]) == [1, 1]
                and rw.moving(node.args[0]) and rw.rank(node.args[0]) == 4):
            return None
        return MatchResult.success(p=rw.perm(node.args[0]))

    def build(self, node, m, rw):
        p = m["p"]
        dims = sorted(inverse(p)[d] for d in (2, 3))
        return Built(aten.mean.dim, (rw.request(node.args[0], p), dims, True), {}, p)


class Select(LayoutRule):
    """``select``, ``squeeze``, ``unsqueeze``: renumbered; the result loses or gains one axis."""

    name = "select"

    def match(self, node, rw):
        if not is_op(node, aten.select.int, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
                     aten.unsqueeze.default) or not rw.moving(node.args[0]):
            return None
        p = rw.perm(node.args[0])
        r = len(p)
        shape = rw.lshape(node.args[0])
        if is_op(node, aten.unsqueeze.default):
            d = node.args[1] % (r + 1)
            k = inverse(p)[d - 1] + 1 if d > 0 else 0      # next to the axis it follows
            out = [x + (1 if x >= d else 0) for x in p]
            out.insert(k, d)
            return MatchResult.success(p=p, args=(k,), out=tuple(out))
        if is_op(node, aten.select.int):
            d = node.args[1] % r
            return MatchResult.success(p=p, args=(inverse(p)[d], node.args[2]), out=drop_dims(p, [d]))
        if is_op(node, aten.squeeze.default):
            dims = list(range(r))
        else:
            dims = node.args[1] if is_op(node, aten.squeeze.dims) else [node.args[1]]
        dims = sorted(d % r for d in dims)
        if not all(static_dim(shape[d]) for d in dims):
            return MatchResult.fail("squeeze of an axis of symbolic size")
        gone = [d for d in dims if is_one(shape[d])]
        phys = sorted(inverse(p)[d] for d in gone)
        return MatchResult.success(p=p, args=(phys,), target=aten.squeeze.dims, out=drop_dims(p, gone))

    def build(self, node, m, rw):
        x = rw.request(node.args[0], m["p"])
        return Built(m.values.get("target", node.target), (x, *m["args"]), {}, m["out"])


class SymSize(LayoutRule):
    """``sym_size(x, d)`` reads axis ``d`` of the logical value: renumbered."""

    name = "sym_size"

    def match(self, node, rw):
        if not (is_op(node, aten.sym_size.int) and rw.moving(node.args[0])):
            return None
        p = rw.perm(node.args[0])
        return MatchResult.success(d=inverse(p)[node.args[1] % len(p)])

    def build(self, node, m, rw):
        return Built(node.target, (rw.env[node.args[0]][0], m["d"]), {}, None)


class AssertMetadata(LayoutRule):
    """``_assert_tensor_metadata`` without size/stride checks: dtype and device do not change."""

    name = "assert_metadata"

    def match(self, node, rw):
        if not (is_op(node, aten._assert_tensor_metadata.default) and rw.moving(node.args[0])):
            return None
        if node.kwargs.get("size") is not None or node.kwargs.get("stride") is not None or len(node.args) > 1:
            return MatchResult.fail("asserts sizes or strides")
        return MatchResult.success()

    def build(self, node, m, rw):
        return Built(node.target, (rw.env[node.args[0]][0],), dict(node.kwargs), None)


class Pad(LayoutRule):
    """Constant padding: the pad list (last axis first, two entries per axis) is rewritten for the
    physical axes."""

    name = "pad"

    def match(self, node, rw):
        if not (is_op(node, aten.pad.default, aten.constant_pad_nd.default) and rw.moving(node.args[0])):
            return None
        if is_op(node, aten.pad.default) and arg(node, 2, "mode", "constant") != "constant":
            return MatchResult.fail(f"padding mode {arg(node, 2, 'mode')!r} pads only the trailing axes")
        p = rw.perm(node.args[0])
        r = len(p)
        pad = list(node.args[1])
        per_axis = {r - 1 - i: (pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)}
        inv = inverse(p)
        phys = {inv[d]: v for d, v in per_axis.items() if tuple(v) != (0, 0)}
        low = min(phys, default=r - 1)
        new = []
        for j in range(r - 1, low - 1, -1):
            new += list(phys.get(j, (0, 0)))
        return MatchResult.success(p=p, pad=new)

    def build(self, node, m, rw):
        args = list(node.args)
        args[0] = rw.request(node.args[0], m["p"])
        args[1] = m["pad"]
        return Built(node.target, tuple(args), dict(node.kwargs), m["p"])


class Reshape(LayoutRule):
    """``view``/``reshape``/``flatten`` of a permuted value.

    - When the permutation only moves size-1 axes (after a global pool), the element order is the
      logical one: the op applies to the physical value as it is and the result is logical.
    - ``flatten(x, s, e)`` whose axes ``s..e`` are adjacent and in order in the physical layout
      flattens those physical axes; the result keeps the permutation of the other axes
      (NHWC ``[N, H, W, C]`` flattened over H, W is ``[N, HW, C]``: logical ``flatten(2)``
      transposed, so a following ``transpose(1, 2)`` is absorbed).
    """

    name = "reshape"
    OPS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints)

    def match(self, node, rw):
        if not (is_op(node, *self.OPS) and rw.moving(node.args[0])):
            return None
        p = rw.perm(node.args[0])
        shape = rw.lshape(node.args[0])
        r = len(p)
        order = [d for d in p if not is_one(shape[d])]
        flatten = is_op(node, aten.flatten.using_ints)
        s, e = (arg(node, 1, "start_dim", 0) % r, arg(node, 2, "end_dim", -1) % r) if flatten else (0, r - 1)
        if order == sorted(order) and (not flatten or all(
                str(shape[p[j]]) == str(shape[j]) for j in range(r) if j < s or j > e)):
            return MatchResult.success(p=p, out=identity(rw.rank(node)), args=None)
        if not flatten:
            return MatchResult.fail("reshape mixes permuted axes")
        pos = [inverse(p)[d] for d in range(s, e + 1)]
        if pos != list(range(pos[0], pos[0] + len(pos))):
            return MatchResult.fail("flatten of axes that are not adjacent in the physical layout")
        merged = lambda d: d if d < s else (s if d <= e else d - (e - s))   # noqa: E731
        out = tuple(merged(p[j]) for j in range(r) if not pos[0] < j <= pos[-1])
        return MatchResult.success(p=p, out=out, args=(pos[0], pos[-1]))

    def build(self, node, m, rw):
        x = rw.env[node.args[0]][0]
        if m["args"] is not None:
            return Built(node.target, (x, *m["args"]), {}, m["out"])
        args = [x, *[rw.plain(a) for a in node.args[1:]]]
        target = aten.reshape.default if is_op(node, aten.view.default) else node.target
        return Built(target, tuple(args), rw.plain(dict(node.kwargs)), m["out"])
