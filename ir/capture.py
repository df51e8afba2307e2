"""Capture an ``nn.Module`` into an optc :class:`~optc.ir.program.Program`.

``torch.export.export(strict=False)`` by default; ``method="symbolic"`` runs
``torch.fx.symbolic_trace`` first and exports the traced module, so both paths end in the
same ATen dialect. The result is normalised: a flat graph (tensor leaves in, tensor leaves
out), no guard submodule or hooks, parameters and buffers as ``get_attr`` attributes holding
*copies* of the user's tensors, and ``meta["val"]`` on every node.

The user's module is never modified: its parameters, buffers, training flag and hooks are
the same afterwards (checked, and restored if torch changed them).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import warnings
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from optc.ir import provenance
from optc.errors import CaptureError
from optc.ir.program import InputLeaf, Program
from optc.ir.source import user_frame_from_exception, user_frame_from_stack_trace

log = logging.getLogger(__name__)

_METHODS = ("export", "symbolic")


def capture(model: nn.Module, example_inputs: Any = (), example_kwargs: dict | None = None, *,
            dynamic_shapes: Any = None, method: str = "export", name: str | None = None) -> Program:
    """Capture ``model`` called as ``model(*example_inputs, **example_kwargs)``.

    ``example_inputs`` may be a tuple of positional arguments, a single tensor, or a dict
    of keyword arguments. ``dynamic_shapes`` is passed to ``torch.export`` unchanged (use
    :func:`optc.ir.capture.dynamic_batch` for the common case).
    """
    if method not in _METHODS:
        raise ValueError(f"unknown capture method '{method}' (valid: {', '.join(_METHODS)})")
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected an nn.Module, got {type(model).__name__}",
                           hint="wrap a function in an nn.Module whose forward calls it")
    on_meta = [n for n, t in list(model.named_parameters(remove_duplicate=False)) +
               list(model.named_buffers(remove_duplicate=False)) if t.is_meta]
    if on_meta:
        from optc.errors import WeightsError
        shown = ", ".join(f"'{n}'" for n in on_meta[:3]) + (f" and {len(on_meta) - 3} more" if len(on_meta) > 3 else "")
        raise WeightsError(f"{type(model).__name__} has {len(on_meta)} tensors on the meta device ({shown}) and no "
                           "weights: pass weights= to optc.compile (a .safetensors file, a folder of them or a "
                           "mapping), or --weights to optc compile")
    args, kwargs = _normalise_inputs(example_inputs, example_kwargs)
    if isinstance(dynamic_shapes, str) and dynamic_shapes == "batch":
        dynamic_shapes = dynamic_batch(model, args, kwargs)
    name = name or type(model).__name__
    if _mode_dependent(model):
        warnings.warn(f"{name} is in training mode: the captured graph keeps training-mode "
                      "BatchNorm and dropout. Call model.eval() before capture to deploy it.",
                      stacklevel=2)

    trace_args, trace_kwargs = args, kwargs
    if dynamic_shapes is not None and _batch_is_one(args, kwargs):
        # torch.export specialises size-1 dims; trace a dynamic batch with batch 2
        trace_args, trace_kwargs = _batch2_where_dynamic(model, args, kwargs, dynamic_shapes)

    state = _ModuleState(model)
    try:
        ep = _export(model, trace_args, trace_kwargs, dynamic_shapes, method)
    finally:
        state.restore_and_check(name)

    gm = _normalise(ep)
    leaves = _input_leaves(ep, args, kwargs)
    program = Program(graph_module=gm, in_spec=ep.call_spec.in_spec, out_spec=ep.call_spec.out_spec,
                      input_leaves=leaves, example_args=args, example_kwargs=kwargs,
                      dynamic_shapes=dynamic_shapes, name=name,
                      meta={"capture_method": method,
                            "functionalized": ep.graph_module.meta.get("optc_functionalized", [])})
    _check_normalised(program)
    return program


def dynamic_batch(model: nn.Module, args: tuple, kwargs: dict | None = None, name: str = "batch") -> dict:
    """A ``dynamic_shapes`` spec marking dim 0 of every tensor input as one shared batch dim."""
    batch = torch.export.Dim(name, min=1, max=4096)

    def spec(x):
        return {0: batch} if isinstance(x, torch.Tensor) and x.dim() > 0 else None

    bound = inspect.signature(model.forward).bind(*args, **(kwargs or {}))
    return {k: pytree.tree_map(spec, v) for k, v in bound.arguments.items()}


_MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.modules.instancenorm._InstanceNorm)


def _mode_dependent(model: nn.Module) -> bool:
    """True if a submodule in training mode behaves differently from eval (BatchNorm, dropout)."""
    return any(m.training and isinstance(m, _MODE_DEPENDENT) for m in model.modules())


def _batch_is_one(args, kwargs) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 1
               for t in pytree.tree_leaves((args, kwargs)))


def _to_batch2(t):
    if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 1:
        return t.expand(2, *t.shape[1:]).clone()
    return t


def _batch2_where_dynamic(model: nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any) -> tuple[tuple, dict]:
    """``_to_batch2`` on the inputs whose dim 0 ``dynamic_shapes`` marks dynamic; the others
    (a weight of shape (1, n) passed as an input) keep their shape."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        return args, kwargs
    specs = dynamic_shapes if isinstance(dynamic_shapes, dict) else dict(zip(bound.arguments, dynamic_shapes))
    for name, value in bound.arguments.items():
        bound.arguments[name] = _batch2_by_spec(value, specs.get(name))
    return bound.args, bound.kwargs


def _batch2_by_spec(value: Any, spec: Any) -> Any:
    if isinstance(value, torch.Tensor):
        dim0 = spec.get(0) if isinstance(spec, dict) else (
            spec[0] if isinstance(spec, (list, tuple)) and len(spec) > 0 else None)
        return _to_batch2(value) if dim0 is not None else value
    if isinstance(value, (list, tuple)) and isinstance(spec, (list, tuple)) and len(spec) == len(value):
        items = [_batch2_by_spec(v, s) for v, s in zip(value, spec)]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict) and isinstance(spec, dict):
        return {k: _batch2_by_spec(v, spec.get(k)) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------
def _normalise_inputs(example_inputs, example_kwargs):
    kwargs = dict(example_kwargs or {})
    if isinstance(example_inputs, torch.Tensor):
        args = (example_inputs,)
    elif isinstance(example_inputs, dict):
        args, kwargs = (), {**example_inputs, **kwargs}
    elif isinstance(example_inputs, (tuple, list)):
        args = tuple(example_inputs)
    else:
        raise CaptureError(f"example inputs must be a tensor, a tuple of arguments or a dict of "
                           f"keyword arguments, got {type(example_inputs).__name__}")
    return args, kwargs


def _export(model, args, kwargs, dynamic_shapes, method) -> torch.export.ExportedProgram:
    target = model
    if method == "symbolic":
        try:
            target = fx.symbolic_trace(model)
        except Exception as e:  # torch.fx raises TraceError, TypeError, AttributeError ...
            raise _capture_error(e, method) from e
    try:
        with warnings.catch_warnings(), _quiet_torch_logs():
            warnings.simplefilter("ignore")
            ep = torch.export.export(target, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
            return functionalize(ep)
    except CaptureError:
        raise
    except Exception as e:  # torch.export raises many exception types; all become CaptureError
        raise _capture_error(e, method) from e


def _written_attrs(graph: fx.Graph) -> set[str]:
    """The attribute targets that an in-place op of ``graph`` writes, directly or through views."""
    written: set[str] = set()
    for node in graph.nodes:
        t = node.target
        if node.op != "call_function" or not isinstance(t, torch._ops.OpOverload):
            continue
        for i, a in enumerate(t._schema.arguments):
            if a.alias_info is None or not a.alias_info.is_write:
                continue
            x = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
            seen = set()
            while isinstance(x, fx.Node) and x not in seen:   # back through views to the base
                seen.add(x)
                if x.op == "get_attr":
                    written.add(x.target)
                    break
                if x.op != "call_function" or not x.args:
                    break
                x = x.args[0]
    return written


def mutating_ops(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes of ``gm`` that write one of their inputs in place (``copy_``, ``index_put_``,
    ``masked_fill_``, ``div_``, ``detach_`` ...): an op whose schema marks an argument written."""
    out = []
    for node in gm.graph.nodes:
        t = node.target
        if node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and any(
                a.alias_info is not None and a.alias_info.is_write for a in t._schema.arguments):
            out.append(node)
    return out


def functionalize(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``ep`` with its in-place ops replaced by functional ones, when it has any.

    torch.export's default IR keeps in-place ops (transformers writes ``x[:, 1:] = y``
    (``copy_`` into a slice), ``inv[perm] = arange`` (``index_put_``), ``scores.div_(s)``).
    Every backend would have to honour the aliasing they imply; ONNX and TVM do not, and a
    pass that moves a reader across a write changes the answer. torch's own functionalization
    (``run_decompositions`` with an empty table) rewrites them exactly: ``copy_`` into a view
    becomes ``slice_scatter``/``select_scatter`` of the base, ``index_put_`` ``index_put``. It
    also decomposes the view-returning composites it must see through (``reshape`` into
    ``view``/``clone`` + ``_unsafe_view``, ``to`` into ``_to_copy``, ``chunk`` into ``split``),
    which ``canonicalize`` cleans up. Graphs without mutations are returned unchanged."""
    found = mutating_ops(ep.graph_module)
    if not found:
        return ep
    log.debug("functionalizing %d in-place ops (%s)", len(found),
              ", ".join(sorted({str(n.target) for n in found})))
    new = ep.run_decompositions({})
    new.graph_module.meta["optc_functionalized"] = sorted({f"{n.target}" for n in found})
    return new


@contextlib.contextmanager
def _quiet_torch_logs():
    """torch logs partial graphs at WARNING when export fails; the CaptureError says it better."""
    names = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):   # torch prints the partial graph on failure
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


_HINTS = [
    (re.compile(r"data-dependent|GuardOnDataDependent|cannot be used as inputs to control flow"),
     "data-dependent control flow",
     "the model branches on tensor values: use torch.where or torch.cond, or make the branch depend "
     "only on shapes; torch._check() can state facts export cannot prove"),
    (re.compile(r"Constraints violated|not in range|specialized|Dim\("),
     "a dimension marked dynamic was specialised",
     "the model fixes that dimension to its example value; remove it from dynamic_shapes or make the "
     "code shape-generic"),
    (re.compile(r"Unsupported|not supported|NotImplemented", re.I),
     "an operation torch.export does not support",
     "rewrite that line with supported tensor operations, or capture with method='symbolic'"),
]


def _capture_error(e: BaseException, method: str) -> CaptureError:
    text = f"{type(e).__name__}: {e}"
    source = user_frame_from_exception(e)
    m = re.search(r'The following call raised this error:\s*\n\s*File "([^"]+)", line (\d+)', str(e))
    if m:
        source = f"{m.group(1)}:{m.group(2)}"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    for pattern, reason, hint in _HINTS:
        if pattern.search(text):
            return CaptureError(f"cannot capture ({method}): {reason}: {first}", source=source, hint=hint)
    return CaptureError(f"cannot capture ({method}): {type(e).__name__}: {first}", source=source)


# ---------------------------------------------------------------------------------------
class _ModuleState:
    """Snapshot of a module's observable state, to prove capture left it untouched."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.training = {n: m.training for n, m in model.named_modules()}
        self.tensors = {n: (t, t._version) for n, t in
                        list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))}
        self.hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}

    def restore_and_check(self, name: str) -> None:
        for n, m in self.model.named_modules():
            if n in self.training and m.training != self.training[n]:
                m.train(self.training[n])
        now = {n: t for n, t in
               list(self.model.named_parameters(remove_duplicate=False)) + list(self.model.named_buffers(remove_duplicate=False))}
        for n, (t, version) in self.tensors.items():
            if now.get(n) is not t or t._version != version:
                raise CaptureError(f"capturing {name} modified its tensor '{n}' (the model mutates its own "
                                   "state in forward)", hint="remove in-place updates of parameters/buffers from forward")
        hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in self.model.named_modules()}
        if hooks != self.hooks:
            raise CaptureError(f"capturing {name} changed its hooks")


def _input_leaves(ep, args, kwargs) -> tuple[InputLeaf, ...]:
    leaves_with_path, _ = pytree.tree_flatten_with_path((args, kwargs))
    out = []
    for path, value in leaves_with_path:
        p = pytree.keystr(path)
        p = re.sub(r"^\[0\]", "args", p)
        p = re.sub(r"^\[1\]", "kwargs", p)
        if isinstance(value, torch.Tensor):
            out.append(InputLeaf(p, True))
        else:
            out.append(InputLeaf(p, False, value))
    return tuple(out)


def _normalise(ep: torch.export.ExportedProgram) -> fx.GraphModule:
    """Unlift ``ep`` into a flat GraphModule with copied weights and no guards or hooks."""
    unlifted = ep.module()
    graph = unlifted.graph
    # drop guard calls and the guard submodule
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target.startswith("_guards"):
            graph.erase_node(node) if not node.users else node.replace_all_uses_with(None)
            if node in graph.nodes:
                graph.erase_node(node)
    # non-tensor placeholders were specialised by export: drop them (Program checks their values)
    for node in list(graph.nodes):
        if node.op == "placeholder" and not isinstance(node.meta.get("val"), torch.Tensor):
            if node.users:
                raise CaptureError(f"non-tensor input '{node.name}' is used by the graph; optc needs tensor inputs")
            graph.erase_node(node)
    # flat output: the codegen returns pytree.tree_unflatten((a, b), spec); the graph's output
    # node holds the flat tuple already.
    out = graph.output_node()
    flat = out.args[0]
    if not isinstance(flat, (tuple, list)):
        flat = (flat,)
    for a in flat:
        if not isinstance(a, fx.Node):
            raise CaptureError(f"the model returns a non-tensor value ({a!r}); optc needs tensor outputs")
    out.args = (tuple(flat),)

    # the Program shares the user's weight tensors (detached: no copy, one set of weights in
    # memory); passes and backends never write to an attribute (they make new ones). The only
    # writes a captured graph can hold are a mutated buffer's write-back (``copy_`` into it,
    # added by ep.module() after functionalization): such a buffer gets its own copy, so running
    # the Program never modifies the user's model.
    written = _written_attrs(graph)
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            obj = unlifted
            for atom in node.target.split("."):
                obj = getattr(obj, atom)
            if isinstance(obj, torch.Tensor):
                t = obj.detach()
                if node.target in written:
                    t = t.clone()
                root[node.target] = nn.Parameter(t, requires_grad=False) if isinstance(obj, nn.Parameter) else t
            else:
                root[node.target] = obj
        elif node.op == "call_module":
            raise CaptureError(f"unexpected submodule call '{node.target}' after export")
    new_graph = fx.Graph()
    new_out = new_graph.graph_copy(graph, {})
    new_graph.output(new_out)
    gm = fx.GraphModule(root, new_graph, class_name="GraphModule")
    for node in gm.graph.nodes:
        if "val" not in node.meta and node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                and not node.target._schema.returns:
            node.meta["val"] = None   # an op that returns nothing (run_decompositions leaves no val on asserts)
        elif "val" not in node.meta and node.op == "call_function" and node.target is torch.ops.aten.copy_.default:
            # the write-back of a mutated buffer that ep.module() adds after functionalization
            node.meta["val"] = node.args[0].meta.get("val")
        src = user_frame_from_stack_trace(node.meta.get("stack_trace"))
        if src:
            node.meta["optc_source"] = src
    provenance.stamp(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _check_normalised(program: Program) -> None:
    for node in program.graph.nodes:
        if node.op == "output":
            continue
        if "val" not in node.meta:
            raise CaptureError(f"captured node %{node.name} ({node.target}) has no shape metadata")
