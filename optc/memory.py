"""Resident memory of this process over a piece of work, without disturbing anyone else's
measurement: a thread samples ``VmRSS`` (``/proc/self/statm``) every few milliseconds; the peak
and the growth over the start are what ``optc compile`` reports (peak RSS, and its ratio to the
model's weight bytes). ``VmHWM`` is not reset (a benchmark around the call may be reading it).
Where ``/proc`` is missing (not Linux) the figures are None."""

from __future__ import annotations

import os
import threading

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class RSSWatch:
    """``with RSSWatch() as w: ...`` then ``w.peak`` (bytes) and ``w.start``; sampled every
    ``interval_s`` (a peak shorter than that may be missed)."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.start: int | None = None
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            r = rss_bytes()
            if r is not None and (self.peak is None or r > self.peak):
                self.peak = r

    def __enter__(self) -> "RSSWatch":
        self.start = self.peak = rss_bytes()
        if self.start is not None:
            self._thread = threading.Thread(target=self._sample, name="optc-rss-watch", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        r = rss_bytes()
        if r is not None and self.peak is not None and r > self.peak:
            self.peak = r

    @property
    def growth(self) -> int | None:
        return None if self.start is None or self.peak is None else max(self.peak - self.start, 0)
