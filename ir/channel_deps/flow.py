"""Op handlers of the channel-dependency analysis for ops that carry channels on (or refuse them):
pointwise and elementwise ops, views and reshapes, permutes, expand, concatenation and stacking,
split/slice/select, reductions, softmax, pooling and padding windows.

A handler takes the analysis and a node whose inputs' layouts are known and returns the layout of
its result (a tuple of layouts for ops returning several tensors, None when no channels flow on),
records the members the surgery must touch, or raises :class:`Refused`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from optc.ir.channel_deps.model import Layout, ParamUse, Piece, Refused, ShapeUse, merge_pieces
from optc.ir.channel_deps.nodes import (PADS, SIZED_RESHAPES, const_positions, indexed_args, is_const,
                                        is_tensor_node, norm_dim, packet, rank_of, reshape_groups, shape_of,
                                        spatial_dims, static)
from optc.ir.rewrite import arg

if TYPE_CHECKING:
    from optc.ir.channel_deps.graph import ChannelGraph

aten = torch.ops.aten


def on_unary(cg: ChannelGraph, node: fx.Node) -> Any:
    """Activations, dropout, clones, casts, asserts: the layout of the data input, unchanged."""
    lay = cg.layouts.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    if lay is None:
        raise Refused("channels flow into an argument that is not the data input")
    return (lay, lay) if packet(node) is aten.native_dropout else lay


def on_elementwise(cg: ChannelGraph, node: fx.Node) -> Layout:
    out_rank = rank_of(node)
    out_shape = shape_of(node)
    tensors = [(k, a) for k, a in indexed_args(node) if is_tensor_node(a)]
    lays = []
    for k, a in tensors:
        lay = cg.layouts.get(a)
        if lay is not None:
            off = out_rank - rank_of(a)
            lays.append(lay.moved(lay.axis + off, None if lay.sub_axis is None else lay.sub_axis + off))
    axes = {l.axis for l in lays}
    if not lays:
        raise Refused("channels flow into a non-tensor argument")
    if len(axes) > 1:
        raise Refused("channels of different axes meet")
    merged = lays[0]
    for other in lays[1:]:
        merged = cg.unify(merged, other, node)
    for k, a in tensors:
        if cg.layouts.get(a) is not None:
            continue
        off = out_rank - rank_of(a)
        d = merged.axis - off
        if d < 0 or static(shape_of(a)[d]) == 1:
            continue                                     # broadcast along the channels
        if is_const(a) and static(shape_of(a)[d]) == static(out_shape[merged.axis]):
            cg.params.append(ParamUse(node, k, d, merged, "operand"))
            continue
        cg.refuse([merged], node, f"channels meet %{a.name}, whose channels no producer owns")
    return merged


def _repeated_along(x, dims) -> bool:
    """``x`` is an ``expand`` (through a ``clone``) that broadcast every one of ``dims`` from 1."""
    if isinstance(x, fx.Node) and x.op == "call_function" and x.target == torch.ops.aten.clone.default:
        x = x.args[0]
    if not (isinstance(x, fx.Node) and x.op == "call_function" and x.target == torch.ops.aten.expand.default):
        return False
    src = shape_of(x.args[0])
    return bool(dims) and len(src) == len(shape_of(x)) and all(static(src[d]) == 1 for d in dims)


def on_reshape(cg: ChannelGraph, node: fx.Node) -> Layout:
    lay = cg.only_input(node)
    x = node.args[0]
    ins, outs = shape_of(x), shape_of(node)
    groups = reshape_groups(ins, outs)
    if groups is None:
        raise Refused("a reshape with symbolic sizes moves the channel axis")
    where = {d: g for g in groups for d in g[0]}
    gi, go = where[lay.axis]
    non1_in = [d for d in gi if static(ins[d]) != 1]
    non1_out = [d for d in go if static(outs[d]) != 1]
    sub = lay.sub_axis
    new_sub: int | None = None
    if sub is not None and sub not in gi:
        _, sgo = where[sub]
        s_out = [d for d in sgo if static(outs[d]) != 1]
        if not s_out:
            raise Refused("a reshape drops the head dim")
        new_sub = s_out[0]        # reshaped within each head: the head axis is untouched
    if non1_in == [lay.axis] and len(non1_out) == 1:
        res = Layout(non1_out[0], lay.pieces, new_sub)
    elif len(non1_out) == 1 and non1_in and non1_in[0] == lay.axis:
        inner = math.prod(static(ins[d]) for d in non1_in[1:])
        if sub is None and all(p.per == 1 for p in lay.pieces):
            pieces = tuple(Piece(p.space, p.start, p.stop, 1, p.rep * inner) if p.space is not None
                           else Piece(None, 0, p.stop * inner) for p in lay.pieces)
            res = Layout(non1_out[0], pieces)
        elif sub is not None and non1_in == [lay.axis, sub] and all(p.rep == 1 for p in lay.pieces):
            # heads back into channels: channel for channel where the head dim is whole; else (each
            # head's fused q/k/v split along it) head for head, ``inner`` positions each
            pieces = tuple(Piece(None, 0, p.stop * inner) if p.space is None else
                           Piece(p.space, p.start, p.stop) if p.per == inner else
                           Piece(p.space, p.start, p.stop, p.per, inner) for p in lay.pieces)
            res = Layout(non1_out[0], pieces)
        elif len(non1_in) == 2 and _repeated_along(x, non1_in[1:]) and any(p.per > 1 for p in lay.pieces):
            # grouped-query attention's repeat_kv (unsqueeze, expand, reshape): every key/value head
            # serves ``inner`` query heads; the key/value heads are tied to the query heads they serve
            res = cg.repeat_heads(lay, inner, non1_out[0], new_sub, node)
        else:
            raise Refused("a reshape merges the channel axis with other dims")
    elif non1_in == [lay.axis] and len(non1_out) >= 2 and sub is None and \
            all(p.per == 1 and p.rep == 1 for p in lay.pieces):
        # channels into heads: (H, D), or (H, 3, D) (BLOOM's fused q/k/v per head; the last dim is
        # the head dim the layout follows, the others are within each head too)
        h_axis, d_axis = non1_out[0], non1_out[-1]
        dsz = math.prod(static(outs[d]) for d in non1_out[1:])
        pieces, pos = [], 0
        for p in lay.pieces:
            n = p.positions
            if pos % dsz or n % dsz or (p.space is not None and p.start % dsz):
                raise Refused(f"a reshape into heads of {dsz} cuts a concatenated piece")
            pos += n
            if p.space is None:
                pieces.append(Piece(None, 0, n // dsz))
            else:
                sp = cg.root(p.space)
                sp.block = sp.block * dsz // math.gcd(sp.block, dsz)
                sp.heads = True
                pieces.append(Piece(p.space, p.start, p.stop, dsz, 1))
        res = Layout(h_axis, tuple(pieces), d_axis)
    elif non1_in == [lay.axis] and len(non1_out) >= 2 and sub is None and all(p.per == 1 for p in lay.pieces) \
            and all(p.rep == math.prod(static(outs[d]) for d in non1_out[1:])
                    for p in lay.pieces if p.space is not None):
        r = math.prod(static(outs[d]) for d in non1_out[1:])
        if any(p.space is None and p.stop % r for p in lay.pieces):
            raise Refused("a reshape unflattens a concatenation unevenly")
        pieces = tuple(Piece(p.space, p.start, p.stop) if p.space is not None else Piece(None, 0, p.stop // r)
                       for p in lay.pieces)
        res = Layout(non1_out[0], pieces)
    else:
        raise Refused("a reshape splits or merges the channel axis")
    pk = packet(node)
    if pk in SIZED_RESHAPES or pk is aten.unflatten:
        key, base = (2, norm_dim(node.args[1], len(outs))) if pk is aten.unflatten else (1, 0)
        sizes = node.args[key]
        idx = res.axis - base
        if not isinstance(sizes, (list, tuple)) or not (0 <= idx < len(sizes)) or \
                not isinstance(sizes[idx], int):
            raise Refused("the channel size of a reshape is not a constant")
        cg.shapes.append(ShapeUse(node, "sizes", res, key=key, index=idx))
    return res


def on_permute(cg: ChannelGraph, node: fx.Node) -> Layout:
    lay = cg.only_input(node)
    rank = rank_of(node)
    pk = packet(node)
    if pk is aten.permute:
        perm = [norm_dim(d, rank) for d in node.args[1]]
    elif pk is aten.movedim:
        src, dst = node.args[1], node.args[2]
        src = [src] if isinstance(src, int) else list(src)
        dst = [dst] if isinstance(dst, int) else list(dst)
        src = [norm_dim(d, rank) for d in src]
        dst = [norm_dim(d, rank) for d in dst]
        rest = [d for d in range(rank) if d not in src]
        perm = [None] * rank
        for s, d in zip(src, dst):
            perm[d] = s
        it = iter(rest)
        perm = [p if p is not None else next(it) for p in perm]
    else:
        d0, d1 = (0, 1) if pk is aten.t else (norm_dim(node.args[1], rank), norm_dim(node.args[2], rank))
        perm = list(range(rank))
        if rank >= 2 or pk is not aten.t:
            perm[d0], perm[d1] = perm[d1], perm[d0]
    sub = None if lay.sub_axis is None else perm.index(lay.sub_axis)
    return Layout(perm.index(lay.axis), lay.pieces, sub)


def on_expand(cg: ChannelGraph, node: fx.Node) -> Layout | None:
    lay = cg.only_input(node)
    off = rank_of(node) - rank_of(node.args[0])
    res = lay.moved(lay.axis + off, None if lay.sub_axis is None else lay.sub_axis + off)
    if static(shape_of(node)[res.axis]) != lay.size:
        sizes = node.args[1]
        if lay.size == 1 and static(shape_of(node.args[0])[lay.axis]) == 1 and off == 0 and \
                isinstance(sizes[res.axis], int) and sizes[res.axis] > 1:
            # one head broadcast to many (Falcon's multi-query key/value: expand(k, [-1, H, -1, -1])):
            # the head stays whole; an attention reading the result takes the query heads alone
            # (layers.on_sdpa) and has this size follow them
            cg.refuse([lay], node, "the one key/value head of multi-query attention is read by every query head")
            cg.one_head[node] = [(node, res.axis)]
            return None
        raise Refused("an expand broadcasts the channel axis")
    sizes = node.args[1]
    if isinstance(sizes[res.axis], int) and sizes[res.axis] != -1:
        cg.shapes.append(ShapeUse(node, "sizes", res, key=1, index=res.axis))
    elif not isinstance(sizes[res.axis], int):
        raise Refused("the channel size of an expand is not a constant")
    return res


def on_cat(cg: ChannelGraph, node: fx.Node) -> Layout:
    rank = rank_of(node)
    # an empty 1-d operand (torch's legacy cat rule: a key/value cache's first update) adds nothing
    tensors = [t for t in node.args[0] if not (rank_of(t) == 1 != rank and static(shape_of(t)[0]) == 0)]
    dim = norm_dim(arg(node, 1, "dim", 0), rank)
    lays = [cg.layouts.get(t) for t in tensors]
    present = [l for l in lays if l is not None]
    if any(l.axis == dim for l in present):
        if any(l.axis != dim for l in present):
            raise Refused("a concatenation mixes channel axes")
        subs = {l.sub_axis for l in present}
        if len(subs) > 1:
            raise Refused("a concatenation mixes head layouts")
        pieces = []
        for t, l in zip(tensors, lays):
            pieces.extend(l.pieces if l is not None else (Piece(None, 0, static(shape_of(t)[dim])),))
        if any(p.per > 1 for p in pieces) and any(p.space is None for p in pieces):
            raise Refused("a concatenation mixes heads with other tensors")
        return Layout(dim, merge_pieces(pieces), subs.pop())
    merged = present[0]
    for other in present[1:]:
        merged = cg.unify(merged, other, node)
    for t, l in zip(tensors, lays):
        if l is None:
            cg.refuse([merged], node, f"channels are concatenated with %{t.name}, whose channels no "
                                      "producer owns")
    return merged


def on_stack(cg: ChannelGraph, node: fx.Node) -> Layout:
    tensors = node.args[0]
    rank = rank_of(node)
    dim = norm_dim(arg(node, 1, "dim", 0), rank)
    lays = [cg.layouts.get(t) for t in tensors]
    if any(l is None for l in lays):
        raise Refused("channels are stacked with a tensor whose channels no producer owns")
    merged = lays[0]
    for other in lays[1:]:
        merged = cg.unify(merged, other, node)
    shift = lambda a: a if a is None or a < dim else a + 1  # noqa: E731
    return Layout(shift(merged.axis), merged.pieces, shift(merged.sub_axis))


def on_split(cg: ChannelGraph, node: fx.Node) -> tuple:
    lay = cg.only_input(node)
    rank = rank_of(node.args[0])
    dim = norm_dim(arg(node, 2, "dim", 0), rank)        # split, split_with_sizes and chunk alike
    outs = node.meta["val"]
    if dim != lay.axis:
        if dim == lay.sub_axis and not lay.whole_heads:
            raise Refused("a split cuts the head dim")
        return tuple(lay for _ in outs)       # within each head (partial rotary, a per-head q/k/v split)
    res, pos, ranges = [], 0, []
    for o in outs:
        n = static(o.shape[dim])
        sl = cg.slice_layout(lay, pos, pos + n, node)
        if sl is None:
            raise Refused("a split cuts inside a flattened channel")
        res.append(sl)
        ranges.append((pos, pos + n))
        pos += n
    cg.shapes.append(ShapeUse(node, "split", lay, ranges=tuple(ranges)))
    return tuple(res)


def on_slice(cg: ChannelGraph, node: fx.Node) -> Layout:
    lay = cg.only_input(node)
    rank = rank_of(node.args[0])
    dim = norm_dim(arg(node, 1, "dim", 0), rank)
    size = static(shape_of(node.args[0])[dim])
    if dim != lay.axis:
        if dim == lay.sub_axis and not lay.whole_heads:
            raise Refused("a slice cuts the head dim")
        return lay                            # within each head (partial rotary, interleaved halves)
    if packet(node) is aten.narrow:
        start, length = node.args[2], node.args[3]
        if not isinstance(start, int) or not isinstance(length, int):
            raise Refused("a narrow of the channels has symbolic bounds")
        start = norm_dim(start, size)
        end, step = start + length, 1
    else:
        start, end, step = arg(node, 2, "start", None), arg(node, 3, "end", None), arg(node, 4, "step", 1)
        if not all(v is None or isinstance(v, int) for v in (start, end, step)):
            raise Refused("a slice of the channels has symbolic bounds")
        start = 0 if start is None else min(max(norm_dim(start, size), 0), size)
        end = size if end is None else min(max(norm_dim(end, size), 0), size)
    if step != 1:
        raise Refused("a strided slice of the channels")
    res = cg.slice_layout(lay, start, end, node)
    if res is None:
        raise Refused("a slice cuts inside a flattened channel")
    cg.shapes.append(ShapeUse(node, "slice", lay, ranges=((start, end),)))
    return res


def on_index(cg: ChannelGraph, node: fx.Node) -> Layout:
    """``x[..., idx]`` (``aten.index.Tensor``) with one constant index tensor of consecutive
    positions on the channel axis and none elsewhere -- Falcon's ``fused[:, :, [H]]`` picking its
    key head out of the per-head fused projection: a slice of those positions, whose constant is
    rewritten after pruning."""
    lay = cg.only_input(node)
    indices = node.args[1]
    rank = rank_of(node.args[0])
    used = [i for i, t in enumerate(indices) if t is not None]
    if used != [lay.axis] or len(indices) > rank:
        raise Refused("an index picks channels")
    t = indices[lay.axis]
    size = static(shape_of(node.args[0])[lay.axis])
    val = t.meta.get("val") if isinstance(t, fx.Node) else None
    pos = const_positions(t, size) if isinstance(val, torch.Tensor) and val.dim() == 1 and size else None
    if not pos:
        raise Refused("an index picks channels with a tensor that is not a constant list of positions")
    if pos != list(range(pos[0], pos[0] + len(pos))):
        raise Refused("an index picks channels out of order")
    res = cg.slice_layout(lay, pos[0], pos[-1] + 1, node)
    if res is None:
        raise Refused("an index cuts inside a flattened channel")
    cg.shapes.append(ShapeUse(node, "index", lay, index=lay.axis, ranges=((pos[0], pos[-1] + 1),)))
    return res


def on_select(cg: ChannelGraph, node: fx.Node) -> Any:
    lay = cg.only_input(node)
    rank = rank_of(node.args[0])
    dim = norm_dim(node.args[1], rank)
    if dim in (lay.axis, lay.sub_axis):
        raise Refused("an index/select picks channels")
    pk = packet(node)
    if pk is aten.index_select:
        return lay
    down = lambda a: a if a is None or a < dim else a - 1  # noqa: E731
    res = Layout(down(lay.axis), lay.pieces, down(lay.sub_axis))
    return tuple(res for _ in node.meta["val"]) if pk is aten.unbind else res


def on_reduction(cg: ChannelGraph, node: fx.Node) -> Any:
    lay = cg.only_input(node)
    rank = rank_of(node.args[0])
    dims = arg(node, 2, "dim", None) if packet(node) is aten.norm else arg(node, 1, "dim", None)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        raise Refused("a reduction over all dims includes the channels")
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not all(isinstance(d, int) for d in dims):
        raise Refused("a reduction over symbolic dims")
    dims = [norm_dim(d, rank) for d in dims]
    if lay.axis in dims:
        raise Refused("a reduction runs over the channels")
    val = node.meta["val"]
    keep = (val[0] if isinstance(val, (tuple, list)) else val).dim() == rank
    shift = lambda a: a if a is None or keep else a - sum(1 for d in dims if d < a)  # noqa: E731
    sub = None if lay.sub_axis in dims else shift(lay.sub_axis)
    res = Layout(shift(lay.axis), lay.pieces, sub)
    return tuple(res for _ in node.meta["val"]) if isinstance(node.meta["val"], (tuple, list)) else res


def on_softmax(cg: ChannelGraph, node: fx.Node) -> Layout:
    """Softmax and cumulative ops: refused over the channel axis, else the layout carries on."""
    lay = cg.only_input(node)
    if norm_dim(node.args[1], rank_of(node)) == lay.axis:
        raise Refused("a softmax/cumulative op runs over the channels")
    return lay


def on_window(cg: ChannelGraph, node: fx.Node) -> Any:
    """Pooling, resampling and padding: refused when their window covers the channel axis."""
    pk = packet(node)
    lay = cg.only_input(node)
    rank = rank_of(node.args[0])
    k = (len(node.args[1]) // 2) if pk in PADS else spatial_dims(node)
    if lay.axis >= rank - k or (lay.sub_axis is not None and lay.sub_axis >= rank - k):
        raise Refused("a pooling/padding window covers the channel axis")
    return (lay, lay) if isinstance(node.meta["val"], (tuple, list)) else lay
