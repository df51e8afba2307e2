"""Channel dependency analysis for structured pruning (Torch-Pruning's DepGraph, on the ATen graph).

Removing output channel ``c`` of a convolution is only correct if every tensor dim that
carries channel ``c`` shrinks with it: the BatchNorm after it, the input channels of the
layers that read it, the other branch of a residual add, the offset of ``c`` in a
concatenation, the ``H`` of a ``view(B, L, H, D)``... This package finds those ties.

Vocabulary
----------
space    the output channels of one prunable *producer*: a convolution with ``groups=1`` or
         a linear layer with constant weights; or a *virtual* space, the heads of a key/value
         tensor repeated for grouped-query attention (no producer, no weights).
group    spaces that must be pruned together (their channels meet position-wise: residual
         adds and multiplies, attention's q/k/v heads). Union-find over spaces; the unit
         that a pruning pass keeps or removes channels of. Weighted: a space's ``mult`` is how
         many of its heads share one head of its parent (a query projection has ``n_rep`` heads
         per key/value head); the root is the coarsest space and a group's channels are counted
         in the root's coordinates (:meth:`ChannelGraph.root_channels`).
layout   how the *channel axis* of one tensor maps onto spaces: the axis and a sequence of
         pieces, each a channel range of one space (or an opaque range that no producer
         owns: an input, an embedding). ``per`` channels per position describe heads
         (``view(B, L, C) -> (B, L, H, D)``: a position of the ``H`` axis is ``D``
         channels, and ``sub_axis`` is the ``D`` axis); ``rep`` positions per channel
         describe a flatten (``(B, C, H, W) -> (B, C*H*W)``: ``rep = H*W``).
member   a place the surgery must touch: a constant indexed along one dim (a producer's
         weight along its out-dim, a consumer's weight along its in-dim, BatchNorm and
         LayerNorm parameters, depthwise weights, constant operands of elementwise ops)
         or a shape argument (view/reshape/expand sizes, split sizes, slice bounds, the
         ``groups`` of a depthwise convolution).

The analysis is one forward walk in topological order: every producer starts a layout;
channel-preserving ops carry it (activations, dropout, BatchNorm, pooling, elementwise ops
with broadcasting, transpose/permute, view/reshape/flatten, depthwise convolutions); ops
joining two layouts position-wise (add, mul, matmul/attention batch dims) merge their
groups; ``cat`` concatenates pieces; split/slice take sub-ranges; a convolution or linear
layer reading a layout is a *consumer* (its input channels are indexed) and starts a new
space of its own.

Refusals (a group that is refused keeps all its channels; the reason is recorded):
- a layout reaching the graph output (output shapes never change) or meeting, position-wise,
  channels no producer owns (a graph input, an embedding, a non-constant tensor);
- an op not known to preserve channels (the default for anything not listed), a reduction,
  softmax, LayerNorm (unless allowed: pruning changes its statistics) or a pooling window
  over the channel axis, a matmul contracting the channels of two activations;
- a grouped convolution (``1 < groups < channels``) reading or producing the channels;
- a view/reshape that splits or merges the channel axis other than C -> (H, D), (H, D) -> C,
  C x spatial -> flattened and back, and grouped-query attention's repeat of whole heads
  (H, n_rep) -> H * n_rep; a slice with a step or a cut inside a head (slices, splits and
  reshapes of the head dim itself are within each head and carry the head layout on);
- two different channel ranges tied together (e.g. q/k/v split out of one fused linear).

Exactness: the surgery keeps a subset of each group's channels. Since every removed
position only ever flows, position-wise, into consumers (convolution/linear input channels,
matmul contractions with a constant), the pruned model computes exactly what the original
computes with the consumers' weights for the removed channels set to zero -- the
statement :func:`optc.passes.prune_channels.zero_removed_channels` builds and the tests
check. LayerNorm over pruned channels breaks that statement, which is why it is refused
unless asked for (``inexact`` notes).

Modules: ``model.py`` (pieces, layouts, members, spaces, groups), ``nodes.py`` (the op families
and how nodes are read), ``graph.py`` (:class:`ChannelGraph`: the walk, the op -> handler table,
union-find and refusals), ``flow.py`` and ``layers.py`` (the op handlers). The pruning passes
(``passes/prune_channels.py``) plan and apply the surgery on the result of :func:`analyze`.
"""

from __future__ import annotations

import torch.fx as fx

from optc.ir.channel_deps.graph import OP_HANDLERS, ChannelGraph
from optc.ir.channel_deps.model import Group, Layout, ParamUse, Piece, ShapeUse, Space
from optc.ir.channel_deps.nodes import get_arg, set_arg


def analyze(gm: fx.GraphModule, *, log_refusals: bool = True) -> ChannelGraph:
    """The channel groups of ``gm`` and every member the surgery must touch."""
    return ChannelGraph(gm, log_refusals=log_refusals)


__all__ = ["OP_HANDLERS", "ChannelGraph", "Group", "Layout", "ParamUse", "Piece", "ShapeUse", "Space", "analyze",
           "get_arg", "set_arg"]
