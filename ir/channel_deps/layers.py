"""Op handlers of the channel-dependency analysis for the ops that own or read channels: convolutions
and linear layers (producers of a space, consumers of their input's), BatchNorm and LayerNorm,
matmuls and attention (which tie heads and batch dims together).

A handler takes the analysis and a node whose inputs' layouts are known and returns the layout of
its result, records the members the surgery must touch, or raises :class:`Refused`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from optc.ir.channel_deps.model import Layout, ParamUse, Piece, Refused, ShapeUse
from optc.ir.channel_deps.nodes import (SIZED_RESHAPES, SPLITS, arg_key, const_positions, conv_groups, is_const,
                                        norm_dim, packet, rank_of, shape_of, static)
from optc.ir.rewrite import arg

if TYPE_CHECKING:
    from optc.ir.channel_deps.graph import ChannelGraph

aten = torch.ops.aten


def on_layer(cg: ChannelGraph, node: fx.Node, layer) -> Layout | None:
    x = node.args[0]
    lin = cg.layouts.get(x) if isinstance(x, fx.Node) else None
    others = [l for l in cg.input_layouts(node) if l is not lin]
    if others:
        cg.refuse(others, node, "channels flow into a layer's weight or bias")
    w, b = layer.weight, layer.bias
    wkey, bkey = arg_key(node, 1, "weight"), arg_key(node, 2, "bias")
    consts = is_const(w) and w.meta["val"].is_floating_point() and (b is None or is_const(b))
    rank = rank_of(node)
    if layer.kind == "linear":
        if lin is not None:
            if lin.axis == rank_of(x) - 1 and consts:
                cg.params.append(ParamUse(node, wkey, 1, lin, "consumer"))
            else:
                cg.refuse([lin], node, "a linear layer with non-constant weights reads the channels"
                          if lin.axis == rank_of(x) - 1 else "a linear layer runs over another axis")
        if not consts:
            return None
        bounds = [0, *_split_points(node, rank - 1, layer.out_channels), layer.out_channels]
        out = Layout(rank - 1, tuple(Piece(cg.new_space(node, b - a, offset=a if len(bounds) > 2 else None), 0, b - a)
                                     for a, b in zip(bounds, bounds[1:])))
        cg.params.append(ParamUse(node, wkey, 0, out, "producer"))
        if b is not None:
            cg.params.append(ParamUse(node, bkey, 0, out, "producer"))
        return out
    groups = conv_groups(node)
    ch = layer.channel_axis
    cin = static(shape_of(x)[ch]) if isinstance(x, fx.Node) else None
    if not isinstance(groups, int) or cin is None:
        cg.refuse([lin], node, "convolution groups or channels are not constants")
        return None
    if layer.kind == "conv" and groups == cin and groups > 1:
        # depthwise (channel multiplier m): output channel c*m + j reads input channel c only
        if lin is None:
            return None
        if lin.axis != ch or lin.sub_axis is not None or any(p.per != 1 for p in lin.pieces) or not consts:
            raise Refused("a depthwise convolution reads channels in an unsupported layout")
        mult = layer.out_channels // cin
        out = Layout(ch, tuple(Piece(p.space, p.start, p.stop, 1, p.rep * mult) if p.space is not None
                               else Piece(None, 0, p.stop * mult) for p in lin.pieces))
        cg.params.append(ParamUse(node, wkey, 0, out, "depthwise"))
        if b is not None:
            cg.params.append(ParamUse(node, bkey, 0, out, "depthwise"))
        gkey = arg_key(node, 8 if node.target in (aten.convolution.default, aten._convolution.default) else 6,
                       "groups")
        cg.shapes.append(ShapeUse(node, "groups", lin, key=gkey))
        return out
    w_in, w_out = (0, 1) if layer.kind == "conv_transpose" else (1, 0)
    if lin is not None:
        if lin.axis != ch:
            cg.refuse([lin], node, "a convolution runs over the channel axis")
        elif groups != 1:
            cg.refuse([lin], node, f"a grouped convolution (groups={groups}) reads the channels")
        elif not consts:
            cg.refuse([lin], node, "a convolution with non-constant weights reads the channels")
        else:
            cg.params.append(ParamUse(node, wkey, w_in, lin, "consumer"))
    if groups != 1 or not consts:
        return None
    out = Layout(ch, (Piece(cg.new_space(node, layer.out_channels), 0, layer.out_channels),))
    cg.params.append(ParamUse(node, wkey, w_out, out, "producer"))
    if b is not None:
        cg.params.append(ParamUse(node, bkey, 0, out, "producer"))
    return out


def _heads_view_cuts(cur: fx.Node, axis: int, size: int) -> list[int] | None:
    """Falcon's fused projection: viewed as ``[..., H, D]`` (its only user), and that read only as
    slices and constant indexes of consecutive heads (the query heads, then the key head, the value
    head): the channel cuts at those parts' bounds. None where the output is not read that way."""
    if len(cur.users) != 1 or axis != rank_of(cur) - 1:
        return None
    v = next(iter(cur.users))
    out = shape_of(v) if packet(v) in SIZED_RESHAPES else ()
    if len(out) != rank_of(cur) + 1 or static(out[-2]) is None or static(out[-1]) is None or \
            static(out[-2]) * static(out[-1]) != size or \
            [static(x) for x in out[:-2]] != [static(x) for x in shape_of(cur)[:-1]]:
        return None
    n_heads, d = static(out[-2]), static(out[-1])
    h_axis = len(out) - 2
    cuts: set[int] = set()
    for u in v.users:
        if u.target is aten.slice.Tensor and norm_dim(arg(u, 1, "dim", 0), len(out)) == h_axis and \
                arg(u, 4, "step", 1) == 1:
            bounds = [arg(u, 2, "start", None), arg(u, 3, "end", None)]
        elif u.target is aten.index.Tensor and len(u.args[1]) == h_axis + 1 and \
                all(t is None for t in u.args[1][:-1]) and \
                (pos := const_positions(u.args[1][-1], n_heads)) is not None:
            bounds = [min(pos), max(pos) + 1] if pos else []
        else:
            return None
        for b in bounds:
            if isinstance(b, int):
                cuts.add(min(max(norm_dim(b, n_heads), 0), n_heads) * d)
    return sorted(c for c in cuts if 0 < c < size)


def _split_points(node: fx.Node, axis: int, size: int) -> list[int]:
    """Where the users of a linear layer's output split its channels (a fused projection: GPT-2's
    ``c_attn`` split into q, k and v, Phi-3's ``qkv_proj`` sliced into them, a fused gate/up): the
    interior cut points of ``split``/``chunk``/``slice`` users along the channel axis, reached
    through views and unsqueezes that keep it last (GPT-BigCode's ``c_attn`` is unsqueezed first).
    Each part becomes a space of its own (as if the layer were one linear per part), so that parts
    tied position-wise (q, k and v heads at the attention) form a group instead of being refused as
    different ranges of one space."""
    cur = node
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        uv = u.meta.get("val")
        if (packet(u) not in SIZED_RESHAPES and u.target is not aten.unsqueeze.default) or \
                not isinstance(uv, torch.Tensor) or uv.dim() < 1 or \
                static(uv.shape[-1]) != size or axis != rank_of(cur) - 1:
            break
        cur, axis = u, uv.dim() - 1
    cuts: set[int] = set()
    heads = _heads_view_cuts(cur, axis, size)
    if heads is not None:
        return heads
    for u in cur.users:
        if packet(u) in SPLITS and norm_dim(arg(u, 2, "dim", 0), rank_of(cur)) == axis:
            pos = 0
            for o in u.meta["val"][:-1]:
                pos += static(o.shape[axis]) or 0
                cuts.add(pos)
        elif u.target is aten.slice.Tensor and norm_dim(arg(u, 1, "dim", 0), rank_of(cur)) == axis and \
                arg(u, 4, "step", 1) == 1:
            for b in (arg(u, 2, "start", None), arg(u, 3, "end", None)):
                if isinstance(b, int):
                    cuts.add(min(max(norm_dim(b, size), 0), size))
        else:
            return []                    # the whole projection is read somewhere: one space
    return sorted(c for c in cuts if 0 < c < size)


def on_batch_norm(cg: ChannelGraph, node: fx.Node, bn) -> Any:
    lay = cg.layouts.get(bn.input) if isinstance(bn.input, fx.Node) else None
    others = [l for l in cg.input_layouts(node) if l is not lay]
    if lay is None or others:
        raise Refused("channels flow into a BatchNorm's statistics or parameters")
    if lay.axis == 1:
        for i, name, n in ((1, "weight", bn.weight), (2, "bias", bn.bias), (3, "running_mean", bn.mean),
                           (4, "running_var", bn.var)):
            if n is None:
                continue
            if not is_const(n):
                raise Refused(f"BatchNorm {name} is not a constant")
            cg.params.append(ParamUse(node, arg_key(node, i, name), 0, lay, "bn"))
    if isinstance(node.meta["val"], (tuple, list)):
        return (lay,) + (None,) * (len(node.meta["val"]) - 1)
    return lay


def on_layer_norm(cg: ChannelGraph, node: fx.Node) -> Layout:
    """LayerNorm and RMSNorm: over other dims, or within each head (Qwen3's and OLMo's q/k norms over the
    head dim: whole heads removed leave the others' statistics alone), the layout carries on; over the
    channels it is inexact (pruning changes the statistics)."""
    lay = cg.only_input(node)
    rank = rank_of(node)
    shape = list(node.args[1])
    first = rank - len(shape)
    if lay.axis < first and (lay.sub_axis is None or lay.sub_axis < first or
                             (lay.whole_heads and lay.sub_axis == rank - 1 and len(shape) == 1)):
        return lay
    kind = "RMSNorm" if node.target is aten.rms_norm.default else "LayerNorm"
    if len(shape) != 1 or lay.axis != rank - 1:
        raise Refused(f"a {kind} normalises over the channels together with other dims")
    for i, name in ((2, "weight"), (3, "bias"))[:1 if kind == "RMSNorm" else 2]:
        n = arg(node, i, name)
        if n is None:
            continue
        if not is_const(n):
            raise Refused(f"{kind} {name} is not a constant")
        cg.params.append(ParamUse(node, arg_key(node, i, name), 0, lay, "ln"))
    cg.shapes.append(ShapeUse(node, "normalized_shape", lay, key=1))
    note = f"{kind} %{node.name} normalises over the channels: pruning changes its statistics"
    for p in lay.pieces:
        if p.space is not None and note not in cg.root(p.space).inexact:
            cg.root(p.space).inexact.append(note)
    return lay


def on_matmul(cg: ChannelGraph, node: fx.Node) -> Layout | None:
    a, b = node.args[0], node.args[1]
    la, lb = cg.layouts.get(a), cg.layouts.get(b)
    ra, rb, ro = rank_of(a), rank_of(b), rank_of(node)
    if ra < 2 or rb < 2:
        raise Refused("a matrix-vector product reads the channels")
    cands: list[Layout] = []
    sub = None
    if la is not None:
        if la.axis == ra - 1:
            if is_const(b):
                cg.params.append(ParamUse(node, 1, rb - 2, la, "consumer"))
            else:
                raise Refused("a matmul contracts the channels of two activations")
        else:
            cands.append(la.moved(la.axis + ro - ra, None))
            if la.sub_axis is not None and la.sub_axis != ra - 1:
                sub = la.sub_axis + ro - ra
    if lb is not None:
        if lb.axis == rb - 2:
            if is_const(a):
                cg.params.append(ParamUse(node, 0, ra - 1, lb, "consumer"))
            else:
                raise Refused("a matmul contracts the channels of two activations")
        else:
            cands.append(lb.moved(lb.axis + ro - rb, None))
            if lb.sub_axis is not None and lb.sub_axis != rb - 2:
                s = lb.sub_axis + ro - rb
                if sub is not None and sub != s:
                    raise Refused("head dims of a matmul do not line up")
                sub = s
    if not cands:
        return None
    if len({c.axis for c in cands}) > 1:
        raise Refused("a matmul combines channels on different axes")
    merged = cands[0]
    for c in cands[1:]:
        merged = cg.unify(merged, c, node)
    if merged.axis < ro - 2:           # a batch dim: the other operand must broadcast or carry it
        for t, lt, rt in ((a, la, ra), (b, lb, rb)):
            if lt is None or lt.axis >= rt - 2:
                d = merged.axis - (ro - rt)
                if d >= 0 and static(shape_of(t)[d]) != 1:
                    raise Refused(f"a matmul batches channels with %{t.name}, whose channels no producer owns")
    return Layout(merged.axis, merged.pieces, sub)


def _one_head_broadcast(t: fx.Node, heads: int) -> list[tuple[fx.Node, int]] | None:
    """Where ``t`` ([B, H, T, D], read as SDPA's key or value) has its ``heads`` heads from one
    key/value head, repeated -- multi-query attention, written as HF's ``repeat_kv`` with one
    key/value head (GPT-BigCode): ``reshape(expand(x[B, 1, 1, T, D], [B, 1, H, T, D]), [B, H, T,
    D])`` -- the ``(node, sizes index)`` entries that spell ``H``; None otherwise."""
    if packet(t) not in SIZED_RESHAPES or rank_of(t) < 3:
        return None
    e = t.args[0]
    if isinstance(e, fx.Node) and e.op == "call_function" and e.target == aten.clone.default:
        e = e.args[0]
    if not (isinstance(e, fx.Node) and e.op == "call_function" and e.target == aten.expand.default):
        return None
    src, mid, out = shape_of(e.args[0]), shape_of(e), shape_of(t)
    r = len(out)
    d = r - 3                                        # the heads dim of t, (1, H) in the expand
    if len(mid) != r + 1 or len(src) != r + 1 or static(out[d]) != heads or \
            [static(x) for x in mid[d:d + 2]] != [1, heads] or static(src[d + 1]) != 1 or \
            [static(x) for x in mid[:d]] != [static(x) for x in out[:d]] or \
            [static(x) for x in mid[d + 2:]] != [static(x) for x in out[d + 1:]]:
        return None
    sizes_e, sizes_t = e.args[1], t.args[1]
    if not (isinstance(sizes_e, (list, tuple)) and isinstance(sizes_t, (list, tuple)) and
            isinstance(sizes_e[d + 1], int) and isinstance(sizes_t[d], int)):
        return None
    return [(e, d + 1), (t, d)]


def on_sdpa(cg: ChannelGraph, node: fx.Node) -> Layout:
    q, k, v = node.args[:3]
    mask = arg(node, 3, "attn_mask", None)
    lays = []
    one_head = []          # multi-query attention: the key/value tensors of one head, broadcast
    for t in (q, k, v):
        lt = cg.layouts.get(t)
        r = rank_of(t)
        if lt is None and t is not q and t in cg.one_head and lays and lays[0].axis == r - 3 and \
                static(shape_of(t)[r - 3]) == static(shape_of(q)[r - 3]):
            # one key/value head broadcast to every query head on the heads axis (Falcon's
            # multi-query attention; flow.on_expand kept the head whole)
            one_head.append((None, cg.one_head[t]))
            continue
        if lt is None:
            raise Refused(f"attention mixes heads with %{t.name}, whose heads no producer owns")
        if t is not q and lt.axis == r - 3 and lays and lays[0].axis == r - 3 and lt.size == 1 and \
                static(shape_of(t)[r - 3]) == 1 and (static(shape_of(q)[r - 3]) or 0) > 1:
            # one key/value head that the attention broadcasts to every query head itself (a size-1
            # heads dim: Falcon's multi-query attention with transformers' sdpa attention)
            one_head.append((lt, []))
            continue
        if t is not q and lt.axis == r - 1 and lays and lays[0].axis == r - 3:
            # the key/value channels are one head's dims: every query head reads that one head
            # (multi-query attention). The query heads prune alone; the key/value head stays
            # whole, and the sizes that repeat it follow the query heads kept
            n_q = static(shape_of(q)[r - 3])
            gqa_one = arg(node, 7, "enable_gqa", False) and static(shape_of(t)[r - 3]) == 1
            spelled = None if gqa_one else _one_head_broadcast(t, n_q)
            if gqa_one or spelled is not None:
                one_head.append((lt, spelled or []))
                continue
        if lt.axis >= r - 2:
            raise Refused("attention reads channels on its sequence or feature axis")
        if t is not q and arg(node, 7, "enable_gqa", False) and lt.size != lays[0].size:
            # grouped-query attention: query head h reads key/value head h // n_rep
            n_rep = lays[0].size // lt.size if lt.size else 0
            if lt.axis != lays[0].axis or not n_rep or n_rep * lt.size != lays[0].size:
                raise Refused("grouped-query attention's key/value heads do not divide the query heads")
            lt = cg.repeat_heads(lt, n_rep, lt.axis, lt.sub_axis, node)
        lays.append(lt)
    merged = lays[0]
    for other in lays[1:]:
        merged = cg.unify(merged, other, node)
    for lt, spelled in one_head:
        cg.refuse([lt], node, "the one key/value head of multi-query attention is read by every query head")
        for n, i in spelled:
            cg.shapes.append(ShapeUse(n, "sizes", Layout(i, merged.pieces), key=1, index=i))
    if isinstance(mask, fx.Node):
        if cg.layouts.get(mask) is not None:
            raise Refused("channels flow into an attention mask")
        d = merged.axis - (rank_of(q) - rank_of(mask))
        if d >= 0 and static(shape_of(mask)[d]) != 1:
            if static(shape_of(mask)[d]) != merged.size:
                raise Refused(f"an attention mask %{mask.name} is per head")
            # a bias per head (T5's relative bias, BEiT's and Swin's position tables): this attention
            # reads the kept heads' rows of it (an index_select inserted for it alone: the bias may
            # be shared by other layers, which keep other heads)
            cg.shapes.append(ShapeUse(node, "select", merged, key=arg_key(node, 3, "attn_mask"), index=d))
    if len(lays) == 3:
        sub = lays[2].sub_axis if lays[2].sub_axis == rank_of(v) - 1 else None
    else:                  # the value is the one shared head: the output's last dim is within each head
        sub = rank_of(v) - 1
    return Layout(merged.axis, merged.pieces, None if sub is None else rank_of(node) - 1)


def on_rotary(cg: ChannelGraph, node: fx.Node) -> Layout:
    """``optc::rotary_embedding(x, cos, sin)`` mixes positions only along the last (within-head)
    dim: channels on a head axis pass unchanged; channels on the last dim, or cos/sin that vary
    along the channel axis, are refused."""
    x, cos, sin = node.args[:3]
    lay = cg.layouts.get(x)
    if lay is None or any(cg.layouts.get(t) is not None for t in (cos, sin) if isinstance(t, fx.Node)):
        raise Refused("channels flow into the angles of a rotary embedding")
    r = rank_of(x)
    if lay.axis == r - 1:
        raise Refused("a rotary embedding rotates pairs of the channel axis")
    for t in (cos, sin):
        d = lay.axis - (r - rank_of(t))
        if d >= 0 and static(shape_of(t)[d]) != 1:
            raise Refused(f"the rotary angles %{t.name} vary along the channel axis")
    return lay
