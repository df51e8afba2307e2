"""The backend registry: backend names to ``module:Class``, imported on first use, and the one-line
"pip install" errors for a missing package."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from optc.errors import BackendUnavailableError, OptcError

if TYPE_CHECKING:
    from optc.backends.base import Backend

# name -> "module:Class". Modules are imported on first use, so a backend whose package is
# missing costs nothing until it is asked for.
_BACKENDS: dict[str, str] = {
    "torchscript": "optc.backends.torchscript:TorchScriptBackend",
    "onnx": "optc.backends.onnx:ONNXBackend",
    "tvm": "optc.backends.tvm:TVMBackend",
    "openvino": "optc.backends.openvino:OpenVINOBackend",
}
_INSTANCES: dict[str, "Backend"] = {}

# import name -> pip name, for one-line "pip install" hints
PIP_NAMES = {"onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript", "tvm": "apache-tvm", "openvino": "openvino"}


def require(module: str, pip: str | None = None, *, backend: str) -> Any:
    """Import ``module`` or raise a one-line :class:`BackendUnavailableError` naming the package."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pip = pip or PIP_NAMES.get(module, module)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BackendUnavailableError(f"{backend}: needs the Python package '{pip}', which cannot be imported "
                                      f"here ({first}); pip install {pip}") from None


def available_backends() -> list[str]:
    return list(_BACKENDS)


def register_backend(name: str, path: str) -> None:
    """Make backend ``name`` resolve to ``"module:Class"`` (plugins, tests)."""
    _BACKENDS[name] = path
    _INSTANCES.pop(name, None)


def unregister_backend(name: str) -> None:
    """Forget backend ``name`` (what :func:`register_backend` made; tests clean up with it)."""
    _BACKENDS.pop(name, None)
    _INSTANCES.pop(name, None)


def get_backend(name: str) -> "Backend":
    """The backend called ``name``, importing its module on first use."""
    from optc.backends.base import Backend
    if isinstance(name, Backend):
        return name
    if name not in _BACKENDS:
        raise OptcError(f"unknown backend '{name}' (valid: {', '.join(_BACKENDS)})")
    if name in _INSTANCES:
        return _INSTANCES[name]
    module_name, cls_name = _BACKENDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        if e.name == module_name:
            raise BackendUnavailableError(f"backend '{name}' is not part of this optc installation "
                                          f"(module {module_name} not found)") from None
        pip = PIP_NAMES.get((e.name or "").split(".")[0], e.name)
        raise BackendUnavailableError(f"backend '{name}' needs the Python package '{pip}', which cannot be "
                                      f"imported here ({str(e).strip().splitlines()[0]}); pip install {pip}") from None
    cls = getattr(module, cls_name, None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendUnavailableError(f"backend '{name}': {module_name} defines no Backend subclass {cls_name}")
    _INSTANCES[name] = cls()
    return _INSTANCES[name]


def register_translations(register, table: dict) -> None:
    """``register(op, fn)`` for every entry of a backend's translation table (``onnx_quant.py``,
    ``tvm_quant.py``, ``tvm_layout.py``: ``optc::`` op -> translation)."""
    for op, fn in table.items():
        register(op, fn)


__all__ = ["register_translations", "available_backends", "register_backend", "get_backend", "require", "PIP_NAMES"]
