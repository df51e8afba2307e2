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


_MADV_PAGEOUT = 21          # Linux >= 5.4: reclaim the pages (clean file pages are dropped, never lost)
_mapped: list[str] = []      # the weight files of the compile under way (mapped_weights)


class mapped_weights:
    """``with mapped_weights(paths):`` -- while a compile runs, the memory-mapped weight files
    whose pages :func:`release_mapped` may hand back (passes call it on the weights they replace)."""

    def __init__(self, paths):
        self.paths = [os.path.realpath(os.fspath(p)) for p in paths]

    def __enter__(self):
        self._before = list(_mapped)
        _mapped[:] = self.paths
        return self

    def __exit__(self, *exc):
        _mapped[:] = self._before


def available_bytes() -> int | None:
    """The memory the system can still give without swapping (``MemAvailable`` of
    ``/proc/meminfo``), or None where that is not known (not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def mapped(tensors) -> list[bool]:
    """For each of ``tensors``: does it lie in a weight file of the compile under way
    (:class:`mapped_weights`) -- a weight read from a file rather than held by the user's model."""
    tensors = list(tensors)
    if not _mapped:
        return [False] * len(tensors)
    ranges = _file_ranges(_mapped)
    out = []
    for t in tensors:
        r = _storage_range(t)
        out.append(r is not None and any(lo <= r[0] and r[1] <= hi for lo, hi in ranges))
    return out


def mapped_bytes(tensors) -> int:
    """How many of the bytes of ``tensors`` lie in a weight file of the compile under way
    (:func:`mapped`)."""
    tensors = list(tensors)
    return sum(t.nbytes for t, m in zip(tensors, mapped(tensors)) if m)


def mapping_active() -> bool:
    """A compile with memory-mapped weight files is under way (:class:`mapped_weights`)."""
    return bool(_mapped)


def hand_back_mapped(keep=()) -> int:
    """:func:`page_out_mapped` over the weight files of the compile under way (:class:`mapped_weights`),
    but for the pages of ``keep``; 0 outside such a compile."""
    return page_out_mapped(_mapped, keep=keep) if _mapped else 0


def _file_ranges(paths) -> list[tuple[int, int]]:
    """``[start, end)`` of this process's mappings of ``paths`` (``/proc/self/maps``)."""
    wanted = set(paths)
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].strip() in wanted:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    out.append((lo, hi))
    except OSError:
        return []
    return out


def _madvise():
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _storage_range(t) -> tuple[int, int] | None:
    """``[start, end)`` of a torch tensor's storage, or of a numpy array's own bytes."""
    if hasattr(t, "untyped_storage"):
        try:
            s = t.untyped_storage()
            return (s.data_ptr(), s.data_ptr() + s.nbytes()) if s.nbytes() else None
        except NotImplementedError:      # a sparse tensor has no storage (meta ones: pointer 0, in no file)
            return None
    if getattr(t, "__array_interface__", None) is not None and getattr(t, "nbytes", 0):
        import numpy as np
        try:        # any strides (a transposed view of a weight, as the ONNX exporter folds one)
            from numpy.lib.array_utils import byte_bounds
        except ImportError:      # numpy < 2
            byte_bounds = np.byte_bounds
        lo, hi = byte_bounds(t)
        return (lo, hi)
    return None


def release_mapped(tensors) -> int:
    """Hand back the resident pages of ``tensors`` that lie in a weight file of the compile under
    way (:class:`mapped_weights`; nothing otherwise): the whole pages inside each tensor's storage,
    by ``madvise(MADV_PAGEOUT)``; the bytes advised. For a pass that has just replaced those
    weights (``merge-parallel-linear`` after concatenating q, k and v). Safe whatever else holds
    them: a page read again is faulted in again (see :func:`page_out_mapped`)."""
    if not _mapped:
        return 0
    madvise = _madvise()
    ranges = _file_ranges(_mapped)
    if madvise is None or not ranges:
        return 0
    done = 0
    for t in tensors:
        r = _storage_range(t)
        if r is None or not any(lo <= r[0] and r[1] <= hi for lo, hi in ranges):
            continue
        a, b = -(-r[0] // _PAGE) * _PAGE, r[1] // _PAGE * _PAGE
        if b > a:
            if madvise(a, b - a, _MADV_PAGEOUT) != 0:
                return done
            done += b - a
    return done


def page_out_mapped(paths, keep=()) -> int:
    """Hand back to the OS this process's resident pages of the memory-mapped files ``paths``
    (``madvise(MADV_PAGEOUT)``), except the pages holding the tensors ``keep``; the bytes advised.

    The weights of ``optc.compile(..., weights=file.safetensors)`` are the file's pages, mapped
    once: a page read counts in the process's resident set until the mapping goes, i.e. until
    the last tensor of the file is released. A weight a pass replaced (the q, k and v projections
    ``merge-parallel-linear`` concatenated) or one already read for the check stays resident for
    nothing. ``MADV_PAGEOUT`` reclaims clean file pages (a later read faults them in again from
    the page cache or the file) and never discards data: a page written since (copy-on-write) is
    kept or swapped, not reverted. Not Linux, or a kernel without it: nothing is done, 0."""
    madvise = _madvise()
    ranges = _file_ranges({os.path.realpath(os.fspath(p)) for p in paths})
    if madvise is None or not ranges:
        return 0
    keep_ranges = []
    for t in keep:
        r = _storage_range(t)
        if r is not None:
            keep_ranges.append((r[0] // _PAGE * _PAGE, -(-r[1] // _PAGE) * _PAGE))
    keep_ranges.sort()
    done = 0
    for lo, hi in ranges:
        pieces, cur = [], lo
        for k_lo, k_hi in keep_ranges:
            if k_hi <= cur or k_lo >= hi:
                continue
            if k_lo > cur:
                pieces.append((cur, k_lo))
            cur = max(cur, k_hi)
        if cur < hi:
            pieces.append((cur, hi))
        for a, b in pieces:
            if madvise(a, b - a, _MADV_PAGEOUT) != 0:
                return done           # EINVAL: a kernel without MADV_PAGEOUT
            done += b - a
    return done


def release_heap() -> bool:
    """Return the C heap's free memory to the OS (glibc's ``malloc_trim(0)``): a big buffer freed
    (a serialized model, a library's constants) can otherwise stay in the resident set, and count
    in the peak when the next big one is allocated. False where there is no glibc."""
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True
