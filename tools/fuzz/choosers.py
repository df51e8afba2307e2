"""Where the generator's choices come from: a seed, a recorded sequence, or hypothesis' genes.

Specs are drawn from any source of choices through a :class:`Chooser`: :class:`RandomChooser`
(a seed, ``random.Random``: the campaign), :class:`ReplayChooser` (a recorded choice sequence:
the shrinker) or :class:`GeneChooser` (the ints hypothesis draws: :func:`~optc.tools.fuzz.draw.model_specs`,
which hypothesis shrinks: every choice shrinks towards the simplest option).
"""

from __future__ import annotations

import random
from typing import Any, Sequence


class Chooser:
    """Where the generator's choices come from. Every choice is an integer in a range and
    shrinks towards its first option (offset 0). ``record`` keeps the offsets drawn (a choice
    sequence: replayed by :class:`ReplayChooser`, shrunk by :func:`shrink_choices`) and
    ``marks`` the positions where each op's choices begin."""

    def __init__(self):
        self.record: list[int] = []
        self.marks: list[int] = []

    def _draw(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def integer(self, lo: int, hi: int) -> int:
        v = self._draw(lo, hi)
        self.record.append(v - lo)
        return v

    def mark(self) -> None:
        self.marks.append(len(self.record))

    def more_ops(self, first: bool) -> bool:
        """Whether to draw another op (the first op is always drawn)."""
        more = self.flag(85)
        return first or more

    def pick(self, options: Sequence):
        return options[self.integer(0, len(options) - 1)]

    def flag(self, percent: int) -> bool:
        """True with about ``percent`` % probability; shrinks to False."""
        return self.integer(0, 99) >= 100 - percent

    def weighted(self, options: Sequence[tuple[Any, float]]):
        total = sum(w for _, w in options)
        scale = 1000 / total
        cum, r = 0, self.integer(0, 999)
        for value, w in options:
            cum += w * scale
            if r < cum:
                return value
        return options[-1][0]


class RandomChooser(Chooser):
    def __init__(self, seed: int | str):
        super().__init__()
        self.rng = random.Random(seed)

    def _draw(self, lo, hi):
        return self.rng.randint(lo, hi)


class ReplayChooser(Chooser):
    """Replays a recorded choice sequence (offsets, clamped to each range); past its end
    every choice is the simplest one."""

    def __init__(self, choices: Sequence[int]):
        super().__init__()
        self.choices = list(choices)

    def _draw(self, lo, hi):
        i = len(self.record)
        off = self.choices[i] if i < len(self.choices) else 0
        return lo + abs(off) % (hi - lo + 1)


class GeneChooser(Chooser):
    """Choices from a header, one *gene* (a list of ints) per op, and a tail: the shape of
    :func:`model_specs`. Each op reads only its own gene, so when hypothesis shrinks the list of
    genes it deletes whole ops, and shrinking a gene's ints towards 0 simplifies that op alone.
    A value ``v`` in a range of ``n`` options picks option ``v % n``; a gene that runs out reads 0."""

    def __init__(self, header: Sequence[int], genes: Sequence[Sequence[int]], tail: Sequence[int]):
        super().__init__()
        self.streams = [list(header)] + [list(g) for g in genes] + [list(tail)]
        self.stream, self.pos = 0, 0

    def mark(self) -> None:
        super().mark()
        self.stream, self.pos = min(self.stream + 1, len(self.streams) - 1), 0

    def more_ops(self, first: bool) -> bool:
        return self.stream < len(self.streams) - 1

    def _draw(self, lo, hi):
        stream = self.streams[self.stream]
        v = stream[self.pos] if self.pos < len(stream) else 0
        self.pos += 1
        return lo + v % (hi - lo + 1)
