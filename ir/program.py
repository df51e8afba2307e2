"""The Program: a flat torch.fx GraphModule in torch.export's ATen dialect plus its signature.

The graph takes the tensor leaves of the user's ``(args, kwargs)`` as placeholders, in
pytree order, and returns a flat tuple of tensor leaves. ``in_spec``/``out_spec`` restore
the user's structure, so a Program is called exactly like the model it was captured from.
Non-tensor input leaves (``None``, ints) were specialised at capture: calls must pass the
same values.

Invariants (checked by :mod:`optc.ir.verifier`):
- every placeholder and call_function/get_attr node has ``meta["val"]`` (a FakeTensor, or a
  tuple of them for multi-output ops);
- get_attr targets exist on the GraphModule;
- passes never mutate tensor data in place: a pass that changes a weight registers a new
  attribute. That is what makes :meth:`Program.clone` cheap (weights are shared), and what
  lets :func:`~optc.ir.capture.capture` share the user's weight tensors instead of copying them
  (one set of weights in memory; a buffer the graph itself writes is the one exception, copied).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from optc.errors import InputSpecError

_DTYPE_SHORT = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "bool", torch.complex64: "c64",
}
_SHORT_DTYPE = {v: k for k, v in _DTYPE_SHORT.items()}


def dtype_short(dtype: torch.dtype) -> str:
    return _DTYPE_SHORT.get(dtype, str(dtype).replace("torch.", ""))


def dtype_from_short(name: str) -> torch.dtype:
    """Parse ``f32``/``float32``/``torch.float32`` into a torch dtype."""
    key = name.strip().replace("torch.", "")
    if key in _SHORT_DTYPE:
        return _SHORT_DTYPE[key]
    dt = getattr(torch, key, None)
    if isinstance(dt, torch.dtype):
        return dt
    valid = ", ".join(sorted(_SHORT_DTYPE))
    raise ValueError(f"unknown dtype '{name}' (valid: {valid}, or torch dtype names like float32)")


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one graph input or output. Symbolic dims are strings."""

    name: str
    shape: tuple[int | str, ...]
    dtype: torch.dtype

    def __str__(self) -> str:
        dims = ",".join(str(d) for d in self.shape)
        return f"{self.name}: {dtype_short(self.dtype)}[{dims}]"

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": dtype_short(self.dtype)}

    @staticmethod
    def from_json(d: dict) -> "TensorSpec":
        return TensorSpec(d["name"], tuple(d["shape"]), dtype_from_short(d["dtype"]))

    @staticmethod
    def of(name: str, val: Any) -> "TensorSpec":
        shape = tuple(int(s) if isinstance(s, int) or _is_static(s) else str(s) for s in val.shape)
        return TensorSpec(name, shape, val.dtype)


def _is_static(s) -> bool:
    if isinstance(s, torch.SymInt):
        # never int() a symbolic dim: that guards on its hint and specialises it in the shape env
        return s.node.maybe_as_int() is not None
    try:
        int(s)
        return True
    except Exception:
        return False


@dataclass(frozen=True)
class InputLeaf:
    """One leaf of the flattened ``(args, kwargs)``: a tensor placeholder or a specialised constant."""

    path: str                 # e.g. "args[0]" or "kwargs['attention_mask']"
    is_tensor: bool
    const: Any = None         # the captured value, for non-tensor leaves


@dataclass
class Program:
    """A captured model: flat GraphModule + pytree specs + example inputs + metadata."""

    graph_module: fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    input_leaves: tuple[InputLeaf, ...]
    example_args: tuple = ()
    example_kwargs: dict = field(default_factory=dict)
    dynamic_shapes: Any = None
    name: str = "model"
    meta: dict = field(default_factory=dict)

    # ---- calling ---------------------------------------------------------------------
    def flatten_inputs(self, args: tuple, kwargs: dict | None = None) -> list[torch.Tensor]:
        """The tensor inputs of the graph for a call ``model(*args, **kwargs)``."""
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
        if spec != self.in_spec:
            raise InputSpecError(
                f"{self.name}: inputs do not match the captured signature.\n"
                f"  expected: {_describe_spec(self.in_spec)}\n  got:      {_describe_spec(spec)}")
        tensors = []
        for leaf, value in zip(self.input_leaves, leaves):
            if leaf.is_tensor:
                if not isinstance(value, torch.Tensor):
                    raise InputSpecError(f"{self.name}: input {leaf.path} must be a tensor, got {type(value).__name__}")
                tensors.append(value)
            elif not _same_const(value, leaf.const):
                raise InputSpecError(
                    f"{self.name}: input {leaf.path} was captured as {leaf.const!r} and specialised; got {value!r}")
        return tensors

    def unflatten_outputs(self, flat: list | tuple) -> Any:
        return pytree.tree_unflatten(list(flat), self.out_spec)

    def __call__(self, *args, **kwargs):
        flat = self.flatten_inputs(args, kwargs)
        self._check_shapes(flat)
        out = self.graph_module(*flat)
        return self.unflatten_outputs(out)

    def _check_shapes(self, flat: list[torch.Tensor]) -> None:
        for spec, t in zip(self.input_specs, flat):
            if len(spec.shape) != t.dim() or any(
                    isinstance(d, int) and d != s for d, s in zip(spec.shape, t.shape)):
                raise InputSpecError(
                    f"{self.name}: input '{spec.name}' expects shape {list(spec.shape)}, got {list(t.shape)}")
            if spec.dtype != t.dtype:
                raise InputSpecError(
                    f"{self.name}: input '{spec.name}' expects dtype {spec.dtype}, got {t.dtype}")

    # ---- signature ---------------------------------------------------------------------
    @property
    def graph(self) -> fx.Graph:
        return self.graph_module.graph

    @property
    def input_specs(self) -> list[TensorSpec]:
        return [TensorSpec.of(n.name, n.meta["val"]) for n in self.graph.nodes if n.op == "placeholder"]

    @property
    def output_specs(self) -> list[TensorSpec]:
        out = self.graph.output_node()
        specs = []
        for i, a in enumerate(out.args[0]):
            if isinstance(a, fx.Node) and isinstance(a.meta.get("val"), torch.Tensor):
                specs.append(TensorSpec.of(f"output_{i}", a.meta["val"]))
        return specs

    def example_flat_inputs(self) -> list[torch.Tensor]:
        return self.flatten_inputs(self.example_args, self.example_kwargs)

    # ---- copying -------------------------------------------------------------------------
    def clone(self) -> "Program":
        """A copy with its own graph; tensors are shared (passes never mutate them in place)."""
        return dataclasses.replace(self, graph_module=copy_graph_module(self.graph_module), meta=dict(self.meta))

    def with_graph_module(self, gm: fx.GraphModule) -> "Program":
        return dataclasses.replace(self, graph_module=gm)

    # ---- stats -------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(t.numel() for t in attr_tensors(self.graph_module).values())

    def __str__(self) -> str:
        from optc.ir.printer import format_text
        return format_text(self)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a copied graph and the same attribute tensors (shared)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    # graph_copy copies node.meta shallowly; keep the output node's meta too
    graph.output_node().meta = dict(gm.graph.output_node().meta)
    root = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            root[node.target] = _get_attr(gm, node.target)
        elif node.op in ("call_module",):
            root[node.target] = _get_attr(gm, node.target)
    new = fx.GraphModule(root, graph, class_name=type(gm).__name__ if type(gm).__name__ != "GraphModuleImpl" else "GraphModule")
    new.meta = dict(getattr(gm, "meta", {}))
    if hasattr(gm, "_optc_fake_mode"):
        new._optc_fake_mode = gm._optc_fake_mode   # same FakeTensors in the copied meta
    return new


def _get_attr(mod: torch.nn.Module, target: str):
    obj = mod
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def get_attr(mod: torch.nn.Module, target: str):
    """The object a get_attr node refers to."""
    return _get_attr(mod, target)


def attr_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor a get_attr node of ``gm`` refers to, by target (deduplicated by target)."""
    out = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = _get_attr(gm, node.target)
            if isinstance(obj, torch.Tensor):
                out[node.target] = obj
    return out


def _same_const(a, b) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return a is b


def _describe_spec(spec: pytree.TreeSpec) -> str:
    try:
        dummy = pytree.tree_unflatten(["*"] * spec.num_leaves, spec)
        args, kwargs = dummy
        parts = [f"{len(args)} positional"]
        if kwargs:
            parts.append("keywords " + ", ".join(sorted(kwargs)))
        return "; ".join(parts) + f" ({spec.num_leaves} leaves)"
    except Exception:
        return str(spec)
