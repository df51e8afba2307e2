"""Checking a tuned kernel against the default one (NaN-filled outputs, timing) before it may replace it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import tirx
from tvm.target import Target

from optc.backends.tvm_schedule.pipelines import _all_blocks, _buffers

log = logging.getLogger("optc.backends.tvm")


# ---- checking a tuned kernel -------------------------------------------------------------------------
@dataclass
class KernelCheck:
    """The verdict on one tuned kernel against its default (untuned) schedule."""

    ok: bool                  # correct and faster: the tuned record may be used
    correct: bool
    reason: str
    max_error: float = float("nan")   # max |tuned - default| / max(1, max |default|)
    unwritten: int = 0        # output values the tuned kernel left as NaN where the default wrote
    tuned_us: float = float("nan")
    default_us: float = float("nan")

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and v != v else v) for k, v in self.__dict__.items()}


def _written_params(func: tirx.PrimFunc) -> set:
    """Indices of the parameters whose buffers some block of ``func`` writes (its outputs)."""
    written = [w.source for b in _all_blocks(func) for w in b.writes]
    return {i for i, p in enumerate(func.params) if any(p.same_as(w) for w in written)}


def _random_args(func: tirx.PrimFunc, outputs: set, rng: np.random.Generator, dev) -> list:
    args = []
    for i, p in enumerate(func.params):
        buf = p
        shape = [int(d) for d in buf.shape]
        dtype = str(buf.dtype)
        if i in outputs:
            if dtype.startswith("float"):
                data = np.full(shape, np.nan, dtype=dtype)
            else:   # no NaN for integers: an out-of-range sentinel
                data = np.full(shape, np.iinfo(dtype).min if dtype.startswith("int") else 0, dtype=dtype)
        elif dtype.startswith("float"):
            data = rng.standard_normal(shape).astype(dtype)
        elif dtype == "bool":
            data = rng.integers(0, 2, shape).astype(bool)
        else:   # indices (gather, embedding): 0 is always in range
            data = np.zeros(shape, dtype=dtype)
        args.append(tvm.runtime.tensor(data, dev))
    return args


def _build(func: tirx.PrimFunc, target: Target):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)


def _time_us(lib, args, dev, min_ms: float) -> float:
    f = lib.mod.time_evaluator("main", dev, number=1, repeat=5, min_repeat_ms=int(round(min_ms)))
    return float(np.median(f(*args).results)) * 1e6


def check_kernel(default: tirx.PrimFunc, tuned: tirx.PrimFunc, target: Target, *, rtol: float = 1e-4,
                 speedup: float = 1.03, min_repeat_ms: float = 20.0, seed: int = 0) -> KernelCheck:
    """Whether the ``tuned`` form of a kernel may replace its ``default`` (untuned) form.

    Both are built and run on the same random inputs with every output buffer pre-filled with NaN
    (integer outputs: the type's minimum), so a kernel that leaves outputs unwritten is caught
    even when the stale memory happens to hold the right values. The tuned outputs must match
    the default ones within ``rtol`` of the output scale (``max(1, max |default|)``), with NaN
    exactly where the default has NaN. Then both are timed with constant-weight repacking
    removed (it runs once at compile time in the real build): the tuned kernel is kept only if
    it is at least ``speedup`` times faster.
    """
    if target.kind.name != "llvm":
        dev = tvm.device(target.kind.name, 0)
    else:
        dev = tvm.cpu()
    if [(str(b.dtype), list(b.shape)) for b in _buffers(default)] != [(str(b.dtype), list(b.shape)) for b in _buffers(tuned)]:
        return KernelCheck(False, False, "signature differs")
    outputs = _written_params(default)
    if not outputs:
        return KernelCheck(False, False, "the default kernel writes no parameter")
    rng = np.random.default_rng(seed)
    ref_args = _random_args(default, outputs, rng, dev)
    got_args = [tvm.runtime.tensor(a.numpy(), dev) for a in ref_args]
    try:
        lib_default = _build(default, target)
        lib_tuned = _build(tuned, target)
        lib_default["main"](*ref_args)
        lib_tuned["main"](*got_args)
    except Exception as e:  # noqa: BLE001 - a kernel that does not build or run is rejected
        return KernelCheck(False, False, f"build/run failed: {type(e).__name__}: {str(e).strip().splitlines()[-1:]}")
    worst, unwritten = 0.0, 0
    for i in sorted(outputs):
        ref, got = ref_args[i].numpy(), got_args[i].numpy()
        if ref.dtype.kind == "f":
            ref_nan, got_nan = np.isnan(ref), np.isnan(got)
            unwritten += int(np.count_nonzero(got_nan & ~ref_nan))
            if np.any(ref_nan & ~got_nan):
                return KernelCheck(False, False, "tuned kernel wrote values where the default left NaN")
            finite = ~ref_nan & ~got_nan
            scale = max(1.0, float(np.max(np.abs(ref[finite]), initial=0.0)))
            diff = np.abs(ref[finite].astype(np.float64) - got[finite].astype(np.float64))
            worst = max(worst, float(np.max(diff, initial=0.0)) / scale)
        else:
            worst = max(worst, float(np.count_nonzero(ref != got)))
    if unwritten:
        return KernelCheck(False, False, f"tuned kernel left {unwritten} output values unwritten",
                           max_error=worst, unwritten=unwritten)
    if not worst <= rtol:
        return KernelCheck(False, False, f"tuned kernel differs from the default: {worst:.3g} > {rtol:g}",
                           max_error=worst)
    try:
        default_us, tuned_us = _time_pair(default, tuned, target, dev, min_repeat_ms, rng)
    except Exception as e:  # noqa: BLE001
        return KernelCheck(False, True, f"timing failed: {type(e).__name__}: {str(e).strip().splitlines()[-1:]}",
                           max_error=worst)
    ok = tuned_us * speedup <= default_us
    reason = (f"correct, {default_us / tuned_us:.2f}x the default's speed"
              + ("" if ok else f" (needs {speedup:.2f}x)"))
    return KernelCheck(ok, True, reason, max_error=worst, tuned_us=tuned_us, default_us=default_us)


def _time_pair(default, tuned, target, dev, min_ms, rng):
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    strip = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)
    out = []
    for func in (default, tuned):
        stripped = strip(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}))["main"]
        args = _random_args(stripped, _written_params(stripped), rng, dev)
        lib = _build(stripped, target)
        lib["main"](*args)   # warm-up
        out.append(_time_us(lib, args, dev, min_ms))
    return out[0], out[1]
