"""convert-layout's rules for layout-sensitive ops (converted to the target layout), permutes
(absorbed into the layout), pointwise ops (computed in their operands' layout) and BatchNorm (a
per-channel affine map on the channel axis).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from optc.ir.rewrite import MatchResult, arg, attr_value, is_op
from optc.passes.convert_layout.families import TO_LAYOUT, Family
from optc.passes.convert_layout.perm import inverse, pair
from optc.passes.convert_layout.rewriter import Built, LayoutRule, Stop

aten = torch.ops.aten
optc_ops = torch.ops.optc


# -- layout-sensitive ops ------------------------------------------------------------------------------
class Sensitive(LayoutRule):
    """A layout-sensitive op: converted to the target layout, its input (and weight) requested in
    it; an op already in the target layout takes its input in its own (logical) layout."""

    def __init__(self, family: Family):
        self.family = family
        self.name = family.name

    def form(self, node: fx.Node) -> str | None:
        if is_op(node, self.family.nhwc):
            return "NHWC"
        if is_op(node, *self.family.nchw):
            return "NCHW"
        return None

    def match(self, node, rw):
        src = self.form(node)
        if src is None:
            return None
        if self.family.name == "adaptive_avg_pool2d" and src == "NCHW" and pair(node.args[1]) == [1, 1]:
            return None                      # a global pool: a mean over the spatial axes (GlobalPool)
        parsed = self.family.parse(node)
        if isinstance(parsed, str):
            return MatchResult.fail(parsed)
        x, args = parsed
        if src != rw.layout and self.family.weight is not None:
            w = args[self.family.weight]
            if not (isinstance(w, fx.Node) and w in rw.const):
                return MatchResult.fail(f"weight %{getattr(w, 'name', w)} is not a constant (permuting it would "
                                        "run on every call)")
        return MatchResult.success(src=src, x=x, args=args)

    def build(self, node, m, rw):
        src, args = m["src"], list(m["args"])
        to = TO_LAYOUT[(src, rw.layout)]
        x = rw.request(m["x"], to)
        w = self.family.weight
        args = [rw.request(a, to) if i == w else rw.plain(a) for i, a in enumerate(args)]
        if rw.layout == "NHWC":
            return Built(self.family.nhwc, (x, *args), {}, to)
        target, new_args = self.family.build_nchw(x, args)
        return Built(target, new_args, {}, to)


# -- permutes ----------------------------------------------------------------------------------------
class AbsorbPermute(LayoutRule):
    """``permute``/``transpose`` of a permuted value: no node, the layout changes (an inverse pair
    cancels). The node itself stays available as the logical value if something needs that."""

    name = "permute"

    def match(self, node, rw):
        if not (is_op(node, aten.permute.default, aten.transpose.int) and rw.moving(node.args[0])):
            return None
        r = rw.rank(node.args[0])
        if is_op(node, aten.transpose.int):
            a, b = node.args[1] % r, node.args[2] % r
            q = list(range(r))
            q[a], q[b] = q[b], q[a]
        else:
            q = [d % r for d in node.args[1]]
        return MatchResult.success(q=tuple(q))


class Pointwise(LayoutRule):
    """Pointwise ops: computed in the layout of their first permuted operand."""

    name = "pointwise"
    same_rank = True
    EXTRA = (aten._to_copy.default, aten.alias.default, aten.detach.default, aten.contiguous.default,
             aten.hardswish.default, aten.hardswish_.default, aten.zeros_like.default, aten.ones_like.default,
             aten.full_like.default, aten.empty_like.default)

    def _pointwise(self, node) -> bool:
        t = node.target
        if not isinstance(t, torch._ops.OpOverload):
            return False
        if t in (aten.dropout.default, aten.dropout_.default, aten.feature_dropout.default):
            return arg(node, 2, "train") is False
        if t.namespace == "optc":
            return t in (optc_ops.quantize_per_tensor.default, optc_ops.dequantize_per_tensor.default,
                         optc_ops.quantize_dequantize_dynamic.default)
        if t in self.EXTRA:
            return not ({"memory_format", "layout", "device"} & set(node.kwargs)) or t is aten.contiguous.default
        return torch.Tag.pointwise in t.tags and torch.Tag.nondeterministic_seeded not in t.tags

    def _tensors(self, node):
        return [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]

    def match(self, node, rw):
        if not self._pointwise(node):
            return None
        out_rank = rw.rank(node)
        lead = next((a for a in self._tensors(node) if rw.moving(a) and rw.rank(a) == out_rank), None)
        if lead is None:
            return None
        return self.match_in(node, rw.perm(lead), rw)

    def match_in(self, node, p, rw):
        if not self._pointwise(node) or rw.rank(node) != len(p):
            return None
        if node.target._schema.is_mutable:
            written = node.args[0]
            if len(written.users) != 1:
                return MatchResult.fail("in-place op on a value that other ops read")
            if not rw.moving(written) or rw.perm(written) != p:
                return MatchResult.fail("in-place op on a value in another layout")
        return MatchResult.success(p=p)

    def build(self, node, m, rw):
        p = m["p"]

        def operand(a):
            if not isinstance(a, fx.Node) or rw.rank(a) is None:
                return a
            got = rw.request_broadcast(a, p)
            if got is None:
                raise Stop(f"operand %{a.name} {rw.lshape(a)} cannot be broadcast in layout {p}")
            return got

        return Built(node.target, tuple(operand(a) for a in node.args),
                     {k: operand(v) for k, v in node.kwargs.items()}, p)


# -- batch norm --------------------------------------------------------------------------------------
class BatchNorm(LayoutRule):
    """Eval-mode ``batch_norm`` of a permuted value: ``channel_affine`` on the channel axis, with
    ``scale = gamma / sqrt(var + eps)`` and ``shift = beta - mean * scale`` computed in float64."""

    name = "batch_norm"

    def match(self, node, rw):
        if not (is_op(node, aten.batch_norm.default) and rw.moving(node.args[0])):
            return None
        if arg(node, 5, "training") is not False:
            return MatchResult.fail("batch norm in training mode")
        w, b, mean, var = (arg(node, i, k) for i, k in ((1, "weight"), (2, "bias"), (3, "running_mean"),
                                                         (4, "running_var")))
        tensors = {}
        for key, v in (("weight", w), ("bias", b), ("mean", mean), ("var", var)):
            if v is None and key in ("weight", "bias"):
                continue
            t = attr_value(v)
            if t is None:
                return MatchResult.fail(f"batch norm {key} is not a constant")
            tensors[key] = t
        return MatchResult.success(p=rw.perm(node.args[0]), eps=float(arg(node, 7, "eps")), **tensors)

    def build(self, node, m, rw):
        p = m["p"]
        var = m["var"].double()
        scale = 1.0 / torch.sqrt(var + m["eps"])
        if "weight" in m.values:
            scale = scale * m["weight"].double()
        shift = -m["mean"].double() * scale
        if "bias" in m.values:
            shift = shift + m["bias"].double()
        dtype = rw.logical[node].dtype
        like = node.args[3]
        s = rw._new_attr(like, scale.to(dtype), f"{node.name}_scale")
        t = rw._new_attr(like, shift.to(dtype), f"{node.name}_shift")
        x = rw.request(node.args[0], p)
        return Built(optc_ops.channel_affine.default, (x, s, t, inverse(p)[1]), {}, p)
