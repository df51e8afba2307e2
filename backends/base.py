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

Manifest (``manifest.json``; see docs/backends.md)::

    {"format": "optc-artifact", "format_version": 1, "optc_version": "0.1.0",
     "backend": "onnx", "target": {"device": "cpu", "backend": "onnx", "layout": "NCHW"},
     "pipeline": "canonicalize,...", "name": "Model",
     "inputs": [TensorSpec.to_json()...], "outputs": [...],
     "in_spec": <treespec_dumps(...) as JSON>, "out_spec": ..., "input_leaves": [{"path", "is_tensor", ...}],
     "options": {backend options}, "versions": {"torch": ..., ...},
     "files": {"model.onnx": {"sha256": "...", "bytes": 1234}}}
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

import optc
from optc.errors import ArtifactError, BackendUnavailableError, InputSpecError, LoweringError, OptcError
from optc.ir import ops as optc_ops
from optc.ir.program import InputLeaf, Program, TensorSpec, _describe_spec, _same_const
from optc.ir.source import node_source
from optc.target import Target, make_target, resolve_target

log = logging.getLogger("optc.backends")

MANIFEST = "manifest.json"
FORMAT = "optc-artifact"
FORMAT_VERSION = 1

# name -> "module:Class". Modules are imported on first use, so a backend whose package is
# missing costs nothing until it is asked for.
_BACKENDS: dict[str, str] = {
    "torchscript": "optc.backends.torchscript:TorchScriptBackend",
    "onnx": "optc.backends.onnx:ONNXBackend",
    "tvm": "optc.backends.tvm:TVMBackend",
}
_INSTANCES: dict[str, "Backend"] = {}

# import name -> pip name, for one-line "pip install" hints
PIP_NAMES = {"onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript", "tvm": "apache-tvm"}


# ---- the signature a CompiledModel is called with ------------------------------------------
class _OpaqueConst:
    """A specialised non-tensor input leaf that JSON cannot hold: matched by type name and repr."""

    def __init__(self, type_name: str, text: str):
        self.type_name, self.text = type_name, text

    def matches(self, value: Any) -> bool:
        return type(value).__name__ == self.type_name and repr(value) == self.text

    def __repr__(self) -> str:
        return self.text


_JSON_SCALARS = (type(None), bool, int, float, str)


@dataclass(frozen=True)
class Signature:
    """How a CompiledModel is called: the Program's pytree specs, input leaves and tensor specs.

    Symbolic dims are strings (``"s0"``): any size, but the same symbol must have the same size
    in every input of one call.
    """

    name: str
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    input_leaves: tuple[InputLeaf, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @staticmethod
    def of(program: Program) -> "Signature":
        return Signature(program.name, program.in_spec, program.out_spec, tuple(program.input_leaves),
                         tuple(program.input_specs), tuple(program.output_specs))

    @property
    def is_dynamic(self) -> bool:
        return any(isinstance(d, str) for s in self.inputs for d in s.shape)

    # -- calling --
    def flatten(self, args: tuple, kwargs: dict, device: torch.device | None = None) -> list[torch.Tensor]:
        """Validate ``(args, kwargs)`` against the signature; return the tensor leaves (on ``device``)."""
        leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        if spec != self.in_spec:
            raise InputSpecError(f"{self.name}: inputs do not match the compiled signature.\n"
                                 f"  expected: {_describe_spec(self.in_spec)}\n  got:      {_describe_spec(spec)}")
        tensors: list[torch.Tensor] = []
        for leaf, value in zip(self.input_leaves, leaves):
            if leaf.is_tensor:
                if not isinstance(value, torch.Tensor):
                    raise InputSpecError(f"{self.name}: input {leaf.path} must be a tensor, got {type(value).__name__}")
                tensors.append(value)
            elif not (leaf.const.matches(value) if isinstance(leaf.const, _OpaqueConst) else _same_const(value, leaf.const)):
                raise InputSpecError(f"{self.name}: input {leaf.path} was captured as {leaf.const!r} and "
                                     f"specialised; got {value!r}")
        self._check_tensors(tensors)
        if device is not None:
            tensors = [t if t.device == device else t.to(device) for t in tensors]
        return tensors

    def _check_tensors(self, tensors: list[torch.Tensor]) -> None:
        bound: dict[str, tuple[int, str]] = {}
        for spec, t in zip(self.inputs, tensors):
            if spec.dtype != t.dtype:
                raise InputSpecError(f"{self.name}: input '{spec.name}' expects dtype {spec.dtype}, got {t.dtype}")
            if len(spec.shape) != t.dim():
                raise InputSpecError(f"{self.name}: input '{spec.name}' expects shape {list(spec.shape)}, "
                                     f"got {list(t.shape)}")
            for axis, (want, got) in enumerate(zip(spec.shape, t.shape)):
                if isinstance(want, int):
                    if want != got:
                        raise InputSpecError(f"{self.name}: input '{spec.name}' expects shape {list(spec.shape)}, "
                                             f"got {list(t.shape)}")
                elif want in bound and bound[want][0] != got:
                    size, where = bound[want]
                    raise InputSpecError(f"{self.name}: dynamic dim {want} is {size} in {where} but {got} in "
                                         f"input '{spec.name}' (axis {axis})")
                else:
                    bound.setdefault(want, (got, f"input '{spec.name}'"))

    def unflatten(self, flat: list) -> Any:
        if len(flat) != self.out_spec.num_leaves:
            raise OptcError(f"{self.name}: the compiled model returned {len(flat)} outputs, its signature "
                            f"has {self.out_spec.num_leaves}")
        return pytree.tree_unflatten(list(flat), self.out_spec)

    # -- JSON --
    def to_json(self) -> dict:
        try:
            in_spec = json.loads(pytree.treespec_dumps(self.in_spec))
            out_spec = json.loads(pytree.treespec_dumps(self.out_spec))
        except Exception as e:  # a pytree node type with no serialized name
            raise ArtifactError(f"{self.name}: the input/output structure cannot be saved: {e}") from e
        return {"name": self.name, "inputs": [s.to_json() for s in self.inputs],
                "outputs": [s.to_json() for s in self.outputs], "in_spec": in_spec, "out_spec": out_spec,
                "input_leaves": [_leaf_to_json(leaf) for leaf in self.input_leaves]}

    @staticmethod
    def from_json(d: dict) -> "Signature":
        try:
            return Signature(d["name"], pytree.treespec_loads(json.dumps(d["in_spec"])),
                             pytree.treespec_loads(json.dumps(d["out_spec"])),
                             tuple(_leaf_from_json(x) for x in d["input_leaves"]),
                             tuple(TensorSpec.from_json(x) for x in d["inputs"]),
                             tuple(TensorSpec.from_json(x) for x in d["outputs"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"manifest signature is malformed: {type(e).__name__}: {e}") from e


def _leaf_to_json(leaf: InputLeaf) -> dict:
    d: dict[str, Any] = {"path": leaf.path, "is_tensor": leaf.is_tensor}
    if not leaf.is_tensor:
        c = leaf.const
        if isinstance(c, _OpaqueConst):
            d["const_repr"], d["const_type"] = c.text, c.type_name
        elif isinstance(c, _JSON_SCALARS) and not (isinstance(c, float) and c != c):
            d["const"] = c
        else:
            d["const_repr"], d["const_type"] = repr(c), type(c).__name__
    return d


def _leaf_from_json(d: dict) -> InputLeaf:
    if d["is_tensor"]:
        return InputLeaf(d["path"], True)
    if "const_repr" in d:
        return InputLeaf(d["path"], False, _OpaqueConst(d["const_type"], d["const_repr"]))
    return InputLeaf(d["path"], False, d.get("const"))


# ---- CompiledModel -----------------------------------------------------------------------------
class CompiledModel:
    """A lowered model: callable like the original, saves to a folder, loads with :func:`optc.load`.

    Inputs are validated against the signature (structure, specialised constants, dtypes, static
    dims, consistent dynamic dims) and moved to the target's device; outputs are torch tensors on
    the target's device, in the model's output structure. Inference only: no autograd.
    """

    backend: ClassVar[str] = ""

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

    def save_artifacts(self, directory: str) -> list[str]:
        """Write the backend's files into ``directory``; return their paths relative to it."""
        raise NotImplementedError

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
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "optc_version": optc.__version__,
            "backend": self.backend,
            "target": {"device": self.target.device, "backend": self.target.backend, "layout": self.target.layout},
            "pipeline": self.pipeline,
            **self.signature.to_json(),
            "options": self.backend_options,
            "versions": _versions(),
            "files": files,
        }

    def save(self, directory: str | os.PathLike) -> str:
        """Write the artifact(s) and ``manifest.json`` into ``directory``; returns its path.

        Everything is written into a temporary sibling folder that is renamed into place at the
        end, so a failed save leaves no half-written folder. An existing artifact folder is
        replaced; any other existing non-empty folder is an error.
        """
        final = os.path.abspath(os.fspath(directory))
        parent = os.path.dirname(final) or "."
        if os.path.exists(final):
            if not os.path.isdir(final) or (os.listdir(final) and not os.path.exists(os.path.join(final, MANIFEST))):
                raise ArtifactError(f"{final} exists and is not an optc artifact folder: refusing to overwrite it")
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
        try:
            self.signature.to_json()  # fail early (before the big files) on an unsavable structure
            names = self.save_artifacts(tmp)
            files = {}
            for name in names:
                path = os.path.join(tmp, name)
                if not os.path.isfile(path):
                    raise ArtifactError(f"{self.backend}: save_artifacts reported '{name}' but did not write it")
                files[name.replace(os.sep, "/")] = {"sha256": sha256_file(path), "bytes": os.path.getsize(path)}
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump(self.manifest(files), f, indent=2, sort_keys=False)
                f.write("\n")
            _replace_dir(tmp, final)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, (OptcError, KeyboardInterrupt, SystemExit)):
                raise
            raise ArtifactError(f"saving {self.signature.name} to {final} failed: {type(e).__name__}: {e}") from e
        return final


def _replace_dir(tmp: str, final: str) -> None:
    if not os.path.exists(final):
        os.rename(tmp, final)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=os.path.dirname(final))
    os.rmdir(old)
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict:
    out = {"torch": torch.__version__}
    for mod in ("onnx", "onnxruntime", "onnxscript", "tvm"):
        m = sys.modules.get(mod)
        if m is not None and getattr(m, "__version__", None):
            out[mod] = m.__version__
    return out


# ---- loading -----------------------------------------------------------------------------------
def read_manifest(directory: str | os.PathLike) -> dict:
    """Read and check ``manifest.json`` and the hash of every artifact file it lists."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise ArtifactError(f"{directory}: no such artifact folder")
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise ArtifactError(f"{directory}: {MANIFEST} is missing (not an optc artifact folder, or an "
                            "incomplete copy)")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: cannot read the manifest: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not an optc artifact manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {manifest.get('format_version')} is not "
                            f"supported by optc {optc.__version__} (it reads version {FORMAT_VERSION})")
    for key in ("backend", "target", "files", "inputs", "outputs", "in_spec", "out_spec", "input_leaves"):
        if key not in manifest:
            raise ArtifactError(f"{path}: manifest has no '{key}'")
    if manifest.get("optc_version") != optc.__version__:
        log.warning("%s was saved by optc %s; this is optc %s", directory, manifest.get("optc_version"),
                    optc.__version__)
    root = os.path.realpath(directory)
    for name, info in manifest["files"].items():
        file = os.path.realpath(os.path.join(directory, name))
        if not file.startswith(root + os.sep):
            raise ArtifactError(f"{path}: artifact file '{name}' lies outside the artifact folder")
        if not os.path.isfile(file):
            raise ArtifactError(f"{directory}: artifact file '{name}' is missing")
        digest = sha256_file(file)
        if digest != info.get("sha256"):
            raise ArtifactError(f"{directory}: artifact file '{name}' is corrupted (sha256 {digest[:16]}... "
                                f"does not match the manifest's {str(info.get('sha256'))[:16]}...)")
    return manifest


def load_artifact(directory: str | os.PathLike) -> CompiledModel:
    """Load a folder written by :meth:`CompiledModel.save` (hashes checked first)."""
    manifest = read_manifest(directory)
    backend = get_backend(manifest["backend"])
    target = target_from_manifest(manifest)
    backend.check_available(target)
    return backend.load(os.fspath(directory), manifest)


def target_from_manifest(manifest: dict) -> Target:
    t = manifest["target"]
    try:
        return make_target(t["device"], t.get("backend") or manifest["backend"])
    except (OptcError, KeyError, TypeError) as e:
        raise ArtifactError(f"manifest target {t!r} is invalid: {e}") from e


def signature_from_manifest(manifest: dict) -> Signature:
    return Signature.from_json(manifest)


# ---- the backend protocol ----------------------------------------------------------------------
class Backend:
    """Lowers a Program for a Target. Stateless: one instance per backend (see :func:`get_backend`)."""

    name: ClassVar[str] = ""
    packages: ClassVar[tuple[tuple[str, str], ...]] = ()     # (import name, pip name)
    supported_higher_order: ClassVar[frozenset[str]] = frozenset()

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


def require(module: str, pip: str | None = None, *, backend: str) -> Any:
    """Import ``module`` or raise a one-line :class:`BackendUnavailableError` naming the package."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pip = pip or PIP_NAMES.get(module, module)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BackendUnavailableError(f"{backend}: needs the Python package '{pip}', which cannot be imported "
                                      f"here ({first}); pip install {pip}") from None


# ---- registry ----------------------------------------------------------------------------------
def available_backends() -> list[str]:
    return list(_BACKENDS)


def register_backend(name: str, path: str) -> None:
    """Make backend ``name`` resolve to ``"module:Class"`` (plugins, tests)."""
    _BACKENDS[name] = path
    _INSTANCES.pop(name, None)


def get_backend(name: str) -> Backend:
    """The backend called ``name``, importing its module on first use."""
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


# ---- lowering ----------------------------------------------------------------------------------
def lower(program: Program, target: Target | str = "cpu", backend: str | None = None, *,
          pipeline: str = "", **options) -> CompiledModel:
    """Lower ``program`` for ``target`` with ``backend`` (default: the target's, else onnx).

    Checks availability (package, device) and every op of the program *before* lowering, and
    turns any unexpected exception from the lowering into a :class:`LoweringError` naming the
    node where the message lets us find it. Unknown ``options`` are errors listing the valid ones.
    """
    if not isinstance(program, Program):
        raise TypeError(f"lower() takes a Program (from optc.capture), got {type(program).__name__}")
    tgt = resolve_target(target, backend)
    if tgt.backend is None:
        tgt = tgt.with_backend("onnx")
    be = get_backend(tgt.backend)
    unknown = [k for k in options if k not in be.option_names()]
    if unknown:
        raise OptcError(f"backend '{be.name}' has no option '{unknown[0]}' "
                        f"(valid options: {', '.join(be.option_names()) or 'none'})")
    be.check_available(tgt)
    program = decompose_for(program, be.name)
    be.check_ops(program, tgt)
    try:
        compiled = be.lower(program, tgt, **options)
    except OptcError:
        raise
    except Exception as e:  # exporters raise anything; name the node where we can
        raise lowering_error(e, program, be.name) from e
    compiled.pipeline = pipeline
    return compiled


def decompose_for(program: Program, backend: str) -> Program:
    """``program`` with the ops ``backend`` cannot lower written as ATen ops it can
    (``decompose{backend=...}``, :mod:`optc.ir.decompositions`); ``program`` itself if it has none."""
    from optc.ir.decompositions import decomposition_for
    wanted = [n for n in program.graph.nodes
              if (d := decomposition_for(n)) is not None and backend in d.needed_by and d.check(n) is None]
    if not wanted:
        return program
    from optc.passes.manager import PassManager
    out, _report = PassManager(f"decompose{{backend={backend}}},dce").run(program)
    return out


def lowering_error(exc: BaseException, program: Program, backend: str) -> LoweringError:
    """A :class:`LoweringError` for an exception raised while lowering ``program``.

    Looks through the exception chain for a node name (``%linear``) or an op (``aten::foo``,
    ``torch.ops.aten.foo.default``) that the program has, to name the node and its source line.
    """
    chain, e, seen = [], exc, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = "\n".join(str(x) for x in chain)
    node = _find_node(text, program)
    innermost = chain[-1]
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    msg = f"lowering failed: {type(exc).__name__}: {first}"
    if innermost is not exc and str(innermost).strip():
        msg += f" (caused by {type(innermost).__name__}: {str(innermost).strip().splitlines()[0]})"
    if node is None:
        return LoweringError(msg, backend=backend)
    return LoweringError(msg, backend=backend, op=op_name(node.target), node=node.name, source=node_source(node))


_OPS_RE = re.compile(r"torch\.ops\.(\w+)\.(\w+)(?:\.(\w+))?|\b(\w+)::(\w+)(?:\.(\w+))?")


def _find_node(text: str, program: Program) -> fx.Node | None:
    nodes = [n for n in program.graph.nodes if n.op == "call_function"]
    by_name = {n.name: n for n in nodes}
    for m in re.finditer(r"%(\w+)", text):
        if m.group(1) in by_name:
            return by_name[m.group(1)]
    for m in _OPS_RE.finditer(text):
        ns, op, overload = (m.group(1), m.group(2), m.group(3)) if m.group(1) else (m.group(4), m.group(5), m.group(6))
        for n in nodes:
            t = n.target
            if isinstance(t, torch._ops.OpOverload) and t.namespace == ns and t._opname == op and (
                    overload is None or t._overloadname == overload):
                return n
    return None


# ---- graph helpers shared by backends ----------------------------------------------------------
def inline_decompositions(gm: fx.GraphModule, keep: Callable[[Any], bool] = lambda target: False) -> fx.GraphModule:
    """A copy of ``gm`` (attributes shared) in which every ``optc::`` node whose op ``keep``
    rejects calls its decomposition instead (a Python function of ATen ops, traced in by the
    backend's trace or export). The decomposition computes exactly the op's reference semantics."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    for node in graph.nodes:
        if node.op == "call_function" and optc_ops.is_optc_op(node.target) and not keep(node.target):
            op = _optc_op(node.target)
            if op is None:
                raise LoweringError("optc op has no decomposition", backend="decompose",
                                    op=op_name(node.target), node=node.name, source=node_source(node))
            node.target = op.decomposition
    new = fx.GraphModule(gm, graph, class_name="GraphModule")
    new.meta = dict(getattr(gm, "meta", {}))
    return new


def graph_module_on(gm: fx.GraphModule, device: torch.device | str) -> fx.GraphModule:
    """``gm`` with copies of its attribute tensors on ``device`` (``gm`` itself is untouched:
    ``nn.Module.to`` would move shared Parameters in place)."""
    device = torch.device(device)
    root: dict[str, Any] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = gm
            for atom in node.target.split("."):
                obj = getattr(obj, atom)
            if isinstance(obj, torch.Tensor) and obj.device != device:
                obj = torch.nn.Parameter(obj.detach().to(device), requires_grad=False) \
                    if isinstance(obj, torch.nn.Parameter) else obj.to(device)
            root[node.target] = obj
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(root, graph, class_name="GraphModule")


def symbolic_dims(program: Program) -> dict[int, dict[int, str]]:
    """``{placeholder index: {axis: symbol}}`` for every symbolic dim of the graph inputs."""
    out: dict[int, dict[int, str]] = {}
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for axis, d in enumerate(val.shape):
            if isinstance(d, torch.SymInt) and d.node.maybe_as_int() is None:
                out.setdefault(i, {})[axis] = str(d)
    return out


def export_inputs(program: Program) -> tuple[list[torch.Tensor], tuple | None]:
    """Example flat inputs and a ``dynamic_shapes`` spec for ``torch.export`` of the flat graph.

    Symbolic dims of the placeholders become shared ``torch.export.Dim`` objects (one per symbol,
    range from the shape environment). A dynamic dim whose example size is 0 or 1 is repeated to
    2, as torch.export specialises sizes 0 and 1.
    """
    flat = [t.detach() for t in program.example_flat_inputs()]
    dims = symbolic_dims(program)
    if not dims:
        return flat, None
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    shared: dict[str, Any] = {}
    spec: list[dict | None] = []
    for i, t in enumerate(flat):
        axes = dims.get(i)
        if not axes:
            spec.append(None)
            continue
        entry = {}
        for axis, sym in axes.items():
            if sym not in shared:
                lo, hi = _sym_range(placeholders[i].meta["val"].shape[axis])
                name = re.sub(r"\W", "_", sym)
                shared[sym] = torch.export.Dim(name if name.isidentifier() else f"d_{name}", min=lo, max=hi)
            entry[axis] = shared[sym]
            if t.shape[axis] == 1:
                reps = [1] * t.dim()
                reps[axis] = 2
                t = t.repeat(*reps)
        flat[i] = t
        spec.append(entry)
    return flat, tuple(spec)


def export_program(program: Program, keep: Callable[[Any], bool] = lambda target: False,
                   rewrites: tuple = ()) -> torch.export.ExportedProgram:
    """The Program's flat graph exported again with ``torch.export`` (for backends that consume an
    ExportedProgram: ONNX, TVM's ``from_exported_program``). ``optc::`` ops that ``keep`` rejects
    are decomposed first and ``rewrites`` (``backends/workarounds.py``) applied to that private
    copy; symbolic dims stay dynamic (see :func:`export_inputs`)."""
    from optc.backends import workarounds
    gm = inline_decompositions(program.graph_module, keep)
    workarounds.apply(gm, rewrites)
    flat, dynamic = export_inputs(program)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(gm, tuple(flat), dynamic_shapes=dynamic, strict=False)
        if _rename_clashing_attrs(gm, ep):
            ep = torch.export.export(gm, tuple(flat), dynamic_shapes=dynamic, strict=False)
    return ep


def _rename_clashing_attrs(gm: fx.GraphModule, ep: torch.export.ExportedProgram) -> int:
    """Give a new name to each attribute of ``gm`` whose name is also the name of a node of ``ep``
    (a constant folded from a ``where`` node is the attribute ``where``; the export of an
    ``aten.where`` call is the node ``where``). torch 2.13's ONNX exporter names an initializer
    after the attribute and a value after the node, and writes both: "Duplicate definition of
    name (where)" (docs/fuzzing.md, ``onnx-initializer-name-clash``)."""
    names = {n.name for n in ep.graph.nodes if n.op != "placeholder"}
    clash = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target in names]
    for node in clash:
        from optc.ir.rewrite import add_attr
        new = add_attr(gm, f"{node.target}_const", get_attr_value(gm, node.target))
        node.target = new
    if clash:
        gm.recompile()
    return len(clash)


def get_attr_value(gm: fx.GraphModule, target: str):
    obj = gm
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _sym_range(d: torch.SymInt) -> tuple[int, int]:
    lo, hi = 1, 1 << 30
    try:
        vr = d.node.shape_env.var_to_range.get(d.node._expr)
        if vr is not None:
            lo = max(int(vr.lower), 1) if vr.lower.is_finite else 1
            hi = int(vr.upper) if vr.upper.is_finite else hi
    except Exception:  # ranges are advisory: fall back to [1, 2**30]
        pass
    return lo, max(hi, lo + 1)


def flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return list(out)


__all__ = ["Backend", "CompiledModel", "Signature", "available_backends", "get_backend", "lower",
           "load_artifact", "read_manifest", "register_backend", "require", "op_name", "lowering_error",
           "inline_decompositions", "graph_module_on", "export_inputs", "export_program", "symbolic_dims"]
