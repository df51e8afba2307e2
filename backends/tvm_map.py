"""The TVM node map: which Relax value holds each optc node's result, which kernels of the built
library compute it, and an instrumented copy of the imported module that returns those values.

**Values** are read where they are defined by construction: the importer
(``ExportedProgramImporter``) keeps ``env``, fx node -> the Relax expression it made, and the fx
nodes are those of the ExportedProgram it imported (``ep.run_decompositions()`` of optc's export,
whose ``from_node`` chains reach the graph :func:`~optc.backends.export.export_program` traced --
matched by that graph's identity, as in :func:`optc.backends.onnx.backend_map`). An optc node
gets a value only when exactly one of its exported nodes is read outside the node (its result)
and the importer bound that node to a Relax variable of ``main`` whose shape and dtype are the
optc node's: that variable, named by its unique name in the imported ``main``.

**Kernels** are followed through the real build (a pass instrument keeps ``main`` before
``FuseOps``, the module after it and the built one): the passes up to ``FuseOps`` keep binding
variables; ``FuseOps`` moves a group of bindings into a primitive function, and each call of it
is matched, binding by binding, with the bindings of ``main`` that compute the same (the same
operator, PrimFunc, attributes and types on the same values, the function's parameters read as
the call's arguments) -- not by the function's own variables, which are one group's: one fused
function serves the same group of every layer; ``FuseTIR`` keeps ``main``'s bindings; and the
k-th call of a PrimFunc in ``main`` before the schedule is its k-th call in the built ``main``
(and at run time) when both call it the same number of times (``f_prepacked`` counting as ``f``:
``SplitLayoutRewritePreproc`` splits the weight repacking out of ``f``). A kernel call is named
``fused_matmul_add1`` (one call per run) or ``add#3`` (the third call of a PrimFunc called
several times). What cannot be followed is left out: a node with no kernel named, never a wrong
one.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

log = logging.getLogger("optc.backends.tvm")


class BackendMap(dict):
    """optc node name (of the staged Program that was lowered) -> ``{"nodes": [kernel calls of the
    built library], "value": name of the Relax variable of the imported ``main`` or None}``."""


@dataclass
class Imported:
    """A Program imported to Relax, with what the importer knew."""

    mod: Any                                   # tvm.IRModule, weights bound as constants (or main's parameters)
    env: dict                                  # exported fx node -> Relax expression
    ep: torch.export.ExportedProgram           # the program the importer read (decomposed)
    source_graph: fx.Graph | None              # the graph export_program traced
    params: list | None = None                 # with keep_params: main's weight arguments (torch tensors, shared)


def import_program(ep: torch.export.ExportedProgram, convert_map: dict | None, keep_params: bool = False) -> Imported:
    """``from_exported_program(ep, keep_params_as_input=keep_params, custom_convert_map=...)``,
    keeping the importer's ``env``: the same steps (``run_decompositions``, then the importer).
    ``keep_params``: the parameters stay ``main``'s arguments after its ``num_input`` inputs (buffers
    and constants are bound), detached from the module as the Program's own tensors."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter
    decomposed = ep.run_decompositions()
    importer = ExportedProgramImporter()
    if keep_params:
        # the importer converts every parameter to a TVM tensor for main's "params" attribute, which
        # is dropped below (the Program's own tensors are the weights): a copy of every weight that
        # is not 64-byte aligned (all of a safetensors file's), and the file pages read for it.
        # Parameters get an empty placeholder instead; buffers and constants (bound) are converted.
        import tvm
        own = {id(t) for t in dict(decomposed.named_parameters()).values()}
        convert, placeholder = importer._convert_pytorch_tensor_to_tvm, tvm.runtime.empty((0,), "float32")
        importer._convert_pytorch_tensor_to_tvm = lambda t: placeholder if id(t) in own else convert(t)
    mod = importer.from_exported_program(decomposed, keep_params, False, False, convert_map)
    params = None
    if keep_params:
        main = mod["main"]
        mod["main"] = main.without_attr("params")       # relax.frontend.detach_params, keeping torch's tensors
        params = [p.detach() for p in dict(decomposed.named_parameters()).values()]
    return Imported(mod, dict(importer.env), decomposed, getattr(ep, "optc_source_graph", None), params)


# ---- Relax helpers ---------------------------------------------------------------------------------------
def bindings(func) -> list:
    """The bindings of a Relax function's body, every block in order."""
    out = []
    for block in func.body.blocks:
        out.extend(block.bindings)
    return out


def _is_var(e) -> bool:
    from tvm import relax
    return isinstance(e, (relax.Var, relax.DataflowVar))


def _tensor_type_matches(var, val) -> bool:
    """The Relax variable's type is a tensor of ``val``'s dtype and shape (static dims compared)."""
    from tvm import relax
    ty = getattr(var, "ty", None)
    if not isinstance(ty, relax.TensorType) or not isinstance(val, torch.Tensor):
        return False
    if str(ty.dtype) != str(val.dtype).replace("torch.", ""):
        return False
    shape = getattr(ty, "shape", None)
    if not isinstance(shape, relax.ShapeExpr) or len(shape.values) != val.dim():
        return False
    for d, t in zip(shape.values, val.shape):
        static = getattr(d, "value", None)
        if isinstance(static, int) and not isinstance(t, torch.SymInt) and static != int(t):
            return False
    return True


# ---- the map -----------------------------------------------------------------------------------------------
def ep_to_optc(ep: torch.export.ExportedProgram, names: set[str], source_graph: fx.Graph | None) -> dict:
    """Exported call nodes -> the optc node each was traced from (``from_node``, by graph identity)."""
    source_id = id(source_graph) if source_graph is not None else None
    out: dict[fx.Node, str] = {}
    for n in ep.graph.nodes:
        if n.op != "call_function":
            continue
        stack = list(n.meta.get("from_node") or [])
        while stack:
            src = stack.pop(0)
            if getattr(src, "name", None) in names and (source_id is None or getattr(src, "graph_id", None) == source_id):
                out[n] = src.name
                break
            stack.extend(getattr(src, "from_node", None) or [])
    return out


def binding_owners(imported: Imported) -> dict:
    """Relax binding variable of the imported ``main`` -> the exported node whose translation
    emitted it. The importer translates nodes in order and each translation emits its bindings
    before the next one starts: the bindings up to and including the one a node's variable is
    bound by are that node's."""
    position = {b.var: i for i, b in enumerate(bindings(imported.mod["main"]))}
    order = list(bindings(imported.mod["main"]))
    owners: dict = {}
    last = -1
    for node in imported.ep.graph.nodes:
        if node.op != "call_function":
            continue
        e = imported.env.get(node)
        p = position.get(e) if _is_var(e) else None
        if p is None or p <= last:
            continue
        for b in order[last + 1:p + 1]:
            owners[b.var] = node
        last = p
    return owners


def build_map(imported: Imported, program, kernels: dict | None = None) -> BackendMap:
    """The node map of ``program`` (the staged Program that was imported); ``kernels``: Relax
    variable of the imported ``main`` -> kernel calls computing it (:func:`kernel_calls`)."""
    names = {n.name: n for n in program.graph.nodes}
    to_optc = ep_to_optc(imported.ep, set(names), imported.source_graph)
    groups: dict[str, list[fx.Node]] = {}
    for n, o in to_optc.items():
        groups.setdefault(o, []).append(n)
    # torch.export records the items of a multi-output node (split's getitems) as traced from
    # that node: optc's own ``getitem(s, i)`` takes the item i of s's group
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target is operator.getitem and node.name not in groups \
                and isinstance(node.args[0], fx.Node) and isinstance(node.args[1], int):
            parent = groups.get(node.args[0].name, [])
            items = [e for e in parent if e.target is operator.getitem and e.args[1] == node.args[1]
                     and e.args[0] in parent]
            if len(items) == 1:
                groups[node.name] = items
                parent.remove(items[0])
    main_bindings = bindings(imported.mod["main"])
    count: dict[str, int] = {}
    for b in main_bindings:
        count[b.var.name] = count.get(b.var.name, 0) + 1
    bound = {b.var for b in main_bindings}
    owners = binding_owners(imported)
    node_kernels: dict[fx.Node, list[str]] = {}
    for var, calls in (kernels or {}).items():
        owner = owners.get(var)
        if owner is not None:
            node_kernels.setdefault(owner, []).extend(calls)

    out = BackendMap()
    for node in program.graph.nodes:          # in program order: a shared kernel's first node first
        group = groups.get(node.name)
        if not group:
            continue
        members = set(group)
        calls = list(dict.fromkeys(c for e in group for c in node_kernels.get(e, [])))
        results = [e for e in group if any(u not in members for u in e.users)]
        value = None
        if len(results) == 1:
            v = imported.env.get(results[0])
            if _is_var(v) and v in bound and count.get(v.name) == 1 and \
                    _tensor_type_matches(v, node.meta.get("val")) and \
                    _tensor_type_matches(v, results[0].meta.get("val")):
                value = v.name
        out[node.name] = {"nodes": calls, "value": value}
    return out


# ---- kernels: following bindings through the build ---------------------------------------------------------
class Recorder:
    """A TVM pass instrument that keeps ``main`` before ``FuseOps``, the module after it, and the
    built module (after ``OptcBuild``): what :func:`kernel_calls` follows bindings through."""

    def __init__(self):
        import tvm
        recorder = self
        self.before_fuse = None
        self.after_fuse = None
        self.built = None

        @tvm.instrument.pass_instrument
        class _Instrument:
            def run_before_pass(self, mod, info):
                if info.name == "FuseOps":
                    recorder.before_fuse = mod["main"]

            def run_after_pass(self, mod, info):
                if info.name == "FuseOps":
                    recorder.after_fuse = mod
                elif info.name == "OptcBuild":
                    recorder.built = mod

        self.instrument = _Instrument()


def _same(a, b, subst: dict) -> bool:
    """``a`` (inside a fused function, its variables read through ``subst``) is the expression
    ``b`` (of ``main`` before fusion): the same Relax variables, operators, attributes and types."""
    import tvm
    import tvm_ffi
    from tvm import relax
    if _is_var(a):
        a = subst.get(a, a)
        if a is None:                  # an argument whose value was not followed
            return False
        if _is_var(a) or _is_var(b):
            return a.same_as(b)
    if isinstance(a, tvm.ir.expr.Call) and isinstance(b, tvm.ir.expr.Call):
        return (a.op.same_as(b.op) and len(a.args) == len(b.args)
                and all(_same(x, y, subst) for x, y in zip(a.args, b.args))
                and tvm_ffi.structural_equal(a.attrs, b.attrs, map_free_vars=True)
                and tvm_ffi.structural_equal(list(a.ty_args), list(b.ty_args), map_free_vars=True))
    if isinstance(a, relax.Tuple) and isinstance(b, relax.Tuple):
        return len(a.fields) == len(b.fields) and all(_same(x, y, subst) for x, y in zip(a.fields, b.fields))
    if isinstance(a, relax.TupleGetItem) and isinstance(b, relax.TupleGetItem):
        return a.index == b.index and _same(a.tuple_value, b.tuple_value, subst)
    # shapes, prim values, constants; a fused function has its own symbolic dims (``s43``): matched
    # freely (the tensor arguments, compared by identity above, are what pin a binding down)
    return a.same_as(b) or (type(a) is type(b) and tvm_ffi.structural_equal(a, b, map_free_vars=True))


def _key(value) -> tuple:
    """What two bindings computing the same must share: the operator (and the PrimFunc a
    ``call_tir`` calls)."""
    import tvm
    if isinstance(value, tvm.ir.expr.Call):
        op = value.op
        if isinstance(op, tvm.ir.Op) and value.args and isinstance(value.args[0], tvm.ir.GlobalVar):
            return (op.name, value.args[0].name_hint)
        return (op.name if isinstance(op, tvm.ir.Op) else getattr(op, "name_hint", str(type(op))),)
    return (type(value).__name__,)


def _through_fusion(before_main, after_mod) -> dict:
    """Variable of ``main`` after ``FuseOps`` -> the variables of ``main`` before it whose values
    its binding computes. A fused call's group is found by matching each binding of the fused
    function, its parameters read as this call's arguments, with a binding of ``main`` before
    fusion that computes the same (:func:`_same`): a fused function may be called for several
    groups (the layers of a transformer), so its own variables name only one of them."""
    import tvm
    from tvm import relax
    before = bindings(before_main)
    known = {b.var for b in before}
    buckets: dict[tuple, list] = {}
    for b in before:
        buckets.setdefault(_key(b.value), []).append(b)
    items = {(b.value.tuple_value, b.value.index): b.var for b in before
             if isinstance(b.value, relax.TupleGetItem) and _is_var(b.value.tuple_value)}
    claimed: set = set()
    value_of: dict = {}      # after-fusion var -> before-fusion var (or tuple of them) holding its value

    def resolve(e):
        """An argument of a call in ``main`` after fusion, as what holds its value before it."""
        if _is_var(e):
            return value_of.get(e, e)
        if isinstance(e, relax.TupleGetItem):
            t = resolve(e.tuple_value)
            if isinstance(t, tuple):
                return t[e.index] if 0 <= e.index < len(t) and t[e.index] is not None else e
            return items.get((t, e.index), e)
        return e

    out: dict = {}
    for b in bindings(after_mod["main"]):
        if b.var in known:
            value_of[b.var] = b.var
            out[b.var] = [b.var]
            continue
        v = b.value
        if isinstance(v, relax.TupleGetItem):
            r = resolve(v)
            if _is_var(r):
                value_of[b.var] = r
            continue
        if not (isinstance(v, tvm.ir.expr.Call) and isinstance(v.op, tvm.ir.GlobalVar)):
            continue
        func = after_mod[v.op]
        if not isinstance(func, relax.Function):
            continue
        subst = {p: resolve(a) for p, a in zip(func.params, v.args)}
        members = []
        for fb in bindings(func):
            match = next((c for c in buckets.get(_key(fb.value), []) if c.var not in claimed
                          and _same(fb.value, c.value, subst)), None)
            if match is None:
                continue
            claimed.add(match.var)
            subst[fb.var] = match.var
            members.append(match.var)
        ret = func.body.body
        if _is_var(ret) and subst.get(ret) is not None:
            value_of[b.var] = subst[ret]
        elif isinstance(ret, relax.Tuple):
            value_of[b.var] = tuple(subst.get(f) if _is_var(f) else None for f in ret.fields)
        out[b.var] = members
    return out


def _prim_calls(main, mod) -> list[tuple[Any, str]]:
    """``(binding var, PrimFunc name)`` of each ``call_tir`` of ``main`` (before lowering) or call of
    a PrimFunc (after it), in order."""
    import tvm
    from tvm import tirx
    out = []
    for b in bindings(main):
        v = b.value
        if not isinstance(v, tvm.ir.expr.Call):
            continue
        gv = None
        if isinstance(v.op, tvm.ir.GlobalVar):
            gv = v.op
        elif isinstance(v.op, tvm.ir.Op) and v.op.name in ("relax.call_tir", "relax.call_tir_inplace") and v.args \
                and isinstance(v.args[0], tvm.ir.GlobalVar):
            gv = v.args[0]
        if gv is not None and isinstance(mod[gv], tirx.PrimFunc):
            out.append((b.var, gv.name_hint))
    return out


def call_names(names: list[str]) -> list[str]:
    """Kernel calls named as :meth:`TVMModel.node_times` names them: ``f`` for a PrimFunc called
    once, ``f#k`` for its k-th call."""
    total: dict[str, int] = {}
    for n in names:
        total[n] = total.get(n, 0) + 1
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if total[n] == 1 else f"{n}#{seen[n]}")
    return out


PREPACKED = "_prepacked"


def kernel_calls(recorder: Recorder, scheduled, imported_main) -> dict:
    """Relax variable of the imported ``main`` -> the kernel calls of the built library that
    compute it (module docstring); ``scheduled`` is the module the pre-schedule pipeline made."""
    if recorder.built is None:
        return {}
    if recorder.after_fuse is not None and recorder.before_fuse is not None:
        groups = _through_fusion(recorder.before_fuse, recorder.after_fuse)
    else:                                         # FuseOps did not run (disabled)
        groups = {b.var: [b.var] for b in bindings(scheduled["main"])}
    calls = _prim_calls(scheduled["main"], scheduled)
    built = _prim_calls(recorder.built["main"], recorder.built)
    before_names = {n for _, n in calls}

    def base(n: str) -> str:
        # SplitLayoutRewritePreproc splits the weight repacking out of f; the rest is f_prepacked
        if n not in before_names and n.endswith(PREPACKED) and n[:-len(PREPACKED)] in before_names:
            return n[:-len(PREPACKED)]
        return n

    per_name_before: dict[str, int] = {}
    for _, n in calls:
        per_name_before[n] = per_name_before.get(n, 0) + 1
    per_name_built: dict[str, int] = {}
    for _, n in built:
        per_name_built[base(n)] = per_name_built.get(base(n), 0) + 1
    names = dict(zip(range(len(built)), call_names([n for _, n in built])))
    # the k-th call of f before the schedule is the k-th call of f (or f_prepacked) in the built main
    built_index: dict[tuple[str, int], int] = {}
    seen: dict[str, int] = {}
    for i, (_, n) in enumerate(built):
        seen[base(n)] = seen.get(base(n), 0) + 1
        built_index[(base(n), seen[base(n)])] = i
    imported = {b.var for b in bindings(imported_main)}
    out: dict = {}
    seen = {}
    for var, n in calls:
        seen[n] = seen.get(n, 0) + 1
        if per_name_before[n] != per_name_built.get(n):
            continue
        name = names[built_index[(n, seen[n])]]
        for member in groups.get(var, []):
            if member in imported:
                out.setdefault(member, []).append(name)
    return out


# ---- the instrumented copy -----------------------------------------------------------------------------------
def with_outputs(mod, names: list[str]) -> tuple[Any, list[str]]:
    """A copy of ``mod`` whose ``main`` returns ``(its outputs, (the variables named names...))``:
    each variable of a dataflow block leaves it as an output of that block. Returns the module and
    the names it returns, in order (names that are not tensor variables of ``main`` are left out)."""
    import tvm
    from tvm import relax
    main = mod["main"]
    by_name: dict[str, Any] = {}
    for b in bindings(main):
        by_name.setdefault(b.var.name, []).append(b.var)
    wanted = [n for n in dict.fromkeys(names)
              if len(by_name.get(n, [])) == 1 and isinstance(by_name[n][0].ty, relax.TensorType)]
    want = {by_name[n][0]: n for n in wanted}
    bb = relax.BlockBuilder()
    attrs = dict(main.attrs) if main.attrs is not None else None
    outs: dict[str, Any] = {}
    with bb.function("main", list(main.params), attrs=attrs, pure=main.is_pure):
        for block in main.body.blocks:
            if isinstance(block, relax.DataflowBlock):
                with bb.dataflow():
                    for b in block.bindings:
                        bb.emit_normalized(b)
                    for b in block.bindings:
                        if b.var in want:
                            outs[want[b.var]] = bb.emit_output(b.var)
            else:
                for b in block.bindings:
                    bb.emit_normalized(b)
                    if b.var in want:
                        outs[want[b.var]] = b.var
        bb.emit_func_output(relax.Tuple([main.body.body, relax.Tuple([outs[n] for n in wanted])]))
    new = bb.get()
    result = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"}, attrs=mod.attrs)
    result["main"] = new["main"]
    return result, wanted


__all__ = ["BackendMap", "Imported", "Recorder", "build_map", "call_names", "import_program", "kernel_calls",
           "with_outputs"]
