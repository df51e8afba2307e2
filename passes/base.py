"""Pass protocol and registry.

A pass is a function ``fn(gm, ctx) -> PassResult`` registered under a kebab-case name:

    @register_pass("dce", exact=True, description="remove nodes whose results are unused")
    def dce(gm: fx.GraphModule, ctx: PassContext) -> PassResult: ...

It works on the GraphModule in place and says honestly whether it changed it (the
PassManager fingerprints the graph in checked runs and fails a pass that lies). Options are
declared with types and defaults; the pipeline parser validates them against the
declaration. ``exact`` passes compute the same function up to float rounding and are
checked numerically when asked; lossy passes (pruning, quantization, half precision) have
the error they introduce reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch.fx as fx

from optc.errors import PipelineError

if TYPE_CHECKING:
    from optc.ir.program import Program

log = logging.getLogger("optc.passes")


@dataclass(frozen=True)
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    stats: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Option:
    """A declared pass option: ``type`` is bool, int, float, str, or a tuple of allowed strings."""

    type: Any
    default: Any
    help: str = ""

    def parse(self, pass_name: str, key: str, raw: str) -> Any:
        t = self.type
        try:
            if isinstance(t, tuple):
                if raw not in t:
                    raise ValueError(f"must be one of {', '.join(t)}")
                return raw
            if t is bool:
                low = raw.lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise ValueError("must be true or false")
            if t is int:
                return int(raw)
            if t is float:
                return float(raw)
            return str(raw)
        except ValueError as e:
            tname = t.__name__ if isinstance(t, type) else "choice"
            raise PipelineError(f"pass '{pass_name}': option {key}={raw!r} is not a valid {tname}: {e}") from None

    def describe(self) -> str:
        t = "|".join(self.type) if isinstance(self.type, tuple) else self.type.__name__
        return f"{t}={self.default}"


@dataclass
class PassContext:
    """What a pass may read besides the graph: its options, the target, the program's
    example inputs, and hooks for statistics, refusals and the bisection counter."""

    pass_name: str
    options: dict
    program: "Program | None" = None
    target: Any = None
    stats: dict = field(default_factory=dict)
    rejections: list = field(default_factory=list)
    current_node: str | None = None
    budget: "RewriteBudget | None" = None
    extra: dict = field(default_factory=dict)   # per-run data (e.g. calibration data)

    def reject(self, rule: str, node: fx.Node, reason: str) -> None:
        entry = (rule, node.name, reason)
        if entry in self.rejections:
            return
        self.rejections.append(entry)
        log.debug("%s: %s did not fire at %%%s: %s", self.pass_name, rule, node.name, reason)

    def allow_rewrite(self, rule: str, node: fx.Node) -> bool:
        if self.budget is None:
            return True
        return self.budget.take(self.pass_name, rule, node.name)

    def bump(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n


class RewriteBudget:
    """LLVM ``-debug-counter`` style: allow only the first ``limit`` rewrites in the run."""

    def __init__(self, limit: int | None):
        self.limit = limit          # None: no limit (the rewrites are still counted)
        self.used = 0
        self.last: tuple[str, str, str] | None = None

    def take(self, pass_name: str, rule: str, node: str) -> bool:
        if self.limit is not None and self.used >= self.limit:
            log.info("rewrite limit %d reached: not applying %s/%s at %%%s", self.limit, pass_name, rule, node)
            return False
        self.used += 1
        self.last = (pass_name, rule, node)
        return True


@dataclass(frozen=True)
class PassInfo:
    name: str
    fn: Callable[[fx.GraphModule, PassContext], PassResult]
    exact: bool
    description: str
    options: Mapping[str, Option] = field(default_factory=dict)
    after: tuple[str, ...] = ()            # must run after these when both are in a pipeline
    lossy_tolerance: float | None = None   # documented error bound for lossy passes
    #: ``refuse(options, target) -> reason | None``: the pass does not belong in a pipeline for
    #: ``target`` with these options (checked when a PassManager is built for a target with a backend)
    refuse: Callable[[dict, Any], str | None] | None = None

    def parse_options(self, raw: Mapping[str, str]) -> dict:
        unknown = [k for k in raw if k not in self.options]
        if unknown:
            valid = ", ".join(f"{k}:{o.describe()}" for k, o in self.options.items()) or "none"
            raise PipelineError(f"pass '{self.name}' has no option '{unknown[0]}' (valid options: {valid})")
        values = {k: o.default for k, o in self.options.items()}
        for k, v in raw.items():
            values[k] = self.options[k].parse(self.name, k, v)
        return values


_REGISTRY: dict[str, PassInfo] = {}


def register_pass(name: str, *, exact: bool, description: str, options: Mapping[str, Option] | None = None,
                  after: tuple[str, ...] = (), lossy_tolerance: float | None = None,
                  refuse: Callable[[dict, Any], str | None] | None = None):
    """Decorator registering ``fn(gm, ctx) -> PassResult`` as pass ``name``."""
    def deco(fn):
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"pass '{name}' registered twice")
        _REGISTRY[name] = PassInfo(name, fn, exact, description, dict(options or {}), tuple(after), lossy_tolerance,
                                   refuse)
        return fn
    return deco


def registry() -> Mapping[str, PassInfo]:
    from optc.passes import _load_all  # noqa: F401  (importing registers every pass module)
    return _REGISTRY


def get_pass(name: str) -> PassInfo:
    reg = registry()
    if name not in reg:
        raise PipelineError(f"unknown pass '{name}' (valid passes: {', '.join(sorted(reg))})")
    return reg[name]
