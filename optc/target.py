"""Targets: a device, a backend, its preferred layout and the default pipeline for the pair.

The default pipeline is data, kept here in one table, so that later passes join a target's
pipeline by editing one line (and the choice is visible in ``optc passes --target``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

DEVICES = ("cpu", "cuda")
BACKENDS = ("torchscript", "onnx", "tvm")

# Exact cleanups every target runs first.
_BASE = "canonicalize,constant-fold,cse,dce"
# Exact fusions: fold BatchNorm and constant scales into conv/linear weights, recognise
# hand-written layer norm / GELU / attention, merge q/k/v projections; then clean up.
# docs/benchmarks.md (fusion section) has the measurements behind this choice.
_FUSED = ("canonicalize,constant-fold,fold-conv-bn,fold-linear-bn,fold-binary,"
          "fuse-layer-norm,fuse-gelu,fuse-attention,merge-parallel-linear,cse,dce")

DEFAULT_PIPELINES: dict[tuple[str, str | None], str] = {
    ("cpu", None): _FUSED,
    ("cuda", None): _FUSED,
    ("cpu", "torchscript"): _FUSED,
    ("cpu", "onnx"): _FUSED,
    ("cpu", "tvm"): _FUSED,
    ("cuda", "torchscript"): _FUSED,
    ("cuda", "onnx"): _FUSED,
    ("cuda", "tvm"): _FUSED,
}

# Preferred activation layout per (device, backend); see docs/layout.md for the measurements.
LAYOUTS: dict[tuple[str, str | None], str] = {}


@dataclass(frozen=True)
class Target:
    device: str = "cpu"
    backend: str | None = None
    layout: str = "NCHW"
    features: frozenset = field(default_factory=frozenset)
    default_pipeline: str = _FUSED
    options: tuple = ()

    def __str__(self) -> str:
        return f"{self.backend}:{self.device}" if self.backend else self.device

    def with_backend(self, backend: str) -> "Target":
        return make_target(self.device, backend)


def make_target(device: str = "cpu", backend: str | None = None) -> Target:
    from optc.errors import OptcError
    if device not in DEVICES:
        raise OptcError(f"unknown target device '{device}' (valid: {', '.join(DEVICES)})")
    if backend is not None and backend not in BACKENDS:
        raise OptcError(f"unknown backend '{backend}' (valid: {', '.join(BACKENDS)})")
    return Target(device=device, backend=backend,
                  layout=LAYOUTS.get((device, backend), "NCHW"),
                  default_pipeline=DEFAULT_PIPELINES[(device, backend)])


def resolve_target(target: "Target | str", backend: str | None = None) -> Target:
    """``"cpu"``, ``"cuda"``, ``"onnx:cpu"`` or a Target -> Target (``backend`` overrides)."""
    if isinstance(target, Target):
        return target if backend is None or backend == target.backend else replace(make_target(target.device, backend))
    if not isinstance(target, str):
        from optc.errors import OptcError
        raise OptcError(f"target must be a string like 'cpu' or 'onnx:cuda', got {type(target).__name__}")
    if ":" in target:
        b, d = target.split(":", 1)
        return make_target(d, backend or b)
    return make_target(target, backend)
