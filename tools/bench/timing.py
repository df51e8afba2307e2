"""Timing candidates interleaved (:func:`interleaved`) and the statistics of the result: paired
per-round ratios, percentiles, a distribution-free confidence interval of the median."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence


#: Sleep before each timed call: ONNX Runtime's intra-op workers spin for about 100-200 ms after a
#: run (measured here: ~0.05 CPU-s after each ResNet-50 call), which would slow whichever candidate
#: runs next on a 2-core machine.
DEFAULT_PAUSE_MS = 200.0


def interleaved(fns: dict[str, Callable[[], Any]], *, runs: int, warmup: int = 1, pause_s: float = 0.0,
                seed: int = 0, errors: dict[str, BaseException] | None = None) -> dict[str, list[float]]:
    """Time each zero-argument callable ``runs`` times, interleaved: one call of each per round,
    in a fresh random order every round (seeded), so that no candidate always runs right after the
    same other one; ``pause_s`` of sleep before each call lets the previous runtime's worker
    threads stop spinning. Returns ``{name: [seconds per round]}``.

    With ``errors`` (a dict), a callable that raises is dropped from the rotation, its exception
    stored there and its times emptied; without it, the exception propagates."""
    import random
    rng = random.Random(seed)
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}

    def call(name: str) -> float | None:
        if pause_s > 0:
            time.sleep(pause_s)
        t0 = time.perf_counter()
        try:
            fns[name]()
        except Exception as e:  # noqa: BLE001
            if errors is None:
                raise
            errors[name] = e
            names.remove(name)
            times[name] = []
            return None
        return time.perf_counter() - t0

    for _ in range(warmup):
        for name in list(names):
            call(name)
    for _ in range(runs):
        for name in rng.sample(names, len(names)):
            if name not in names:   # dropped earlier in this round
                continue
            dt = call(name)
            if dt is not None:
                times[name].append(dt)
    return times


def paired_ratios(times: list[float], ref: list[float]) -> list[float]:
    return [a / b for a, b in zip(times, ref) if b > 0]


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median: the order statistics ranked
    ``n/2 -+ z sqrt(n)/2`` (normal approximation of the binomial; (min, max) for small n)."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    k = int((n - z * n ** 0.5) / 2)   # 0-based rank of the lower bound
    k = max(0, min(k, (n - 1) // 2))
    return xs[k], xs[n - 1 - k]
