"""The campaign: models drawn from seeds for a given time, compared, and new mismatches shrunk.

:func:`campaign` draws model ``k`` from ``random.Random(f"{seed}:{k}")``, samples backends at a
rate, counts per target (:class:`~optc.tools.fuzz.report.CampaignReport`), and shrinks the first
mismatch of each new signature on the generator's choice sequence
(:func:`~optc.tools.fuzz.shrink.shrink_choices`) into a reproducer
(:func:`~optc.tools.fuzz.reproducer.write_reproducer`). :func:`parallel_campaign` splits it over
processes. The test suite draws models with hypothesis instead
(:func:`~optc.tools.fuzz.draw.model_specs`) and lets hypothesis shrink them.
"""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Sequence

import torch

from optc.tools.fuzz.draw import random_spec_choices
from optc.tools.fuzz.known_issues import known_issue
from optc.tools.fuzz.oracle import DEFAULT_BACKENDS, oracle
from optc.tools.fuzz.report import CampaignReport
from optc.tools.fuzz.reproducer import write_reproducer
from optc.tools.fuzz.results import Mismatch, _first_line
from optc.tools.fuzz.shrink import shrink_choices
from optc.tools.fuzz.spec import ModelSpec
from optc.tools.progress import open_progress


def code_digest() -> str:
    """sha256 (12 hex digits) of optc's Python sources (subpackages included; a file's path
    relative to its top folder is hashed with it): which code a campaign ran."""
    import hashlib
    import optc
    root = os.path.dirname(os.path.dirname(os.path.abspath(optc.__file__)))
    h = hashlib.sha256()
    for sub in ("optc", "ir", "passes", "backends", "tools"):
        top = os.path.join(root, sub)
        for d, dirs, files in os.walk(top):
            dirs[:] = sorted(x for x in dirs if not x.startswith((".", "__pycache__")))
            for name in sorted(files):
                if name.endswith(".py"):
                    h.update(os.path.relpath(os.path.join(d, name), top).encode())
                    with open(os.path.join(d, name), "rb") as f:
                        h.update(f.read())
    return h.hexdigest()[:12]


def campaign(minutes: float, *, seed: int = 0, backends: Sequence[str] = DEFAULT_BACKENDS,
             backend_rate: float | dict = 0.1, out: str | os.PathLike = "fuzz-repro", passes: Sequence[str] | None = None,
             max_ops: int = 10, shrink_seconds: float = 120.0, progress: bool = True,
             max_models: int | None = None, start: int = 0, kinds: Sequence[str] | None = None,
             stride: int = 1, checkpoint: str | None = None, checkpoint_every: int = 100) -> CampaignReport:
    """Fuzz for ``minutes`` (or ``max_models``): model ``k`` is ``random_spec(f"{seed}:{k}")``
    (``k`` from ``start`` in steps of ``stride``: worker ``i`` of ``n`` takes ``start + i``,
    step ``n``; see :func:`parallel_campaign`); each goes through capture, every pass and the default pipeline, and
    each backend runs on a ``backend_rate`` share of models (a float, or a dict per backend;
    chosen by a seeded RNG, so a
    campaign is deterministic up to its time limit). The first mismatch of each new signature
    is shrunk (:func:`~optc.tools.fuzz.shrink.shrink_choices`, at most ``shrink_seconds``) and
    written as a reproducer into ``out``; later ones with the same signature are counted.
    ``kinds`` restricts the generator's op kinds (a focused campaign). ``checkpoint``: a path the
    counts so far are written to (as JSON, atomically) every ``checkpoint_every`` models, so that a
    campaign whose worker hangs (a library stuck in native code cannot be interrupted from Python)
    or is killed loses nothing it counted."""
    report = CampaignReport(seed, tuple(backends), backend_rate, code_digest=code_digest())
    rates = {b: backend_rate.get(b, 0.0) if isinstance(backend_rate, dict) else backend_rate for b in backends}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # tiny tensors: threads only add overhead on a shared machine
    t_start = time.monotonic()
    deadline = t_start + minutes * 60
    seen: set[str] = set()
    bar = open_progress("optc fuzz", "model", total=max_models, seconds=minutes * 60,
                        bar_format="{desc}: {n} models [{elapsed}, {rate_fmt}{postfix}]") if progress else None
    k = start
    try:
        while time.monotonic() < deadline and (max_models is None or report.models < max_models):
            spec, choices = random_spec_choices(f"{seed}:{k}", max_ops, kinds)
            rng = random.Random(f"{seed}:{k}:backends")
            chosen = [b for b in backends if rng.random() < rates[b]]
            index = k
            k += stride
            try:
                res = oracle(spec, passes, chosen)
            except Exception as e:  # the harness itself (e.g. a pass module that fails to import)
                report.harness_errors += 1
                msg = f"optc fuzz: model {index}: the oracle failed: {type(e).__name__}: {_first_line(str(e))}"
                bar.write(msg) if bar is not None else print(msg, file=sys.stderr)
                if report.harness_errors >= 20 and report.harness_errors > report.models:
                    raise
                continue
            report.add(res, index)
            seen.add(spec.digest())
            if checkpoint and report.models % checkpoint_every == 0:
                _write_checkpoint(report, seen, t_start, checkpoint, index)
            if bar is not None:
                bar.set_postfix(mismatches=sum(f.occurrences for f in report.findings.values()), refresh=False)
                bar.update(1)
            for m in res.mismatches:
                finding = report.findings[m.signature]
                if finding.reproducer is not None or finding.first is not m:
                    continue
                if known_issue(m) is not None:    # already has a minimal regression test
                    finding.reproducer = write_reproducer(m, out, note=f"known issue {known_issue(m).id}")
                    continue
                finding.shrunk = shrink_mismatch(m, choices, passes=passes, seconds=shrink_seconds, max_ops=max_ops,
                                                 kinds=kinds)
                finding.reproducer = write_reproducer(finding.shrunk, out, note=f"optc fuzz --seed {seed}, model {index}")
                msg = (f"optc fuzz: {m.target}: {m.kind}: {_first_line(m.detail)}\n"
                       f"  shrunk from {len(m.spec.ops)} to {len(finding.shrunk.spec.ops)} ops: {finding.reproducer}")
                if bar is not None:
                    bar.write(msg)
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
    report.digests = seen
    report.distinct = len(seen)
    report.elapsed_s = time.monotonic() - t_start
    if checkpoint:
        _write_checkpoint(report, seen, t_start, checkpoint, k - stride)
    return report


def _write_checkpoint(report: CampaignReport, seen: set, t_start: float, path: str, last_index: int) -> None:
    import json
    import os

    from optc.tools.fuzz.report import report_json
    report.distinct = len(seen)
    report.elapsed_s = time.monotonic() - t_start
    data = dict(report_json(report), last_model=last_index)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _campaign_worker(kwargs: dict) -> CampaignReport:
    return campaign(**kwargs)


def parallel_campaign(minutes: float, *, workers: int, max_models: int | None = None, start: int = 0,
                      progress: bool = True, checkpoint: str | None = None, **kwargs) -> CampaignReport:
    """:func:`campaign` in ``workers`` processes (each single-threaded): worker ``i`` takes models
    ``start + i``, ``start + i + workers``, ... so the union is the models one worker would take
    (up to the time limit); their reports are merged. Only worker 0 shows its progress (its
    count is about ``1/workers`` of the total). A campaign's counts do not depend on ``workers``
    when it stops at ``max_models``. ``checkpoint``: worker ``i`` writes its counts so far to
    ``{checkpoint}.worker{i}`` (see :func:`campaign`)."""
    if workers <= 1:
        return campaign(minutes, max_models=max_models, start=start, progress=progress,
                        checkpoint=None if checkpoint is None else f"{checkpoint}.worker0", **kwargs)
    import multiprocessing
    jobs = []
    for i in range(workers):
        share = None if max_models is None else max_models // workers + (i < max_models % workers)
        if share == 0:
            continue
        jobs.append(dict(kwargs, minutes=minutes, max_models=share, start=start + i, stride=workers,
                         progress=progress and i == 0,
                         checkpoint=None if checkpoint is None else f"{checkpoint}.worker{i}"))
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        reports = pool.map(_campaign_worker, jobs)
    report = reports[0]
    for other in reports[1:]:
        report.merge(other)
    return report


def shrink_mismatch(m: Mismatch, choices: Sequence[int], *, passes: Sequence[str] | None = None,
                    seconds: float = 120.0, max_ops: int = 10, kinds: Sequence[str] | None = None) -> Mismatch:
    """Shrink ``m``'s model to a smaller one with a mismatch of the same signature on the same
    target (only that target is run while shrinking)."""
    best = [m]

    def fails(spec: ModelSpec) -> bool:
        res = oracle(spec, passes, [m.backend] if m.backend else [], only=m.target)
        same = [x for x in res.mismatches if x.signature == m.signature]
        if same:
            best[0] = same[0]
        return bool(same)

    shrink_choices(choices, fails, deadline=time.monotonic() + seconds, max_ops=max_ops, kinds=kinds)
    return best[0]
