"""Shrinking a failing model on the generator's choice sequence (the campaign's shrinker)."""

from __future__ import annotations

from typing import Callable, Sequence

from optc.tools.fuzz.draw import spec_from_choices
from optc.tools.fuzz.kinds.base import _numel
from optc.tools.fuzz.spec import MAX_OPS, ModelSpec


def _size(spec: ModelSpec) -> tuple:
    return (len(spec.ops), sum(_numel(s) for s in spec.inputs), sum(_numel(op.shape) for op in spec.ops))


def shrink_choices(choices: Sequence[int], fails: Callable[[ModelSpec], bool], *, deadline: float | None = None,
                   max_ops: int = MAX_OPS, kinds: Sequence[str] | None = None) -> ModelSpec:
    """The smallest spec found whose replayed choices still make ``fails`` true.

    Hypothesis's shrinking idea on this generator's choice sequence: delete one op's choices,
    truncate, zero a block, then lower single choices (to 0, halved, minus one), greedily,
    until nothing smaller fails or ``deadline`` (``time.monotonic()``) passes. A candidate is
    accepted when its spec is smaller (ops, input elements, intermediate elements, then the
    choice sequence, shortlex) and still fails."""
    import time
    best, best_choices, marks = spec_from_choices(choices, max_ops, kinds)
    tried: set[tuple[int, ...]] = set()
    seen_specs: set[str] = {best.digest()}

    def better(cand: list[int]) -> bool:
        nonlocal best, best_choices, marks
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError
        spec, used, mk = spec_from_choices(cand, max_ops, kinds)
        key = tuple(used)
        if key in tried or (_size(spec), len(used), used) >= (_size(best), len(best_choices), best_choices):
            return False
        tried.add(key)
        if spec.digest() in seen_specs:       # another choice sequence for a model already tried
            if spec == best:
                best_choices, marks = used, mk
                return True
            return False
        seen_specs.add(spec.digest())
        if not fails(spec):
            return False
        best, best_choices, marks = spec, used, mk
        return True

    try:
        improved = True
        while improved:
            improved = False
            # whole ops, last first (later values may read earlier ones)
            for k in range(len(marks) - 1, -1, -1):
                if k >= len(marks):
                    continue
                end = marks[k + 1] if k + 1 < len(marks) else len(best_choices)
                if k == len(marks) - 1 and end - marks[k] <= 1:
                    continue                       # the final stop flag
                if better(best_choices[:marks[k]] + best_choices[end:]):
                    improved = True
            for size in (8, 4, 2, 1):
                i = 0
                while i < len(best_choices):
                    block = best_choices[i:i + size]
                    if any(block) and better(best_choices[:i] + [0] * len(block) + best_choices[i + size:]):
                        improved = True
                    i += size
            for i in range(len(best_choices)):
                for v in (0, best_choices[i] // 2, best_choices[i] - 1) if i < len(best_choices) else ():
                    if 0 <= v < best_choices[i] and better(best_choices[:i] + [v] + best_choices[i + 1:]):
                        improved = True
                        break
    except TimeoutError:
        pass
    return best
