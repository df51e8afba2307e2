"""What the oracle reports: the comparison of outputs, :class:`Mismatch` and :class:`OracleResult`.

:func:`output_errors` is the comparison (its source is copied into every reproducer, so it
imports what it needs itself). A failure is a :class:`Mismatch`; its :attr:`~Mismatch.signature`
says which mismatches are the same bug (deduplication and shrinking).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from optc.tools.fuzz.known_issues import known_issue
from optc.tools.fuzz.spec import ModelSpec

STATUSES = ("ok", "fired", "mismatch", "rounding", "refused", "unsupported", "unchecked", "unavailable", "blocked")


def output_errors(ref, eager, got):
    """Per output leaf ``(error of got, error of eager)``, each ``max|t - ref| / max|ref|``.

    Raises ValueError when ``got`` has another number of outputs, or an output has another
    shape or dtype than eager's. A non-finite output has error ``inf``."""
    import math
    import torch
    import torch.utils._pytree as pytree
    refs, eagers, gots = (pytree.tree_leaves(t) for t in (ref, eager, got))
    if len(gots) != len(refs):
        raise ValueError(f"{len(gots)} outputs, expected {len(refs)}")
    out = []
    for i, (r, e, g) in enumerate(zip(refs, eagers, gots)):
        if not isinstance(g, torch.Tensor):
            raise ValueError(f"output {i} is a {type(g).__name__}, expected a tensor")
        if tuple(g.shape) != tuple(r.shape):
            raise ValueError(f"output {i}: shape {list(g.shape)}, expected {list(r.shape)}")
        if g.dtype != e.dtype:
            raise ValueError(f"output {i}: dtype {g.dtype}, expected {e.dtype}")
        r64 = r.detach().cpu().double()
        scale = max(float(r64.abs().max()) if r64.numel() else 0.0, 1e-12)

        def err(t):
            t = t.detach().cpu().double()
            if not bool(torch.isfinite(t).all()):
                return math.inf
            return float((t - r64).abs().max()) / scale if t.numel() else 0.0

        out.append((err(g), err(e)))
    return out


@dataclass
class Mismatch:
    """``target`` disagreed with eager on ``spec`` (``kind``: numeric, shape, error)."""

    target: str
    kind: str
    detail: str
    spec: ModelSpec
    pipeline: str | None = None
    backend: str | None = None
    error: float | None = None
    allowed: float | None = None
    exc_type: str | None = None
    plugins: tuple[str, ...] = ()

    @property
    def signature(self) -> tuple[str, str, str]:
        """What makes two mismatches the same bug (for deduplication and shrinking): a known
        issue's id, else the target, the kind and for errors the message's first and last lines."""
        known = known_issue(self)
        if known is not None:
            return (self.target, self.kind, f"known:{known.id}")
        if self.kind == "error":
            # first and last lines: TorchScript and ONNX Runtime put the reason after a generic header
            last = _normalise_message("\n".join(reversed(self.detail.splitlines())))
            return (self.target, self.kind, f"{self.exc_type}: {_normalise_message(self.detail)} | {last}")
        return (self.target, self.kind, "")

    def __str__(self) -> str:
        return f"{self.target}: {self.kind}: {self.detail}"


def _normalise_message(text: str) -> str:
    """The first line with content once exception-type prefixes (``RuntimeError: ``) are
    dropped, with node names and numbers blanked: what identifies a crash."""
    first = ""
    for line in text.splitlines():
        line = re.sub(r"^(?:[A-Z]\w*(?:Error|Exception|Warning)?:\s*)+", "", line.strip())
        if line:
            first = line
            break
    first = re.sub(r"%[\w.]+", "%N", first)
    first = re.sub(r"\d+", "#", first)
    return first[:120]


@dataclass
class OracleResult:
    spec: ModelSpec
    status: dict[str, str] = field(default_factory=dict)     # target -> one of STATUSES
    mismatches: list[Mismatch] = field(default_factory=list)
    notes: dict[str, str] = field(default_factory=dict)      # target -> why refused/unsupported/unavailable
    times: dict[str, float] = field(default_factory=dict)
    discarded: str | None = None                              # why the model was not compared
    changed: set = field(default_factory=set)                 # targets whose passes changed the graph


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:200]
