"""The channel-dependency analysis: :class:`ChannelGraph`, one forward walk over the graph in
topological order, dispatching each call to the handler of its op (:data:`OP_HANDLERS`, op packet
-> handler; convolutions, linear layers and BatchNorms are recognised by their views first),
merging spaces into groups (union-find) and recording refusals.
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

import optc.ir.ops  # noqa: F401  (registers the optc:: ops the table names)
from optc.ir.channel_deps import flow, layers
from optc.ir.channel_deps.layers import on_batch_norm, on_layer
from optc.ir.channel_deps.model import (Group, Layout, ParamUse, Piece, Refused, ShapeUse, Space, flat_layouts,
                                        merge_pieces)
from optc.ir.channel_deps.nodes import (ELEMENTWISE, MATMULS, PADS, REDUCTIONS, RESHAPES, SOFTMAX, SPATIAL, SPLITS,
                                        UNARY, packet)
from optc.ir.printer import op_name
from optc.ir.queries import layer_name
from optc.ir.views import as_batch_norm, as_layer

log = logging.getLogger(__name__)
aten = torch.ops.aten


def _op_handlers() -> dict[Any, Callable]:
    """op packet -> handler. Where two families name the same packet, the one listed first wins."""
    table: dict[Any, Callable] = {}
    for ops, handler in (
            (UNARY, flow.on_unary),
            (ELEMENTWISE, flow.on_elementwise),
            ((aten.layer_norm, aten.rms_norm), layers.on_layer_norm),
            (RESHAPES, flow.on_reshape),
            ((aten.transpose, aten.t, aten.permute, aten.swapaxes, aten.movedim), flow.on_permute),
            ((aten.expand,), flow.on_expand),
            ((aten.cat, aten.concat), flow.on_cat),
            ((aten.stack,), flow.on_stack),
            (SPLITS, flow.on_split),
            ((aten.slice, aten.narrow), flow.on_slice),
            ((aten.select, aten.index_select, aten.unbind), flow.on_select),
            ((aten.index,), flow.on_index),
            (REDUCTIONS, flow.on_reduction),
            (SOFTMAX, flow.on_softmax),
            (SPATIAL, flow.on_window),
            (PADS, flow.on_window),
            (MATMULS, layers.on_matmul),
            ((aten.scaled_dot_product_attention,), layers.on_sdpa),
            ((torch.ops.optc.rotary_embedding,), layers.on_rotary)):
        for op in ops:
            table.setdefault(op, handler)
    return table


#: how each op the analysis knows carries, ties or refuses channels; any other op refuses them
OP_HANDLERS: dict[Any, Callable] = _op_handlers()


class ChannelGraph:
    """The result of :func:`analyze`: spaces, groups, per-node layouts and the members."""

    def __init__(self, gm: fx.GraphModule, *, log_refusals: bool = True):
        self.gm = gm
        self.spaces: list[Space] = []
        self.layouts: dict[fx.Node, Any] = {}
        self.params: list[ParamUse] = []
        self.shapes: list[ShapeUse] = []
        self.producers: dict[fx.Node, int] = {}   # producer node -> its space
        #: a one-head key/value broadcast to every query head (flow.on_expand) -> the (node, sizes
        #: index) entries that spell the query head count, for the attention that reads it
        self.one_head: dict[fx.Node, list[tuple[fx.Node, int]]] = {}
        self._log = log_refusals
        self._run()
        self.groups = self._groups()

    # -- union-find --
    # Weighted: a space's ``mult`` is how many of its heads share one head of its parent (grouped-query
    # attention: a key/value head serves ``n_rep`` query heads); the root of a group is its coarsest
    # space, and a group's channels are counted in the root's coordinates.
    def find(self, s: int) -> int:
        path = []
        while self.spaces[s].parent != s:
            path.append(s)
            s = self.spaces[s].parent
        for x in reversed(path):          # closest to the root first: its parent is compressed already
            sp = self.spaces[x]
            if sp.parent != s:
                sp.mult *= self.spaces[sp.parent].mult
                sp.parent = s
        return s

    def mult(self, s: int) -> int:
        """How many heads of space ``s`` share one head of its group's root."""
        return 1 if self.find(s) == s else self.spaces[s].mult

    def _union(self, a: int, b: int, ratio: int = 1, unit: int | None = None) -> str | None:
        """Tie space ``a`` to space ``b``, ``a`` having ``ratio`` heads (of ``unit`` channels) per head of
        ``b``; returns why they cannot be tied, or None."""
        ra, rb = self.find(a), self.find(b)
        num, den = ratio * self.mult(b), self.mult(a)       # heads of root(a) per head of root(b)
        if ra == rb:
            return None if num == den else "grouped-query heads are tied with two different ratios"
        if num % den and den % num:
            return "grouped-query heads are tied with ratios that do not divide"
        k = num // den if num % den == 0 else den // num
        if (k == 1 and rb < ra) or (k > 1 and num % den == 0):
            ra, rb = rb, ra                                 # ra becomes the root: the coarser space
        A, B = self.spaces[ra], self.spaces[rb]
        units = {u for u in (A.unit, B.unit, unit if k > 1 else None) if u is not None}
        if len(units) > 1:
            return "grouped-query heads of different sizes are tied"
        if k > 1 and any(sp.cuts for sp in (A, B)):
            return "slices of grouped-query heads are not supported"
        B.parent, B.mult = ra, k
        A.unit = units.pop() if units else None
        A.block = A.block * B.block // math.gcd(A.block, B.block)
        A.heads = A.heads or B.heads
        A.cuts |= B.cuts
        A.reasons += B.reasons
        A.inexact += B.inexact
        return None

    def root_channels(self, s: int, chans: torch.Tensor) -> torch.Tensor:
        """Channels ``chans`` of space ``s`` in its root's coordinates."""
        m = self.mult(s)
        if m == 1:
            return chans
        u = self.root(s).unit
        return torch.div(chans, m * u, rounding_mode="floor") * u + chans % u

    def root(self, s: int) -> Space:
        return self.spaces[self.find(s)]

    # -- refusals, spaces and layouts (used by the op handlers) --
    def refuse(self, layouts: Iterable[Layout | None], node: fx.Node | None, why: str) -> None:
        """Make every group with channels in ``layouts`` unprunable, for ``why`` at ``node``."""
        where = f"%{node.name} ({op_name(node)})" if node is not None and node.op == "call_function" else \
            (f"%{node.name}" if node is not None else "")
        reason = f"{why} at {where}" if where else why
        for lay in layouts:
            if lay is None:
                continue
            for p in lay.pieces:
                if p.space is not None:
                    r = self.root(p.space)
                    if reason not in r.reasons:
                        r.reasons.append(reason)
                        if self._log:
                            log.debug("group of %s: unprunable: %s", r.producer.name, reason)

    def new_space(self, producer: fx.Node, size: int, offset: int | None = None) -> int:
        """A new space: the ``size`` output channels of ``producer`` (from ``offset`` on, for one part of
        a fused projection whose parts are split apart)."""
        sid = len(self.spaces)
        self.spaces.append(Space(sid, size, producer, layer_name(producer), sid, offset=offset))
        self.producers[producer] = sid
        return sid

    def unify(self, a: Layout, b: Layout, node: fx.Node) -> Layout:
        """Tie two layouts position-wise (same output axis); returns the merged layout."""
        if a.size != b.size:
            self.refuse([a, b], node, "channel axes of different sizes meet")
            return a
        cuts_a, cuts_b, pos = [], [], 0
        for p in a.pieces:
            pos += p.positions
            cuts_a.append(pos)
        pos = 0
        for p in b.pieces:
            pos += p.positions
            cuts_b.append(pos)
        if cuts_a != cuts_b:
            self.refuse([a, b], node, "concatenations with different boundaries meet")
            return a
        for p, q in zip(a.pieces, b.pieces):
            if p.space is None and q.space is None:
                continue
            if p.space is None or q.space is None:
                own = q if p.space is None else p
                self.refuse([Layout(a.axis, (own,))], node, "channels meet channels no producer owns (an input, an "
                                                            "embedding or a non-constant tensor)")
                continue
            if (p.per, p.rep) != (q.per, q.rep):
                self.refuse([a, b], node, "channels meet with different head/flatten structure")
                continue
            fp = p.start == 0 and p.stop == self.spaces[p.space].size
            fq = q.start == 0 and q.stop == self.spaces[q.space].size
            if fp and fq:
                why = self._union(p.space, q.space)
                if why:
                    self.refuse([a, b], node, why)
            elif not (self.find(p.space) == self.find(q.space) and (p.start, p.stop) == (q.start, q.stop)
                      and self.mult(p.space) == self.mult(q.space)):
                self.refuse([a, b], node, "different channel ranges are tied together (q/k/v split out of one "
                                           "fused projection: the model's own, as GPT-2's c_attn, or "
                                           "merge-parallel-linear's, which pruning must run before)")
        if a.sub_axis is not None and b.sub_axis is not None and a.sub_axis != b.sub_axis:
            self.refuse([a, b], node, "head axes do not line up")
        return Layout(a.axis, a.pieces, a.sub_axis if a.sub_axis is not None else b.sub_axis)

    def _cut(self, lay: Layout, node: fx.Node) -> None:
        for p in lay.pieces:
            if p.space is not None and (p.start != 0 or p.stop != self.spaces[p.space].size):
                if self.mult(p.space) != 1 or self.root(p.space).unit is not None:
                    self.refuse([lay], node, "slices of grouped-query heads are not supported")
                self.spaces[p.space].cuts.update((p.start, p.stop))
                r = self.root(p.space)
                r.cuts.update((p.start, p.stop))

    def slice_layout(self, lay: Layout, p0: int, p1: int, node: fx.Node) -> Layout | None:
        """Positions ``[p0, p1)`` of ``lay`` (the cut recorded), or None (refused) inside a flattened channel."""
        out, pos = [], 0
        for p in lay.pieces:
            n = p.positions
            a, b = max(p0, pos), min(p1, pos + n)
            if a < b:
                lo, hi = a - pos, b - pos
                if p.space is None:
                    out.append(Piece(None, 0, hi - lo))
                elif p.per == 1:
                    if lo % p.rep or hi % p.rep:
                        self.refuse([lay], node, "a slice cuts inside a flattened channel")
                        return None
                    out.append(Piece(p.space, p.start + lo // p.rep, p.start + hi // p.rep, 1, p.rep))
                else:
                    if lo % p.rep or hi % p.rep:
                        self.refuse([lay], node, "a slice cuts inside a head")
                        return None
                    out.append(Piece(p.space, p.start + lo // p.rep * p.per, p.start + hi // p.rep * p.per, p.per,
                                     p.rep))
            pos += n
        res = Layout(lay.axis, merge_pieces(out), lay.sub_axis)
        self._cut(res, node)
        return res

    def repeat_heads(self, lay: Layout, n_rep: int, axis: int, sub_axis: int | None, node: fx.Node) -> Layout:
        """The layout of heads repeated ``n_rep`` times each (grouped-query attention: position ``h`` of
        the result is head ``h // n_rep`` of ``lay``), on ``axis``: each piece of a space becomes a new
        virtual space of ``n_rep`` times its heads, tied to it."""
        pieces = []
        for p in lay.pieces:
            if p.space is None:
                pieces.append(Piece(None, 0, p.stop * n_rep))
                continue
            if p.per == 1 or p.rep != 1 or p.start != 0 or p.stop != self.spaces[p.space].size:
                raise Refused("grouped-query attention repeats channels that are not whole heads of one "
                              "projection")
            sid = len(self.spaces)
            self.spaces.append(Space(sid, p.stop * n_rep, node, layer_name(node), sid, block=p.per, heads=True,
                                     virtual=True))
            why = self._union(sid, p.space, n_rep, p.per)
            if why:
                raise Refused(why)
            pieces.append(Piece(sid, 0, p.stop * n_rep, p.per))
        return Layout(axis, tuple(pieces), sub_axis)

    # -- the walk --
    def _run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "output":
                outs = [self.layouts.get(a) for a in tree_flatten(node.args)[0] if isinstance(a, fx.Node)]
                self.refuse(flat_layouts(outs), node, "reaches the model output")
                continue
            if node.op != "call_function":
                continue
            try:
                self.layouts[node] = self._visit(node)
            except Refused as r:
                self.refuse(self.input_layouts(node), node, str(r))
                self.layouts[node] = None

    def input_layouts(self, node: fx.Node) -> list[Layout]:
        """The layouts of ``node``'s inputs, flattened."""
        return flat_layouts(self.layouts.get(a) for a in tree_flatten((node.args, node.kwargs))[0]
                            if isinstance(a, fx.Node))

    def _visit(self, node: fx.Node) -> Any:
        ins = self.input_layouts(node)
        layer = as_layer(node)
        if layer is not None:
            return on_layer(self, node, layer)
        if node.target is operator.getitem:
            src = self.layouts.get(node.args[0])
            if isinstance(src, tuple) and isinstance(node.args[1], int) and node.args[1] < len(src):
                return src[node.args[1]]
            if src is not None:
                raise Refused("indexing into a channel tensor")
            return None
        if not ins:
            return None
        val = node.meta.get("val")
        if not isinstance(val, (torch.Tensor, tuple, list)):
            return None   # sym_size, asserts: no data flows on
        bn = as_batch_norm(node)
        if bn is not None:
            return on_batch_norm(self, node, bn)
        handler = OP_HANDLERS.get(packet(node))
        if handler is None:
            raise Refused(f"{op_name(node)} is not known to preserve channels")
        return handler(self, node)

    def only_input(self, node: fx.Node) -> Layout:
        """The layout of ``node``'s data input (argument 0); refused when channels reach another argument."""
        x = node.args[0]
        lay = self.layouts.get(x) if isinstance(x, fx.Node) else None
        others = [l for l in self.input_layouts(node) if l is not lay]
        if lay is None or others:
            raise Refused("channels flow into an argument that is not the data input")
        return lay

    # producers and consumers

    # -- groups --
    def _groups(self) -> list[Group]:
        by_root: dict[int, Group] = {}
        for sp in self.spaces:
            r = self.find(sp.id)
            R = self.spaces[r]
            g = by_root.get(r)
            if g is None:
                g = by_root[r] = Group("", R.size, R.block, [], [], R.heads, (), list(R.reasons), list(R.inexact),
                                       root=r)
            if sp.virtual:
                continue
            g.leader = g.leader or (sp.producer.name if sp.offset is None else
                                    f"{sp.producer.name}[{sp.offset}:{sp.offset + sp.size}]")
            g.producers.append(sp.producer)
            g.layers.append(sp.name)
        for g in by_root.values():
            R = self.spaces[g.root]
            cuts = sorted(c for c in R.cuts if 0 < c < R.size)
            g.cuts = tuple(cuts)
            if R.size % R.block or any(c % R.block for c in cuts):
                g.reasons.append(f"heads of {R.block} channels do not tile the {R.size} channels")
            if R.unit is not None and R.block != R.unit:
                g.reasons.append(f"grouped-query heads of {R.unit} channels are pruned in blocks of {R.block}")
        return [g for g in by_root.values() if g.producers]

    # -- positions --
    def kept_positions(self, lay: Layout, kept: dict[int, list[int]]) -> list[int] | None:
        """Positions along ``lay``'s axis that survive when root space ``r`` keeps ``kept[r]``
        (absent: all); None when all survive."""
        out: list[int] = []
        pos, changed = 0, False
        for p in lay.pieces:
            n = p.positions
            keep = kept.get(self.find(p.space)) if p.space is not None else None
            if keep is None:
                out.extend(range(pos, pos + n))
            else:
                own = torch.arange(p.start, p.stop)
                hit = torch.isin(self.root_channels(p.space, own), torch.tensor(keep, dtype=torch.long))
                chans = own[hit].tolist()
                if p.per == 1:
                    out.extend(pos + (c - p.start) * p.rep + j for c in chans for j in range(p.rep))
                else:
                    out.extend(pos + (c - p.start) // p.per * p.rep + j for c in chans if (c - p.start) % p.per == 0
                               for j in range(p.rep))
                changed = changed or len(chans) != p.stop - p.start
            pos += n
        return out if changed else None

    def position_map(self, lay: Layout) -> list[tuple[int, torch.Tensor, torch.Tensor, float]]:
        """Where the positions of ``lay``'s axis live: per piece of a space, ``(root, positions,
        channels, share)`` -- position ``positions[i]`` holds channel ``channels[i]`` of the root
        (a head position holds ``per`` channels, each with ``share = 1/per`` of it)."""
        out, pos = [], 0
        for p in lay.pieces:
            n = p.positions
            if p.space is not None:
                r = self.find(p.space)
                k = torch.arange(p.stop - p.start)
                if p.per == 1:
                    j = torch.arange(n)
                    out.append((r, pos + j, self.root_channels(p.space, p.start + j // p.rep), 1.0))
                else:
                    for j in range(p.rep):
                        out.append((r, pos + k // p.per * p.rep + j, self.root_channels(p.space, p.start + k),
                                    1.0 / p.per))
            pos += n
        return out

    def describe(self) -> str:
        lines = []
        for g in self.groups:
            state = "prunable" if g.prunable else "refused: " + "; ".join(g.reasons[:2])
            if g.prunable and g.inexact:
                state = "prunable if LayerNorm statistics may change"
            lines.append(f"{g.leader}: {g.size} ch, block {g.block}, layers {', '.join(g.layers)}: {state}")
        return "\n".join(lines)
