"""The registry of op kinds and the helpers every kind's generator uses.

A kind is a pair (gen, emit) registered under a name with :func:`kind`: ``gen(b, x)`` reads the
builder ``b``'s chooser and shapes and returns ``(inputs, params, out_shape)`` or None (no valid
parameters for this input); ``emit(op, i, a, shapes, out)`` returns ``(__init__ lines, forward
lines)`` of the model's source, with ``a`` the input variable names and ``shapes`` their shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from optc.tools.fuzz.spec import MAX_NUMEL, Op

if TYPE_CHECKING:
    from optc.tools.fuzz.draw import _Builder  # noqa: F401


Gen = Callable[["_Builder", int], "tuple[tuple[int, ...], dict, tuple[int, ...]] | None"]
Emit = Callable[[Op, int, list, list, str], "tuple[list[str], list[str]]"]


@dataclass(frozen=True)
class Kind:
    name: str
    ranks: tuple[int, ...]
    weight: float
    gen: Gen
    emit: Emit
    doc: str = ""


KINDS: dict[str, Kind] = {}
ANY = (2, 3, 4)


def kind(name: str, ranks=ANY, weight: float = 1.0, doc: str = ""):
    def deco(pair):
        gen, emit = pair
        KINDS[name] = Kind(name, tuple(ranks), weight, gen, emit, doc)
        return pair
    return deco


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _numel(shape) -> int:
    return math.prod(shape)


def _ok(shape) -> bool:
    return all(d >= 1 for d in shape) and _numel(shape) <= MAX_NUMEL


def _f(x: float) -> str:
    return repr(float(x))
