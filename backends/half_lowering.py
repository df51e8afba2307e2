"""Half-precision compute a backend's library cannot run, rewritten on the backend's private copy of
the graph into float32 compute between casts.

    y = conv/linear/matmul(x, w, b)    (half)     ==>    y = to(conv/linear/matmul(to(x, f32), to(w, f32),
                                                                                  to(b, f32)), half)

The float32 op computes on the same half-rounded values and its result is rounded to half once,
as a half kernel that accumulates in float32 does (torch's CPU kernels do): the same function up
to the order of accumulation. Casts of constant weights fold at compile time in both libraries.
Where it is used (each a gap in the library, not a choice):

- TVM 0.27: ``from_exported_program`` builds conv / linear / matmul with ``out_dtype="float32"``
  whatever their input type, so the half bias it adds next does not type-check -- for float16 and
  bfloat16 alike (:data:`TVM`);
So a half program runs on TVM with its conv / linear / matmul in float32: correct, and never
faster than float32 there.

ONNX Runtime 1.32 (CPU) has almost no bfloat16 kernels (ONNX has no bfloat16 Conv or MaxPool at
all; ORT implements no bfloat16 Gemm, MatMul, Sqrt... on CPU: ``NOT_IMPLEMENTED``), so on ONNX a
bfloat16 program is lowered by :func:`bfloat16_as_rounded_float32` (:data:`ONNX`): every value in
float32, rounded to bfloat16 after each op -- the bfloat16 program's numbers, computed in float32
(slower than float32: the rounding casts come on top). float16 needs neither: ORT has float16
kernels (or inserts its own casts around the ops that lack one). docs/quantization.md has the
measurements.
"""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten

_HALF_COMPUTE = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
                 aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input,
                 aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default,
                 aten.baddbmm.default)


def _dtype(a):
    v = a.meta.get("val") if isinstance(a, fx.Node) else None
    return v.dtype if isinstance(v, torch.Tensor) else None


def half_compute_in_float32(gm: fx.GraphModule, dtypes: tuple[torch.dtype, ...]) -> int:
    """Rewrite every conv / linear / matmul of ``gm`` whose result has a type in ``dtypes``; returns
    how many."""
    graph = gm.graph
    n = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _HALF_COMPUTE:
            continue
        half = _dtype(node)
        if half not in dtypes:
            continue
        with graph.inserting_before(node):
            def up(a):
                if isinstance(a, fx.Node) and _dtype(a) == half:
                    c = graph.call_function(aten.to.dtype, (a, torch.float32))
                    c.meta["val"] = a.meta["val"].to(torch.float32)
                    return c
                return a
            node.args = tuple(up(a) for a in node.args)
            node.kwargs = {k: up(v) for k, v in node.kwargs.items()}
        node.meta["val"] = node.meta["val"].to(torch.float32)
        with graph.inserting_after(node):
            down = graph.call_function(aten.to.dtype, (node, half))
        node.replace_all_uses_with(down, delete_user_cb=lambda u: u is not down)
        down.meta["val"] = node.meta["val"].to(half)
        n += 1
    if n:
        graph.lint()
        gm.recompile()
    return n


def tvm_half_in_float32(gm: fx.GraphModule) -> int:
    return half_compute_in_float32(gm, (torch.float16, torch.bfloat16))


def bfloat16_as_rounded_float32(gm: fx.GraphModule) -> int:
    """Every bfloat16 value of ``gm`` held as a float32 value rounded to bfloat16: an op that
    produced bfloat16 now computes in float32 (its inputs are float32 now) and its result is
    rounded (a cast to bfloat16 and back); a cast into bfloat16 keeps rounding and is followed by
    the cast back; casts out of bfloat16 become no-ops. The same numbers as the bfloat16 program,
    op by op, up to each op's order of accumulation. Returns how many ops were rewritten."""
    graph = gm.graph
    bf16, f32 = torch.bfloat16, torch.float32
    n = 0

    def redirect(node: fx.Node, new: fx.Node, *own: fx.Node) -> None:
        node.replace_all_uses_with(new, delete_user_cb=lambda u: u not in own)

    for node in list(graph.nodes):
        if _dtype(node) != bf16 or node.op not in ("placeholder", "call_function", "get_attr"):
            continue
        is_cast = node.op == "call_function" and node.target in (aten.to.dtype, aten._to_copy.default)
        if node.op == "call_function" and not is_cast:
            node.meta["val"] = node.meta["val"].to(f32)    # computes in float32 now; round its result
            with graph.inserting_after(node):
                down = graph.call_function(aten.to.dtype, (node, bf16))
            down.meta["val"] = node.meta["val"].to(bf16)
            src, own = down, (down,)
        else:                                          # a bf16 input, constant or cast: already rounded
            src, own = node, ()
        with graph.inserting_after(src):
            up = graph.call_function(aten.to.dtype, (src, f32))
        up.meta["val"] = src.meta["val"].to(f32)
        redirect(node, up, up, *own)
        n += 1
    if n:
        graph.lint()
        gm.recompile()
    return n


__all__ = ["half_compute_in_float32", "tvm_half_in_float32", "bfloat16_as_rounded_float32"]
