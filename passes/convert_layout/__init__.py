"""convert-layout{layout=NHWC|NCHW}: run convolutions, pooling and resampling in the target layout,
with permutes only where the layout cannot be carried further.

Every value keeps its *logical* meaning (the shape the original graph gives it); the pass decides
its *physical* layout, a permutation ``P`` with ``physical = logical.permute(P)``. Layout-sensitive
ops take their input in the target layout and produce it; every other op either works in whatever
layout its input has (the layout propagates) or needs the logical layout back (the layout stops).
Permutes are inserted only where a value is needed in a layout it does not have, so inverse pairs
never appear; the model's own permutes and transposes are absorbed into the layout and cancel::

    %x : f32[1,3,8,8]                              %x : f32[1,3,8,8]
    %c = aten.conv2d(%x, %w, %b)                   %permute = aten.permute(%x, [0, 2, 3, 1])
    %r = aten.relu(%c)                   ==>       %c = optc.conv2d_nhwc(%permute, %w_ohwi, %b)   [1,8,8,C]
    %m = aten.max_pool2d(%r, [2, 2])               %r = aten.relu(%c)                             [1,8,8,C]
    %y = aten.flatten(%m, 1)   (H = W = 1 here)    %m = optc.max_pool2d_nhwc(%r, [2, 2])          [1,1,1,C]
                                                   %y = aten.flatten(%m, 1)                       [1,C]

Layout-sensitive ops (``ir/layout_ops.py`` has their NHWC forms; with ``layout=NCHW`` the pass
maps them back to ATen):

- ``aten.conv2d`` / ``aten.convolution`` (2-d, not transposed) <-> ``optc.conv2d_nhwc``; the
  weight OIHW <-> OHWI is permuted at compile time (the weight must be a constant, or a constant
  subgraph such as ``dequantize_per_channel`` of one: that subgraph is re-emitted permuted);
- ``aten.max_pool2d``, ``aten.avg_pool2d``, ``aten.adaptive_avg_pool2d`` (output other than 1x1),
  ``aten.upsample_nearest2d.vec``, ``aten.upsample_bilinear2d.vec`` <-> ``optc.*_nhwc``.

Propagation rules (the op runs on the physical tensor; axis arguments are renumbered):

- pointwise ops (``torch.Tag.pointwise``: activations, arithmetic, ``where``, clones, casts,
  eval dropout, per-tensor Q/DQ): other operands are brought to the first permuted operand's
  layout; a lower-rank operand is broadcast first (a constant is permuted at compile time);
- axis ops: ``cat``, ``split``/``chunk``/``unbind`` (+ ``getitem``), ``softmax``/``log_softmax``,
  ``sum``/``mean``/``amax``/``amin``/``var``/``std`` (with or without ``keepdim``), ``select``,
  ``slice``, ``narrow``, ``squeeze``/``unsqueeze``, ``glu``, ``cumsum``, ``sym_size``,
  ``optc.channel_affine``, per-channel ``optc.quantize``/``dequantize``;
- ``aten.adaptive_avg_pool2d`` to 1x1 -> ``aten.mean`` over the spatial axes;
- eval-mode ``aten.batch_norm`` with constant statistics -> ``optc.channel_affine`` on the
  channel axis (scale and shift computed at compile time in float64);
- constant ``aten.pad`` / ``constant_pad_nd``: the pad list is rewritten for the physical axes;
- ``aten.permute`` / ``aten.transpose``: absorbed into the layout (no node);
- ``view`` / ``reshape`` / ``flatten``: when the permutation only moves size-1 axes (e.g. after a
  global pool) the element order is the same, and the result is logical again.

What stops propagation: any other op (linear, matmul, layer norm, unknown custom ops, in-place ops
with other readers...), a reshape that mixes permuted axes, a padding mode other than constant,
graph outputs. There the value gets a permute back to its logical layout and the op is left
alone; each stop is recorded as a refusal (``propagate``). Sensitive ops that cannot be converted
stay in their layout with permutes around them, with the reason (weight not a constant, unbatched
input, transposed or 1-d/3-d convolution, ``divisor_override``...).

Preconditions: none for correctness; run after BatchNorm/binary folding and pruning (``after=``),
which look for ``aten.conv2d``. A graph without a convertible layout-sensitive op is left
unchanged. The rewrite is exact: it moves data, never changes arithmetic, except that a
BatchNorm becomes a per-channel affine map (rounding only). New values are checked against the
logical shape permuted; a mismatch is a :class:`~optc.errors.PassError` (and the PassManager
restores the previous Program).

Modules: ``perm.py`` (permutation algebra), ``rewriter.py`` (the layout of every value, permutes
and constants in a requested layout, the rule protocol), ``families.py`` (the layout-sensitive ops
in both forms), ``rules.py`` and ``axis_rules.py`` (the rules), ``driver.py`` (the sweep, and why
it is not ``apply_rules``).
"""

from __future__ import annotations

import torch.fx as fx

from optc.passes.base import Option, PassContext, PassResult, register_pass
from optc.passes.convert_layout import driver
from optc.passes.convert_layout.driver import RULES, SAME_RANK_RULES
from optc.passes.convert_layout.families import FAMILIES, Family
from optc.passes.convert_layout.perm import Perm, drop_dims, identity, inverse, is_identity, then
from optc.passes.convert_layout.rewriter import PASS, Built, LayoutRule, Rewriter
from optc.passes.convert_layout.rules import Sensitive

LAYOUTS = ("NHWC", "NCHW")


@register_pass(PASS, exact=True, options={
    "layout": Option(LAYOUTS, "NHWC", "activation layout of convolutions, pooling and resampling"),
}, after=("fold-conv-bn", "fold-binary", "prune-channels", "prune-heads", "prune-magnitude"),
    description="run convolutions/pooling in NHWC or NCHW, propagating the layout and cancelling permutes")
def convert_layout(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    return driver.run(gm, ctx)


__all__ = ["convert_layout", "RULES", "SAME_RANK_RULES", "FAMILIES", "LAYOUTS", "PASS", "Built", "Family",
           "LayoutRule", "Perm", "Rewriter", "Sensitive", "identity", "inverse", "is_identity", "then", "drop_dims"]
