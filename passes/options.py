"""Option types and option values shared by several passes (not a pass).

- :class:`RatioOption`: a float in ``[0, 1)`` (the share of weights or channels to remove),
  checked when the pipeline is parsed; :class:`PositiveIntOption`: an int ``>= 1``;
- :class:`LayerFilter`: an ``exclude=`` value, glob patterns or a regular expression over layer
  names, that refuses a pattern matching no layer.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Iterable

from optc.errors import PipelineError
from optc.passes.base import Option


@dataclass(frozen=True)
class RatioOption(Option):
    """A float option that must lie in ``[0, 1)``: checked when the pipeline is parsed."""

    def parse(self, pass_name: str, key: str, raw: str) -> Any:
        v = super().parse(pass_name, key, raw)
        if not (0.0 <= v < 1.0):
            raise PipelineError(f"pass '{pass_name}': option {key}={raw} is out of range: the ratio of weights "
                                f"to remove must be in [0, 1)")
        return v


@dataclass(frozen=True)
class PositiveIntOption(Option):
    def parse(self, pass_name: str, key: str, raw: str) -> Any:
        v = super().parse(pass_name, key, raw)
        if v < 1:
            raise PipelineError(f"pass '{pass_name}': option {key}={raw} must be >= 1")
        return v


class LayerFilter:
    """``exclude``: glob patterns separated by ``|`` (``fc|layer4.*``), or ``re:REGEX``; full match."""

    def __init__(self, pattern: str):
        self.pattern = pattern.strip()
        if not self.pattern:
            self.alternatives: list[str] = []
        elif self.pattern.startswith("re:"):
            try:
                rx = re.compile(self.pattern[3:])
            except re.error as e:
                raise PipelineError(f"exclude pattern '{self.pattern}' is not a valid regular expression: "
                                    f"{e}") from None
            self.alternatives = [self.pattern]
            self._rx = {self.pattern: rx}
        else:
            self.alternatives = [p.strip() for p in self.pattern.split("|") if p.strip()]
            self._rx = {p: re.compile(fnmatch.translate(p)) for p in self.alternatives}

    def excluded(self, name: str) -> bool:
        return any(rx.fullmatch(name) for rx in self._rx.values()) if self.alternatives else False

    def check(self, names: Iterable[str]) -> None:
        """Raise if an alternative matches no layer name: a typo must not silently prune everything."""
        names = list(dict.fromkeys(names))
        for alt in self.alternatives:
            if not any(self._rx[alt].fullmatch(n) for n in names):
                shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise PipelineError(f"exclude pattern '{alt}' matches no layer (layers: {shown or 'none'})")
