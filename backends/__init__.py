"""optc's backends: the protocol (``base``) and TorchScript, ONNX Runtime and TVM lowerings.

Backend modules are imported lazily by :func:`get_backend`, so a missing package (onnxruntime,
tvm) only matters when that backend is used.
"""

from optc.backends.base import (
    Backend, CompiledModel, Signature, available_backends, get_backend, load_artifact, lower, read_manifest,
    register_backend,
)

__all__ = ["Backend", "CompiledModel", "Signature", "available_backends", "get_backend", "load_artifact",
           "lower", "read_manifest", "register_backend"]
