"""``optc reduce``: the smallest part of a model's graph that still fails the same way.

    optc reduce MODEL --backend B [--pipeline P] [--target T] [--rtol R] [--out DIR] [--json OUT]

The model is captured once and every node's value on the example inputs recorded. A *candidate*
is a piece of the captured graph: one node as its output, and a cut -- nodes whose recorded
values become the piece's inputs. Each candidate is compiled like the model (``pipeline``, the
backend, no check) and compared with the same piece run in float64 eager (``optc compare``'s
measure); it *reproduces* if it fails as the whole model did: the same kind (a mismatch of the
same order of magnitude, or the same exception type and first line). The failure of the whole
model is **pinned** first, so the reduction cannot slide to another bug.

1. **From the back**: the earliest node, in topological order, whose prefix of the graph (that
   node as the only output) reproduces -- a bisection over the nodes.
2. **From the front**: the most ancestors of that node replaced by their recorded values (as
   inputs) with the failure still reproducing -- a bisection over its ancestors in topological
   order.

What is left is written to ``--out``: ``reduced.optc`` (the piece in optc's IR text, with source
lines) and ``reduced.optc.weights`` (its tensors and recorded inputs), which ``optc dump`` and
``optc compare DIR/reduced.optc --backend B`` replay; ``reduced.py``, the piece as a plain-torch
module whose ``make()`` returns ``(model, inputs)``; ``reduced.pt2`` (``torch.export.save``:
``optc compile DIR/reduced.pt2 --backend B`` reproduces it); ``inputs.pt`` (the recorded input
values) and ``failure.json``. The command that shows the failure is printed. Unlike a reducer that
marks every tensor as an output, each candidate is a whole graph of its own, compiled with the
fusions it allows.

Exit status: 0 when the whole model matches (nothing to reduce), 1 when a reduced piece was
written, 2 on a usage error.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from optc.errors import OptcError
from optc.tools.bisect import Failure


@dataclass
class ReduceResult:
    model: str
    backend: str
    pipeline: str
    pinned: Failure | None
    nodes_before: int = 0            # call nodes of the captured graph
    nodes_after: int = 0             # call nodes of the reduced piece
    output: str | None = None        # the captured node the piece ends at
    inputs: list[str] = field(default_factory=list)   # captured nodes whose values feed the piece
    text: str = ""                   # the piece in optc's IR text
    failure: Failure | None = None   # how the piece fails
    tries: int = 0
    files: list[str] = field(default_factory=list)
    target: str = "cpu"
    replay: str = ""                 # the command that shows the failure of the written piece

    def to_json(self) -> dict:
        d = asdict(self)
        for key in ("pinned", "failure"):
            f = d.get(key)
            if f:
                for k in ("decade", "error"):
                    if isinstance(f.get(k), float) and not math.isfinite(f[k]):
                        f[k] = str(f[k])
        return d

    def format(self) -> str:
        lines = [f"model {self.model}, backend {self.backend}, pipeline {self.pipeline}"]
        if self.pinned is None:
            lines.append("the full compile matches the eager model: nothing to reduce")
            return "\n".join(lines)
        lines.append(f"pinned failure: {self.pinned.describe()}")
        lines.append(f"reduced: {self.nodes_before} -> {self.nodes_after} nodes in {self.tries} tries, ending at "
                     f"%{self.output}, inputs {', '.join('%' + i for i in self.inputs) or 'none'}")
        if self.failure is not None:
            lines.append(f"the piece fails with: {self.failure.describe()}")
        lines.append(self.text.rstrip())
        if self.files:
            lines.append("written: " + ", ".join(self.files))
        if self.replay:
            lines.append(f"replay (exit status 1 on the failure): {self.replay}")
        return "\n".join(lines)


def _piece(gm: fx.GraphModule, out: fx.Node, cut: set[str], values: dict[str, Any]) -> tuple[fx.GraphModule, list, list[str]]:
    """The graph computing ``out`` from the nodes in ``cut`` (as inputs, with their recorded values)
    and the original inputs it still needs; attributes shared with ``gm``."""
    needed: list[fx.Node] = []
    seen: set[fx.Node] = set()

    def visit(n: fx.Node):
        if n in seen:
            return
        seen.add(n)
        if n.name not in cut and n.op == "call_function":
            for a in n.all_input_nodes:
                visit(a)
        needed.append(n)
    visit(out)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    needed.sort(key=order.__getitem__)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs, names = [], []
    for n in needed:
        if n.op == "placeholder" or n.name in cut:
            p = graph.placeholder(n.name)
            p.meta = dict(n.meta)
            env[n] = p
            inputs.append(values[n.name])
            names.append(n.name)
    for n in needed:
        if n in env:
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[out])
    return fx.GraphModule(gm, graph), inputs, names


def reduce(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, *, backend: str,
           pipeline: str = "default", target: str = "cpu", rtol: float | None = None, atol: float | None = None,
           label: str = "", progress: Callable[[str], None] | None = None) -> tuple[ReduceResult, Any]:
    """See the module docstring. Returns the result and the reduced piece ``(GraphModule, inputs)``
    (None when there is nothing to reduce)."""
    import optc
    from optc.backends.lowering import resolve
    from optc.ir.printer import format_text
    from optc.tools.bisect import _signature
    from optc.tools.compare import _flat, _record, _reference
    say = progress or (lambda msg: None)
    kwargs = dict(kwargs or {})
    tgt, be = resolve(target, backend, {})
    program = optc.capture(model, args, kwargs or None)
    gm = program.graph_module
    values = _record(gm, program.example_flat_inputs())
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and isinstance(values.get(n.name), torch.Tensor)
             and values[n.name].is_floating_point()]
    result = ReduceResult(label or type(model).__name__, be.name, pipeline, None, nodes_before=len(calls),
                          target=str(target))

    def attempt(module: torch.nn.Module, inputs: list) -> Failure | None:
        result.tries += 1
        try:
            reference, _ = _reference(module, tuple(inputs), {})
            compiled, _ = optc.compile(module, tuple(inputs), backend=be.name, target=tgt, pipeline=pipeline,
                                       check=False)
            with torch.no_grad():
                got = _flat(compiled(*inputs))
            program_for_tol = optc.capture(module, tuple(inputs))
            return _signature(got, reference, program_for_tol, rtol, atol)
        except Exception as e:  # noqa: BLE001 - a candidate that raises is an outcome
            return Failure("error", error_type=type(e).__name__, message=(str(e).strip().splitlines() or [""])[0][:200])

    def same_kind(f: Failure | None) -> bool:
        return f is not None and f.same_as(result.pinned, any_output=True)

    say("pinning the failure of the whole model")
    result.pinned = attempt(model, list(args))
    if result.pinned is None:
        return result, None

    def fails(out: fx.Node, cut: set[str]) -> bool:
        piece, inputs, _ = _piece(gm, out, cut, values)
        f = attempt(piece, inputs)
        ok = same_kind(f)
        say(f"try {result.tries}: %{out.name}, {len(cut)} cut: {'reproduces' if ok else 'no'}")
        return ok

    # 1. from the back: the first prefix that reproduces
    lo, hi = -1, len(calls) - 1
    if not fails(calls[hi], set()):
        raise OptcError("the failure does not reproduce on the graph's last computed value alone "
                        "(it needs several outputs together): not reduced")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fails(calls[mid], set()):
            hi = mid
        else:
            lo = mid
    out = calls[hi]
    # 2. from the front: cut the most ancestors
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    ancestors: list[fx.Node] = []
    stack, seen = list(out.all_input_nodes), set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and isinstance(values.get(n.name), torch.Tensor):
            ancestors.append(n)
        stack.extend(n.all_input_nodes)
    ancestors.sort(key=order.__getitem__)
    lo, hi = 0, len(ancestors)          # cut the first j ancestors; j = 0 reproduces
    while hi - lo > 0:
        mid = (lo + hi + 1) // 2
        if fails(out, {a.name for a in ancestors[:mid]}):
            lo = mid
        else:
            hi = mid - 1
    cut = {a.name for a in ancestors[:lo]}
    piece, inputs, names = _piece(gm, out, cut, values)
    result.failure = attempt(piece, inputs)
    result.output, result.inputs = out.name, names
    result.nodes_after = sum(1 for n in piece.graph.nodes if n.op == "call_function")
    result.text = format_text(piece)
    return result, (piece, inputs)


def save_reduced(result: ReduceResult, piece, inputs: list, directory: str) -> list[str]:
    """``reduced.optc`` and ``reduced.optc.weights``, ``reduced.py``, ``reduced.pt2``, ``inputs.pt`` and
    ``failure.json`` into ``directory`` (each written to a temporary name first); sets ``result.replay``."""
    from optc.ir.parser import save_program_text
    os.makedirs(directory, exist_ok=True)
    ep = torch.export.export(piece, tuple(inputs), strict=False)
    written = save_program_text(piece, os.path.join(directory, "reduced.optc"), inputs=inputs)

    def put(name, write):
        path = os.path.join(directory, name)
        write(path + ".tmp")
        os.replace(path + ".tmp", path)
        written.append(path)
    import shlex
    result.replay = " ".join(["optc", "compare", shlex.quote(os.path.join(directory, "reduced.optc")), "--backend",
                              shlex.quote(result.backend), "--pipeline", shlex.quote(result.pipeline), "--target",
                              shlex.quote(result.target)])
    put("reduced.py", lambda p: _write_text(p, standalone_python(piece, result)))
    put("reduced.pt2", lambda p: torch.export.save(ep, p))
    put("inputs.pt", lambda p: torch.save(list(inputs), p))
    result.files = written + [os.path.join(directory, "failure.json")]
    put("failure.json", lambda p: open(p, "w").write(json.dumps(result.to_json(), indent=1)))
    return result.files


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


_STANDALONE = '''"""The piece of {model} that optc reduce cut down: it still fails as the whole model did
({failure}).

Plain torch: forward is fx's Python code of the piece; its tensors come from reduced.optc.weights
and its inputs from inputs.pt, next to this file. Shown failing by

    {replay}
"""

import os

import torch
{imports}
HERE = os.path.dirname(os.path.abspath(__file__))


class Reduced(torch.nn.Module):
    def __init__(self, tensors):
        super().__init__()
        for target, t in tensors.items():
            *path, name = target.split(".")
            module = self
            for atom in path:
                if not hasattr(module, atom):
                    module.add_module(atom, torch.nn.Module())
                module = getattr(module, atom)
            module.register_buffer(name, t)

{forward}

def make():
    """The piece and the inputs it fails on: ``(model, inputs)``."""
    tensors = torch.load(os.path.join(HERE, "reduced.optc.weights"), weights_only=True)
    inputs = torch.load(os.path.join(HERE, "inputs.pt"), weights_only=True)
    model = Reduced({{k: v for k, v in tensors.items() if not k.startswith("%")}})
    return model.eval(), tuple(inputs)


if __name__ == "__main__":
    model, inputs = make()
    with torch.no_grad():
        print(model(*inputs))
'''


def standalone_python(piece: fx.GraphModule, result: ReduceResult) -> str:
    """``reduced.py``: the piece as a module of plain torch calls (fx's generated code as ``forward``)."""
    import importlib
    import textwrap
    code = piece.graph.python_code(root_module="self")
    imports = []
    for name, obj in sorted(code.globals.items()):
        if name == "torch":
            continue
        if isinstance(obj, float):
            imports.append(f"{name} = float({str(obj)!r})")
        elif obj is type(None):
            imports.append(f"{name} = type(None)")
        elif isinstance(obj, type(os)):
            imports.append(f"import {obj.__name__} as {name}")
        else:
            module, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
            try:
                found = importlib.import_module(module) if module else None
                for atom in qual.split("."):
                    found = getattr(found, atom)
            except (ImportError, AttributeError, TypeError):
                found = None
            if found is obj and "." not in qual:
                imports.append(f"from {module} import {qual} as {name}")
            else:
                imports.append(f"raise ImportError('reduced.py cannot import {name} ({obj!r}); replay reduced.optc')")
    if any(n.op == "call_function" and getattr(n.target, "namespace", None) == "optc" for n in piece.graph.nodes):
        imports.append("import optc.ir.ops, optc.ir.quant_ops, optc.ir.layout_ops  # noqa: E401 - the optc:: ops")
    failure = result.failure.describe() if result.failure is not None else "see failure.json"
    return _STANDALONE.format(model=result.model, failure=failure, replay=result.replay or "optc compare ...",
                              imports="\n".join(imports) + ("\n" if imports else ""),
                              forward=textwrap.indent(code.src.strip(), "    ") + "\n")


# ---- the command ------------------------------------------------------------------------------------------
def add_reduce_parser(sub) -> None:
    from optc.tools.compare import add_debug_command
    p = add_debug_command(sub, "reduce", "the smallest part of the graph that still fails the same way", __doc__)
    p.add_argument("--backend", required=True, metavar="B", help="the backend whose compile fails")
    p.add_argument("--rtol", type=float, default=None, help="tolerance relative to the output scale")
    p.add_argument("--atol", type=float, default=None, help="also pass outputs whose max abs error is within this")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="write reduced.optc (+ .weights), reduced.py, reduced.pt2, inputs.pt, failure.json")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the result as JSON")
    p.set_defaults(func=cmd_reduce)


def cmd_reduce(args) -> int:
    import sys

    from optc.passes.manager import PassManager
    from optc.tools.models import load_model, parse_config
    from optc.tools.compare import check_writable, write_json
    PassManager(args.pipeline, target=args.target)
    check_writable(args.json)
    check_writable(args.out, "--out")
    loaded = load_model(args.model, inputs=args.input, config=parse_config(args.config), tiny=args.tiny,
                        batch=args.batch)
    result, piece = reduce(loaded.model, loaded.args, loaded.kwargs, backend=args.backend, pipeline=args.pipeline,
                           target=args.target, rtol=args.rtol, atol=args.atol, label=loaded.label,
                           progress=lambda msg: print(f"optc: {msg}", file=sys.stderr, flush=True))
    if piece is not None and args.out:
        save_reduced(result, *piece, args.out)
    print(result.format())
    if args.json:
        write_json(args.json, result.to_json())
    return 0 if result.pinned is None else 1


__all__ = ["reduce", "ReduceResult", "save_reduced", "standalone_python", "add_reduce_parser", "cmd_reduce"]
