"""How a compiled model is called: :class:`Signature` (the Program's pytree specs, input leaves and
tensor specs), validation of a call's inputs against it, and its JSON form in the manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree

from optc.errors import ArtifactError, InputSpecError, OptcError
from optc.ir.program import InputLeaf, Program, TensorSpec, _describe_spec, _same_const

class _OpaqueConst:
    """A specialised non-tensor input leaf that JSON cannot hold: matched by type name and repr."""

    def __init__(self, type_name: str, text: str):
        self.type_name, self.text = type_name, text

    def matches(self, value: Any) -> bool:
        return type(value).__name__ == self.type_name and repr(value) == self.text

    def __repr__(self) -> str:
        return self.text


_JSON_SCALARS = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class Signature:
    """How a CompiledModel is called: the Program's pytree specs, input leaves and tensor specs.

    Symbolic dims are strings (``"s0"``): any size, but the same symbol must have the same size
    in every input of one call.
    """

    name: str
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    input_leaves: tuple[InputLeaf, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @staticmethod
    def of(program: Program) -> "Signature":
        return Signature(program.name, program.in_spec, program.out_spec, tuple(program.input_leaves),
                         tuple(program.input_specs), tuple(program.output_specs))

    @property
    def is_dynamic(self) -> bool:
        return any(isinstance(d, str) for s in self.inputs for d in s.shape)

    # -- calling --
    def flatten(self, args: tuple, kwargs: dict, device: torch.device | None = None) -> list[torch.Tensor]:
        """Validate ``(args, kwargs)`` against the signature; return the tensor leaves (on ``device``)."""
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec != self.in_spec:
            raise InputSpecError(f"{self.name}: inputs do not match the compiled signature.\n"
                                 f"  expected: {_describe_spec(self.in_spec)}\n  got:      {_describe_spec(spec)}")
        tensors: list[torch.Tensor] = []
        for leaf, value in zip(self.input_leaves, leaves):
            if leaf.is_tensor:
                if not isinstance(value, torch.Tensor):
                    raise InputSpecError(f"{self.name}: input {leaf.path} must be a tensor, got {type(value).__name__}")
                tensors.append(value)
            elif not (leaf.const.matches(value) if isinstance(leaf.const, _OpaqueConst) else _same_const(value, leaf.const)):
                raise InputSpecError(f"{self.name}: input {leaf.path} was captured as {leaf.const!r} and "
                                     f"specialised; got {value!r}")
        self._check_tensors(tensors)
        if device is not None:
            tensors = [t if t.device == device else t.to(device) for t in tensors]
        return tensors

    def _check_tensors(self, tensors: list[torch.Tensor]) -> None:
        bound: dict[str, tuple[int, str]] = {}
        for spec, t in zip(self.inputs, tensors):
            if spec.dtype != t.dtype:
                raise InputSpecError(f"{self.name}: input '{spec.name}' expects dtype {spec.dtype}, got {t.dtype}")
            if len(spec.shape) != t.dim():
                raise InputSpecError(f"{self.name}: input '{spec.name}' expects shape {list(spec.shape)}, "
                                     f"got {list(t.shape)}")
            for axis, (want, got) in enumerate(zip(spec.shape, t.shape)):
                if isinstance(want, int):
                    if want != got:
                        raise InputSpecError(f"{self.name}: input '{spec.name}' expects shape {list(spec.shape)}, "
                                             f"got {list(t.shape)}")
                elif want in bound and bound[want][0] != got:
                    size, where = bound[want]
                    raise InputSpecError(f"{self.name}: dynamic dim {want} is {size} in {where} but {got} in "
                                         f"input '{spec.name}' (axis {axis})")
                else:
                    bound.setdefault(want, (got, f"input '{spec.name}'"))

    def unflatten(self, flat: list) -> Any:
        if len(flat) != self.out_spec.num_leaves:
            raise OptcError(f"{self.name}: the compiled model returned {len(flat)} outputs, its signature "
                            f"has {self.out_spec.num_leaves}")
        return pytree.tree_unflatten(list(flat), self.out_spec)

    # -- JSON --
    def to_json(self) -> dict:
        try:
            in_spec = json.loads(pytree.treespec_dumps(self.in_spec))
            out_spec = json.loads(pytree.treespec_dumps(self.out_spec))
        except Exception as e:  # a pytree node type with no serialized name
            raise ArtifactError(f"{self.name}: the input/output structure cannot be saved: {e}") from e
        return {"name": self.name, "inputs": [s.to_json() for s in self.inputs],
                "outputs": [s.to_json() for s in self.outputs], "in_spec": in_spec, "out_spec": out_spec,
                "input_leaves": [_leaf_to_json(leaf) for leaf in self.input_leaves]}

    @staticmethod
    def from_json(d: dict) -> "Signature":
        try:
            return Signature(d["name"], pytree.treespec_loads(json.dumps(d["in_spec"])),
                             pytree.treespec_loads(json.dumps(d["out_spec"])),
                             tuple(_leaf_from_json(x) for x in d["input_leaves"]),
                             tuple(TensorSpec.from_json(x) for x in d["inputs"]),
                             tuple(TensorSpec.from_json(x) for x in d["outputs"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"manifest signature is malformed: {type(e).__name__}: {e}") from e


def _leaf_to_json(leaf: InputLeaf) -> dict:
    d: dict[str, Any] = {"path": leaf.path, "is_tensor": leaf.is_tensor}
    if not leaf.is_tensor:
        c = leaf.const
        if isinstance(c, _OpaqueConst):
            d["const_repr"], d["const_type"] = c.text, c.type_name
        elif isinstance(c, _JSON_SCALARS) and not (isinstance(c, float) and c != c):
            d["const"] = c
        else:
            d["const_repr"], d["const_type"] = repr(c), type(c).__name__
    return d


def _leaf_from_json(d: dict) -> InputLeaf:
    if d["is_tensor"]:
        return InputLeaf(d["path"], True)
    if "const_repr" in d:
        return InputLeaf(d["path"], False, _OpaqueConst(d["const_type"], d["const_repr"]))
    return InputLeaf(d["path"], False, d.get("const"))


__all__ = ["Signature"]
