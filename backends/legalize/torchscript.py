"""Legalizations for TorchScript (torch 2.13's ``torch.jit`` trace, freeze, optimize_for_inference).

=============================  =====================================================================
rule                           the bug it avoids
=============================  =====================================================================
fill-tensor-as-expand          ``torch.jit.trace`` records ``fill.Tensor`` as ``aten::full_like(Tensor,
                               Tensor)``, an overload TorchScript lacks (functionalised HF BART)
addmm-as-linear                optimize_for_inference + the profiling executor fail on ``aten::addmm``
                               feeding a linear
tanh-gelu-as-formula           optimize_for_inference runs tanh GELU on a convolution's MKLDNN output,
                               which MKLDNN rejects
clamp-one-sided                optimize_for_inference's conv + clamp fusion reads both bounds as doubles
batch-norm-as-affine           ``torch.jit.freeze`` folds a BatchNorm into a linear whose output has
                               other users, or across a ``[N, C, L]`` linear output's rows (silent
                               miscompiles); MKLDNN rejects a BatchNorm without affine
adaptive-avg-pool-as-matmul    MKLDNN's adaptive average pooling fails when the input is not a multiple
                               of the output
add-alpha-as-mul               (shared with TVM, ``common_rules``) ``add(y, y, alpha=a)`` of a
                               convolution's output computed as ``2a*y``
=============================  =====================================================================
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from optc.backends.legalize.common import Legalization, MatchResult, aten, arg, static_shape, val


class FillTensorAsExpand(Legalization):
    """``fill.Tensor(x, v)`` -> ``v`` cast to ``x``'s dtype, expanded to its shape and copied
    (``zeros_like(x) + v`` where the shape is dynamic): ``torch.jit.trace`` records the op as
    ``aten::full_like(Tensor, Tensor)``, which TorchScript does not have ("We don't have an op for
    aten::full_like", INTERNAL ASSERT, torch 2.13); functionalization writes ``ids[:, 0] = start``
    this way (HF BART)."""

    name = "fill-tensor-as-expand"
    backends = ("torchscript",)
    targets = (aten.fill.Tensor,)

    def check(self, node):
        return MatchResult.success() if isinstance(val(node.args[0]), torch.Tensor) else MatchResult.fail(
            "input has no shape metadata")

    def apply(self, node, m):
        x, v = node.args[:2]
        xv = val(x)
        cast = self.emit(node, aten._to_copy.default, (v,), {"dtype": xv.dtype})
        shape = static_shape(xv)
        if shape is not None:
            new = self.emit(node, aten.clone.default, (self.emit(node, aten.expand.default, (cast, list(shape))),))
        else:
            new = self.emit(node, aten.add.Tensor, (self.emit(node, aten.zeros_like.default, (x,)), cast))
        self.replace(node, new)


class AddmmAsLinear(Legalization):
    """``addmm(b, x, w)`` -> ``linear(x, w.t(), b)`` (1-d ``b``, ``beta = alpha = 1``), else
    ``beta * b + alpha * mm(x, w)``: TorchScript's frozen-linear folding and MKLDNN path run the
    linear form correctly, while an ``aten::addmm`` feeding a linear fails shape propagation at
    run time ('The size of tensor a (2) must match the size of tensor b (3)', torch 2.13)."""

    name = "addmm-as-linear"
    backends = ("torchscript",)
    targets = (aten.addmm.default,)

    def apply(self, node, m):
        b, x, w = node.args[:3]
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        bv = val(b)
        if beta == 1 and alpha == 1 and isinstance(bv, torch.Tensor) and bv.dim() == 1:
            new = self.emit(node, aten.linear.default, (x, self.emit(node, aten.t.default, (w,)), b))
        else:
            mm = self.emit(node, aten.mm.default, (x, w))
            if alpha != 1:
                mm = self.emit(node, aten.mul.Tensor, (mm, alpha))
            bb = b if beta == 1 else self.emit(node, aten.mul.Tensor, (b, beta))
            new = self.emit(node, aten.add.Tensor, (mm, bb))
        self.replace(node, new)


class TanhGeluAsFormula(Legalization):
    """In a graph with a convolution, ``gelu(x, approximate="tanh")`` ->
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, the definition of the tanh form:
    optimize_for_inference moves convolution outputs to MKLDNN and runs a following tanh GELU on
    them, which fails ('mkldnn_gelu: fast, approximate gelu is not supported', torch 2.13). Graphs
    without a convolution (GPT-style decoders) keep the fused op."""

    name = "tanh-gelu-as-formula"
    backends = ("torchscript",)
    targets = (aten.gelu.default,)

    def check(self, node):
        if arg(node, 1, "approximate", "none") != "tanh":
            return None
        return MatchResult.success() if self.facts.has_conv else MatchResult.fail(
            "no convolution in the graph: optimize_for_inference keeps GELU off MKLDNN")

    def apply(self, node, m):
        x, e = node.args[0], self.emit
        x3 = e(node, aten.mul.Tensor, (e(node, aten.mul.Tensor, (x, x)), x))
        inner = e(node, aten.add.Tensor, (x, e(node, aten.mul.Tensor, (x3, 0.044715))))
        t = e(node, aten.tanh.default, (e(node, aten.mul.Tensor, (inner, math.sqrt(2 / math.pi))),))
        half_x = e(node, aten.mul.Tensor, (x, 0.5))
        self.replace(node, e(node, aten.mul.Tensor, (half_x, e(node, aten.add.Tensor, (t, 1.0)))))


class ClampOneSided(Legalization):
    """``clamp(x, lo, None)`` -> ``clamp_min(x, lo)`` and ``clamp(x, None, hi)`` -> ``clamp_max(x, hi)``:
    optimize_for_inference fuses a convolution with a following clamp and reads both bounds as
    doubles ('INTERNAL ASSERT FAILED ... expected double' when one is None, torch 2.13)."""

    name = "clamp-one-sided"
    backends = ("torchscript",)
    targets = (aten.clamp.default,)

    def check(self, node):
        lo, hi = arg(node, 1, "min"), arg(node, 2, "max")
        if (lo is None) == (hi is None) or isinstance(lo, fx.Node) or isinstance(hi, fx.Node):
            return None
        return MatchResult.success(lo=lo, hi=hi)

    def apply(self, node, m):
        lo, hi = m["lo"], m["hi"]
        new = self.emit(node, aten.clamp_min.default if hi is None else aten.clamp_max.default,
                        (node.args[0], lo if hi is None else hi))
        self.replace(node, new)


class BatchNormAsAffine(Legalization):
    """Eval-mode ``batch_norm`` -> ``x * s + t`` per channel (``s = w / sqrt(var + eps)``,
    ``t = b - mean * s``, computed from the constants in the graph, so freezing folds them) where
    TorchScript gets the op wrong (torch 2.13):

    - its input is a linear whose output has other users: ``torch.jit.freeze`` folds the BatchNorm
      into the linear's weights anyway, so the other users read the folded values (a silent
      miscompile);
    - its input is a linear of rank > 2 (``[N, C, L]``): the BatchNorm's channels are dim 1, not the
      linear's output features, yet ``freeze`` folds it per output feature (a silent miscompile);
    - it has no affine parameters: optimize_for_inference moves it to MKLDNN, which rejects it.

    optc's own fold-linear-bn/fold-conv-bn fold the cases where folding is right; what is left
    here is exactly what must not be folded."""

    name = "batch-norm-as-affine"
    backends = ("torchscript",)
    targets = (aten.batch_norm.default,)

    def check(self, node):
        x, w, _b, mean, var = node.args[:5]
        xv = val(x)
        if arg(node, 5, "training", False) or mean is None or var is None or not isinstance(xv, torch.Tensor) \
                or xv.dim() < 2:
            return None
        from_linear = isinstance(x, fx.Node) and x.op == "call_function" and x.target is aten.linear.default
        if not (from_linear and (len(x.users) > 1 or xv.dim() > 2) or w is None):
            return MatchResult.fail("TorchScript folds and runs this BatchNorm correctly")
        return MatchResult.success()

    def apply(self, node, m):
        x, w, b, mean, var = node.args[:5]
        eps = arg(node, 7, "eps", 1e-5)
        e = self.emit
        shape = [1, -1] + [1] * (val(x).dim() - 2)
        inv = e(node, aten.rsqrt.default, (e(node, aten.add.Tensor, (var, eps)),))
        scale = inv if w is None else e(node, aten.mul.Tensor, (w, inv))
        shift = e(node, aten.neg.default, (e(node, aten.mul.Tensor, (mean, scale)),))
        if b is not None:
            shift = e(node, aten.add.Tensor, (shift, b))
        y = e(node, aten.mul.Tensor, (x, e(node, aten.reshape.default, (scale, shape))))
        self.replace(node, e(node, aten.add.Tensor, (y, e(node, aten.reshape.default, (shift, shape)))))


def adaptive_windows(n: int, out: int) -> list[tuple[int, int]]:
    """Adaptive pooling's windows along one axis: ``[floor(i*n/out), ceil((i+1)*n/out))``."""
    return [((i * n) // out, -((-(i + 1) * n) // out)) for i in range(out)]


def pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``[n_out, n_in]``: row i averages the window adaptive pooling uses for output i."""
    mat = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i, (lo, hi) in enumerate(adaptive_windows(n_in, n_out)):
        mat[i, lo:hi] = 1.0 / (hi - lo)
    return mat


class AdaptiveAvgPoolAsMatmul(Legalization):
    """In a graph with a convolution, ``adaptive_avg_pool2d`` whose input size is not a multiple
    of its output size -> ``P_h @ x @ P_w^T`` with constant averaging matrices (the same windows
    and weights): optimize_for_inference moves it to MKLDNN, which fails at run time ('input size
    is not divisible by the output size is not supported yet', torch 2.13)."""

    name = "adaptive-avg-pool-as-matmul"
    backends = ("torchscript",)
    targets = (aten.adaptive_avg_pool2d.default,)

    def check(self, node):
        xv = val(node.args[0])
        xs, ys = static_shape(xv), static_shape(val(node))
        if xs is None or ys is None or len(xs) < 3 or not xv.is_floating_point():
            return MatchResult.fail("dynamic or non-floating input")
        (h, w), (oh, ow) = xs[-2:], ys[-2:]
        if h % oh == 0 and w % ow == 0:
            return MatchResult.fail("the input is a multiple of the output: MKLDNN pools it")
        if not self.facts.has_conv:
            return MatchResult.fail("no convolution in the graph: the pool stays off MKLDNN")
        return MatchResult.success(h=h, w=w, oh=oh, ow=ow, dtype=xv.dtype)

    def apply(self, node, m):
        ph = self.constant(node, "_optc_adaptive_pool_ph", pool_matrix(m["h"], m["oh"]).to(m["dtype"]))
        pwt = self.constant(node, "_optc_adaptive_pool_pwt",
                            pool_matrix(m["w"], m["ow"]).t().contiguous().to(m["dtype"]))
        y = self.emit(node, aten.matmul.default, (ph, node.args[0]))
        self.replace(node, self.emit(node, aten.matmul.default, (y, pwt)))


RULES = (FillTensorAsExpand, AddmmAsLinear, TanhGeluAsFormula, ClampOneSided, BatchNormAsAffine,
         AdaptiveAvgPoolAsMatmul)
