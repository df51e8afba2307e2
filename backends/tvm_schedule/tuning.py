"""MetaSchedule tuning with a persistent database of checked records, and its builder helpers."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import sys
from typing import Callable

import tvm
import tvm_ffi
from tvm.target import Target

from optc.backends.tvm_schedule.kernel_check import check_kernel
from optc.backends.tvm_schedule.pipelines import apply_default_schedule, has_reduction, is_static, tir_functions


log = logging.getLogger("optc.backends.tvm")


# ---- MetaSchedule helpers --------------------------------------------------------------------------------
def make_fast_build():
    """The MetaSchedule builder function. Defined in a closure so cloudpickle ships it by value:
    its workers then import neither optc (torch) nor ``tvm.s_tir.tensor_intrin``, which the
    default builder imports (tens of seconds to minutes per worker, past its 30 s timeout)."""

    def fast_build(mod, target, _params):
        from tvm.driver import build as tvm_build
        from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
        return tvm_build(mod, target=target)

    return fast_build


def cpu_tensor_intrinsics_only() -> None:
    """Register the x86 tensor intrinsics without importing every target's.

    MetaSchedule's TuneContext imports ``tvm.s_tir.tensor_intrin``, whose ``__init__`` imports the
    intrinsics of every target: 2 minutes on the project's loaded machine, 85 s of it for CUDA.
    CPU tuning needs only the x86 ones (its default rules name the VNNI/AVX-512 dot products).
    The package is registered without running its ``__init__``; other submodules
    (``tvm.s_tir.tensor_intrin.cuda``) still import normally when something asks for them.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name not in sys.modules:
        import tvm.s_tir  # noqa: F401  (the parent package must exist)
        spec = importlib.util.find_spec(name)
        if spec is None:
            return
        sys.modules[name] = importlib.util.module_from_spec(spec)
    importlib.import_module(name + ".x86")


# ---- MetaSchedule tuning with checked records ------------------------------------------------------------
DECISIONS = "decisions.json"


def _workload_key(workload: tvm.IRModule) -> str:
    return str(tvm_ffi.structural_hash(workload))


def _read_decisions(db_dir: str) -> dict:
    path = os.path.join(db_dir, DECISIONS)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        log.warning("tvm tuning: ignoring unreadable %s: %s", path, e)
        return {}


def _write_decisions(db_dir: str, decisions: dict) -> None:
    tmp = os.path.join(db_dir, DECISIONS + ".tmp")
    with open(tmp, "w") as f:
        json.dump(decisions, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(db_dir, DECISIONS))


def _json_database(path: str):
    from tvm.s_tir import meta_schedule as ms
    os.makedirs(path, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=path)


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: str(v) for k, v in values.items()})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _meta_schedule_logging():
    """MetaSchedule's ``create_loggers`` rebuilds its logger with ``logging.config.dictConfig`` and
    lists every handler already on ``tvm.s_tir.meta_schedule`` by name: a handler it did not
    create (unnamed: "'NoneType' object has no attribute 'format'"; or named, unknown to its
    config) makes tuning fail. Such handlers are set aside for the call and put back after; its
    chatter on stdout is silenced (the tqdm bar shows progress)."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    foreign = [h for h in logger.handlers if not (h.get_name() or "").startswith("tvm.s_tir.meta_schedule")]
    for h in foreign:
        logger.removeHandler(h)
    if logger.level == logging.NOTSET:   # else it sets DEBUG, and its console handler prints every XGB round
        logger.setLevel(logging.INFO)
    # its console handler writes the task table to stdout each round: here it goes to devnull
    # (the same lines are in DIR/tuned/logs/), and afterwards only warnings, to stderr
    with open(os.devnull, "w") as null:
        try:
            with contextlib.redirect_stdout(null):
                yield
        finally:
            for h in logger.handlers:
                if (h.get_name() or "").endswith(".console") and isinstance(h, logging.StreamHandler):
                    h.setStream(sys.stderr)
                    h.setLevel(logging.WARNING)
            for h in foreign:
                logger.addHandler(h)


def _progress_callback(bar):
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            bar.update(len(measure_candidates))

    return _Progress()


def _no_bar(progress: bool | None) -> bool | None:
    return None if progress is None else not progress   # tqdm: None = only on a terminal


def tune(mod: tvm.IRModule, target: Target, *, trials: int, db_dir: str, threads: int,
         progress: bool | None = None, check: Callable | None = None):
    """Tune the kernels of ``mod`` (the output of :func:`pre_schedule_pipeline`) that have a
    reduction and static shapes, and return ``(database, summary)``: a MetaSchedule database of
    the *checked* records only (None if there are none) for :func:`build_pipeline`.

    ``db_dir`` holds ``tuned/`` (MetaSchedule's own JSON database and logs), ``checked/`` (the
    records that passed :func:`check_kernel`) and ``decisions.json`` (per workload: kept or not,
    why, the timings). A workload with a decision is never tuned or checked again, so a second
    compile of the same model reuses the records. ``trials`` = 0 only applies what is there;
    ``trials`` = -n means n trials for each kernel still to tune.
    ``progress``: tqdm bars over trials and checks (None: when stderr is a terminal).
    """
    from tqdm import tqdm
    check = check or check_kernel
    os.makedirs(db_dir, exist_ok=True)
    decisions = _read_decisions(db_dir)
    checked_dir = os.path.join(db_dir, "checked")
    summary = {"db_dir": db_dir, "tasks": 0, "tuned": 0, "untuned": 0, "applied": 0, "rejected": {}, "trials": 0}
    if trials != 0:
        from tvm.s_tir import meta_schedule as ms
        if target.kind.name == "llvm":
            cpu_tensor_intrinsics_only()
        extracted = [t for t in ms.relax_integration.extract_tasks(mod, target)
                     if is_static(t.dispatched[0]["main"]) and has_reduction(t.dispatched[0]["main"])]
        summary["tasks"] = len(extracted)
        todo = [t for t in extracted if _workload_key(t.dispatched[0]) not in decisions]
        if trials < 0:   # -n: n trials per kernel still to tune
            trials = -trials * len(todo)
        summary["trials"] = trials
        if todo and trials:
            tuned_dir = os.path.join(db_dir, "tuned")
            raw = _json_database(tuned_dir)
            with tqdm(total=trials, desc=f"tvm tuning {len(todo)} kernels", unit="trial", disable=_no_bar(progress)) as bar, \
                    _env(TVM_NUM_THREADS=threads):
                try:
                    with _meta_schedule_logging():
                        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                            todo, work_dir=tuned_dir)
                        ms.tune_tasks(
                            tasks=contexts, task_weights=weights, work_dir=tuned_dir,
                            max_trials_global=trials, max_trials_per_task=trials,
                            num_trials_per_iter=max(1, min(64, trials)),
                            builder=ms.builder.LocalBuilder(f_build=make_fast_build(), max_workers=threads,
                                                            timeout_sec=300),
                            runner=ms.runner.LocalRunner(timeout_sec=120),
                            database=raw, cost_model="xgb",
                            measure_callbacks=list(ms.measure_callback.MeasureCallback.create("default"))
                            + [_progress_callback(bar)],
                        )
                except Exception as e:  # noqa: BLE001 - the tuner failing costs speed, never correctness
                    # what it committed before failing is still checked below; the rest keeps the
                    # default schedule and stays undecided, so the next compile tunes it again
                    summary["error"] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1][:200]}"
                    log.warning("tvm tuning stopped early (%s); the kernels it did not finish keep their default "
                                "schedule", summary["error"])
            checked = _json_database(checked_dir)
            for task in tqdm(todo, desc="tvm checking tuned kernels", unit="kernel",
                             disable=_no_bar(progress)):
                workload = task.dispatched[0]
                key = _workload_key(workload)
                record = raw.query_tuning_record(workload, target, "main")
                sch = raw.query_schedule(workload, target, "main")
                if record is None or sch is None:   # no trial reached it (budget) or none built: undecided,
                    summary["untuned"] += 1         # so a later compile with more trials tunes it
                    continue
                default = apply_default_schedule(workload, target)["main"]
                verdict = check(default, sch.mod["main"], target)
                decisions[key] = {"task": task.task_name, **verdict.to_json()}
                summary["tuned"] += 1
                if verdict.ok:
                    # the record's own workload (MetaSchedule's normalised copy of the task's module):
                    # its trace replays on that one. ``workload`` itself can differ structurally, and
                    # a trace that does not replay makes the whole database fail to load (MobileNetV2,
                    # a grouped conv: "parallel_for_dynamic error")
                    checked.commit_tuning_record(ms.database.TuningRecord(
                        record.trace, checked.commit_workload(record.workload.mod), record.run_secs, target,
                        record.args_info))
                else:
                    summary["rejected"][task.task_name] = verdict.reason
                    log.info("tvm tuning: %s keeps its default schedule: %s", task.task_name, verdict.reason)
            _write_decisions(db_dir, decisions)
    if not os.path.exists(os.path.join(checked_dir, "database_tuning_record.json")):
        return None, summary
    try:
        database = _json_database(checked_dir)
    except Exception as e:  # noqa: BLE001 - a record that no longer replays (written by an older optc or TVM)
        summary["error"] = (f"the checked records in {checked_dir} do not load ({type(e).__name__}: "
                            f"{(str(e).strip().splitlines() or [''])[-1][:200]}); delete that folder to tune again")
        log.warning("tvm tuning: %s; every kernel keeps its default schedule", summary["error"])
        return None, summary
    summary["applied"] = sum(1 for f in tir_functions(mod).values()
                             if database.has_workload(tvm.IRModule({"main": f})))
    return (database if len(database) else None), summary


