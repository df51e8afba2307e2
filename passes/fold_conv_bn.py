"""Fold eval-mode BatchNorm into the preceding convolution.

Rewrite, per output channel ``c`` with ``s = gamma / sqrt(var + eps)``::

    %y = conv(%x, W, b, ...)
    %z = batch_norm(%y, gamma, beta, mean, var, training=False, momentum, eps)
        ==>   %z = conv(%x, W', b', ...)

    W'[c] = W[c] * s[c]
    b'[c] = (b[c] - mean[c]) * s[c] + beta[c]

since ``bn(y) = (y - mean) * s + beta`` is affine per channel and a convolution is linear in
``W`` and ``b``. ``W[c]`` is the weight slice that produces output channel ``c``: dim 0 of
``W`` for a convolution (``(out, in/groups, k...)``); for a transposed convolution, whose
weight is ``(in, out/groups, k...)``, channel ``c = g * out/groups + j`` is slice ``j`` of
dim 1 within the rows ``[g*in/groups, (g+1)*in/groups)`` of group ``g``. ``b = 0`` for a
convolution without bias (one is added); ``gamma = 1``, ``beta = 0`` for ``affine=False``.
``W'`` and ``b'`` are computed in float64 from the original tensors and rounded once to
their dtype, so the result differs from conv-then-bn by rounding only.

Ops: ``aten.conv1d|conv2d|conv3d``, ``aten.conv_transpose1d|2d|3d``,
``aten.convolution`` / ``aten._convolution`` (with their ``transposed`` flag), followed by
``aten.batch_norm``, ``aten._native_batch_norm_legit_no_training`` (and its ``getitem 0``),
or ``aten._native_batch_norm_legit`` / ``aten.native_batch_norm`` with ``training=False``.

Preconditions (else the BatchNorm stays; the refusal and its reason are recorded):
- the BatchNorm is in eval mode and has running statistics;
- its running statistics and affine parameters are constants (``get_attr``);
- the convolution's output has no user besides the BatchNorm;
- the convolution's weight and bias are constants and no other node reads them (shared
  weights would need a copy per user: refused rather than silently duplicated);
- the BatchNorm normalises the convolution's channel axis (dim 1: a batched input).

The new weight and bias are new attributes (tensors are never modified in place); the old
ones are dropped when nothing else uses them.

The rule is :class:`optc.ir.affine_fold.FoldLayerBN` (shared with ``fold-linear-bn``); the op
views it matches with are in ``ir/views.py``.
"""

from __future__ import annotations

import torch.fx as fx

from optc.ir.affine_fold import FoldLayerBN
from optc.ir.rewrite import apply_rules
from optc.passes.base import PassContext, PassResult, register_pass

#: ``batch_norm(conv(x, W, b)) ==> conv(x, W', b')`` (see the module docstring)
CONV_BN = FoldLayerBN("conv-bn", ("conv", "conv_transpose"))


@register_pass("fold-conv-bn", exact=True,
               description="fold eval-mode BatchNorm into the preceding convolution's weight and bias")
def fold_conv_bn(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    n = apply_rules(gm, [CONV_BN], ctx)
    return PassResult(gm, n > 0, {"folded": n})
