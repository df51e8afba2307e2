"""The backend protocol: a :class:`Backend` lowers a Program for a Target to a :class:`CompiledModel`.

    backend = get_backend("onnx")                 # imported lazily; BackendUnavailableError if missing
    compiled = lower(program, "cpu", "onnx")      # availability, op check, backend.lower
    compiled(*args, **kwargs)                     # same call and output structure as the model
    compiled.save("out/")                         # artifacts + manifest.json, atomically
    compiled = load_artifact("out/")              # hashes checked, dispatched to the backend

Writing a backend (``optc.backends.tvm`` is one): a module in ``backends/`` named after the
backend, listed in ``_BACKENDS`` below, defining

- a ``Backend`` subclass with ``name``, ``packages`` (import name, pip name) checked by
  :meth:`Backend.check_available`, optionally :meth:`Backend.unsupported_reason` (which ops it
  cannot lower; checked for every node *before* lowering), ``lower(program, target, **options)``
  (keyword options only; :func:`lower` rejects unknown ones by the signature) and
  ``load(directory, manifest)``;
- a ``CompiledModel`` subclass implementing ``run_flat(list[Tensor]) -> list[Tensor]`` (the flat
  graph inputs, already validated and on the target's device, to the flat outputs) and
  ``save_artifacts(directory) -> list[str]`` (write its files, return their relative paths).
  :func:`export_program` gives the ExportedProgram of a Program (optc ops decomposed, symbolic
  dims kept dynamic) for backends that import one.
  ``backend_options`` (a JSON-able dict) is written to the manifest and is what ``load`` gets
  back in ``manifest["options"]``.

Everything else -- calling with the user's structure, input validation, the manifest, hashes,
atomic saves, turning an unexpected exception from a lowering into a :class:`LoweringError` that
names the node -- lives here, once.

Where the rest lives: :mod:`~optc.backends.signature` (calling), :mod:`~optc.backends.artifact`
(saving, the manifest, loading), :mod:`~optc.backends.registry` (names, imports),
:mod:`~optc.backends.lowering` (``lower``), :mod:`~optc.backends.stage` (the backend stage),
:mod:`~optc.backends.export` (graph helpers). Their public names are re-exported here.
"""

from __future__ import annotations

import inspect
import logging
import os
import tempfile
from typing import Any, ClassVar

import torch
import torch.fx as fx

from optc.backends.signature import Signature
from optc.errors import BackendUnavailableError, LoweringError
from optc.ir import ops as optc_ops
from optc.ir.program import Program
from optc.ir.source import node_source
from optc.target import Target

log = logging.getLogger("optc.backends")


#: ``params="auto"`` (ONNX, TorchScript: :func:`auto_params`) takes the weights by reference when a
#: copy of those the process holds would be more than this fraction of the memory the system has
#: available (``MemAvailable``): the copy would leave too little
REFERENCE_WHEN_OVER = 0.5


def auto_params(program: Program, target: Target, backend: str, slower: str) -> str:
    """``params="auto"`` of a backend whose modes are ``copy`` and ``reference``: ``"reference"``
    where a copy of the weights the process holds would take more than
    :data:`REFERENCE_WHEN_OVER` of the memory available (a warning says so, with ``slower``: what
    reading the weights in place costs), ``"copy"`` otherwise, and on CUDA. Weights memory-mapped
    from a weight file (``optc.compile(weights=...)``) do not count: the compile releases them, so
    a copy replaces them rather than doubling them. Where the available memory is not known:
    ``"copy"``."""
    from optc.ir.program import attr_tensors
    from optc.memory import available_bytes, mapped_bytes
    if target.device != "cpu":
        return "copy"
    tensors = list(attr_tensors(program.graph_module).values())
    held = sum(t.nbytes for t in tensors) - mapped_bytes(tensors)
    available = available_bytes()
    if available is None or held <= REFERENCE_WHEN_OVER * available:
        return "copy"
    log.warning("%s: the model runs on its own weights (params='reference'): a copy of its %.2f GiB would take "
                "more than %d%% of the %.2f GiB of memory available. %s; params='copy' copies anyway", backend,
                held / 2 ** 30, REFERENCE_WHEN_OVER * 100, available / 2 ** 30, slower)
    return "reference"


def tensors_holding(pointers, tensors: "dict[str, torch.Tensor]") -> "dict[str, torch.Tensor]":
    """The tensors of ``tensors`` (name -> tensor) whose storage holds one of the addresses
    ``pointers``: which of a Program's weights a runtime reads, given the addresses it was handed
    (a view, a numpy array over a weight's memory)."""
    import bisect
    spans = sorted((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes(), name)
                   for name, t in tensors.items() if t.device.type == "cpu" and t.untyped_storage().nbytes())
    starts = [s[0] for s in spans]
    out = {}
    for ptr in pointers:
        i = bisect.bisect_right(starts, ptr) - 1
        if i >= 0 and ptr < spans[i][0] + spans[i][1]:
            out[spans[i][2]] = tensors[spans[i][2]]
    return out


class CompiledModel:
    """A lowered model: callable like the original, saves to a folder, loads with :func:`optc.load`.

    Inputs are validated against the signature (structure, specialised constants, dtypes, static
    dims, consistent dynamic dims) and moved to the target's device; outputs are torch tensors on
    the target's device, in the model's output structure. Inference only: no autograd.
    """

    backend: ClassVar[str] = ""
    stage_report = None    # the backend stage's PipelineReport, after lower() (None when loaded)

    def __init__(self, signature: Signature, target: Target, *, pipeline: str = "",
                 backend_options: dict | None = None):
        self.signature = signature
        self.target = target
        self.pipeline = pipeline
        self.backend_options = dict(backend_options or {})

    @property
    def device(self) -> torch.device:
        return torch.device("cuda" if self.target.device == "cuda" else "cpu")

    def __call__(self, *args, **kwargs):
        flat = self.signature.flatten(args, kwargs, self.device)
        with torch.no_grad():
            out = self.run_flat(flat)
        return self.signature.unflatten(list(out))

    def run_flat(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Flat graph inputs (validated, on the device) -> flat outputs."""
        raise NotImplementedError

    #: the tensors of the model this compiled model runs on by reference, with their version
    #: counters when it was compiled (:meth:`watch_weights`); empty for a model with its own copy
    _watched: tuple = ()
    #: the ``params=`` mode that gives a model its own copy of the weights (named by
    #: :class:`~optc.errors.StaleWeightsError`); None where no mode does
    own_copy_params: ClassVar[str | None] = None

    def watch_weights(self, tensors: "dict[str, torch.Tensor]") -> None:
        """Record ``tensors`` (name -> the model's tensor) as weights this model reads by reference:
        :meth:`check_weights` then refuses to run once one of them has been modified in place
        (torch bumps a tensor's ``_version`` on every in-place write: ``copy_``,
        ``load_state_dict``, an optimizer step)."""
        self._watched = tuple((name, t, t._version) for name, t in tensors.items())

    def check_weights(self) -> None:
        """A :class:`~optc.errors.StaleWeightsError` naming the first weight read by reference that
        was modified in place since the compile (a handful of microseconds for a few hundred
        weights: only big models take weights by reference)."""
        for name, t, version in self._watched:
            if t._version != version:
                from optc.errors import StaleWeightsError
                how = "(params='reference') " if self.own_copy_params else ""
                fix = f", or compile with params='{self.own_copy_params}' for a model with its own copy" \
                    if self.own_copy_params else ""
                raise StaleWeightsError(
                    f"{self.backend}: weight '{name}' was modified in place after the model was compiled; this "
                    f"compiled model runs on the model's own weights by reference {how}and was compiled and "
                    f"checked with the old values. Compile again{fix}.")

    def save_artifacts(self, directory: str) -> list[str]:
        """Write the backend's files into ``directory``; return their paths relative to it."""
        raise NotImplementedError

    def integer_coverage(self) -> "dict | None":
        """For a quantized program: which convolutions and matmuls the runtime runs as integer
        kernels, ``{"conv": (integer, total), "matmul": (integer, total), "source": how it was
        read}``, or None where the backend cannot tell."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.signature.name} on {self.target}>"

    # -- size --
    def artifact_size(self) -> int:
        """Bytes of the saved artifact files (the manifest excluded)."""
        with tempfile.TemporaryDirectory(prefix="optc-size-") as tmp:
            files = self.save_artifacts(tmp)
            return sum(os.path.getsize(os.path.join(tmp, f)) for f in files)

    # -- saving --
    def manifest(self, files: dict[str, dict]) -> dict:
        from optc.backends.artifact import manifest_of
        return manifest_of(self, files)

    def save(self, directory: str | os.PathLike) -> str:
        """Write the artifact(s) and ``manifest.json`` into ``directory`` atomically; returns its
        path (:func:`optc.backends.artifact.save_artifact`)."""
        from optc.backends.artifact import save_artifact
        return save_artifact(self, directory)


class Backend:
    """Lowers a Program for a Target. Stateless: one instance per backend (see :func:`get_backend`)."""

    name: ClassVar[str] = ""
    packages: ClassVar[tuple[tuple[str, str], ...]] = ()     # (import name, pip name)
    supported_higher_order: ClassVar[frozenset[str]] = frozenset()
    #: the modes of the backend's ``params=`` option (where the model's weights live: the runtime's
    #: copy or the model's own tensors by reference); None for a backend without it
    params_modes: ClassVar[tuple[str, ...] | None] = None

    def check_params(self, params: str) -> None:
        """A :class:`LoweringError` unless ``params`` is one of :attr:`params_modes`."""
        if params not in (self.params_modes or ()):
            raise LoweringError(f"params must be one of {', '.join(self.params_modes or ())}, got {params!r}",
                                backend=self.name)

    def check_available(self, target: Target) -> None:
        """Raise :class:`BackendUnavailableError` (one line) if ``target`` cannot run here."""
        for module, pip in self.packages:
            require(module, pip, backend=self.name)
        if target.device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(f"{self.name}: target 'cuda' needs a CUDA GPU, and none is available "
                                          "here (torch.cuda.is_available() is False)")

    def unsupported_reason(self, node: fx.Node, target: Target) -> str | None:
        """Why this backend cannot lower ``node``, or None. The default accepts ATen and prims ops,
        every ``optc::`` op (lowered through its decomposition when there is no native translation)
        and Python scalar arithmetic on symbolic sizes; it rejects other custom ops (a Python kernel
        registered at run time cannot be part of an artifact) and higher-order ops (control flow)
        not in ``supported_higher_order``."""
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            if t.namespace in ("aten", "prims"):
                return None
            if optc_ops.is_optc_op(t):
                if _optc_op(t) is None:
                    return f"optc op {op_name(t)} has no decomposition and no {self.name} translation"
                return None
            return f"custom op {op_name(t)} has no {self.name} lowering"
        if isinstance(t, torch._ops.HigherOrderOperator):
            if t.name() in self.supported_higher_order:
                return None
            return f"higher-order op {t.name()} (control flow) cannot be lowered to {self.name}"
        if callable(t) and getattr(t, "__module__", None) in ("_operator", "operator", "math", "builtins"):
            return None
        if str(node.meta.get("optc_rule", "")).startswith("decompose:"):
            return None     # an optc op's decomposition, called: the export traces it (backends/stage.py)
        if t in _SYM_FUNCTIONS:
            return None
        return f"Python function {op_name(t)} has no {self.name} lowering"

    def check_ops(self, program: Program, target: Target) -> None:
        """Raise :class:`LoweringError` for the first node this backend cannot lower."""
        for node in program.graph.nodes:
            if node.op != "call_function":
                continue
            reason = self.unsupported_reason(node, target)
            if reason is not None:
                raise LoweringError(f"cannot lower: {reason}", backend=self.name, op=op_name(node.target),
                                    node=node.name, source=node_source(node))

    def stage(self, program: Program, target: Target) -> list[str]:
        """The backend stage: pass texts run after the target pipeline, before :meth:`lower`
        (``backends/stage.py``). The default decomposes what this backend cannot lower and the
        ``optc::`` ops it has no translation for, then runs its legalization rules, if it has any
        (``backends/legalize/``). A backend outside optc gets every decomposition."""
        from optc.backends.legalize import BACKENDS as LEGALIZED
        if self.name not in LEGALIZED:
            return ["decompose{backend=all}", "lower-optc-ops"]
        return [f"decompose{{backend={self.name}}}", "lower-optc-ops", f"legalize{{backend={self.name}}}"]

    def native_ops(self, target: Target) -> frozenset:
        """``optc::`` ops this backend translates itself (the stage leaves them alone)."""
        return frozenset()

    def lower(self, program: Program, target: Target, **options) -> CompiledModel:
        raise NotImplementedError

    def load(self, directory: str, manifest: dict) -> CompiledModel:
        raise NotImplementedError

    def option_names(self) -> list[str]:
        params = inspect.signature(self.lower).parameters.values()
        return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


_SYM_FUNCTIONS = {getattr(torch, n) for n in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_sqrt",
                                             "sym_ite", "sym_sum") if hasattr(torch, n)}


def op_name(target: Any) -> str:
    """``aten::linear``, ``optc::channel_affine``, ``aten::add.Tensor``, ``cond``, ``operator.mul``."""
    if isinstance(target, torch._ops.OpOverload):
        base = f"{target.namespace}::{target._opname}"
        return base if target._overloadname == "default" else f"{base}.{target._overloadname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    if isinstance(target, torch._ops.HigherOrderOperator):
        return target.name()
    mod = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    return f"{mod}.{name}" if mod else name


def _optc_op(target) -> "optc_ops.OptcOp | None":
    for op in optc_ops.OPS.values():
        if op.overload is target:
            return op
    return None


# ---- the public names of the backend modules, importable from here too ---------------------------
from optc.backends.registry import (  # noqa: E402
    _BACKENDS, _INSTANCES, PIP_NAMES, available_backends, get_backend, register_backend, require,
)
from optc.backends.artifact import (  # noqa: E402
    FORMAT, FORMAT_VERSION, MANIFEST, load_artifact, read_manifest, sha256_file, signature_from_manifest,
    target_from_manifest,
)
from optc.backends.export import (  # noqa: E402
    export_inputs, export_program, flat_outputs, graph_module_on, symbolic_dims,
)
from optc.backends.lowering import lower, lowering_error, run_backend_stage  # noqa: E402

__all__ = ["Backend", "CompiledModel", "Signature", "available_backends", "get_backend", "lower",
           "load_artifact", "read_manifest", "register_backend", "require", "op_name", "lowering_error",
           "run_backend_stage", "graph_module_on", "export_inputs", "export_program", "symbolic_dims",
           "flat_outputs", "sha256_file", "signature_from_manifest", "target_from_manifest", "MANIFEST",
           "FORMAT", "FORMAT_VERSION", "PIP_NAMES"]
