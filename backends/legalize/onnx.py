"""Legalizations for ONNX (torch 2.13's dynamo exporter, onnxscript 0.7.2, onnx 1.23).

=================================  ============================================================
rule                               the bug it avoids
=================================  ============================================================
ceil-pool-as-floor                 onnx shape inference counts one ceil-mode window too many where
                                   torch drops a last window that would start in the right padding
sdpa-as-4d                         torchlib's SDPA translation takes only 4-d operands
sdpa-masked-rows-as-zeros          a query row whose keys a boolean or -inf mask all masks out is
                                   zeros in torch's SDPA, the values' mean or NaN once exported
near-identity-scalar-as-tensor     the exporter's optimizer deletes ``x + 1e-12`` and ``x * 1.000001``
(shared) adaptive-max-pool-as-...  no translation of adaptive max pooling
=================================  ============================================================
"""

from __future__ import annotations

import math

import torch

from optc.backends.legalize.common import Legalization, MatchResult, aten, arg, static_shape, val

# op -> index of ceil_mode, index of padding, index of dilation (None: no dilation argument)
_CEIL_POOLS = {
    aten.max_pool1d.default: (5, 3, 4), aten.max_pool2d.default: (5, 3, 4), aten.max_pool3d.default: (5, 3, 4),
    aten.max_pool2d_with_indices.default: (5, 3, 4), aten.max_pool3d_with_indices.default: (5, 3, 4),
    aten.avg_pool1d.default: (4, 3, None), aten.avg_pool2d.default: (4, 3, None), aten.avg_pool3d.default: (4, 3, None),
}
_POOL_RANK = {aten.max_pool1d.default: 1, aten.avg_pool1d.default: 1, aten.max_pool2d.default: 2,
              aten.avg_pool2d.default: 2, aten.max_pool2d_with_indices.default: 2, aten.max_pool3d.default: 3,
              aten.max_pool3d_with_indices.default: 3, aten.avg_pool3d.default: 3}


def _ints(v, n: int, default: int) -> list[int]:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        return [default] * n
    if isinstance(v, int):
        return [v] * n
    v = [int(a) for a in v]
    return v * n if len(v) == 1 else v


class CeilPoolAsFloor(Legalization):
    """Ceil-mode pooling whose output has the floor-mode length -> ``ceil_mode=False`` (the same
    windows: torch drops a last ceil window that would start in the right padding, so both modes
    produce the same windows). onnx 1.23's shape inference keeps that window and
    ``check_model(full_check=True)`` rejects the exported model."""

    name = "ceil-pool-as-floor"
    backends = ("onnx",)
    targets = tuple(_CEIL_POOLS)

    def check(self, node):
        ci, pi, di = _CEIL_POOLS[node.target]
        if not arg(node, ci, "ceil_mode"):
            return None
        out = val(node)
        out = out[0] if isinstance(out, (tuple, list)) else out
        xs, ys = static_shape(val(node.args[0])), static_shape(out)
        if xs is None or ys is None:
            return MatchResult.fail("dynamic shape")
        spatial = _POOL_RANK[node.target]
        k = _ints(node.args[1], spatial, 1)
        s = [kk if ss == 0 else ss for ss, kk in zip(_ints(arg(node, 2, "stride"), spatial, 0), k)]
        p = _ints(arg(node, pi, "padding"), spatial, 0)
        d = _ints(arg(node, di, "dilation"), spatial, 1) if di is not None else [1] * spatial
        floor = [(L + 2 * pp - dd * (kk - 1) - 1) // ss + 1 for L, kk, ss, pp, dd in zip(xs[-spatial:], k, s, p, d)]
        if list(ys[-spatial:]) != floor:
            return MatchResult.fail("ceil mode adds a window here: ONNX computes it the same")
        return MatchResult.success(ci=ci)

    def apply(self, node, m):
        args = list(node.args)
        if len(args) > m["ci"]:
            args[m["ci"]] = False
            node.args = tuple(args)
        else:
            node.update_kwarg("ceil_mode", False)
        node.meta["optc_rule"] = self.name


class SdpaAs4d(Legalization):
    """``scaled_dot_product_attention`` of 3-d ``[B, L, E]`` operands -> the same on ``[B, 1, L, E]``
    (a mask of rank 3 too), squeezed back: torch 2.13's ONNX translation of SDPA accepts only 4-d
    operands ("only 4D query, key, and value are supported"); fuse-attention writes single-head
    attention as 3-d SDPA, as torch allows."""

    name = "sdpa-as-4d"
    backends = ("onnx",)
    targets = (aten.scaled_dot_product_attention.default,)

    def check(self, node):
        if not all(isinstance(val(a), torch.Tensor) and val(a).dim() == 3 for a in node.args[:3]):
            return None
        mask = arg(node, 3, "attn_mask")
        mv = val(mask)
        if mask is not None and not (isinstance(mv, torch.Tensor) and mv.dim() in (2, 3)):
            return MatchResult.fail("mask of another rank")
        return MatchResult.success(mask=mask)

    def apply(self, node, m):
        args = [self.emit(node, aten.unsqueeze.default, (a, 1)) for a in node.args[:3]]
        rest, kwargs = list(node.args[3:]), dict(node.kwargs)
        mask = m["mask"]
        if mask is not None and val(mask).dim() == 3:
            m4 = self.emit(node, aten.unsqueeze.default, (mask, 1))
            if rest:
                rest[0] = m4
            else:
                kwargs["attn_mask"] = m4
        out = self.emit(node, aten.scaled_dot_product_attention.default, (*args, *rest), kwargs)
        self.replace(node, self.emit(node, aten.squeeze.dim, (out, 1)))


class SdpaMaskedRowsAsZeros(Legalization):
    """``scaled_dot_product_attention`` with a boolean mask, or a float mask that may hold
    ``-inf`` -> the same attention with the rows whose keys are all masked out set to zeros:
    ``where(any(M, -1), sdpa(q, k, v, (not M) * finfo.min), 0)`` for a boolean ``M``, and
    ``where(any(M != -inf, -1), sdpa(q, k, v, M), 0)`` for a float one. torch's SDPA gives such a
    row zeros (a padded query position: HF's ``sdpa`` attention on a left-padded batch, or a
    hand-written ``masked_fill(pad == 0, -inf)``); the exporter's translation gives it the values'
    mean (boolean) or NaN (``-inf``), OpenVINO NaN -- which the next layer's attention spreads
    over the whole sequence. Every other row is exact: a masked score plus the dtype's minimum
    underflows to a zero probability, as torch's ``-inf`` does. The float bias is also what ONNX
    Runtime's fused attention kernels take (``ort-contrib-ops`` refuses boolean masks). A float
    mask that cannot hold ``-inf`` (HF's masks hold the dtype's minimum: torch then gives such a
    row the values' mean too, as the exported model does) is left alone: only an op writing
    ``-inf`` (``masked_fill``, ``where``, ``full``) or a constant holding it, reached from the
    mask through shape ops and arithmetic, or a float model input reached through shape ops and
    additions (a mask the caller passes in may hold ``-inf``), makes the rule fire."""

    name = "sdpa-masked-rows-as-zeros"
    backends = ("onnx", "openvino")
    targets = (aten.scaled_dot_product_attention.default,)

    def check(self, node):
        mask = arg(node, 3, "attn_mask")
        mv = val(mask)
        if mask is None or not isinstance(mv, torch.Tensor):
            return None
        if mv.dtype != torch.bool and not (mv.is_floating_point() and _may_hold_neg_inf(mask)):
            return None                   # a float mask with no -inf (HF's: the dtype's minimum)
        if arg(node, 4, "dropout_p", 0.0) or arg(node, 5, "is_causal", False):
            return None                   # torch refuses a mask with is_causal; dropout: training
        out = val(node)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return MatchResult.fail("an attention output that is not floating point")
        return MatchResult.success(mask=mask, dtype=out.dtype, boolean=mv.dtype == torch.bool)

    def apply(self, node, m):
        mask = m["mask"]
        if m["boolean"]:
            masked = self.emit(node, aten.logical_not.default, (mask,))
            bias = self.emit(node, aten._to_copy.default, (masked,), {"dtype": m["dtype"]})
            bias = self.emit(node, aten.mul.Tensor, (bias, torch.finfo(m["dtype"]).min))
            keep = mask
        else:                             # the float mask as it is; a key is kept where it is above -inf
            bias = mask
            keep = self.emit(node, aten.ne.Scalar, (mask, float("-inf")))
        rows = self.emit(node, aten.any.dim, (keep, -1, True))
        args, kwargs = list(node.args), dict(node.kwargs)
        if len(args) > 3:
            args[3] = bias
        else:
            kwargs["attn_mask"] = bias
        out = self.emit(node, aten.scaled_dot_product_attention.default, tuple(args), kwargs)
        self.replace(node, self.emit(node, aten.where.ScalarOther, (rows, out, 0.0)))


_NEG_INF_WRITERS = (aten.masked_fill.Scalar, aten.where.ScalarOther, aten.where.ScalarSelf, aten.full.default,
                    aten.fill.Scalar, aten.full_like.default, aten.masked_fill.Tensor, aten.where.self)
_MASK_CARRIERS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
                  aten.unsqueeze.default, aten.squeeze.dim, aten.slice.Tensor, aten.select.int, aten.clone.default,
                  aten._to_copy.default, aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.minimum.default,
                  aten.maximum.default, aten.transpose.int, aten.permute.default, aten.cat.default)


def _is_neg_inf(a) -> bool:
    if isinstance(a, float):
        return a == float("-inf")
    if isinstance(a, torch.fx.Node) and a.op == "get_attr":
        from optc.ir.rewrite import attr_value
        v = attr_value(a)
        return isinstance(v, torch.Tensor) and v.is_floating_point() and bool(torch.isneginf(v).any())
    return False


_SCALINGS = (aten.mul.Tensor, aten.minimum.default, aten.maximum.default)


def _may_hold_neg_inf(mask: torch.fx.Node) -> bool:
    """The float mask may hold ``-inf``: an op that writes ``-inf`` (``masked_fill(m, -inf)``,
    ``where(c, x, -inf)``, ``full(-inf)``) or a constant holding it, reached from ``mask``
    through shape ops and arithmetic; or a float model input reached through shape ops and
    additions only (an additive mask the caller passes in: nothing says it holds no ``-inf``; a 0/1
    mask scaled by the dtype's minimum, as HF builds them, is left alone)."""
    seen, todo = set(), [(mask, False)]
    while todo and len(seen) < 64:
        n, scaled = todo.pop()
        if not isinstance(n, torch.fx.Node) or (n, scaled) in seen:
            continue
        seen.add((n, scaled))
        if _is_neg_inf(n):
            return True
        if n.op == "placeholder":
            v = n.meta.get("val")
            if not scaled and isinstance(v, torch.Tensor) and v.is_floating_point():
                return True
            continue
        if n.op != "call_function":
            continue
        if n.target in _NEG_INF_WRITERS and any(_is_neg_inf(a) for a in n.args):
            return True
        if n.target in _MASK_CARRIERS or n.target in _NEG_INF_WRITERS:
            through = scaled or n.target in _SCALINGS
            for a in n.args:
                todo.extend((x, through) for x in (a if isinstance(a, (list, tuple)) else [a]))
    return False


_SCALAR_OPS = {aten.add.Tensor: "add", aten.sub.Tensor: "add", aten.mul.Tensor: "mul", aten.div.Tensor: "mul",
               aten.add.Scalar: "add", aten.sub.Scalar: "add", aten.mul.Scalar: "mul", aten.div.Scalar: "mul"}
_TENSOR_OPS = {aten.add.Scalar: aten.add.Tensor, aten.sub.Scalar: aten.sub.Tensor,
               aten.mul.Scalar: aten.mul.Tensor, aten.div.Scalar: aten.div.Tensor}


class NearIdentityScalarAsTensor(Legalization):
    """``x + c`` / ``x - c`` with ``0 < |c| <= 1e-7`` and ``x * c`` / ``x / c`` with ``c != 1``
    within 2e-5 of 1 -> the same with ``c`` as a constant tensor of shape ``[1] * x.dim()``: the
    ONNX exporter's optimizer (onnxscript 0.7.2) matches scalar constants of its no-op rules with
    ``abs_tol=1e-8, rel_tol=1e-5``, so it deletes ``x + 1e-12`` (an epsilon: 0 / 0 = NaN behind it;
    found by optc fuzz) and ``x * 1.000001``. It leaves non-scalar constants alone."""

    name = "near-identity-scalar-as-tensor"
    backends = ("onnx",)
    targets = tuple(_SCALAR_OPS)

    def check(self, node):
        if len(node.args) < 2 or node.kwargs.get("alpha", 1) != 1:
            return None
        x, c = node.args[:2]
        xv = val(x)
        if not isinstance(c, float) or not isinstance(xv, torch.Tensor) or xv.dim() == 0 or not xv.is_floating_point():
            return None
        kind = _SCALAR_OPS[node.target]
        near = (c != 0 and abs(c) <= 1e-7) if kind == "add" else (c != 1 and math.isclose(c, 1, rel_tol=2e-5))
        return MatchResult.success(c=c, x=x, xv=xv) if near else None

    def apply(self, node, m):
        xv = m["xv"]
        const = self.constant(node, "_optc_scalar", torch.full([1] * xv.dim(), m["c"], dtype=xv.dtype))
        self.replace(node, self.emit(node, _TENSOR_OPS.get(node.target, node.target), (m["x"], const)))


RULES = (CeilPoolAsFloor, SdpaAs4d, SdpaMaskedRowsAsZeros, NearIdentityScalarAsTensor)
