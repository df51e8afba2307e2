"""``main_transform_params`` split into one function per independent group of weights.

With weights by reference (``params="reference"``), ``LiftTransformParams`` moves what computes on
the weights alone (transposes, the CPU schedules' weight repacking) into ``main_transform_params``,
which takes every weight and returns every transformed one in one call: its inputs (64-byte
aligned copies where a weight is not aligned, as TVM requires) and its outputs are all alive at
once. Nearly every output depends on one weight, so the transform splits: this pass adds
``optc_transform_params_<k>`` for each group of outputs that share their inputs (the tuple of
that group's weights -> the tuple of its outputs), and ``optc_transform_params_groups``, which
returns an ``int64 [n, 3]`` tensor of ``(group, 0 = input / 1 = output, index)`` rows, so that
a loaded library says how to call them. The model then transforms the weights group by group
(``backends/tvm.py``, ``_transformed``), each aligned copy freed before the next is made.
``main_transform_params`` stays (what a library built before this pass has).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

TRANSFORM = "main_transform_params"
GROUP_PREFIX = "optc_transform_params_"
GROUPS = "optc_transform_params_groups"
#: the first of the two lifts (:func:`first_lift`): the weight transposes
FIRST = "optc_transpose_params"


def _groups(func: relax.Function) -> list[tuple[list[int], list[int]]] | None:
    """``[(input indices, output indices)]`` of ``func``'s outputs grouped by the weights they read,
    or None when its body is not one dataflow block of bindings returning a tuple."""
    if len(func.params) != 1 or not isinstance(func.body, relax.SeqExpr) or len(func.body.blocks) != 1:
        return None
    param = func.params[0]
    bindings = func.body.blocks[0].bindings
    reads: dict = {}                     # var -> set of weight indices it depends on
    for b in bindings:
        v = b.value
        if isinstance(v, relax.TupleGetItem) and v.tuple_value.same_as(param):
            reads[b.var] = {int(v.index)}
            continue
        deps: set[int] = set()
        for u in relax.analysis.free_vars(v):
            if u.same_as(param):
                return None              # the whole tuple read at once: no split
            deps |= reads.get(u, set())
        reads[b.var] = deps
    body = func.body.body
    by_var = {b.var: b.value for b in bindings}
    out = by_var.get(body, body) if isinstance(body, relax.Var) else body
    if not isinstance(out, relax.Tuple):
        return None
    groups: dict[tuple, list[int]] = {}
    for j, field in enumerate(out.fields):
        key = tuple(sorted(reads.get(field, set()))) if isinstance(field, relax.Var) else ()
        groups.setdefault(key, []).append(j)
    return [(list(k), outs) for k, outs in groups.items()]


def _group_function(func: relax.Function, inputs: list[int], outputs: list[int]) -> relax.Function:
    """``func`` restricted to ``outputs``, reading only the weights ``inputs`` (a tuple of them)."""
    param = func.params[0]
    fields = param.ty.fields
    new_param = relax.Var("params", relax.TupleType([fields[i] for i in inputs]))
    position = {i: n for n, i in enumerate(inputs)}
    bindings = func.body.blocks[0].bindings
    body = func.body.body
    by_var = {b.var: b.value for b in bindings}
    out = by_var.get(body, body) if isinstance(body, relax.Var) else body
    wanted = [out.fields[j] for j in outputs]
    needed: set = set()
    todo = [w for w in wanted if isinstance(w, relax.Var)]
    while todo:
        v = todo.pop()
        if v in needed or v not in by_var:
            continue
        needed.add(v)
        todo.extend(u for u in relax.analysis.free_vars(by_var[v]) if not u.same_as(param))
    new_bindings = []
    for b in bindings:
        if b.var not in needed:
            continue
        value = b.value
        if isinstance(value, relax.TupleGetItem) and value.tuple_value.same_as(param):
            value = relax.TupleGetItem(new_param, position[int(value.index)])
        new_bindings.append(relax.VarBinding(b.var, value))
    result = relax.Var("out", relax.TupleType([w.ty for w in wanted]))
    new_bindings.append(relax.VarBinding(result, relax.Tuple(wanted)))
    seq = relax.SeqExpr([relax.DataflowBlock(new_bindings)], result)
    new = relax.Function([new_param], seq, result.ty, is_pure=True)
    new = new.with_attr("num_input", 0)
    return relax.utils.copy_with_new_vars(new)


# ---- two lifts, one transform ------------------------------------------------------------------------
# The CPU schedule repacks a matmul's weight into [N/VN, K, VN] panels only when the weight is
# layout-free: a constant or one of main's weight parameters (AttachAttrLayoutFreeBuffers). With
# weights by reference, a linear's matmul reads permute_dims(W) -- computed from a parameter, so
# not layout-free: the kernels ran unpacked, 1.19x slower than the bound library. So the
# transposes are lifted first (before AttachAttrLayoutFreeBuffers: main then takes W^T as a
# parameter, which the schedule repacks), the repacking second, and the two transforms are
# composed into one main_transform_params -- which split_transform_params then cuts per weight,
# so that a weight's transposed copy lives only while its group is transformed.


@tvm.transform.module_pass(opt_level=0, name="OptcFirstLift")
def first_lift(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``LiftTransformParams`` now (the weight transposes), its ``main_transform_params`` renamed
    :data:`FIRST` and without ``num_input`` (so that the second lift leaves it alone)."""
    mod = relax.transform.LiftTransformParams()(mod)
    funcs = {}
    for gv, f in mod.functions.items():
        if gv.name_hint == TRANSFORM:
            funcs[tvm.ir.GlobalVar(FIRST)] = f.with_attr("global_symbol", FIRST).without_attr("num_input")
        else:
            funcs[gv] = f
    return tvm.IRModule(funcs, attrs=mod.attrs)


def _block_and_result(func: relax.Function):
    """``(bindings, result tuple, result var)`` of a transform: one dataflow block returning a
    tuple; None otherwise."""
    if not isinstance(func.body, relax.SeqExpr) or len(func.body.blocks) != 1:
        return None
    bindings = list(func.body.blocks[0].bindings)
    by_var = {b.var: b.value for b in bindings}
    body = func.body.body
    out = by_var.get(body, body) if isinstance(body, relax.Var) else body
    return (bindings, out, body) if isinstance(out, relax.Tuple) else None


def _identity(func: relax.Function) -> bool:
    """``func`` returns its parameter as it is (a transform with nothing to do)."""
    body = func.body
    if isinstance(body, relax.SeqExpr):
        if any(len(b.bindings) for b in body.blocks):
            return False
        body = body.body
    return body.same_as(func.params[0])


@tvm.transform.module_pass(opt_level=0, name="OptcComposeTransformParams")
def compose_transform_params(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """:data:`FIRST` (weights -> transposed weights) and the second lift's
    ``main_transform_params`` (transposed weights -> repacked) as one ``main_transform_params``
    (weights -> repacked): the second's reads of its parameter tuple replaced by the first's
    results, in one dataflow block."""
    names = {gv.name_hint: gv for gv in mod.functions}
    if FIRST not in names:
        return mod
    first = mod[names[FIRST]]
    funcs = {gv: f for gv, f in mod.functions.items() if gv.name_hint not in (FIRST, TRANSFORM)}
    if _identity(first):     # nothing transposed (weights read in place)
        if TRANSFORM in names:
            funcs[names[TRANSFORM]] = mod[names[TRANSFORM]]
        return tvm.IRModule(funcs, attrs=mod.attrs)
    if TRANSFORM not in names or _identity(mod[names[TRANSFORM]]):
        # nothing repacked (no kernel's weight panel was worth it: small or narrow weights): the
        # transposes are the whole transform
        funcs[tvm.ir.GlobalVar(TRANSFORM)] = first.with_attr("global_symbol", TRANSFORM).with_attr("num_input", 0)
        return tvm.IRModule(funcs, attrs=mod.attrs)
    second = mod[names[TRANSFORM]]
    a, b = _block_and_result(first), _block_and_result(second)
    if a is None or b is None or len(second.params) != 1:
        raise ValueError("optc: the weight transforms are not one dataflow block returning a tuple each; "
                         "they cannot be composed")
    (bindings1, out1, result1), (bindings2, _, result2) = a, b
    param2 = second.params[0]
    bindings = [x for x in bindings1 if not x.var.same_as(result1)]
    for x in bindings2:
        value = x.value
        if isinstance(value, relax.TupleGetItem) and value.tuple_value.same_as(param2):
            value = out1.fields[int(value.index)]
        elif any(u.same_as(param2) for u in relax.analysis.free_vars(value)):
            raise ValueError("optc: the repacking transform reads its weights as a whole tuple; not composed")
        bindings.append(relax.VarBinding(x.var, value))
    func = relax.Function([first.params[0]], relax.SeqExpr([relax.DataflowBlock(bindings)], result2),
                          second.ret_ty, is_pure=True)
    func = func.with_attr("num_input", 0).with_attr("global_symbol", TRANSFORM)
    funcs[names[TRANSFORM]] = relax.utils.copy_with_new_vars(func)
    return tvm.IRModule(funcs, attrs=mod.attrs)


@tvm.transform.module_pass(opt_level=0, name="OptcSplitTransformParams")
def split_transform_params(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    if TRANSFORM not in [gv.name_hint for gv in mod.functions]:
        return mod
    func = mod[TRANSFORM]
    groups = _groups(func)
    if not groups or len(groups) < 2:
        return mod
    mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    rows = []
    for k, (inputs, outputs) in enumerate(groups):
        f = _group_function(func, inputs, outputs).with_attr("global_symbol", f"{GROUP_PREFIX}{k}")
        mod[f"{GROUP_PREFIX}{k}"] = f
        rows += [(k, 0, i) for i in inputs] + [(k, 1, j) for j in outputs]
    table = relax.const(np.array(rows, dtype="int64").reshape(-1, 3))
    mod[GROUPS] = relax.Function([], table, table.ty, is_pure=True).with_attr("global_symbol", GROUPS)
    return mod


__all__ = ["FIRST", "GROUPS", "GROUP_PREFIX", "compose_transform_params", "first_lift", "split_transform_params"]
