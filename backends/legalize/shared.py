"""Legalizations that more than one backend runs.

``add-alpha-as-mul`` (TVM, TorchScript) and ``adaptive-max-pool-as-max-pool`` (ONNX, TVM).
"""

from __future__ import annotations

import operator

import torch.fx as fx

from optc.backends.legalize.common import Legalization, MatchResult, aten, static_shape, val
from optc.backends.legalize.torchscript import adaptive_windows

_ALPHA_OPS = {aten.add.Tensor: aten.add.Tensor, aten.sub.Tensor: aten.sub.Tensor,
              aten.add.Scalar: aten.add.Tensor, aten.sub.Scalar: aten.sub.Tensor}


class AddAlphaAsMul(Legalization):
    """``add/sub(x, y, alpha=a)`` -> ``add/sub(x, y * a)``: TVM 0.27's importer drops ``alpha``
    (``torch.add(x, y, alpha=0.5)`` ran as ``x + y``), and so does TorchScript's
    ``optimize_for_inference`` for ``add(y, y, alpha=a)`` where ``y`` is a convolution's output
    (torch 2.13.0 returns ``2a*y`` instead of ``(1+a)*y``; found by optc fuzz): silent miscompiles."""

    name = "add-alpha-as-mul"
    backends = ("tvm", "torchscript")
    targets = tuple(_ALPHA_OPS)

    def check(self, node):
        return None if node.kwargs.get("alpha", 1) == 1 else MatchResult.success()

    def apply(self, node, m):
        x, y = node.args[:2]
        alpha = node.kwargs["alpha"]
        y = self.emit(node, aten.mul.Tensor, (y, alpha)) if isinstance(y, fx.Node) else operator.mul(y, alpha)
        self.replace(node, self.emit(node, _ALPHA_OPS[node.target], (x, y)))


class AdaptiveMaxPoolAsMaxPool(Legalization):
    """``adaptive_max_pool2d`` with its indices unused -> ``max_pool2d`` with kernel = stride =
    input / output where the input is a multiple of the output (the same windows), else a
    separable max: along H, one ``amax`` per output row over its window, concatenated, then the
    same along W (a max over a rectangle is the max over its rows of the max over its columns;
    windows may overlap or, for an output larger than the input, repeat). Neither TVM 0.27's
    importer nor torch 2.13's ONNX exporter translates the adaptive op (the exporter raised a
    DispatchError on a 1x1 -> 2x2 pool, found by optc fuzz)."""

    name = "adaptive-max-pool-as-max-pool"
    backends = ("onnx", "tvm")
    targets = (aten.adaptive_max_pool2d.default,)

    def check(self, node):
        xs = static_shape(val(node.args[0]))
        out = val(node)
        ys = static_shape(out[0] if isinstance(out, (tuple, list)) else None)
        if xs is None or ys is None or len(xs) < 3:
            return MatchResult.fail("dynamic shape")
        users = [u for u in node.users if u.users or not (u.op == "call_function" and u.target is operator.getitem)]
        if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in users):
            return MatchResult.fail("its indices are used")
        return MatchResult.success(xs=xs, ys=ys, users=users)

    def apply(self, node, m):
        xs, (oh, ow), users = m["xs"], m["ys"][-2:], m["users"]
        h, w = xs[-2:]
        g = self.gm.graph
        for u in list(node.users):   # the getitems of the indices nobody reads
            if u not in users:
                g.erase_node(u)
        x = node.args[0]
        if h % oh == 0 and w % ow == 0:
            k = [h // oh, w // ow]
            new = self.emit(node, aten.max_pool2d.default, (x, k, k))
        else:
            new, rank = x, len(xs)
            for dim, size, osize in ((rank - 2, h, oh), (rank - 1, w, ow)):
                windows = adaptive_windows(size, osize)
                if osize == size and all(e - s == 1 for s, e in windows):
                    continue   # the identity along this axis
                parts = [self.emit(node, aten.amax.default, (self.emit(node, aten.slice.Tensor, (new, dim, s, e)),
                                                              [dim], True)) for s, e in windows]
                new = parts[0] if len(parts) == 1 else self.emit(node, aten.cat.default, (parts, dim))
            if new is x:
                new = self.emit(node, aten.clone.default, (x,))
        for u in users:
            u.replace_all_uses_with(new)
            g.erase_node(u)
        g.erase_node(node)


RULES = (AddAlphaAsMul, AdaptiveMaxPoolAsMaxPool)
