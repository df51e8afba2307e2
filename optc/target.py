"""Targets: a device, a backend, its preferred layout and the default pipeline for the pair.

The default pipeline is data, kept here in one table, so that later passes join a target's
pipeline by editing one line (and the choice is visible in ``optc passes --target``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

DEVICES = ("cpu", "cuda")
BACKENDS = ("torchscript", "onnx", "tvm", "openvino")

# Exact cleanups every target runs first.
_BASE = "canonicalize,constant-fold,cse,dce"
# Exact fusions (after dce, so that a value nobody reads -- an attention-weights output the
# caller drops -- does not count as a user of what the fusions rewrite): fold BatchNorm and constant scales into conv/linear weights, recognise
# hand-written layer norm / GELU / attention, merge q/k/v projections; then clean up.
# docs/benchmarks.md (fusion section) has the measurements behind this choice.
_FUSED = ("canonicalize,dce,constant-fold,fold-conv-bn,fold-linear-bn,fold-binary,"
          "fuse-layer-norm,fuse-rms-norm,fuse-rotary,fuse-gelu,fuse-attention,merge-parallel-linear,cse,dce")
# The same, with convolutions, pooling and resampling in NHWC (after the folds, before the cleanups).
_FUSED_NHWC = ("canonicalize,dce,constant-fold,fold-conv-bn,fold-linear-bn,fold-binary,"
               "fuse-layer-norm,fuse-rms-norm,fuse-rotary,fuse-gelu,fuse-attention,merge-parallel-linear,convert-layout{layout=NHWC},cse,dce")

# Every CPU backend leaves merge-parallel-linear out: at batch 1 a merged projection is no
# faster than the separate ones (merged / separate, 8-layer Llama-family decoder and BERT-base:
# TorchScript 1.057 and 0.997, TVM 1.008 and 1.008, OpenVINO 0.997 and 1.022, ONNX Runtime 0.993
# and 1.007; docs/benchmarks.md, "Merging parallel linears, per backend"), and its concatenated
# weights are a second copy of the q/k/v and gate/up weights beside the user's model (0.6x the
# weight bytes of a Llama) -- which a backend that runs on the model's own weights by reference
# (ONNX's and TVM's params="reference") would otherwise hold. CUDA keeps it (not measured: no
# GPU on the project's machines).
_FUSED_NO_MERGE = _FUSED.replace("merge-parallel-linear,", "")
_FUSED_NHWC_NO_MERGE = _FUSED_NHWC.replace("merge-parallel-linear,", "")

DEFAULT_PIPELINES: dict[tuple[str, str | None], str] = {
    ("cpu", None): _FUSED,
    ("cuda", None): _FUSED,
    ("cpu", "torchscript"): _FUSED_NO_MERGE,
    ("cpu", "onnx"): _FUSED_NO_MERGE,
    ("cpu", "tvm"): _FUSED_NHWC_NO_MERGE,  # LAYOUTS below
    ("cuda", "torchscript"): _FUSED,
    ("cuda", "onnx"): _FUSED,
    ("cuda", "tvm"): _FUSED,
    ("cpu", "openvino"): _FUSED_NO_MERGE,
    ("cuda", "openvino"): _FUSED,         # listed for completeness: the backend refuses cuda targets
}

# Activation layout of convolutions, pooling and resampling per (device, backend): the one each
# runs fastest in, measured with benchmarks/bench_layout.py (figures and the CUDA reasoning in
# docs/layout.md). A target whose layout is NHWC runs convert-layout{layout=NHWC} in its default
# pipeline; torch.export's graphs are NCHW already. TVM's backend converts what is left to it too.
LAYOUTS: dict[tuple[str, str | None], str] = {
    ("cpu", None): "NCHW",             # no backend: the layout is a backend's property
    ("cuda", None): "NCHW",
    ("cpu", "torchscript"): "NCHW",    # NHWC (channels-last) level: optimize_for_inference blocks both alike
    ("cpu", "onnx"): "NCHW",           # NHWC level: ORT removes the Transposes, runs NCHWc either way
    ("cpu", "tvm"): "NHWC",            # NHWC 5-7x faster: the CPU schedule vectorises NHWC/HWIO
    ("cuda", "torchscript"): "NCHW",   # CUDA: not measured (no GPU on the project's machines)
    ("cuda", "onnx"): "NCHW",
    ("cuda", "tvm"): "NCHW",
    ("cpu", "openvino"): "NCHW",       # OpenVINO picks its own blocked layouts
    ("cuda", "openvino"): "NCHW",
}


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
        from optc.backends.base import available_backends   # plugins (register_backend) too
        if backend not in available_backends():
            raise OptcError(f"unknown backend '{backend}' (valid: {', '.join(available_backends())})")
    return Target(device=device, backend=backend,
                  layout=LAYOUTS.get((device, backend), "NCHW"),
                  default_pipeline=DEFAULT_PIPELINES.get((device, backend), DEFAULT_PIPELINES[(device, None)]))


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
