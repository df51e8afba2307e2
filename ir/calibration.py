"""Calibration: observers that turn activations seen on calibration data into a quantization range
``[lo, hi]``, and the loop that feeds them (``insert-qdq``'s scales, ``to-half``'s value ranges).

Observers (one per quantized value; ``update`` is called once per calibration sample):

``minmax``
    ``[min, max]`` over every sample. Exact for bounded activations (ReLU6), hurt by outliers.
``percentile``
    A 2048-bin histogram (re-binned when a later sample widens the range); the range is the
    ``(100 - p)``-th to ``p``-th percentile (``p = 99.99`` by default): a few outliers no longer
    stretch the scale of every other value.
``entropy``
    The same histogram; the clipping threshold minimises the KL divergence between the clipped
    distribution and its quantized version (TensorRT's method): 255 levels on ``[0, T]`` for
    non-negative values, 127 per side on ``[-T, T]`` (of ``|x|``) otherwise.

Calibration data is an iterable of samples; a sample is a tensor (one positional input), a
tuple/list of positional inputs, a dict of keyword inputs or an ``(args, kwargs)`` pair. Every
sample is checked against the Program's signature (:class:`~optc.errors.InputSpecError` naming
the sample). With no data, :func:`calibration_samples` warns and uses the example inputs plus
random inputs shaped like them.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.fx as fx

from optc.errors import InputSpecError, OptcError

OBSERVERS = ("minmax", "percentile", "entropy")
BINS = 2048


class Observer:
    """Collects statistics of one value; :meth:`range` gives the calibrated ``(lo, hi)``."""

    def __init__(self) -> None:
        self.lo = math.inf
        self.hi = -math.inf
        self.count = 0

    def update(self, t: torch.Tensor) -> None:
        t = t.detach()
        if t.numel() == 0:
            return
        t = t.float()
        finite = t[torch.isfinite(t)] if not bool(torch.isfinite(t).all()) else t
        if finite.numel() == 0:
            return
        self.lo = min(self.lo, float(finite.min()))
        self.hi = max(self.hi, float(finite.max()))
        self.count += 1
        self._update(finite)

    def _update(self, t: torch.Tensor) -> None:
        pass

    def range(self) -> tuple[float, float]:
        if self.count == 0:
            return 0.0, 0.0
        return self.lo, self.hi


class MinMaxObserver(Observer):
    pass


class HistogramObserver(Observer):
    """A histogram over ``[lo, hi]`` of every value seen (``BINS`` bins). When a sample falls
    outside the current range, the histogram is re-binned onto a wider range (counts of an old
    bin go to the new bin holding its centre)."""

    def __init__(self, bins: int = BINS) -> None:
        super().__init__()
        self.bins = bins
        self.hist: np.ndarray | None = None
        self.edges: tuple[float, float] | None = None

    def _update(self, t: torch.Tensor) -> None:
        lo, hi = self.lo, self.hi
        if hi <= lo:
            hi = lo + 1e-8
        if self.edges is None:
            self.edges = (lo, hi)
            self.hist = np.zeros(self.bins, dtype=np.float64)
        elif lo < self.edges[0] or hi > self.edges[1]:
            old_lo, old_hi = self.edges
            # widen by a margin so that a slowly growing range does not re-bin every sample
            span = hi - lo
            new = (min(lo, old_lo - 0.1 * span) if lo < old_lo else old_lo,
                   max(hi, old_hi + 0.1 * span) if hi > old_hi else old_hi)
            centres = old_lo + (np.arange(self.bins) + 0.5) * (old_hi - old_lo) / self.bins
            idx = np.clip(((centres - new[0]) / (new[1] - new[0]) * self.bins).astype(np.int64), 0, self.bins - 1)
            hist = np.zeros(self.bins, dtype=np.float64)
            np.add.at(hist, idx, self.hist)
            self.hist, self.edges = hist, new
        h = torch.histc(t, bins=self.bins, min=self.edges[0], max=self.edges[1])
        self.hist += h.double().numpy()

    def _bin_edges(self) -> np.ndarray:
        return np.linspace(self.edges[0], self.edges[1], self.bins + 1)


class PercentileObserver(HistogramObserver):
    def __init__(self, percentile: float = 99.99, bins: int = BINS) -> None:
        super().__init__(bins)
        if not 50.0 < percentile <= 100.0:
            raise OptcError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def range(self) -> tuple[float, float]:
        if self.count == 0:
            return 0.0, 0.0
        if self.hist is None or self.hist.sum() == 0 or self.percentile >= 100.0:
            return self.lo, self.hi
        cdf = np.cumsum(self.hist) / self.hist.sum()
        edges = self._bin_edges()
        q = self.percentile / 100.0
        hi_bin = int(np.searchsorted(cdf, q))
        lo_bin = int(np.searchsorted(cdf, 1.0 - q))
        hi = min(self.hi, float(edges[min(hi_bin + 1, self.bins)]))
        lo = max(self.lo, float(edges[lo_bin]))
        return lo, hi


class EntropyObserver(HistogramObserver):
    """Exact zeros (half of a ReLU's outputs) are left out of the histogram: zero is exact at any
    threshold (the zero point makes it so), and their spike in the first bin would otherwise
    dominate the divergence and drive the threshold far down (1.9 instead of 4.7 for ReLU(N(0,1)))."""

    def _update(self, t: torch.Tensor) -> None:
        nonzero = t[t != 0]
        if nonzero.numel():
            super()._update(nonzero)

    def range(self) -> tuple[float, float]:
        if self.count == 0:
            return 0.0, 0.0
        if self.hist is None or self.hist.sum() == 0:
            return self.lo, self.hi
        if self.lo >= 0:
            # non-negative (after ReLU): 255 levels on [0, T]; bins below 0 are empty
            edges = self._bin_edges()
            start = int(np.clip(np.searchsorted(edges, 0.0) - 1, 0, self.bins - 1))
            t = _kl_threshold(self.hist[start:], levels=255)
            return self.lo, min(self.hi, float(edges[start] + t * (edges[1] - edges[0])))
        # signed: threshold on |x| with 127 levels per side
        amax = max(-self.lo, self.hi)
        edges = self._bin_edges()
        centres = (edges[:-1] + edges[1:]) / 2
        abs_hist, _ = np.histogram(np.abs(centres), bins=self.bins, range=(0.0, amax), weights=self.hist)
        t = _kl_threshold(abs_hist, levels=127) * amax / self.bins
        return max(self.lo, -t), min(self.hi, t)


def _kl_threshold(hist: np.ndarray, levels: int) -> int:
    """The number of leading bins ``i`` (>= ``levels``) of ``hist`` whose clipped distribution
    quantized to ``levels`` levels has the least KL divergence from the original."""
    n = len(hist)
    if n <= levels:
        return n
    best_i, best_kl = n, math.inf
    for i in range(levels, n + 1, max(1, (n - levels) // 128)):
        p = hist[:i].astype(np.float64).copy()
        p[i - 1] += hist[i:].sum()
        nonzero = p > 0
        # quantize: merge i bins into `levels` groups, spread each group's mass over its non-empty bins
        groups = np.minimum((np.arange(i) * levels) // i, levels - 1)
        mass = np.bincount(groups, weights=hist[:i], minlength=levels)
        nz_count = np.bincount(groups, weights=nonzero.astype(np.float64), minlength=levels)
        q = np.where(nonzero, mass[groups] / np.maximum(nz_count[groups], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if ps == 0 or qs == 0:
            continue
        p_n, q_n = p / ps, q / qs
        mask = p_n > 0
        kl = float(np.sum(p_n[mask] * np.log(p_n[mask] / np.maximum(q_n[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i


def make_observer(method: str, percentile: float = 99.99) -> Observer:
    if method == "minmax":
        return MinMaxObserver()
    if method == "percentile":
        return PercentileObserver(percentile)
    if method == "entropy":
        return EntropyObserver()
    raise OptcError(f"unknown calibration method '{method}' (valid: {', '.join(OBSERVERS)})")


# ---- calibration data -------------------------------------------------------------------------
def normalise_sample(sample: Any) -> tuple[tuple, dict]:
    """A calibration sample as ``(args, kwargs)``."""
    if isinstance(sample, torch.Tensor):
        return (sample,), {}
    if isinstance(sample, dict):
        return (), dict(sample)
    if isinstance(sample, (tuple, list)):
        if len(sample) == 2 and isinstance(sample[0], (tuple, list)) and isinstance(sample[1], dict):
            return tuple(sample[0]), dict(sample[1])
        return tuple(sample), {}
    raise InputSpecError(f"a calibration sample must be a tensor, a tuple/list of positional inputs, a dict of "
                         f"keyword inputs or an (args, kwargs) pair; got {type(sample).__name__}")


def calibration_samples(program, data: Any, *, samples: int, pass_name: str = "insert-qdq") -> list[list[torch.Tensor]]:
    """The flat graph inputs of every calibration sample (validated against ``program``'s
    signature), or, when ``data`` is None, the example inputs and ``samples - 1`` random ones
    (with a warning)."""
    from optc.ir.verifier import random_inputs_like
    if data is None:
        warnings.warn(f"{pass_name}: no calibration_data given: calibrating on the example inputs and "
                      f"{max(samples - 1, 0)} random inputs shaped like them; scales and zero points will not "
                      "match real data (pass calibration_data= to optc.compile / optc.optimize)", UserWarning,
                      stacklevel=2)
        out = [program.example_flat_inputs()]
        for seed in range(1, samples):
            args, kwargs = random_inputs_like(program, seed=seed)
            out.append(program.flatten_inputs(args, kwargs))
        return out
    if isinstance(data, torch.Tensor):
        raise InputSpecError(f"{pass_name}: calibration_data is a single tensor {list(data.shape)}; pass an iterable "
                             "of samples, each one call's inputs: e.g. [x] for one sample, or list(x.split(batch)) "
                             "for a dataset tensor")
    if not isinstance(data, Iterable):
        raise InputSpecError(f"{pass_name}: calibration_data must be an iterable of samples, got {type(data).__name__}")
    out = []
    for i, sample in enumerate(data):
        try:
            args, kwargs = normalise_sample(sample)
            flat = program.flatten_inputs(args, kwargs)
            program._check_shapes(flat)
        except InputSpecError as e:
            raise InputSpecError(f"{pass_name}: calibration sample {i} does not match the program's inputs: {e}") from None
        out.append([t.detach() for t in flat])
    if not out:
        raise InputSpecError(f"{pass_name}: calibration_data is empty")
    return out


def prepare_calibration_data(program, data: Any, *, what: str = "calibration_data") -> list[tuple[tuple, dict]]:
    """``data`` read once (a generator or a DataLoader is consumed here, not by the first pass that
    reads it), checked against ``program``'s signature before any pass runs (an
    :class:`InputSpecError` naming the sample) and returned as ``[(args, kwargs), ...]``."""
    if isinstance(data, Iterable) and not isinstance(data, (torch.Tensor, list, tuple, str, bytes)):
        data = list(data)
    calibration_samples(program, data, samples=1, pass_name=what)    # validates (and raises)
    return [normalise_sample(s) for s in data]


def probe_module(gm: fx.GraphModule, nodes: list[fx.Node]) -> fx.GraphModule:
    """A GraphModule (attributes shared with ``gm``) that returns the values of ``nodes``."""
    graph = fx.Graph()
    mapping: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(gm.graph, mapping)
    graph.output(tuple(mapping[n] for n in nodes))
    return fx.GraphModule(gm, graph, class_name="Probe")


def run_probe(probe: fx.GraphModule, samples: list[list[torch.Tensor]], *, desc: str) -> Iterator[tuple]:
    """Yields ``probe``'s outputs for each sample, under no_grad, with a progress bar on a terminal."""
    try:
        from tqdm.auto import tqdm
        it = tqdm(samples, desc=desc, disable=None, leave=False)
    except ImportError:  # tqdm is a dependency, but the loop must not need it
        it = samples
    with torch.no_grad():
        for flat in it:
            yield probe(*flat)
