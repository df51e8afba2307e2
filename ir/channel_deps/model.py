"""The data model of the channel-dependency analysis: layouts of a tensor's channel axis (pieces of
spaces), the members the surgery must touch, spaces and the groups they form.

See :mod:`optc.ir.channel_deps` for the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch.fx as fx


# ---- layouts --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    """Channels ``[start, stop)`` of space ``space`` laid out along an axis.

    ``space is None``: ``stop`` positions that belong to no prunable space (kept whole).
    ``per`` channels per position (heads), ``rep`` positions per channel (flatten); one is 1 -- or
    both above 1: heads merged back into channels with a head dim of ``rep`` positions that is
    not their ``per`` channels (GPT-NeoX splits each head's ``3D`` fused q/k/v channels into ``D``
    each): head ``h`` spans positions ``[h*rep, (h+1)*rep)``, which channel of it each holds unknown.
    """

    space: int | None
    start: int
    stop: int
    per: int = 1
    rep: int = 1

    @property
    def positions(self) -> int:
        n = self.stop - self.start
        if self.space is None:
            return n
        return n * self.rep if self.per == 1 else n // self.per * self.rep


@dataclass(frozen=True)
class Layout:
    axis: int
    pieces: tuple[Piece, ...]
    sub_axis: int | None = None       # the within-head axis when pieces have per > 1

    @property
    def size(self) -> int:
        return sum(p.positions for p in self.pieces)

    def moved(self, axis: int, sub_axis: int | None) -> "Layout":
        return Layout(axis, self.pieces, sub_axis)

    @property
    def whole_heads(self) -> bool:
        """Every channel is on a head axis (``per`` channels per position) with a head dim: ops within
        each head (slices, splits, reshapes and norms of the head dim) leave whole heads whole. A
        reshape that merges heads back into channels checks that the head dim is whole again."""
        return self.sub_axis is not None and all(p.per > 1 for p in self.pieces if p.space is not None)


def merge_pieces(pieces: Iterable[Piece]) -> tuple[Piece, ...]:
    """Adjacent pieces of one space (and runs of unowned positions) merged; empty pieces dropped."""
    out: list[Piece] = []
    for p in pieces:
        if p.positions == 0:
            continue
        if out:
            q = out[-1]
            if p.space is None and q.space is None:
                out[-1] = Piece(None, 0, q.stop + p.stop)
                continue
            if p.space is not None and p.space == q.space and q.stop == p.start and (p.per, p.rep) == (q.per, q.rep):
                out[-1] = Piece(p.space, q.start, p.stop, p.per, p.rep)
                continue
        out.append(p)
    return tuple(out)


@dataclass(frozen=True)
class ParamUse:
    """Constant argument ``key`` (an index into ``node.args`` or a kwarg name) of ``node``,
    whose dim ``dim`` follows ``layout``. ``role``: producer, consumer, bn, ln, depthwise, operand."""

    node: fx.Node
    key: int | str
    dim: int
    layout: Layout
    role: str


@dataclass(frozen=True)
class ShapeUse:
    """A shape argument of ``node`` that encodes a pruned size (see :func:`apply_shape_use`).

    ``kind``: ``sizes`` (view/reshape/expand sizes, entry ``index``), ``groups`` (depthwise
    conv), ``split`` (split sizes, position ranges ``ranges``), ``slice`` (bounds),
    ``normalized_shape`` (LayerNorm), ``index`` (the constant position list, entry ``index``, of
    an ``aten.index``: positions ``ranges``), ``select`` (argument ``key`` of ``node``, a tensor no
    producer owns whose dim ``index`` follows ``layout``, is read through an ``index_select`` of
    the kept positions: a per-head attention bias)."""

    node: fx.Node
    kind: str
    layout: Layout            # the layout whose kept positions define the new value
    key: int | str = 1
    index: int = 0
    ranges: tuple = ()


@dataclass
class Space:
    id: int
    size: int
    producer: fx.Node
    name: str
    parent: int
    block: int = 1
    heads: bool = False
    cuts: set = field(default_factory=set)
    reasons: list = field(default_factory=list)
    inexact: list = field(default_factory=list)
    # grouped-query attention ties a key/value head to ``mult`` query heads: head ``h`` of this space
    # (``unit`` channels each, ``unit`` set on the root) is head ``h // mult`` of its parent
    mult: int = 1
    unit: int | None = None
    virtual: bool = False      # a repeated key/value tensor's heads: no producer, no weights
    offset: int | None = None  # one part of a fused projection: its first output channel


@dataclass
class Group:
    """Spaces pruned together. ``prunable`` unless ``reasons``; ``inexact`` notes (LayerNorm
    statistics) make it prunable only when the pass allows it."""

    leader: str                      # the first producer's node name: the group's key in a plan
    size: int
    block: int
    producers: list                  # producer nodes, in graph order
    layers: list                     # their layer names
    heads: bool
    cuts: tuple
    reasons: list
    inexact: list
    root: int = -1

    @property
    def prunable(self) -> bool:
        return not self.reasons


def flat_layouts(items: Iterable[Any]) -> list[Layout]:
    """The layouts in ``items`` (layouts, None, and tuples/lists of them, as ops returning several
    tensors have), flattened."""
    out = []
    for it in items:
        if isinstance(it, Layout):
            out.append(it)
        elif isinstance(it, (tuple, list)):
            out.extend(flat_layouts(it))
    return out


class Refused(Exception):
    """Raised by an op handler: the channels reaching this op cannot be pruned (the message says why)."""
