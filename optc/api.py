"""The public entry points: optimize (and, with the backends, compile and load)."""

from __future__ import annotations

from typing import Any, Iterable

from optc.ir.program import Program
from optc.passes.manager import PassManager, PipelineReport
from optc.target import Target, resolve_target


def optimize(program: Program, pipeline: str = "default", target: Target | str = "cpu", *,
             verify_each: bool = False, check_numerics: bool = False, dump_dir: str | None = None,
             print_after_all: bool = False, print_changed: bool = False, bisect_limit: int | None = None,
             max_rewrites: int | None = None, disable: Iterable[str] = (),
             calibration_data: Any = None) -> tuple[Program, PipelineReport]:
    """Run ``pipeline`` (text; ``default`` = the target's default pipeline) over ``program``.

    Returns the new Program and a :class:`~optc.passes.manager.PipelineReport`. ``program``
    itself is never modified; on failure a :class:`~optc.errors.PassError` names the pass, the
    passes before it and the node, and ``program`` is still intact.
    """
    if not isinstance(program, Program):
        raise TypeError(f"optimize() takes a Program (from optc.capture), got {type(program).__name__}")
    tgt = resolve_target(target)
    pm = PassManager(pipeline, target=tgt, verify_each=verify_each, check_numerics=check_numerics,
                     dump_dir=dump_dir, print_after_all=print_after_all, print_changed=print_changed,
                     bisect_limit=bisect_limit, max_rewrites=max_rewrites, disable=disable,
                     extra={"calibration_data": calibration_data} if calibration_data is not None else None)
    return pm.run(program)
