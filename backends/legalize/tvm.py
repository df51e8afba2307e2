"""Legalizations for TVM (apache-tvm 0.27's ``relax.frontend.torch.from_exported_program`` and
its compiler).

=============================  ====================================================================
rule                           the bug or gap it avoids
=============================  ====================================================================
cat-drop-empty                 the importer rejects torch's legacy skip of ``[0]``-shaped ``cat``
                               operands; zero-element constants break the exported library
int-div-scalar-as-tensor       int64 ``x // 2``: the importer makes 2 an int32 constant
index-wrap-negative            ``index.Tensor`` reads a negative index out of bounds (silent)
index-add-one-hot-matmul       ``index_add`` of floats: the accumulating IndexPut races on
                               duplicate indices (a different wrong answer run to run)
index-put-full-indices         IndexPut wants one index per dim, adds duplicates wrongly with
                               ``None`` entries, does not broadcast values (silent)
cumsum-int64                   a bool/int32 ``cumsum`` keeps its dtype (LLVM aborts on bool)
diff-as-index-select           ``diff`` along a dynamic dim: the importer's slices get shapes it
                               cannot prove equal, the difference an unknown shape (no build)
amax-as-max-dim                no ``amax``/``amin`` translation
var-mean-as-two                no ``var_mean`` translation
sdpa-view-as-reshape           a ``view`` that relies on the memory layout of torch's CPU SDPA
                               kernel (``[B, S, N, H]``): the importer decomposes SDPA into
                               ops whose output is ``[B, N, S, H]``, and the ``view`` of its
                               transpose fails ("Cannot view a tensor ...")
(shared) add-alpha-as-mul      ``alpha`` of ``add``/``sub`` dropped (silent)
(shared) adaptive-max-pool...  no adaptive max pooling translation
=============================  ====================================================================
"""

from __future__ import annotations

import operator

import torch

from optc.backends.legalize.common import Legalization, MatchResult, aten, arg, fake_result, static_shape, val


class CatDropEmpty(Legalization):
    """``cat([e, x, ...], d)`` where ``e`` has no elements -> ``cat`` of the others (``clone`` of the
    one left). torch skips 1-d empty tensors in ``cat`` (a legacy rule transformers' key/value caches
    rely on: ``torch.cat([torch.tensor([]), k], dim=-2)``); TVM 0.27's importer rejects the call
    ("Concat expects all input tensors to have same ndim"). An empty operand of the same rank
    (``x.new_zeros((n, 0))``) is folded to a zero-element constant, which the library written by
    ``export_library`` cannot load back ("Invalid DLTensor file format")."""

    name = "cat-drop-empty"
    backends = ("tvm",)
    targets = (aten.cat.default,)

    def check(self, node):
        tensors = list(node.args[0])
        vals = [val(t) for t in tensors]
        if not all(isinstance(v, torch.Tensor) for v in vals):
            return None
        keep = [t for t, v in zip(tensors, vals) if not (static_shape(v) is not None and v.numel() == 0)]
        if len(keep) == len(tensors):
            return None
        if not keep:
            return MatchResult.fail("every operand is empty")
        return MatchResult.success(keep=keep)

    def apply(self, node, m):
        keep = m["keep"]
        new = self.emit(node, aten.clone.default, (keep[0],)) if len(keep) == 1 else \
            self.emit(node, aten.cat.default, (keep, *node.args[1:]), dict(node.kwargs))
        self.replace(node, new)


_INT_DIVS = (aten.floor_divide.default, aten.div.Tensor_mode, aten.div.Scalar_mode, aten.floor_divide.Scalar)


class IntDivScalarAsTensor(Legalization):
    """``x // c`` and ``div(x, c, rounding_mode=...)`` of an int64 ``x`` by a Python int ``c`` ->
    the same with ``c`` a 0-d int64 tensor: TVM 0.27's importer makes ``c`` an int32 constant and
    then rejects the int64 / int32 division ("Binary operators must have the same datatype";
    transformers' MoE routing writes ``perm // num_top_k``)."""

    name = "int-div-scalar-as-tensor"
    backends = ("tvm",)
    targets = _INT_DIVS

    def check(self, node):
        if len(node.args) < 2:
            return None
        x, c = node.args[:2]
        xv = val(x)
        if not isinstance(c, int) or isinstance(c, bool) or not isinstance(xv, torch.Tensor) or xv.dtype != torch.int64:
            return None
        return MatchResult.success(x=x, c=c)

    def apply(self, node, m):
        const = self.constant(node, "_optc_int_scalar", torch.tensor(m["c"], dtype=torch.int64))
        op = aten.div.Tensor_mode if node.target in (aten.div.Tensor_mode, aten.div.Scalar_mode) else \
            aten.floor_divide.default
        self.replace(node, self.emit(node, op, (m["x"], const, *node.args[2:]), dict(node.kwargs)))


def _index_dims(indices) -> list[int]:
    return [d for d, i in enumerate(indices) if i is not None]


class IndexWrapNegative(Legalization):
    """``index(x, [..., i, ...])`` and ``index_put(x, [..., i, ...], v)`` -> the same with ``i``
    replaced by ``where(i < 0, i + x.size(d), i)`` for every integer index ``i`` (on dim ``d``) that
    is not a constant without negative entries: TVM 0.27 lowers ``index.Tensor`` to a ``take`` that
    reads a negative index out of bounds (``x[:, :, [-2]]``, as HF Falcon writes its key slice,
    returned garbage and NaN: a silent miscompile)."""

    name = "index-wrap-negative"
    backends = ("tvm",)
    targets = (aten.index.Tensor, aten.index_put.default)

    def check(self, node):
        x, indices = node.args[0], list(node.args[1])
        xv = val(x)
        if not isinstance(xv, torch.Tensor):
            return None
        wrap = []
        for d, i in enumerate(indices):
            iv = val(i)
            if not isinstance(iv, torch.Tensor) or iv.dtype in (torch.bool, torch.uint8) or d >= xv.dim():
                continue
            if i.meta.get("optc_rule") == self.name:
                continue          # wrapped already
            if i.op == "get_attr":
                from optc.ir.rewrite import attr_value
                if not bool((attr_value(i) < 0).any()):
                    continue
            wrap.append(d)
        return MatchResult.success(wrap=wrap) if wrap else None

    def apply(self, node, m):
        x, indices = node.args[0], list(node.args[1])
        xv = val(x)
        for d in m["wrap"]:
            i = indices[d]
            size = xv.shape[d]
            size = size.node.maybe_as_int() if isinstance(size, torch.SymInt) else int(size)
            if size is None:
                size = self.emit(node, aten.sym_size.int, (x, d))
            neg = self.emit(node, aten.lt.Scalar, (i, 0))
            indices[d] = self.emit(node, aten.where.self, (neg, self.emit(node, aten.add.Tensor, (i, size)), i))
        node.update_arg(1, indices)


class IndexAddAsOneHotMatmul(Legalization):
    """``index_add(x, d, i, src)`` of floats -> ``x + onehot(i)^T @ src`` along dim ``d`` (moved first,
    the other dims flattened): TVM 0.27 lowers it to an accumulating IndexPut whose parallel loop
    adds duplicate indices without atomics, so a MoE-style ``out.index_add_(0, tokens, ys)`` with a
    token chosen twice gives a different wrong answer from run to run (caught by optc's compile
    check about one compile in five). The matmul sums each target row's sources in one fixed order;
    only rounding differs from torch's sequential adds."""

    name = "index-add-one-hot-matmul"
    backends = ("tvm",)
    targets = (aten.index_add.default,)

    def check(self, node):
        x, dim, idx, src = node.args[:4]
        xv, iv, sv = val(x), val(idx), val(src)
        if not all(isinstance(t, torch.Tensor) for t in (xv, iv, sv)):
            return None
        if arg(node, 4, "alpha", 1) != 1:
            return MatchResult.fail("index_add with alpha")
        if not xv.dtype.is_floating_point or sv.dtype != xv.dtype:
            return MatchResult.fail(f"index_add of {xv.dtype} (the one-hot product is for floats)")
        if static_shape(xv) is None or static_shape(sv) is None or static_shape(iv) is None or iv.dim() != 1:
            return MatchResult.fail("dynamic shape or a non-1-D index")
        return MatchResult.success(x=x, dim=dim % max(xv.dim(), 1), idx=idx, src=src)

    def apply(self, node, m):
        x, d, idx, src = m["x"], m["dim"], m["idx"], m["src"]
        shape, sshape = static_shape(val(x)), static_shape(val(src))
        rank = len(shape)
        perm = [d] + [k for k in range(rank) if k != d]
        inverse = [perm.index(k) for k in range(rank)]
        n, k = shape[d], sshape[d]
        rest = [shape[j] for j in perm[1:]]
        xm = self.emit(node, aten.permute.default, (x, perm))
        sm = self.emit(node, aten.permute.default, (src, perm))
        flat = self.emit(node, aten.reshape.default, (sm, [k, -1]))
        rows = self.emit(node, aten.arange.start_step, (0, n, 1), {"dtype": val(idx).dtype, "device": val(x).device})
        hit = self.emit(node, aten.eq.Tensor, (self.emit(node, aten.view.default, (rows, [n, 1])),
                                               self.emit(node, aten.view.default, (idx, [1, k]))))
        onehot = self.emit(node, aten._to_copy.default, (hit,), {"dtype": val(x).dtype})
        upd = self.emit(node, aten.reshape.default, (self.emit(node, aten.mm.default, (onehot, flat)), [n, *rest]))
        out = self.emit(node, aten.add.Tensor, (xm, upd))
        self.replace(node, self.emit(node, aten.permute.default, (out, inverse)))


class IndexPutFullIndices(Legalization):
    """``index_put(x, [None, i], v, acc)`` and ``index_add(x, d, i, src)`` -> ``index_put`` with one
    index tensor per dim of ``x`` (``arange`` views for each dim not indexed, shaped to broadcast the
    way torch's advanced indexing does) and the values expanded to the indexed shape. TVM 0.27's
    importer rejects an index list shorter than the data's rank ("IndexPut requires the number of
    index tensors (1) to match the data tensor dimensions (2)": ``index_add``, ``y[:, i] = v``); with
    ``None`` entries and ``accumulate=True`` it adds duplicates wrongly, and its IndexPut does not
    broadcast the values (a ``[4, 1, 3]`` value written to ``[4, 3, 3]`` positions read past the
    value): silent miscompiles. Index tensors that are not adjacent, and bool masks, are refused."""

    name = "index-put-full-indices"
    backends = ("tvm",)
    targets = (aten.index_put.default, aten.index_add.default)

    def check(self, node):
        if node.target is aten.index_add.default:
            x, dim, idx, values = node.args[:4]
            xv = val(x)
            if not isinstance(xv, torch.Tensor):
                return None
            if arg(node, 4, "alpha", 1) != 1:
                return MatchResult.fail("index_add with alpha")
            indices, acc = [None] * (dim % xv.dim()) + [idx], True
        else:
            x, indices, values = node.args[:3]
            acc = arg(node, 3, "accumulate", False)
            indices = list(indices)
        xv, vv = val(x), val(values)
        if not isinstance(xv, torch.Tensor) or not isinstance(vv, torch.Tensor):
            return None
        rank = xv.dim()
        indices = indices + [None] * (rank - len(indices))
        given = _index_dims(indices)
        ivals = [val(indices[d]) for d in given]
        if not given or not all(isinstance(v, torch.Tensor) for v in ivals):
            return None
        if any(v.dtype in (torch.bool, torch.uint8) for v in ivals):
            return MatchResult.fail("a bool mask index")
        if given != list(range(given[0], given[-1] + 1)):
            return MatchResult.fail("index tensors not adjacent (torch moves their dims first)")
        shape, vshape = static_shape(xv), static_shape(vv)
        if shape is None or vshape is None:
            return MatchResult.fail("dynamic shape")
        full = len(given) == rank
        out_shape = static_shape(fake_result(aten.index.Tensor, xv, [val(i) if i is not None else None
                                                                   for i in indices]))
        if full and node.target is aten.index_put.default and vshape == out_shape:
            return None       # one index per dim and values of the indexed shape: nothing to change
        return MatchResult.success(x=x, indices=indices, values=values, acc=acc, given=given, shape=shape,
                                   out_shape=out_shape)

    def apply(self, node, m):
        x, indices, values, given, shape = m["x"], m["indices"], m["values"], m["given"], m["shape"]
        first, last = given[0], given[-1]
        bdim = max(val(indices[d]).dim() for d in given)
        after = len(shape) - last - 1
        out_rank = first + bdim + after
        full = []
        for d in range(len(shape)):
            if first <= d <= last:
                i = indices[d]
                for _ in range(after):
                    i = self.emit(node, aten.unsqueeze.default, (i, -1))
                full.append(i)
                continue
            pos = d if d < first else first + bdim + (d - last - 1)
            view = [1] * out_rank
            view[pos] = shape[d]
            r = self.emit(node, aten.arange.start_step, (0, shape[d], 1),
                          {"dtype": torch.int64, "device": val(x).device})
            full.append(self.emit(node, aten.view.default, (r, view)))
        if static_shape(val(values)) != m["out_shape"]:
            values = self.emit(node, aten.expand.default, (values, list(m["out_shape"])))
        self.replace(node, self.emit(node, aten.index_put.default, (x, full, values, m["acc"])))


class CumsumInt64(Legalization):
    """``cumsum(x)`` of a bool or integer ``x`` with no ``dtype`` -> ``cumsum(x.to(int64))``: torch
    accumulates integers in int64; TVM 0.27's importer keeps ``x``'s dtype (a bool cumsum then
    aborts LLVM codegen, an int32 one could overflow where torch does not; HF GPT-2's mask)."""

    name = "cumsum-int64"
    backends = ("tvm",)
    targets = (aten.cumsum.default,)

    def check(self, node):
        if node.kwargs.get("dtype") is not None or len(node.args) > 2:
            return None
        xv = val(node.args[0])
        if not isinstance(xv, torch.Tensor) or xv.is_floating_point() or xv.is_complex() or xv.dtype == torch.int64:
            return None
        return MatchResult.success()

    def apply(self, node, m):
        cast = self.emit(node, aten._to_copy.default, (node.args[0],), {"dtype": torch.int64})
        node.update_arg(0, cast)
        node.meta["optc_rule"] = self.name


class AmaxAsMaxDim(Legalization):
    """``amax(x, dims, keepdim)`` -> ``max.dim`` per reduced dim (then ``squeeze``), ``amin(x)`` ->
    ``-amax(-x)``: TVM 0.27's importer translates ``max.dim`` but neither ``amax`` nor ``amin`` (nor
    ``min.dim``). The same values: a max over several dims is the max over each in turn."""

    name = "amax-as-max-dim"
    backends = ("tvm",)
    targets = (aten.amax.default, aten.amin.default)

    def check(self, node):
        xv = val(node.args[0])
        if not isinstance(xv, torch.Tensor) or xv.dim() == 0:
            return MatchResult.fail("a 0-d input")
        return MatchResult.success(xv=xv)

    def apply(self, node, m):
        x, xv = node.args[0], m["xv"]
        dims = arg(node, 1, "dim", [])
        keepdim = arg(node, 2, "keepdim", False)
        dims = sorted({d % xv.dim() for d in (dims if isinstance(dims, (list, tuple)) else [dims])} or range(xv.dim()))
        y = x if node.target is aten.amax.default else self.emit(node, aten.neg.default, (x,))
        for d in dims:
            y = self.emit(node, operator.getitem, (self.emit(node, aten.max.dim, (y, d, True)), 0))
        if node.target is aten.amin.default:
            y = self.emit(node, aten.neg.default, (y,))
        if not keepdim:
            y = self.emit(node, aten.squeeze.dims, (y, dims))
        self.replace(node, y)


class VarMeanAsTwo(Legalization):
    """``var_mean(x, dims, correction, keepdim)`` -> ``var(...)`` and ``mean(...)``: TVM 0.27's
    importer has ``var.correction`` and ``mean.dim`` but not ``var_mean``."""

    name = "var-mean-as-two"
    backends = ("tvm",)
    targets = (aten.var_mean.correction, aten.var_mean.dim)

    def check(self, node):
        xv = val(node.args[0])
        if not isinstance(xv, torch.Tensor):
            return None
        if not all(u.op == "call_function" and u.target is operator.getitem and u.args[1] in (0, 1)
                   for u in node.users):
            return MatchResult.fail("used as a tuple")
        return MatchResult.success(xv=xv)

    def apply(self, node, m):
        x, xv = node.args[0], m["xv"]
        dims = arg(node, 1, "dim")
        if node.target is aten.var_mean.dim:   # (x, dim, unbiased=True, keepdim=False)
            correction = 1 if arg(node, 2, "unbiased", True) else 0
            keepdim = arg(node, 3, "keepdim", False)
        else:
            correction = node.kwargs.get("correction", 1)
            keepdim = node.kwargs.get("keepdim", False)
        correction = 1 if correction is None else correction
        dims = list(range(xv.dim())) if dims is None else dims
        parts = {}
        for user in list(node.users):
            k = user.args[1]
            if k not in parts:
                parts[k] = self.emit(node, aten.var.correction, (x, dims), {"correction": correction, "keepdim": keepdim}) \
                    if k == 0 else self.emit(node, aten.mean.dim, (x, dims, keepdim))
            user.replace_all_uses_with(parts[k])
            self.gm.graph.erase_node(user)
        self.gm.graph.erase_node(node)


_LAYOUT_CARRIERS = (aten.view.default, aten._unsafe_view.default, aten.transpose.int, aten.permute.default,
                    aten.reshape.default, aten.alias.default)


class SdpaViewAsReshape(Legalization):
    """``aten.view`` of (a transpose or view of) ``scaled_dot_product_attention``'s output ->
    ``aten.reshape``. torch.export records HF's ``attn.transpose(1, 2).contiguous().reshape(B, S,
    -1)`` as plain views when the CPU kernel's output is laid out ``[B, S, N, H]`` in memory (its
    ``.contiguous()`` is then a no-op and vanishes); ``from_exported_program`` decomposes SDPA
    into matmuls and a softmax whose output is ``[B, N, S, H]``, and retracing the ``view`` fails.
    ``reshape`` computes the same values whatever the layout (HF GPT-2 with ``sdpa`` attention)."""

    name = "sdpa-view-as-reshape"
    backends = ("tvm",)
    targets = (aten.view.default,)

    def check(self, node):
        x = node.args[0]
        for _ in range(8):
            if not isinstance(x, torch.fx.Node) or x.op != "call_function":
                return None
            if x.target is aten.scaled_dot_product_attention.default:
                return MatchResult.success()
            if x.target not in _LAYOUT_CARRIERS:
                return None
            x = x.args[0]
        return None

    def apply(self, node, m):
        self.replace(node, self.emit(node, aten.reshape.default, node.args, node.kwargs))


class DiffAsIndexSelect(Legalization):
    """``diff(x, n, d, prepend, append)`` along a dynamic dim ``d`` -> ``y[idx + 1] - y[idx]`` with
    ``y = cat([prepend, x, append], d)`` and ``idx = arange(m)`` (``index_select``), ``m`` the
    output's length: ``len(x)`` with one element prepended or appended, ``len(x) - 1`` with none;
    ``n > 1``: that, then first differences again.
    TVM 0.27's importer decomposes ``diff`` into two slices of ``y`` and a subtraction; its shape
    arithmetic does not know the dynamic length is at least 1, leaves the two slices' lengths as
    expressions it cannot prove equal (``min(s, min(1, s) + s)`` against ``max(min(1, s) + s - 1,
    0)``), gives the difference an unknown shape, and a ``cumsum`` of it then fails to build
    ("non-symbolic shape is not supported"; transformers' ``find_packed_sequence_indices``, run by
    every decoder's mask when called without a cache, with a dynamic sequence length). The
    ``arange`` over the input's own length gives both operands the output's exact shape."""

    name = "diff-as-index-select"
    backends = ("tvm",)
    targets = (aten.diff.default,)

    def check(self, node):
        xv = val(node.args[0])
        if not isinstance(xv, torch.Tensor) or xv.dim() == 0:
            return None
        d = arg(node, 2, "dim", -1) % xv.dim()
        if not isinstance(xv.shape[d], torch.SymInt) or xv.shape[d].node.maybe_as_int() is not None:
            return None                   # a static length: the importer's slices have exact shapes
        n = arg(node, 1, "n", 1)
        if not isinstance(n, int) or n < 1:
            return MatchResult.fail(f"n = {n!r}")
        extra = [arg(node, 3, "prepend"), arg(node, 4, "append")]
        lengths = []
        for e in extra:
            if e is None:
                lengths.append(0)
                continue
            ev = val(e)
            length = static_shape(ev)
            if length is None or ev.dim() != xv.dim():
                return MatchResult.fail("a prepended or appended tensor of dynamic length")
            lengths.append(length[d])
        if sum(lengths) > 1:
            return MatchResult.fail("more than one element prepended and appended")
        return MatchResult.success(dim=d, extra=extra, shift=sum(lengths), n=n)

    def apply(self, node, m):
        x, d = node.args[0], m["dim"]
        prepend, append = m["extra"]
        parts = [t for t in (prepend, x, append) if t is not None]
        y = self.emit(node, aten.cat.default, (parts, d)) if len(parts) > 1 else x
        # the first difference; then, for n > 1, first differences of an operand of exact shape
        y = self._first_difference(node, y, x, d, m["shift"])
        for _ in range(m["n"] - 1):
            y = self._first_difference(node, y, y, d, 0)
        self.replace(node, y)

    def _first_difference(self, node, y, x, d, shift):
        """``y[1:] - y[:-1]`` along ``d``, of length ``len(x) + shift - 1`` (``x``: the operand whose
        dynamic length TVM knows exactly; ``y``: ``x`` with ``shift`` static elements added)."""
        length = self.emit(node, aten.sym_size.int, (x, d))
        if shift:           # len(x) rows: 0..n-1 and 1..n of y
            lo = self.emit(node, aten.arange.default, (length,), {"dtype": torch.int64})
        else:               # len(x) - 1 rows
            hi0 = self.emit(node, aten.arange.start, (1, length), {"dtype": torch.int64})
            lo = self.emit(node, aten.sub.Tensor, (hi0, 1))
        hi = self.emit(node, aten.add.Tensor, (lo, 1))
        upper = self.emit(node, aten.index_select.default, (y, d, hi))
        lower = self.emit(node, aten.index_select.default, (y, d, lo))
        return self.emit(node, aten.sub.Tensor, (upper, lower))


RULES = (CatDropEmpty, IntDivScalarAsTensor, IndexWrapNegative, IndexAddAsOneHotMatmul, IndexPutFullIndices, CumsumInt64,
         AmaxAsMaxDim, VarMeanAsTwo, SdpaViewAsReshape, DiffAsIndexSelect)
