"""Lowering a Program with a backend: resolve the target and backend, check availability and every
op, run the backend stage (``backends/stage.py``), lower, and turn an unexpected exception into a
:class:`~optc.errors.LoweringError` that names the node."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch
import torch.fx as fx

from optc.backends.registry import get_backend
from optc.errors import LoweringError, OptcError
from optc.ir.program import Program
from optc.ir.source import node_source
from optc.target import Target, resolve_target

if TYPE_CHECKING:
    from optc.backends.base import Backend, CompiledModel


DEFAULT_BACKEND = "onnx"


def resolve(target: "Target | str", backend: str | None = None, options: dict | None = None
            ) -> tuple[Target, "Backend"]:
    """The one resolution of what to lower with (``optc.compile``, ``lower`` and ``optc compile``
    use it): ``target`` (``"cpu"``, ``"onnx:cuda"``, a Target) with ``backend`` overriding the one
    it names, else :data:`DEFAULT_BACKEND`; the Backend; and ``options`` checked against the
    backend's (an unknown one is an :class:`OptcError` listing the valid ones)."""
    tgt = resolve_target(target, backend)
    if tgt.backend is None:
        tgt = tgt.with_backend(DEFAULT_BACKEND)
    be = get_backend(tgt.backend)
    unknown = [k for k in (options or {}) if k not in be.option_names()]
    if unknown:
        raise OptcError(f"backend '{be.name}' has no option '{unknown[0]}' "
                        f"(valid options: {', '.join(be.option_names()) or 'none'})")
    return tgt, be


def lower(program: Program, target: Target | str = "cpu", backend: str | None = None, *,
          pipeline: str = "", **options) -> CompiledModel:
    """Lower ``program`` for ``target`` with ``backend`` (default: the target's, else onnx).

    Checks availability (package, device) and every op of the program *before* lowering, and
    turns any unexpected exception from the lowering into a :class:`LoweringError` naming the
    node where the message lets us find it. Unknown ``options`` are errors listing the valid ones.
    """
    if not isinstance(program, Program):
        raise TypeError(f"lower() takes a Program (from optc.capture), got {type(program).__name__}")
    tgt, be = resolve(target, backend, options)
    be.check_available(tgt)
    staged, stage_report = run_backend_stage(program, be, tgt)
    be.check_ops(staged, tgt)
    try:
        compiled = be.lower(staged, tgt, **options)
    except OptcError:
        raise
    except Exception as e:  # exporters raise anything; name the node where we can
        raise lowering_error(e, staged, be.name) from e
    compiled.pipeline = pipeline
    compiled.stage_report = stage_report
    return compiled


def run_backend_stage(program: Program, backend: "Backend", target: Target, **manager_options):
    """``backend``'s stage (:meth:`Backend.stage`) run on a copy of ``program`` through the
    PassManager: ``(program, report)``. ``manager_options`` go to the PassManager (``first_index``,
    ``instruments``, ``bisect_limit``, ``disable``: ``optc dump --backend`` numbers and dumps the
    stage after the pipeline)."""
    from optc.backends.stage import run_stage
    try:
        return run_stage(program, backend.stage(program, target), target, native_ops=backend.native_ops(target),
                         **manager_options)
    except OptcError as e:
        if getattr(e, "pass_name", None):
            raise LoweringError(f"the backend stage failed: {e}", backend=backend.name) from e
        raise


def lowering_error(exc: BaseException, program: Program, backend: str) -> LoweringError:
    """A :class:`LoweringError` for an exception raised while lowering ``program``.

    Looks through the exception chain for a node name (``%linear``) or an op (``aten::foo``,
    ``torch.ops.aten.foo.default``) that the program has, to name the node and its source line.
    """
    chain, e, seen = [], exc, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = "\n".join(str(x) for x in chain)
    from optc.backends.base import op_name
    node = _find_node(text, program)
    innermost = chain[-1]
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    msg = f"lowering failed: {type(exc).__name__}: {first}"
    if innermost is not exc and str(innermost).strip():
        msg += f" (caused by {type(innermost).__name__}: {str(innermost).strip().splitlines()[0]})"
    if node is None:
        return LoweringError(msg, backend=backend)
    return LoweringError(msg, backend=backend, op=op_name(node.target), node=node.name, source=node_source(node))


_OPS_RE = re.compile(r"torch\.ops\.(\w+)\.(\w+)(?:\.(\w+))?|\b(\w+)::(\w+)(?:\.(\w+))?")


def _find_node(text: str, program: Program) -> fx.Node | None:
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    by_name = {n.name: n for n in nodes}
    for m in re.finditer(r"%(\w+)", text):
        if m.group(1) in by_name:
            return by_name[m.group(1)]
    for m in _OPS_RE.finditer(text):
        ns, op, overload = (m.group(1), m.group(2), m.group(3)) if m.group(1) else (m.group(4), m.group(5), m.group(6))
        for n in nodes:
            t = n.target
            if isinstance(t, torch._ops.OpOverload) and t.namespace == ns and t._opname == op and (
                    overload is None or t._overloadname == overload):
                return n
    return None


__all__ = ["resolve", "lower", "run_backend_stage", "lowering_error", "DEFAULT_BACKEND"]
