"""Model statistics: parameters, FLOPs and bytes per layer and in total.

    stats = model_stats(program)
    print(format_stats(stats))
    print(format_stats_diff(model_stats(before), model_stats(after)))

One row per *layer op* (convolution, linear, matmul/bmm/mm, attention, BatchNorm,
LayerNorm, embedding), named by its module path (``layer1.0.conv1``) and keyed by its node
name (stable across passes, so two programs diff row by row); every other op is summed
into one ``(other ops)`` row.

- ``params``: elements of the ``nn.Parameter`` constants the op reads (BatchNorm running
  statistics are buffers: counted in bytes, not in params);
- ``flops``: ``2 * MACs`` for convolutions (``out_numel * in_channels/groups * kernel``),
  linear (``out_numel * in_features``), matmuls (``out_numel * K``) and attention (the two
  matmuls); 0 for everything else (elementwise work is memory-bound and not counted);
- ``weight_bytes``: bytes of every constant the op reads (parameters and buffers);
- ``act_bytes``: bytes of the op's output.

Totals count each constant once (shared weights). Symbolic dims count with their example
size (the hint).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from optc.ir.printer import op_name
from optc.ir.program import Program, get_attr
from optc.ir.queries import module_path

aten = torch.ops.aten

_CONVS = {aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten._convolution}
_CONV_T = {aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d}
_MATMUL = {aten.matmul, aten.bmm, aten.mm, aten.addmm, aten.baddbmm}
_LAYER_OPS = _CONVS | _CONV_T | _MATMUL | {
    aten.linear, aten.scaled_dot_product_attention, aten.batch_norm, aten._native_batch_norm_legit_no_training,
    aten.layer_norm, aten.embedding, aten.group_norm}


@dataclass
class StatRow:
    name: str          # module path, or the node name
    node: str
    op: str
    params: int = 0
    flops: int = 0
    weight_bytes: int = 0
    act_bytes: int = 0


@dataclass
class ModelStats:
    rows: list[StatRow] = field(default_factory=list)
    total: StatRow = field(default_factory=lambda: StatRow("total", "", ""))

    def row(self, node: str) -> StatRow:
        return next(r for r in self.rows if r.node == node)


def _size(d) -> int:
    if isinstance(d, int):
        return d
    if isinstance(d, torch.SymInt):
        v = d.node.maybe_as_int()
        if v is not None:
            return int(v)
        hint = getattr(d.node, "hint", None)
        return int(hint) if hint is not None else 1
    return int(d)


def _numel(t) -> int:
    n = 1
    for d in t.shape:
        n *= _size(d)
    return n


def _nbytes(val) -> int:
    return sum(_numel(t) * t.element_size() for t in tree_flatten(val)[0] if isinstance(t, torch.Tensor))


def _val(a):
    return a.meta.get("val") if isinstance(a, fx.Node) else None


def _macs(node: fx.Node) -> int:
    t = node.target
    pk = t.overloadpacket if isinstance(t, torch._ops.OpOverload) else t
    out = node.meta.get("val")
    if not isinstance(out, torch.Tensor) and pk is not aten.scaled_dot_product_attention:
        return 0
    a = node.args
    if pk in _CONVS or pk in _CONV_T:
        w = _val(a[1])
        transposed = pk in _CONV_T or (pk in (aten.convolution, aten._convolution) and len(a) > 6 and a[6] is True)
        per = _numel(w) // _size(w.shape[0])            # (in/groups)*k for a conv, (out/groups)*k transposed
        return (_numel(_val(a[0])) if transposed else _numel(out)) * per
    if pk is aten.linear:
        return _numel(out) * _size(_val(a[1]).shape[-1])
    if pk in _MATMUL:
        x = _val(a[1] if pk in (aten.addmm, aten.baddbmm) else a[0])
        return _numel(out) * _size(x.shape[-1])
    if pk is aten.scaled_dot_product_attention:
        q, k, v = (_val(x) for x in a[:3])
        batch_l = _numel(q) // _size(q.shape[-1])        # (..., L)
        s = _size(k.shape[-2])
        return batch_l * s * (_size(q.shape[-1]) + _size(v.shape[-1]))
    if getattr(pk, "_qualified_op_name", None) in _ORT_ATTENTION:
        # ONNX Runtime's fused attention as optc writes it: query [B, S, N*H], key/value [B, T, Nkv*H]
        # (or [B, N, T, H]): every query head against T keys, twice (scores, then values)
        q, k = _val(a[0]), _val(a[1])
        t = _size(k.shape[1] if k.dim() == 3 else k.shape[-2])
        return _numel(q) * t * 2
    return 0


_ORT_ATTENTION = ("optc::ort_multihead_attention", "optc::ort_group_query_attention")


def model_stats(program: Program | fx.GraphModule) -> ModelStats:
    gm = program.graph_module if isinstance(program, Program) else program
    stats = ModelStats()
    other = StatRow("(other ops)", "", "")
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        t = node.target
        pk = t.overloadpacket if isinstance(t, torch._ops.OpOverload) else t
        params = wbytes = 0
        for a in tree_flatten((node.args, node.kwargs))[0]:
            if isinstance(a, fx.Node) and a.op == "get_attr":
                obj = get_attr(gm, a.target)
                if isinstance(obj, torch.Tensor):
                    wbytes += obj.numel() * obj.element_size()
                    if isinstance(obj, torch.nn.Parameter):
                        params += obj.numel()
                    if a.target not in seen:
                        seen.add(a.target)
                        stats.total.weight_bytes += obj.numel() * obj.element_size()
                        stats.total.params += obj.numel() if isinstance(obj, torch.nn.Parameter) else 0
        row = StatRow(_layer_name(node), node.name, op_name(node), params, 2 * _macs(node), wbytes,
                      _nbytes(node.meta.get("val")))
        stats.total.flops += row.flops
        stats.total.act_bytes += row.act_bytes
        if pk in _LAYER_OPS or row.flops:
            stats.rows.append(row)
        else:
            other.params += row.params
            other.weight_bytes += row.weight_bytes
            other.act_bytes += row.act_bytes
    stats.rows.append(other)
    return stats


def _layer_name(node: fx.Node) -> str:
    path = module_path(node)
    return path if isinstance(path, str) and path else node.name


# ---- formatting -------------------------------------------------------------------------------
def human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000 or suffix == "T":
            return (f"{n:.0f}" if suffix == "" else f"{n:.3g}") + suffix + unit
        n /= 1000
    return str(n)


def human_bytes(n: float, sep: str = "") -> str:
    """``512B``, ``1.5KiB``, ``2.3MiB`` (binary units, 3 significant digits); ``sep`` goes between
    the number and the unit (``optc compile``'s report uses ``" "``)."""
    for suffix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or suffix == "TiB":
            return f"{n:.0f}{sep}{suffix}" if suffix == "B" else f"{n:.3g}{sep}{suffix}"
        n /= 1024
    return str(n)


def format_stats(stats: ModelStats) -> str:
    lines = [f"{'layer':<34} {'op':<28} {'params':>9} {'FLOPs':>9} {'weights':>10} {'activations':>11}"]
    for r in stats.rows + [stats.total]:
        lines.append(f"{r.name[:34]:<34} {r.op[:28]:<28} {human(r.params):>9} {human(r.flops):>9} "
                     f"{human_bytes(r.weight_bytes):>10} {human_bytes(r.act_bytes):>11}")
    return "\n".join(lines)


def _ratio(a: int, b: int) -> str:
    if a == b:
        return "="
    return f"{b / a:.2f}x" if a else "new"


def format_stats_diff(before: ModelStats, after: ModelStats) -> str:
    """Per layer and in total: params, FLOPs, weight and activation bytes before -> after."""
    head = (f"{'layer':<30} {'op':<22} {'params':>19} {'FLOPs':>21} {'weights':>23} {'activations':>23}")
    lines = [head]

    def cell(a: int, b: int, fmt) -> str:
        return f"{fmt(a)}->{fmt(b)} {_ratio(a, b)}" if a != b else f"{fmt(a)} ="

    after_rows = {r.node: r for r in after.rows if r.node}
    done = set()
    for r in before.rows + [before.total]:
        if r.node:
            s = after_rows.get(r.node)
            done.add(r.node)
        elif r is before.total:
            s = after.total
        else:
            s = next(x for x in after.rows if not x.node)
        if s is None:
            lines.append(f"{r.name[:30]:<30} {r.op[:22]:<22} (removed)")
            continue
        lines.append(f"{r.name[:30]:<30} {r.op[:22]:<22} {cell(r.params, s.params, human):>19} "
                     f"{cell(r.flops, s.flops, human):>21} {cell(r.weight_bytes, s.weight_bytes, human_bytes):>23} "
                     f"{cell(r.act_bytes, s.act_bytes, human_bytes):>23}")
    for node, s in after_rows.items():
        if node not in done:
            lines.append(f"{s.name[:30]:<30} {s.op[:22]:<22} (new) params {human(s.params)}, FLOPs {human(s.flops)}")
    return "\n".join(lines)
