"""What a generated model is: a :class:`ModelSpec` of :class:`Op` values.

A model is described by a :class:`ModelSpec`: the input shapes, a list of :class:`Op` (a kind,
the values it reads, its parameters and the shape it produces) and the outputs. Value ``i`` is
input ``i`` for ``i < len(inputs)``, else the result of op ``i - len(inputs)``. Specs are valid by
construction (:mod:`optc.tools.fuzz.draw`): no intermediate holds more than :data:`MAX_NUMEL`
elements. ``repr(spec)`` is Python that rebuilds it (regression tests keep it), and
:meth:`ModelSpec.source` prints it as standalone Python (:mod:`optc.tools.fuzz.source`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

MAX_NUMEL = 4096        # largest intermediate, in elements
MAX_OPS = 10            # default cap on ops per model


@dataclass(frozen=True)
class Op:
    """One layer: ``kind`` applied to values ``inputs`` with ``params``; produces ``shape``."""

    kind: str
    inputs: tuple[int, ...]
    params: tuple[tuple[str, Any], ...]
    shape: tuple[int, ...]

    @property
    def p(self) -> dict[str, Any]:
        return dict(self.params)

    def describe(self) -> str:
        args = ", ".join(f"v{i}" for i in self.inputs)
        ps = ", ".join(f"{k}={v!r}" for k, v in self.params)
        return f"{self.kind}({args}{', ' if ps else ''}{ps}) -> {list(self.shape)}"


@dataclass(frozen=True)
class ModelSpec:
    """A model: input shapes, ops (value ``len(inputs) + i`` is op ``i``), outputs, seed."""

    inputs: tuple[tuple[int, ...], ...]
    ops: tuple[Op, ...]
    outputs: tuple[int, ...]
    seed: int = 0

    def shape_of(self, vid: int) -> tuple[int, ...]:
        n = len(self.inputs)
        return self.inputs[vid] if vid < n else self.ops[vid - n].shape

    def kinds(self) -> set[str]:
        return {op.kind for op in self.ops}

    def forms(self) -> set[str]:
        """``kind`` and ``kind/form`` of every op (coverage accounting)."""
        out = set()
        for op in self.ops:
            out.add(op.kind)
            for key in ("form", "fn", "mask", "groups_mode", "var", "norm", "op", "pool", "qkv", "rot", "apply",
                        "alibi", "upcast", "restore", "sort"):
                if key in op.p:
                    out.add(f"{op.kind}/{key}={op.p[key]}")
        return out

    def describe(self) -> str:
        n = len(self.inputs)
        lines = [f"inputs: {', '.join(f'v{i}: {list(s)}' for i, s in enumerate(self.inputs))}  seed={self.seed}"]
        lines += [f"  v{n + i} = {op.describe()}" for i, op in enumerate(self.ops)]
        lines.append(f"outputs: {', '.join(f'v{o}' for o in self.outputs)}")
        return "\n".join(lines)

    def digest(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:12]

    def source(self) -> str:
        """Standalone Python source: imports, ``Model(seed)``, ``make_inputs(seed)``."""
        from optc.tools.fuzz.source import emit_source
        return emit_source(self)
