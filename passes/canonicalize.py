"""Canonicalization: local rewrites that remove no-ops and pick canonical forms.

It runs first in every default pipeline and is also the export normalisation: what torch.export
and transformers leave behind that computes nothing (assertions, same-dtype casts, copies, eval
dropout, a softmax ``dtype=`` equal to its input's) is removed once here, so that the fusions'
patterns need not see past it.

A rule set run by :func:`optc.ir.rewrite.apply_rules` to a fixed point. Rules, by name
(``%x`` is the operand; "same layout" means same shape, dtype, device, and strides on
every dimension longer than 1, all read from ``meta["val"]`` and static):

``drop-eval-dropout``
    ``aten.dropout|feature_dropout|alpha_dropout|feature_alpha_dropout(%x, p, train)``
    ``==> %x`` when ``train`` is False or ``p == 0``. Refused in training mode.
``drop-detach`` / ``drop-alias``
    ``aten.detach(%x)``, ``aten.detach_(%x)`` / ``aten.alias(%x)`` ``==> %x``: the same
    values (detach only changes autograd metadata).
``drop-clone``
    ``aten.clone(%x, memory_format=f)``, ``aten.contiguous(%x, f)`` ``==> %x`` when the
    result has the same layout as ``%x`` (a later ``view`` may rely on the strides).
``drop-noop-to``
    ``aten._to_copy``, ``aten.to.{dtype,device,dtype_layout,other}``, ``aten.type_as`` ``==> %x`` when the
    result has the same layout (so the same dtype, device and memory format).
``drop-noop-view``
    ``aten.view|reshape|_unsafe_view|expand|flatten|squeeze|slice|narrow(%x, ...)`` with
    a result of the same layout as ``%x``, ``aten.permute`` by the identity,
    ``aten.transpose(%x, d, d)`` and ``aten.t`` of a tensor of rank < 2 ``==> %x``.
``cancel-view-chain``
    A chain of element-order-preserving reshapes (view, reshape, _unsafe_view, flatten,
    unflatten, squeeze, unsqueeze) that comes back to the layout of a tensor it started
    from: ``aten.squeeze(aten.unsqueeze(%x, 1), 1) ==> %x``,
    ``aten.view(aten.view(%x, [6]), [2, 3]) ==> %x`` (for ``%x: [2, 3]``).
``recompose-batch-norm``
    ``getitem(aten._native_batch_norm_legit_no_training(...), 0) ==> aten.batch_norm(..., False, ...)``
    when the batch statistics are unused: functionalization's form of an eval BatchNorm.
``drop-assert``
    ``aten._assert_tensor_metadata``, ``_assert_scalar``, ``sym_constrain_range``... ``==>`` nothing:
    torch.export's checks of what the graph already says (transformers 5's
    ``softmax(...).to(dtype)`` leaves one reading the softmax, which fusions then had to see past).
``drop-empty-cat-operand``
    ``aten.cat([%e, %x, ...], d)`` with ``%e`` empty ``==> aten.cat([%x, ...], d)`` (or ``%x``).
``drop-softmax-dtype``
    ``aten.softmax.int(%x, d, dtype)`` with ``dtype`` the dtype of ``%x`` ``==> aten.softmax.int(%x, d)``.
``drop-arith-identity``
    ``aten.add|sub(%x, 0)``, ``aten.mul|div(%x, 1)`` (Python scalars) ``==> %x`` when the result has
    the layout of ``%x`` (DeBERTa's ``scores + 0`` when relative attention is off).
``expand-as-to-expand``
    ``aten.expand_as(%x, %y) ==> aten.expand(%x, shape(%y))`` for a static shape: ``%y``'s shape is
    all it reads.
``constant-matmul-to-linear``
    ``aten.addmm(%b, %x, %W)``, ``aten.mm(%x, %W)``, ``aten.matmul(%x, %W)`` with ``%W`` a constant
    ``[K, N]`` matrix ``==> aten.linear(%x, %W.t(), %b)`` (a transposed view of the constant, no copy):
    GPT-2's ``Conv1D`` layers and ``x @ self.weight`` become linear layers the other passes know;
    ``x @ W.T`` (Falcon's ``FalconLinear``) becomes ``aten.linear(%x, %W)``.
``mm-add-to-addmm``
    ``aten.add.Tensor(aten.mm(%a, %b), %bias) ==> aten.addmm(%bias, %a, %b)``, also for
    ``aten.matmul`` of two 2-D tensors (``x @ w + b``; nn.Linear is captured as
    ``aten.linear`` already). Only where it pays: the mm has no other user, ``%bias`` is a
    bias vector (``[N]`` or ``[1, N]`` for an ``[M, N]`` product), everything has one
    floating-point dtype, the add has ``alpha=1``. The GEMM adds the bias in its epilogue,
    which may round differently from a separate add.

Dropping a copy (``clone``, ``_to_copy``, ``to(copy=True)``) is refused where the copy
matters: when it is a graph output (the output would alias another tensor) or when the
graph mutates tensors in place (``detach_`` aside). Shapes must be static.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx

from optc.ir.effects import writes_in_place
from optc.ir.queries import same_shape, val
from optc.ir.rewrite import (MatchResult, RewriteRule, add_attr, apply_rules, arg, attr_node, attr_value, call,
                             erase_if_unused, is_op)
from optc.passes.base import PassContext, PassResult, register_pass

log = logging.getLogger(__name__)
aten = torch.ops.aten


# ---- helpers ---------------------------------------------------------------------------
def _static(v: torch.Tensor) -> bool:
    return all(type(d) is int for d in v.shape) and all(type(s) is int for s in v.stride())


def _same_type(src: torch.Tensor, out: torch.Tensor) -> bool:
    """Same shape, dtype, device and layout (both static): a candidate for an identity."""
    return (_static(src) and _static(out) and tuple(src.shape) == tuple(out.shape) and src.dtype == out.dtype
            and src.device == out.device and src.layout == out.layout)


def _stride_mismatch(src: torch.Tensor, out: torch.Tensor) -> str | None:
    """Why ``out`` (of the same type) cannot stand in for ``src``: differing strides."""
    if any(n > 1 and a != b for n, a, b in zip(src.shape, src.stride(), out.stride())):
        return f"changes strides {list(src.stride())} -> {list(out.stride())}"
    return None


def _drop(node: fx.Node, src: fx.Node) -> None:
    node.replace_all_uses_with(src)
    node.graph.erase_node(node)


class _DropRule(RewriteRule):
    """Replace ``node`` by its operand ``m["src"]``."""

    def rewrite(self, node: fx.Node, m: MatchResult, ctx: PassContext) -> None:
        log.debug("%s: %%%s -> %%%s", self.name, node.name, m["src"].name)
        _drop(node, m["src"])


class _DropIdentity(_DropRule):
    """Drop ``targets`` applied to ``args[0]`` when the result has the operand's layout.

    ``copies(node)``: the op returns a fresh tensor, which may matter (see the module docstring)."""

    targets: tuple = ()

    def __init__(self, graph_mutates: bool):
        self.graph_mutates = graph_mutates

    def copies(self, node: fx.Node) -> bool:
        return False

    def match(self, node, ctx):
        if not is_op(node, *self.targets):
            return None
        src = node.args[0]
        sv, ov = val(src), val(node)
        if sv is None or ov is None or not _same_type(sv, ov):
            return None          # a real conversion or reshape: not a candidate
        why = _stride_mismatch(sv, ov)
        if why:
            return MatchResult.fail(why)
        if self.copies(node):
            if any(u.op == "output" for u in node.users):
                return MatchResult.fail("the copy is a graph output (it would alias another tensor)")
            if self.graph_mutates:
                return MatchResult.fail("the graph mutates tensors in place; the copy may be needed")
        return MatchResult.success(src=src)


# ---- rules -----------------------------------------------------------------------------
class DropEvalDropout(_DropRule):
    name = "drop-eval-dropout"
    targets = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
               aten.feature_alpha_dropout.default)

    def match(self, node, ctx):
        if not is_op(node, *self.targets):
            return None
        p, train = arg(node, 1, "p"), arg(node, 2, "train")
        if train and p != 0:
            return MatchResult.fail(f"dropout in training mode (p={p})")
        return MatchResult.success(src=node.args[0])


class DropDetach(_DropIdentity):
    name = "drop-detach"
    targets = (aten.detach.default, aten.detach_.default)


class DropAlias(_DropIdentity):
    name = "drop-alias"
    targets = (aten.alias.default,)


class DropClone(_DropIdentity):
    name = "drop-clone"
    targets = (aten.clone.default, aten.contiguous.default)

    def copies(self, node):
        return is_op(node, aten.clone.default)


class DropNoopTo(_DropIdentity):
    name = "drop-noop-to"
    targets = (aten._to_copy.default, aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten.to.other,
               aten.type_as.default)

    def copies(self, node):
        return is_op(node, aten._to_copy.default) or bool(_schema_arg(node, "copy", False))


def _schema_arg(node: fx.Node, name: str, default):
    """Argument ``name`` of an OpOverload call, positional or keyword."""
    for i, a in enumerate(node.target._schema.arguments):
        if a.name == name:
            return node.args[i] if i < len(node.args) else node.kwargs.get(name, default)
    return default


_SAME_SHAPE_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
                     aten.flatten.using_ints, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
                     aten.slice.Tensor, aten.narrow.default)


class DropNoopView(_DropIdentity):
    name = "drop-noop-view"
    targets = _SAME_SHAPE_VIEWS + (aten.permute.default, aten.transpose.int, aten.t.default)

    def match(self, node, ctx):
        if not is_op(node, *self.targets):
            return None
        sv, ov = val(node.args[0]), val(node)
        if sv is None or ov is None or not same_shape(sv.shape, ov.shape):
            return None          # changes the shape (or may, for some size of a dynamic dim): not a candidate
        if not _is_identity_view(node, sv.dim()):
            return None          # e.g. transposes two equal dimensions: same shape, other data
        return super().match(node, ctx)


def _is_identity_view(node: fx.Node, rank: int) -> bool:
    if is_op(node, aten.permute.default):
        return [d % max(rank, 1) for d in arg(node, 1, "dims")] == list(range(rank))
    if is_op(node, aten.transpose.int):
        return arg(node, 1, "dim0") % max(rank, 1) == arg(node, 2, "dim1") % max(rank, 1)
    if is_op(node, aten.t.default):
        return rank < 2
    return True                  # the others keep element order: same shape means identity


_ORDER_PRESERVING = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
                     aten.unflatten.int, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
                     aten.unsqueeze.default)


class CancelViewChain(_DropRule):
    """Every op of the chain keeps the row-major element order, so a chain that ends in the
    shape of a tensor it started from computes that tensor."""

    name = "cancel-view-chain"

    def match(self, node, ctx):
        if not is_op(node, *_ORDER_PRESERVING) or not is_op(node.args[0], *_ORDER_PRESERVING):
            return None
        out = val(node)
        if out is None or not _static(out):
            return None
        best, why = None, None
        cur = node.args[0]
        while is_op(cur, *_ORDER_PRESERVING):
            cur = cur.args[0]
            v = val(cur)
            if v is None or not _static(v):
                break
            if _same_type(v, out):
                mismatch = _stride_mismatch(v, out)
                if mismatch is None:
                    best = cur
                else:
                    why = why or mismatch
        if best is not None:
            return MatchResult.success(src=best)
        if why:
            return MatchResult.fail(f"the chain returns to the shape of an earlier tensor but {why}")
        return None

    def rewrite(self, node, m, ctx):
        chain, cur = [], node.args[0]
        while cur is not m["src"]:
            chain.append(cur)
            cur = cur.args[0]
        super().rewrite(node, m, ctx)
        erase_if_unused(*chain)


class MmAddToAddmm(RewriteRule):
    name = "mm-add-to-addmm"

    def match(self, node, ctx):
        if not is_op(node, aten.add.Tensor) or len(node.args) < 2:
            return None
        lhs, rhs = node.args[0], node.args[1]
        mm = lhs if is_op(lhs, aten.mm.default, aten.matmul.default) else (
            rhs if is_op(rhs, aten.mm.default, aten.matmul.default) else None)
        if mm is None:
            return None
        bias = rhs if mm is lhs else lhs
        a, b = mm.args[0], mm.args[1]
        va, vb, vm, vout = val(a), val(b), val(mm), val(node)
        if None in (va, vb, vm, vout):
            return MatchResult.fail("missing shape metadata")
        if va.dim() != 2 or vb.dim() != 2:
            return MatchResult.fail(f"matmul is not 2-D x 2-D ({va.dim()}-D x {vb.dim()}-D)")
        if node.kwargs.get("alpha", 1) != 1:
            return MatchResult.fail(f"add has alpha={node.kwargs['alpha']}")
        if len(mm.users) != 1:
            return MatchResult.fail(f"mm has {len(mm.users)} users")
        vbias = val(bias)
        if vbias is None:
            return MatchResult.fail(f"add operand is not a bias vector ({bias!r})")
        if not (_static(vm) and _static(vbias)):
            return MatchResult.fail("dynamic shape")
        n = vm.shape[1]
        if list(vbias.shape) not in ([n], [1, n]):
            return MatchResult.fail(f"add operand is not a bias vector (shape {list(vbias.shape)} "
                                    f"for a [{vm.shape[0]}, {n}] product)")
        if not vm.dtype.is_floating_point or len({vm.dtype, vbias.dtype, vout.dtype}) != 1:
            return MatchResult.fail(f"dtypes differ or are not floating point "
                                    f"(mm {vm.dtype}, bias {vbias.dtype}, add {vout.dtype})")
        if vbias.device != vm.device:
            return MatchResult.fail(f"bias is on {vbias.device}, mm on {vm.device}")
        return MatchResult.success(mm=mm, bias=bias, a=a, b=b)

    def rewrite(self, node, m, ctx):
        with node.graph.inserting_before(node):
            new = call(node.graph, aten.addmm.default, (m["bias"], m["a"], m["b"]), like=node,
                       pass_name=ctx.pass_name, name="addmm")
        log.debug("%s: %%%s + %%%s -> %%%s", self.name, m["mm"].name, node.name, new.name)
        _drop(node, new)
        erase_if_unused(m["mm"])


class ConstantMatmulToLinear(RewriteRule):
    """``aten.addmm(%b, %x, %W)``, ``aten.mm(%x, %W)`` and ``aten.matmul(%x, %W)`` with ``%W`` a constant
    ``[K, N]`` matrix ``==> aten.linear(%x, %W.t(), %b)``: a layer written as a product with its weight
    (HF's ``Conv1D`` in GPT-2: ``addmm(bias, x.view(-1, K), weight)``) becomes the linear layer that the
    folding, pruning, quantization and merging passes know. The new weight is a transposed *view* of
    the constant: no copy."""

    name = "constant-matmul-to-linear"

    def __init__(self) -> None:
        self.transposed: dict[str, str] = {}      # constant's target -> its transposed view's attribute

    def match(self, node, ctx):
        if not is_op(node, aten.addmm.default, aten.mm.default, aten.matmul.default):
            return None
        addmm = is_op(node, aten.addmm.default)
        bias, x, w = (node.args[0], node.args[1], node.args[2]) if addmm else (None, node.args[0], node.args[1])
        wt = _transposed_constant(w)            # x @ W.T (Falcon's FalconLinear): W is the linear weight
        wv = attr_value(wt).t() if wt is not None else (attr_value(w) if isinstance(w, fx.Node) else None)
        if wv is None:
            return None                         # a product of two activations: not a candidate
        if not addmm and len(node.users) == 1:
            m = MmAddToAddmm().match(next(iter(node.users)), ctx)
            if m is not None and m.ok:
                return None                     # its bias add joins it first (next sweep: addmm -> linear)
        xv, out = val(x), val(node)
        if xv is None or out is None:
            return MatchResult.fail("missing shape metadata")
        if wv.dim() != 2 or xv.dim() < 2:
            return MatchResult.fail(f"not an activation times a constant matrix ({xv.dim()}-D x {wv.dim()}-D)")
        if not wv.dtype.is_floating_point or len({wv.dtype, xv.dtype, out.dtype}) != 1:
            return MatchResult.fail(f"dtypes differ or are not floating point (x {xv.dtype}, weight {wv.dtype})")
        if addmm:
            if arg(node, 3, "beta", 1) != 1 or arg(node, 4, "alpha", 1) != 1:
                return MatchResult.fail("addmm with beta or alpha other than 1")
            bv = val(bias)
            if bv is None or list(bv.shape) != [wv.shape[1]] or bv.dtype != wv.dtype:
                return MatchResult.fail(f"addmm's input is not a bias vector of {wv.shape[1]} "
                                        f"(shape {None if bv is None else list(bv.shape)})")
        return MatchResult.success(x=x, w=w, wt=wt, bias=bias)

    def rewrite(self, node, m, ctx):
        g, w = node.graph, m["w"]
        gm = g.owning_module
        if m["wt"] is not None:
            weight = m["wt"]                    # the constant the product transposed
        else:
            target = self.transposed.get(w.target)
            if target is None:
                wv = attr_value(w)
                target = self.transposed[w.target] = add_attr(gm, f"{w.target}_t", wv.detach().t(),
                                                              parameter=isinstance(wv, torch.nn.Parameter))
            with g.inserting_before(node):
                weight = attr_node(gm, target, like=w, pass_name=ctx.pass_name)
        with g.inserting_before(node):
            new = call(g, aten.linear.default, (m["x"], weight) + ((m["bias"],) if m["bias"] is not None else ()),
                       like=node, pass_name=ctx.pass_name, name="linear")
        log.debug("%s: %%%s -> %%%s", self.name, node.name, new.name)
        _drop(node, new)
        erase_if_unused(w)


def _transposed_constant(w) -> fx.Node | None:
    """The constant matrix ``W`` when ``w`` is ``W.t()``, ``W.T`` (``numpy_T``, or ``permute(W, [1, 0])``
    once decomposed) or ``W.transpose(0, 1)``."""
    if not (isinstance(w, fx.Node) and is_op(w, aten.t.default, aten.numpy_T.default, aten.permute.default,
                                             aten.transpose.int)):
        return None
    src = w.args[0]
    sv = attr_value(src) if isinstance(src, fx.Node) else None
    if sv is None or sv.dim() != 2:
        return None
    if is_op(w, aten.permute.default) and [d % 2 for d in w.args[1]] != [1, 0]:
        return None
    if is_op(w, aten.transpose.int) and {w.args[1] % 2, w.args[2] % 2} != {0, 1}:
        return None
    return src


class RecomposeBatchNorm(RewriteRule):
    """``getitem(aten._native_batch_norm_legit_no_training(x, w, b, mean, var, momentum, eps), 0)``
    ``==> aten.batch_norm(x, w, b, mean, var, False, momentum, eps, True)`` when the saved
    statistics (outputs 1 and 2) are unused: what torch's functionalization writes for an
    eval-mode BatchNorm in a graph that had in-place ops, back in the form capture gives
    otherwise (the form layout conversion and the backends' rules know)."""

    name = "recompose-batch-norm"

    def match(self, node, ctx):
        if not (node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0
                and is_op(node.args[0], aten._native_batch_norm_legit_no_training.default)):
            return None
        bn = node.args[0]
        if any(not (u.op == "call_function" and u.target is operator.getitem and (u.args[1] == 0 or not u.users))
               for u in bn.users):
            return MatchResult.fail("the batch statistics are used")
        return MatchResult.success(bn=bn)

    def rewrite(self, node, m, ctx):
        bn = m["bn"]
        x, w, b, mean, var, momentum, eps = bn.args[:7]
        with node.graph.inserting_before(node):
            new = call(node.graph, aten.batch_norm.default, (x, w, b, mean, var, False, momentum, eps, True),
                       like=bn, pass_name=ctx.pass_name, name="batch_norm")
        _drop(node, new)
        for u in list(bn.users):
            erase_if_unused(u)
        erase_if_unused(bn)


_ASSERTS = tuple(op for op in (
    getattr(aten, "_assert_tensor_metadata", None), getattr(aten, "_assert_scalar", None),
    getattr(aten, "_assert_async", None), getattr(aten, "sym_constrain_range", None),
    getattr(aten, "sym_constrain_range_for_size", None), getattr(aten, "_functional_assert_async", None),
    getattr(aten, "_functional_assert_scalar", None)) if op is not None)


class DropAssert(RewriteRule):
    """``aten._assert_tensor_metadata(%x, ...)`` (and ``_assert_scalar``, ``sym_constrain_range``...)
    ``==>`` nothing: torch.export's checks of what the graph already says (the dtype of a value in
    the graph that computes it); they read a value only to check it."""

    name = "drop-assert"

    def match(self, node, ctx):
        if not is_op(node, *_ASSERTS):
            return None
        if node.users:
            return MatchResult.fail("the assertion's result is used")
        return MatchResult.success()

    def rewrite(self, node, m, ctx):
        node.graph.erase_node(node)


class DropSoftmaxDtype(RewriteRule):
    """``aten.softmax.int(%x, d, dtype)`` with ``dtype`` the dtype of ``%x`` ``==> aten.softmax.int(%x,
    d)``: transformers writes ``softmax(scores, dim=-1, dtype=torch.float32)`` for float32 scores too."""

    name = "drop-softmax-dtype"

    def match(self, node, ctx):
        if not is_op(node, aten.softmax.int) or arg(node, 2, "dtype") is None:
            return None
        xv = val(node.args[0])
        if xv is None or xv.dtype != arg(node, 2, "dtype"):
            return None        # a real upcast: not a candidate
        return MatchResult.success()

    def rewrite(self, node, m, ctx):
        node.args = tuple(node.args[:2])
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "dtype"}
        log.debug("%s: %%%s", self.name, node.name)


class DropEmptyCatOperand(RewriteRule):
    """``aten.cat([%e, %x, ...], d)`` where ``%e`` has no elements ``==> aten.cat([%x, ...], d)`` (``%x``
    itself when one operand is left and it has the result's shape): an empty operand adds nothing
    (transformers' first cache update, ``torch.cat([torch.tensor([]), k], dim=-2)``; a zero-width
    rotary pass-through)."""

    name = "drop-empty-cat-operand"

    def match(self, node, ctx):
        if not is_op(node, aten.cat.default, aten.concat.default):
            return None
        tensors = list(node.args[0])
        vals = [val(t) for t in tensors]
        out = val(node)
        if out is None or any(v is None for v in vals):
            return None
        # empty: a static dim of 0 (the other operands may have dynamic dims: a cache's sequence)
        keep = [t for t, v in zip(tensors, vals) if not any(isinstance(d, int) and d == 0 for d in v.shape)]
        if len(keep) == len(tensors) or not keep:
            return None
        if len(keep) == 1:
            kv = val(keep[0])
            if [str(d) for d in kv.shape] != [str(d) for d in out.shape] or kv.dtype != out.dtype:
                return MatchResult.fail("the operand left is not of the result's shape and dtype")
            if any(u.op == "output" for u in node.users):
                return MatchResult.fail("the concatenation is a graph output (it would alias its operand)")
        return MatchResult.success(keep=keep)

    def rewrite(self, node, m, ctx):
        keep = m["keep"]
        if len(keep) == 1:
            _drop(node, keep[0])
            return
        node.update_arg(0, keep)


class DropArithIdentity(_DropIdentity):
    """``aten.add|sub(%x, 0)``, ``aten.mul(%x, 1)``, ``aten.div(%x, 1)`` ``==> %x`` when the result has
    ``%x``'s layout (so no broadcast and no type promotion): DeBERTa adds a relative-position term
    that is the Python ``0`` when relative attention is off. (``-0.0 + 0`` is ``+0.0``: equal.)"""

    name = "drop-arith-identity"
    targets = (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.mul.Tensor,
               aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)

    def copies(self, node):
        return True        # the op returns a new tensor, as a clone does

    def match(self, node, ctx):
        if not is_op(node, *self.targets) or len(node.args) != 2 or isinstance(node.args[1], fx.Node):
            return None
        c = node.args[1]
        if isinstance(c, bool) or not isinstance(c, (int, float)):
            return None
        neutral = 0 if is_op(node, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar) else 1
        if c != neutral or node.kwargs.get("rounding_mode") is not None:
            return None
        return super().match(node, ctx)


class ExpandAsToExpand(RewriteRule):
    """``aten.expand_as(%x, %y) ==> aten.expand(%x, shape(%y))`` for a static shape: ``expand_as`` reads
    only ``%y``'s shape, yet counts as a user of its value (DistilBERT's ``mask.expand_as(scores)``
    kept the scores alive beside the fused attention)."""

    name = "expand-as-to-expand"

    def match(self, node, ctx):
        if not is_op(node, aten.expand_as.default):
            return None
        yv = val(node.args[1])
        if yv is None or not all(isinstance(d, int) for d in yv.shape):
            return MatchResult.fail("the target shape is dynamic")
        return MatchResult.success(shape=list(yv.shape))

    def rewrite(self, node, m, ctx):
        g = node.graph
        with g.inserting_before(node):
            new = call(g, aten.expand.default, (node.args[0], m["shape"]), like=node, pass_name=ctx.pass_name,
                       name="expand")
        node.replace_all_uses_with(new)
        g.erase_node(node)


def rules(gm: fx.GraphModule) -> list[RewriteRule]:
    """The rule set, in the order rules are tried on each node."""
    mut = any(writes_in_place(n) for n in gm.graph.nodes)
    return [DropEvalDropout(), DropDetach(mut), DropAlias(mut), DropClone(mut), DropNoopTo(mut),
            DropNoopView(mut), CancelViewChain(), MmAddToAddmm(), ConstantMatmulToLinear(), RecomposeBatchNorm(), DropAssert(),
            DropSoftmaxDtype(), DropEmptyCatOperand(), DropArithIdentity(mut), ExpandAsToExpand()]


@register_pass("canonicalize", exact=True,
               description="drop no-op ops (eval dropout, detach, clone, same-type to, no-op views), "
                           "fuse mm + bias into addmm, and products with a constant matrix into linear")
def canonicalize(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    rule_set = rules(gm)
    for r in rule_set:
        ctx.stats.setdefault(r.name, 0)
    n = apply_rules(gm, rule_set, ctx)
    return PassResult(gm, n > 0, dict(ctx.stats))
