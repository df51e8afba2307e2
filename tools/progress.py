"""Progress of a long command on stderr: a bar on a terminal, plain periodic lines elsewhere.

A tqdm bar redraws itself with carriage returns: right on a terminal, noise in a log file or a
CI transcript. :func:`progress` returns a tqdm bar only when its stream is a terminal (and tqdm
is installed); otherwise a :class:`LineProgress`, which prints one plain line each time another
``step`` (5 %) of the budget is done or ``interval_s`` (60 s) have passed since the last line,
and a last line when it closes. Both take ``update``, ``set_postfix``, ``write`` and ``close``.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any


class LineProgress:
    """Plain progress lines: ``DESC: N/TOTAL UNITs (P%), M:SS elapsed, R UNITs/s, key=value``.

    The budget is ``total`` units or ``seconds`` of wall time, whichever is nearer its end (the
    share shown); with neither, a line every ``interval_s`` only."""

    def __init__(self, desc: str, unit: str, *, total: int | None = None, seconds: float | None = None,
                 step: float = 0.05, interval_s: float = 60.0, file: IO[str] | None = None):
        self.desc, self.unit, self.total, self.seconds = desc, unit, total, seconds
        self.step, self.interval_s = step, interval_s
        self.file = file
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self._start = self._last_time = time.monotonic()
        self._last_step = 0
        self._last_n = 0

    def fraction(self) -> float | None:
        """The share of the budget done, or None without a budget."""
        shares = []
        if self.total:
            shares.append(self.n / self.total)
        if self.seconds:
            shares.append((time.monotonic() - self._start) / self.seconds)
        return min(max(shares), 1.0) if shares else None

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        frac = self.fraction()
        step = int(frac / self.step + 1e-9) if frac is not None else 0
        if step > self._last_step or now - self._last_time >= self.interval_s:
            self._line(now)
            self._last_step = step

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:   # noqa: ARG002 (tqdm's signature)
        self.postfix = values

    def write(self, msg: str) -> None:
        print(msg, file=self._stream(), flush=True)

    def close(self) -> None:
        if self.n != self._last_n:
            self._line(time.monotonic())

    def _stream(self) -> IO[str]:
        return self.file if self.file is not None else sys.stderr

    def _line(self, now: float) -> None:
        elapsed = now - self._start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        frac = self.fraction()
        share = f" ({100 * frac:.0f}%)" if frac is not None else ""
        rate = self.n / elapsed if elapsed > 0 else 0.0
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        self.write(f"{self.desc}: {done} {self.unit}s{share}, {_clock(elapsed)} elapsed, "
                   f"{rate:.3g} {self.unit}s/s{extra}")
        self._last_time, self._last_n = now, self.n


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def open_progress(desc: str, unit: str, *, total: int | None = None, seconds: float | None = None,
             bar_format: str | None = None, file: IO[str] | None = None):
    """A tqdm bar on ``file`` (default stderr) when it is a terminal, else a :class:`LineProgress`
    (also when tqdm is not installed)."""
    stream = file if file is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            return tqdm(desc=desc, unit=unit, total=total, file=stream, dynamic_ncols=True, bar_format=bar_format)
    return LineProgress(desc, unit, total=total, seconds=seconds, file=file)
