"""``optc compile --precision fp32|bf16|int8|auto``: a precision, or the fastest one within an
accuracy budget, chosen on the user's own inputs.

Each precision is a pipeline on top of the target's default: ``fp32`` -> ``default``, ``bf16`` ->
``default,to-half{dtype=bfloat16}``, ``int8`` -> ``default,insert-qdq`` (calibrated on
``calibration_data``, else on the example inputs, with insert-qdq's warning). ``auto`` compiles
each one the backend takes (a pipeline refused for the target -- bf16 on ONNX Runtime's CPU, which
has no bf16 kernels -- is skipped with the refusal), measures on the example inputs and the
calibration inputs its accuracy against the eager float32 model (cosine of all outputs flattened,
the minimum over the inputs) and its latency (median of interleaved rounds, the same protocol as
``optc bench``), and keeps the fastest whose cosine is at least ``min_cosine`` (default 0.999).
float32 is always a candidate. The table of what was tried is printed with the choice.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from optc.errors import OptcError

PIPELINES = {"fp32": "default", "bf16": "default,to-half{dtype=bfloat16}", "int8": "default,insert-qdq"}
CHOICES = ("fp32", "bf16", "int8", "auto")
MIN_COSINE = 0.999


@dataclass
class Tried:
    precision: str
    pipeline: str
    ms: float | None = None
    cosine: float | None = None
    skipped: str = ""            # why it was not a candidate (refused, failed)

    def row(self, chosen: bool) -> str:
        if self.skipped:
            return f"  {self.precision:<5} {'':>10}  {'':>9}  skipped: {self.skipped}"
        return (f"  {self.precision:<5} {self.ms:8.2f} ms  {self.cosine:9.6f}" + ("  <- chosen" if chosen else ""))


def _cosine(a: Any, b: Any) -> float:
    x = torch.cat([t.detach().double().flatten() for t in pytree.tree_leaves(a) if isinstance(t, torch.Tensor)])
    y = torch.cat([t.detach().double().flatten() for t in pytree.tree_leaves(b) if isinstance(t, torch.Tensor)])
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def choose(model: torch.nn.Module, args: tuple, kwargs: dict, *, backend: str, target: str = "cpu",
           calibration_data: Any = None, min_cosine: float = MIN_COSINE, runs: int = 10,
           compile_options: dict | None = None, say: Callable[[str], None] | None = None):
    """Compile every precision the backend takes; returns ``(compiled, report, chosen, tried)``."""
    import optc
    from optc.tools.bench import interleaved
    say = say or (lambda msg: None)
    inputs = [(tuple(args), dict(kwargs))]
    for item in (calibration_data or [])[:4]:
        a = item[0] if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], dict) else item
        k = item[1] if a is not item else {}
        inputs.append((tuple(a) if isinstance(a, (tuple, list)) else (a,), dict(k)))
    with torch.no_grad():
        refs = [model(*a, **k) for a, k in inputs]
    tried: list[Tried] = []
    built: dict[str, tuple] = {}
    for precision, pipeline in PIPELINES.items():
        t = Tried(precision, pipeline)
        tried.append(t)
        say(f"precision {precision}: compiling ({pipeline})")
        try:
            compiled, report = optc.compile(model, args, example_kwargs=kwargs or None, backend=backend,
                                            target=target, pipeline=pipeline,
                                            calibration_data=calibration_data if precision == "int8" else None,
                                            **(compile_options or {}))
        except OptcError as e:
            if precision == "fp32":
                raise
            t.skipped = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            continue
        with torch.no_grad():
            t.cosine = min(_cosine(compiled(*a, **k), r) for (a, k), r in zip(inputs, refs))
        built[precision] = (compiled, report)
    a0, k0 = inputs[0]
    fns = {p: (lambda c=c: c(*a0, **k0)) for p, (c, _) in built.items()}
    with torch.no_grad():
        times = interleaved(fns, runs=runs, warmup=2, pause_s=0.05)
    for t in tried:
        if t.precision in times:
            t.ms = statistics.median(times[t.precision]) * 1e3
    ok = [t for t in tried if not t.skipped and t.cosine >= min_cosine]
    best = min(ok, key=lambda t: t.ms) if ok else next(t for t in tried if t.precision == "fp32")
    compiled, report = built[best.precision]
    return compiled, report, best, tried


def format_choice(tried: list[Tried], best: Tried, min_cosine: float) -> str:
    lines = [f"precision auto: the fastest with a cosine >= {min_cosine:g} against eager float32 "
             f"(latency on the example inputs; cosine, the minimum over example and calibration inputs):",
             f"  {'':<5} {'latency':>11}  {'cosine':>9}"]
    lines += [t.row(t is best) for t in tried]
    lines.append(f"chosen: {best.precision} ({best.pipeline})")
    return "\n".join(lines)


__all__ = ["choose", "format_choice", "PIPELINES", "CHOICES", "MIN_COSINE", "Tried"]
