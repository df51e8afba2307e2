"""Fold eval-mode BatchNorm into the preceding linear layer.

Rewrite, per output feature ``c`` with ``s = gamma / sqrt(var + eps)``::

    %y = aten.linear(%x, W, b)            W: (out, in)
    %z = batch_norm(%y, gamma, beta, mean, var, training=False, momentum, eps)
        ==>   %z = aten.linear(%x, W', b')

    W'[c, :] = W[c, :] * s[c]
    b'[c]    = (b[c] - mean[c]) * s[c] + beta[c]

(``b = 0`` when the linear has no bias: one is added; ``gamma = 1``, ``beta = 0`` for
``affine=False``). ``W'`` and ``b'`` are computed in float64 and rounded once to their
dtype. The BatchNorm ops recognised are those of ``fold-conv-bn``.

Preconditions (else the BatchNorm stays; the refusal and its reason are recorded):
- BatchNorm normalises dim 1, a linear's features are its last dim: they are the same
  axis only for a 2-D ``(N, C)`` output. ``BatchNorm1d`` on a 3-D linear output
  ``(N, L, C)`` normalises ``L``, not the features, and is refused;
- the BatchNorm is in eval mode, has running statistics, and its statistics and affine
  parameters are constants (``get_attr``);
- the linear's output has no user besides the BatchNorm;
- the linear's weight and bias are constants that no other node reads (tied weights are
  refused).
"""

from __future__ import annotations

import torch.fx as fx

from optc.ir.affine_fold import FoldLayerBN
from optc.ir.rewrite import apply_rules
from optc.passes.base import PassContext, PassResult, register_pass

#: ``batch_norm(linear(x, W, b)) ==> linear(x, W', b')`` (see the module docstring)
LINEAR_BN = FoldLayerBN("linear-bn", ("linear",))


@register_pass("fold-linear-bn", exact=True,
               description="fold eval-mode BatchNorm1d into the preceding linear layer's weight and bias")
def fold_linear_bn(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    n = apply_rules(gm, [LINEAR_BN], ctx)
    return PassResult(gm, n > 0, {"folded": n})
