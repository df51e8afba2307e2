"""ONNX backend: torch's dynamo exporter -> onnx.checker -> an ONNX Runtime session.

Lowering:

1. ``optc::`` ops with an ONNX translation (:func:`register_onnx_translation`; ``channel_affine``
   ships with one) stay as they are and are translated by the exporter; the others are replaced
   by their ATen decomposition;
2. the flat graph is exported again with ``torch.export.export(gm, flat_inputs, dynamic_shapes,
   strict=False)``; the Program's symbolic dims become ``torch.export.Dim`` objects, so a dynamic
   batch stays a ``dim_param`` in the ONNX model;
3. the ExportedProgram is translated at opset :data:`OPSET` with torch's ONNX registry (torchlib
   plus our translations; built once per process and opset) and the exporter's ONNX optimizer;
   inputs are named like the Program's placeholders, outputs ``output_0..``;
4. ``onnx.checker.check_model(full_check=True)``; models whose weights pass
   ``external_data_threshold`` (512 MiB) stream to disk with external data
   (``model.onnx`` + ``model.onnx.data``) and checked and loaded from that path;
5. an ``InferenceSession`` with ``ORT_ENABLE_ALL``, ``intra_op_num_threads`` = ``threads`` (default:
   every core this process may run on), ``inter_op_num_threads=1``, and the CPU or CUDA provider.

Calls bind torch tensors to the session with I/O binding through DLPack, both ways: no copies.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import warnings
import weakref
from typing import Callable

import torch

from optc.backends.base import (
    Backend, CompiledModel, Signature, auto_params, export_program, require,
    signature_from_manifest, target_from_manifest, tensors_holding,
)
from optc.errors import ArtifactError, BackendUnavailableError, LoweringError
from optc.ir.program import Program, attr_tensors
from optc.target import Target

log = logging.getLogger("optc.backends.onnx")

#: The ONNX opset every model is exported at. 20 is the dynamo exporter's default (its torchlib
#: functions are written for 18 and need no version conversion up to 20), ONNX Runtime 1.32 runs
#: every op of it on CPU and CUDA, and it has what the quantization work needs (per-axis
#: QuantizeLinear/DequantizeLinear since 13). Blocked or int4 QDQ would need 21.
OPSET = 20
MIN_OPSET = 18
MAX_OPSET = 23
#: Weights above this many bytes stream to disk as external data (model.onnx + model.onnx.data,
#: tensor by tensor) and the session is created from the file: the in-memory route holds the
#: ModelProto, its serialized bytes and the session at once (a 303 M-parameter Llama peaked at
#: 6.1x its weight bytes that way, 3.1x streamed, 2.5x once the other copies were gone:
#: docs/benchmarks.md, "Memory"). Below it the model stays in memory, where ONNX Runtime's
#: transformer fusions can be applied. Protobuf's own limit is 2 GiB.
EXTERNAL_DATA_THRESHOLD = 512 * 1024 ** 2
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
#: ``params``: ``"copy"`` -- ONNX Runtime loads its own copy of the weights from the model file
#: and prepacks the matmul weights; ``"reference"`` -- the session runs on the Program's own
#: tensors (the user's model's parameters), handed to it with ``SessionOptions.add_initializer``,
#: which ONNX Runtime uses in place, with prepacking off (a prepacked weight is a copy): no second
#: copy of the weights, but about 1.2x slower (unpacked matmuls; docs/backends.md); ``"auto"`` --
#: reference only where the copy would not fit: a float program on CPU taking the external-data
#: route whose weights held in memory (not read from a weight file) exceed
#: ``base.REFERENCE_WHEN_OVER`` of the memory available (``base.auto_params``); copy otherwise.
PARAMS_MODES = ("auto", "copy", "reference")
#: initializers smaller than this are left to ONNX Runtime's copy (shape constants, norms, biases)
REFERENCE_MIN_BYTES = 64 * 1024

# ---- translations of optc:: ops -------------------------------------------------------------------
_TRANSLATIONS: dict[torch._ops.OpOverload, Callable] = {}
_TABLE_VERSION = [0]
_DEFAULTS_LOADED = [False]
_LOCK = threading.Lock()


def register_onnx_translation(op: torch._ops.OpOverload, fn: Callable, *, replace: bool = False) -> None:
    """Translate ``op`` (e.g. ``torch.ops.optc.quantize.default``) with ``fn``, an onnxscript
    function (or a Python function calling onnxscript ops, traced at export time) taking the op's
    arguments in schema order. Use :func:`onnx_opset` for the ops of :data:`OPSET`."""
    if not isinstance(op, torch._ops.OpOverload):
        raise TypeError(f"register_onnx_translation takes an OpOverload (torch.ops.ns.op.default), got {op!r}")
    with _LOCK:
        if op in _TRANSLATIONS and not replace and _TRANSLATIONS[op] is not fn:
            raise ValueError(f"{op} already has an ONNX translation (pass replace=True to override it)")
        _TRANSLATIONS[op] = fn
        _TABLE_VERSION[0] += 1


def onnx_translations() -> dict[torch._ops.OpOverload, Callable]:
    """Every registered translation (the built-in ones are defined on first use: they need onnxscript)."""
    _load_default_translations()
    return dict(_TRANSLATIONS)


def onnx_opset():
    """The onnxscript opset module for :data:`OPSET` (``op.Mul``, ``op.Reshape``...)."""
    onnxscript = require("onnxscript", backend="onnx")
    return getattr(onnxscript, f"opset{OPSET}")


def _load_default_translations() -> None:
    if _DEFAULTS_LOADED[0]:
        return
    op = onnx_opset()

    def channel_affine(x, scale, shift, dim: int):
        """``x * scale + shift`` with scale/shift broadcast along axis ``dim`` of ``x``."""
        if x.shape is None:
            raise ValueError("optc::channel_affine: the rank of x is unknown at export time")
        rank = len(x.shape)
        shape = [1] * rank
        shape[dim % rank] = -1
        target_shape = op.Constant(value_ints=shape)
        s = op.Reshape(op.CastLike(scale, x), target_shape)
        b = op.Reshape(op.CastLike(shift, x), target_shape)
        return op.Add(op.Mul(x, s), b)

    def rms_norm(x, normalized_shape, weight=None, eps=None):
        """``aten.rms_norm`` as ONNX Runtime's SimplifiedLayerNormFusion expects it (``Pow(x, 2)``,
        ``ReduceMean``, ``Add(eps)``, ``Sqrt``, ``Div``, ``Mul(weight)``), so that the session runs
        one SimplifiedLayerNormalization kernel; torchlib's form (``Reciprocal`` and ``Mul``) is
        left unfused. ``eps`` None is ``finfo(x.dtype).eps``, as in eager."""
        if x.shape is None:
            raise ValueError("aten.rms_norm: the rank of x is unknown at export time")
        rank = len(x.shape)
        axes = op.Constant(value_ints=list(range(rank - len(normalized_shape), rank)))
        if eps is None:
            kind = str(getattr(x, "dtype", "")).upper()
            dt = torch.bfloat16 if "BFLOAT16" in kind else torch.float16 if "FLOAT16" in kind else \
                torch.float64 if "DOUBLE" in kind else torch.float32
            eps = float(torch.finfo(dt).eps)
        two = op.CastLike(op.Constant(value_float=2.0), x)
        ms = op.ReduceMean(op.Pow(x, two), axes, keepdims=1)
        y = op.Div(x, op.Sqrt(op.Add(ms, op.CastLike(op.Constant(value_float=float(eps)), x))))
        return y if weight is None else op.Mul(y, weight)

    with _LOCK:
        _TRANSLATIONS.setdefault(torch.ops.aten.rms_norm.default, rms_norm)
        _TRANSLATIONS.setdefault(torch.ops.optc.channel_affine.default, channel_affine)
        _TRANSLATIONS.setdefault(torch.ops.optc.ort_multihead_attention.default, _onnx_contrib._translate_mha)
        _TRANSLATIONS.setdefault(torch.ops.optc.ort_group_query_attention.default, _onnx_contrib._translate_gqa)
        _TABLE_VERSION[0] += 1
        _DEFAULTS_LOADED[0] = True


# ---- the exporter's registry, built once ------------------------------------------------------------
_REGISTRY_CACHE: dict[tuple[int, int], object] = {}


def _registry(opset: int):
    """torch's ONNXRegistry (torchlib + our translations) for ``opset``, cached: building it parses
    ~500 onnxscript functions (seconds), and torch.onnx.export would rebuild it on every call."""
    from torch.onnx._internal.exporter import _registration
    translations = onnx_translations()
    key = (opset, _TABLE_VERSION[0])
    with _LOCK:
        reg = _REGISTRY_CACHE.get(key)
    if reg is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _quiet_exporter_logs()
            reg = _registration.ONNXRegistry.from_torchlib(opset_version=opset)
            for torch_op, fn in translations.items():
                reg.register_op(torch_op, fn, is_complex=False)
        with _LOCK:
            _REGISTRY_CACHE.clear()
            _REGISTRY_CACHE[key] = reg
    return reg


def _quiet_exporter_logs() -> None:
    # "torchvision is not installed. Skipping torchvision::nms" on every registry build
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def _release_rewriter_state() -> int:
    """Drop what onnxscript's pattern matchers remember of the last graph they matched.

    onnxscript 0.7.2's ``SimplePatternMatcher`` keeps its last match, node and graph; the
    rewrite rules of the exporter's optimizer are module-level objects, so after an export they
    hold the whole ONNX IR model -- and through it every weight of the exported program (torch
    tensors the IR wraps) -- until the next export. On a 303 M-parameter model that kept 1.7 GiB
    alive after lowering. Returns the number of matchers reset."""
    import sys
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
        from onnxscript.rewriter._rewrite_rule import RewriteRule, RewriteRuleSet
    except ImportError:   # another onnxscript layout: nothing known to release
        return 0
    seen: set[int] = set()
    reset = 0

    def visit(x, depth=0):
        nonlocal reset
        if id(x) in seen or depth > 3:
            return
        seen.add(id(x))
        if isinstance(x, RewriteRuleSet):
            for r in x.rules:
                visit(r, depth + 1)
        elif isinstance(x, RewriteRule):
            m = getattr(x, "_matcher", None)
            if isinstance(m, SimplePatternMatcher):
                m._init_match(0)
                m._graph = None
                m._tracer = None
                reset += 1
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y, depth + 1)
    for name, mod in list(sys.modules.items()):
        if mod is not None and name.startswith(("onnxscript", "torch.onnx")):
            for v in list(vars(mod).values()):
                visit(v)
    return reset


def _export(ep: torch.export.ExportedProgram, opset: int, input_names: list[str], output_names: list[str],
            optimize: bool):
    """ExportedProgram -> torch.onnx.ONNXProgram at ``opset``."""
    try:
        return _export_unreleased(ep, opset, input_names, output_names, optimize)
    finally:
        _release_rewriter_state()


def _save_streaming(onnx_program, path: str) -> None:
    """``onnx_program.save(path, external_data=True)`` (``model.onnx`` + ``model.onnx.data``, the
    same files: ``onnx_ir.save`` as the exporter calls it), and as each weight has been written,
    its pages handed back when it is memory-mapped from a weight file of the compile
    (:func:`optc.memory.release_mapped`): writing a 1 GiB model out of a safetensors file would
    otherwise leave all of it resident until the program goes."""
    import onnx_ir as ir

    from optc.memory import release_mapped
    model = onnx_program.model
    empty = [v.name for v in model.graph.initializers.values() if v.const_value is None]
    if empty:
        raise LoweringError(f"the exported model has initializers without a value: {', '.join(empty[:5])}",
                            backend="onnx")
    previous = []

    def written(tensor, info) -> None:      # called before each tensor is written
        release_mapped(previous)
        raw = getattr(tensor, "raw", None)      # a torch tensor or a numpy array over the weight's memory
        previous[:] = [raw] if raw is not None else []

    ir.save(model, path, external_data=DATA_FILE, callback=written)
    release_mapped(previous)


def _export_unreleased(ep: torch.export.ExportedProgram, opset: int, input_names: list[str],
                       output_names: list[str], optimize: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from torch.onnx._internal.exporter import _core
            registry = _registry(opset)
        except ImportError:  # the exporter's internals moved: use the public (slower) entry point
            return torch.onnx.export(ep, (), dynamo=True, opset_version=opset, input_names=input_names,
                                     output_names=output_names, optimize=optimize, verbose=False,
                                     custom_translation_table=onnx_translations())
        return _core.export(ep, registry=registry, input_names=input_names, output_names=output_names,
                            optimize=optimize, opset_version=opset, verbose=False)


# ---- the compiled model ------------------------------------------------------------------------------
class ONNXModel(CompiledModel):
    """An ONNX model and its ONNX Runtime session. The model lives in memory (``model_bytes``) or,
    with external data, in a folder (``model_dir``: a private temporary one after lowering, the
    artifact folder after loading)."""

    backend = "onnx"
    own_copy_params = "copy"

    def __init__(self, signature: Signature, target: Target, *, model_bytes: bytes | None = None,
                 model_dir: str | None = None, threads: int | None = None, backend_map: "BackendMap | None" = None,
                 shared: "dict | None" = None, **kw):
        super().__init__(signature, target, **kw)
        #: ``params="reference"``: initializer name -> the array (over the Program's tensor) the
        #: session runs on instead of the model file's copy; None: the session loads its own
        self.shared = shared
        #: optc node (of the staged Program) -> its ONNX nodes and value (:func:`backend_map`);
        #: None for a model loaded from an artifact
        self.backend_map = backend_map
        if (model_bytes is None) == (model_dir is None):
            raise ValueError("ONNXModel needs exactly one of model_bytes and model_dir")
        self.model_bytes = model_bytes
        self.model_dir = model_dir
        self.threads = threads
        self._session = None
        if model_bytes is not None:
            names = [i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()]
        else:
            # a model with external data gets its session on first use: whoever lowered it can
            # release its own copy of the weights before ONNX Runtime loads this one
            import onnx
            graph = onnx.load(os.path.join(model_dir, MODEL_FILE), load_external_data=False).graph
            inits = {t.name for t in graph.initializer}
            names = [i.name for i in graph.input if i.name not in inits], [o.name for o in graph.output]
        present = set(names[0])
        # flat input i -> ONNX input name, None where the exporter dropped an unused input
        self._inputs = [s.name if s.name in present else None for s in signature.inputs]
        missing = present - {s.name for s in signature.inputs}
        if missing:
            raise LoweringError(f"ONNX model has inputs {sorted(missing)} the program does not", backend="onnx")
        self._outputs = names[1]
        self._device = ("cuda", torch.cuda.current_device()) if target.device == "cuda" else ("cpu", 0)

    @property
    def session(self):
        """The ONNX Runtime session (created on first use for a model with external data)."""
        if self._session is None:
            source = self.model_bytes if self.model_bytes is not None else os.path.join(self.model_dir, MODEL_FILE)
            initializers = None
            if self.shared:
                import onnxruntime as ort
                initializers = {name: ort.OrtValue.ortvalue_from_numpy(a) for name, a in self.shared.items()}
            try:
                self._session = _session(source, self.target, self.threads,
                                         self.backend_options.get("ort_disabled_optimizers", ()),
                                         self.backend_options.get("session_optimization", "all"),
                                         initializers=initializers)
                self._initializers = initializers     # the session reads their memory: kept as long as it
            except (OSError, RuntimeError) as e:   # onnxruntime raises its own RuntimeError subclasses
                if self.model_bytes is not None:
                    raise
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ArtifactError(f"{self.model_dir}: ONNX Runtime cannot load '{MODEL_FILE}': {first}") from e
        return self._session

    def run_flat(self, inputs):
        import onnxruntime as ort
        self.check_weights()
        binding = self.session.io_binding()
        keep = []
        for name, t in zip(self._inputs, inputs):
            if name is None:
                continue
            t = t.detach().contiguous()
            keep.append(t)
            binding.bind_ortvalue_input(name, ort.OrtValue.from_dlpack(t))
        for name in self._outputs:
            binding.bind_output(name, *self._device)
        if self._device[0] == "cuda":
            torch.cuda.current_stream().synchronize()
        self.session.run_with_iobinding(binding)
        return [torch.from_dlpack(v) for v in binding.get_outputs()]

    def intermediate_values(self, inputs: list[torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
        """The ONNX values ``names`` on ``inputs`` (flat, as :meth:`run_flat` takes them), from a
        separate session of a copy of the model with those values added as outputs (same session
        options); this model and its session are not touched. Where a fusion of ONNX Runtime
        would have consumed a value, the extra output keeps it: the instrumented run may differ
        from the plain one by that fusion."""
        import onnx
        if self.model_bytes is not None:
            proto = onnx.load_from_string(self.model_bytes)
        else:
            proto = onnx.load(os.path.join(self.model_dir, MODEL_FILE))   # with its external data
        present = {o.name for o in proto.graph.output}
        produced = {v for n in proto.graph.node for v in n.output}
        wanted = [n for n in dict.fromkeys(names) if n in produced]
        for name in wanted:
            if name not in present:
                vi = onnx.ValueInfoProto()
                vi.name = name
                proto.graph.output.append(vi)
        session = _session(proto.SerializeToString(), self.target, self.threads,
                           self.backend_options.get("ort_disabled_optimizers", ()),
                           self.backend_options.get("session_optimization", "all"))
        feed = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(self._inputs, inputs) if name is not None}
        out = session.run(wanted, feed)
        return {name: torch.from_numpy(v) for name, v in zip(wanted, out)}

    def node_times(self, inputs: list[torch.Tensor], *, runs: int = 10, warmup: int = 2) -> dict[str, float]:
        """Median seconds per run of each node of the session's optimized graph (ONNX Runtime's
        profiler: its ``<node>_kernel_time`` events), from a separate profiling session of the same
        model and options; this model's session is not touched. Nodes ONNX Runtime fused keep the
        name of the node they were fused into."""
        import json
        import statistics
        import tempfile
        import onnx
        if self.model_bytes is not None:
            model = self.model_bytes
        else:
            model = onnx.load(os.path.join(self.model_dir, MODEL_FILE)).SerializeToString()
        feed = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(self._inputs, inputs) if name is not None}
        with tempfile.TemporaryDirectory(prefix="optc-profile-") as d:
            session = _session(model, self.target, self.threads,
                               self.backend_options.get("ort_disabled_optimizers", ()),
                               self.backend_options.get("session_optimization", "all"),
                               profile_prefix=os.path.join(d, "ort"))
            for _ in range(warmup + runs):
                session.run(None, feed)
            path = session.end_profiling()
            with open(path) as f:
                events = json.load(f)
        per_run: dict[str, list[float]] = {}
        for e in events:
            name = e.get("name", "")
            if e.get("cat") == "Node" and name.endswith("_kernel_time"):
                per_run.setdefault(name[:-len("_kernel_time")], []).append(e.get("dur", 0) * 1e-6)
        # the last ``runs`` occurrences of each node are the measured runs
        return {name: statistics.median(ts[-runs:]) for name, ts in per_run.items()}

    #: ONNX Runtime's op types for convolutions and matmuls: integer kernels, float kernels
    INTEGER_OPS = {"conv": ("QLinearConv", "ConvInteger"),
                   "matmul": ("QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                              "DynamicQuantizeMatMul", "QAttention")}
    FLOAT_OPS = {"conv": ("Conv", "FusedConv", "NchwcConv", "ConvTranspose"),
                 "matmul": ("Gemm", "MatMul", "FusedMatMul", "FusedGemm", "Attention", "MultiHeadAttention")}

    def integer_coverage(self) -> dict:
        """Counted in the graph ONNX Runtime runs: its optimized model, written by a separate
        session of this model with the same options (``optimized_model_filepath``)."""
        import collections

        import onnx
        import onnxruntime as ort
        with tempfile.TemporaryDirectory(prefix="optc-onnx-opt-") as d:
            so = ort.SessionOptions()
            so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, SESSION_OPTIMIZATION[
                self.backend_options.get("session_optimization", "all")])
            so.intra_op_num_threads = 1
            so.log_severity_level = 3      # its warning that the optimized model is machine-specific
            so.optimized_model_filepath = os.path.join(d, "optimized.onnx")
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            source = self.model_bytes if self.model_bytes is not None else os.path.join(self.model_dir, MODEL_FILE)
            ort.InferenceSession(source, so, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=list(self.backend_options.get("ort_disabled_optimizers", ())))
            graph = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
        counts = collections.Counter(n.op_type for n in graph.node)
        out = {"source": "ONNX Runtime's optimized graph (CPU)"}
        for kind in ("conv", "matmul"):
            integer = sum(counts[o] for o in self.INTEGER_OPS[kind])
            out[kind] = (integer, integer + sum(counts[o] for o in self.FLOAT_OPS[kind]))
        out["float_ops"] = {o: counts[o] for k in ("conv", "matmul") for o in self.FLOAT_OPS[k] if counts[o]}
        return out

    def save_artifacts(self, directory):
        if self.model_bytes is not None:
            with open(os.path.join(directory, MODEL_FILE), "wb") as f:
                f.write(self.model_bytes)
            return [MODEL_FILE]
        names = [MODEL_FILE] + ([DATA_FILE] if os.path.exists(os.path.join(self.model_dir, DATA_FILE)) else [])
        for name in names:
            shutil.copyfile(os.path.join(self.model_dir, name), os.path.join(directory, name))
        return names

    def artifact_size(self) -> int:
        if self.model_bytes is not None:
            return len(self.model_bytes)
        return sum(os.path.getsize(os.path.join(self.model_dir, f)) for f in (MODEL_FILE, DATA_FILE)
                   if os.path.exists(os.path.join(self.model_dir, f)))

    @property
    def external_data(self) -> bool:
        return self.model_bytes is None


#: ONNX Runtime's graph optimization levels, by the names the ``session_optimization`` option takes
SESSION_OPTIMIZATION = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                        "all": "ORT_ENABLE_ALL"}


def _session(model, target: Target, threads: int | None, disabled_optimizers=(), level: str = "all",
             profile_prefix: str | None = None, initializers: "dict | None" = None):
    """An InferenceSession of ``model`` (bytes or a path). ``initializers``: name -> ``OrtValue``
    over memory the caller keeps alive, used by the session in place of the model's own data for
    those initializers (``add_initializer``; prepacking is turned off so that no kernel copies
    them)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    if initializers:
        so.add_session_config_entry("session.disable_prepacking", "1")
        for name, value in initializers.items():
            so.add_initializer(name, value)
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, SESSION_OPTIMIZATION[level])
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads or default_threads()
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if target.device == "cuda":
        providers = [("CUDAExecutionProvider", {"device_id": torch.cuda.current_device()}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(model, so, providers=providers, disabled_optimizers=list(disabled_optimizers))


def default_threads() -> int:
    """Every core this process may run on (``os.sched_getaffinity``), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---- the backend --------------------------------------------------------------------------------------
class ONNXBackend(Backend):
    name = "onnx"
    params_modes = PARAMS_MODES
    packages = (("onnx", "onnx"), ("onnxscript", "onnxscript"), ("onnxruntime", "onnxruntime"))

    def check_available(self, target: Target) -> None:
        super().check_available(target)
        if target.device == "cuda":
            import onnxruntime as ort
            have = ort.get_available_providers()
            if "CUDAExecutionProvider" not in have:
                raise BackendUnavailableError(
                    f"onnx: target 'cuda' needs onnxruntime's CUDAExecutionProvider, which this onnxruntime "
                    f"lacks (providers: {', '.join(have)}); pip install onnxruntime-gpu")

    def unsupported_reason(self, node, target):
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            if t in onnx_translations():
                return None
            if t.namespace not in ("aten", "prims", "optc"):
                return (f"custom op {t.namespace}::{t._opname} has no ONNX translation (register one with "
                        "optc.backends.onnx.register_onnx_translation)")
            if t.namespace == "aten" and not _aten_exportable(t):
                return f"ATen op {t} has no ONNX translation in torchlib and no decomposition"
        return super().unsupported_reason(node, target)

    def stage(self, program: Program, target: Target) -> list[str]:
        """Decompositions, the optc ops without an ONNX translation decomposed, bfloat16 as rounded
        float32 (ONNX Runtime has no CPU bfloat16 kernels), then the exporter's and ONNX's bugs."""
        bf16 = any(isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dtype == torch.bfloat16
                   for n in program.graph.nodes)
        return ["decompose{backend=onnx}", "lower-optc-ops", *(["bfloat16-as-rounded-float32"] if bf16 else []),
                "legalize{backend=onnx}", *(["ort-contrib-ops"] if target.device == "cpu" else [])]

    def native_ops(self, target: Target) -> frozenset:
        return frozenset(onnx_translations())

    def lower(self, program: Program, target: Target, *, opset: int = OPSET, threads: int | None = None,
              optimize: bool = True, external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
              ort_fusions: bool | str = "auto", ort_disabled_optimizers: tuple | None = None,
              session_optimization: str = "all", params: str = "auto") -> ONNXModel:
        """``opset``: ONNX opset (default :data:`OPSET`). ``threads``: ONNX Runtime intra-op threads
        (default: every core). ``optimize``: the exporter's ONNX optimizer (constant folding,
        redundancy elimination) before ONNX Runtime's own. ``external_data_threshold``: weights
        above this many bytes are saved as external data. ``ort_fusions``: ONNX Runtime's
        transformer fusions (:func:`ort_transformer_fusions`: BiasGelu, FastGelu... in the
        ``com.microsoft`` domain) -- ``"auto"`` applies them to graphs with a layer norm, ``True``
        always, ``False`` never (the artifact is then plain ONNX).
        ``session_optimization``: ONNX Runtime's graph optimization level for the session,
        ``"all"`` (default), ``"extended"``, ``"basic"`` or ``"disable"`` (``optc bisect`` steps
        through them), saved in the manifest.
        ``ort_disabled_optimizers``: names of ONNX Runtime graph transformers the session leaves out,
        saved in the manifest, so a loaded model runs the same way. ``None`` (default): on CPU
        ``("SkipLayerNormFusion",)``, and ``GeluFusionL1`` for a program with an ``erf`` left after
        optc's fuse-gelu (ORT fuses near-miss GELU formulas as exact GELU) -- ONNX Runtime 1.32's CPU SkipLayerNormalization kernel is
        slower than the Add + LayerNormalization it replaces (BERT-base fp32 0.97x plain ONNX
        Runtime without it, 1.06x with it; INT8 0.35x instead of 0.41x: docs/benchmarks.md,
        docs/quantization.md); on CUDA none (not measured). A quantized program gets no
        transformer fusions under ``ort_fusions="auto"``.
        ``params`` (:data:`PARAMS_MODES`): ``"reference"`` runs the session on the Program's own
        weight tensors -- for a model the user holds, the model's own parameters -- instead of a
        copy ONNX Runtime loads from the model file (which it then prepacks into another): the
        model takes the external-data route, each linear weight stays as torch lays it out
        (``[out, in]``, read by ``com.microsoft.FusedMatMul`` with ``transB=1`` instead of a
        transposed copy), and the session gets those tensors with prepacking off. The compiled
        model then refuses to run once one of them is modified in place
        (:class:`~optc.errors.StaleWeightsError`). The saved artifact is complete either way; a
        loaded one has its own copy. The price is speed: ONNX Runtime's matmuls over unpacked
        weights run about 1.2x slower (docs/backends.md). ``"copy"``: ONNX Runtime's copy.
        ``"auto"`` (default): reference only where the copy would not fit
        (:func:`~optc.backends.base.auto_params`: a float program on CPU above ``external_data_threshold``
        whose weights in memory exceed ``REFERENCE_WHEN_OVER`` of the memory available), with a
        warning; copy otherwise."""
        from optc.ir.quant_ops import is_quant_op
        quantized = any(n.op == "call_function" and is_quant_op(n.target) for n in program.graph.nodes)
        if ort_disabled_optimizers is None:
            ort_disabled_optimizers = ("SkipLayerNormFusion",) if target.device == "cpu" else ()
            if any(n.op == "call_function" and n.target is torch.ops.aten.erf.default for n in program.graph.nodes):
                # optc's fuse-gelu has fused every exact erf GELU already; an erf left is not GELU,
                # or is a near miss (x / 1.4142), which onnxruntime 1.32's GeluFusionL1 still fuses
                # into an exact Gelu: 3e-6 off the program (found by optc fuzz)
                ort_disabled_optimizers = (*ort_disabled_optimizers, "GeluFusionL1")
        import onnx
        if isinstance(ort_disabled_optimizers, str) or not all(isinstance(o, str) for o in ort_disabled_optimizers):
            raise LoweringError(f"ort_disabled_optimizers must be a tuple of optimizer names, got "
                                f"{ort_disabled_optimizers!r}", backend=self.name)
        if session_optimization not in SESSION_OPTIMIZATION:
            raise LoweringError(f"session_optimization must be one of {', '.join(SESSION_OPTIMIZATION)}, got "
                                f"{session_optimization!r}", backend=self.name)
        if ort_fusions not in (True, False, "auto"):
            raise LoweringError(f"ort_fusions must be True, False or 'auto', got {ort_fusions!r}", backend=self.name)
        if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
            raise LoweringError(f"opset {opset!r} is not supported (valid: {MIN_OPSET}..{MAX_OPSET})", backend=self.name)
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise LoweringError(f"threads must be a positive int, got {threads!r}", backend=self.name)
        self.check_params(params)
        if params == "reference" and target.device != "cpu":
            raise LoweringError("params='reference' is for the CPU target (a CUDA session copies the weights to the "
                                "device): use params='copy'", backend=self.name)
        weights = sum(t.nbytes for t in attr_tensors(program.graph_module).values())
        if params == "auto":
            params = auto_params(program, target, self.name, "Unpacked matmuls run about 1.2x slower") \
                if weights > external_data_threshold and not quantized else "copy"
        signature = Signature.of(program)
        ep = export_program(program)
        input_names = [s.name for s in signature.inputs]
        output_names = [f"output_{i}" for i in range(len(signature.outputs))]
        onnx_program = _export(ep, opset, input_names, output_names, optimize)

        options = {"opset": opset, "threads": threads, "optimize": bool(optimize),
                   "external_data": weights > external_data_threshold or params == "reference", "ort_fusions": {},
                   "ort_disabled_optimizers": list(ort_disabled_optimizers),
                   "session_optimization": session_optimization, "params": params}
        if not options["external_data"]:
            # one copy of the weights at a time where it can be: the proto is serialised and
            # dropped before the checker parses the bytes, which are checked as they are (checking
            # the proto serialises it again inside the checker; measured on a 100 M-parameter
            # Llama: peak 6.81x -> 5.9x the weight bytes)
            proto = onnx_program.model_proto
            maps = backend_map(proto, onnx_program.exported_program or ep, program, ep.optc_source_graph)
            fuse = ort_fusions is True or (ort_fusions == "auto" and not quantized and _has_op(proto, "LayerNormalization"))
            model_bytes = proto.SerializeToString()
            if not fuse:
                del proto
            onnx.checker.check_model(model_bytes, full_check=True)   # the standard ONNX model, before any contrib op
            if fuse:
                del model_bytes
                proto, options["ort_fusions"] = ort_transformer_fusions(proto, program, target, threads)
                model_bytes = proto.SerializeToString()
                del proto
            try:
                return ONNXModel(signature, target, model_bytes=model_bytes, threads=threads, backend_options=options,
                                 backend_map=maps)
            except Exception as e:  # noqa: BLE001 - retried once, re-raised otherwise
                if "is not a graph input, initializer, or output of a previous node" not in str(e) \
                        or "FastGeluFusion" in options["ort_disabled_optimizers"]:
                    raise
                # onnxruntime 1.32's FastGeluFusion fuses a tanh-GELU formula whose 0.5 * x has
                # another reader and deletes that node: the optimised graph is invalid (found by
                # optc fuzz). The model itself is valid: run it without that fusion.
                log.warning("onnx: ONNX Runtime's FastGeluFusion broke the graph (%s); the session leaves it out",
                            (str(e).strip().splitlines() or [""])[0][:160])
                options["ort_disabled_optimizers"] = [*options["ort_disabled_optimizers"], "FastGeluFusion"]
                return ONNXModel(signature, target, model_bytes=model_bytes, threads=threads, backend_options=options,
                                 backend_map=maps)
        workdir = tempfile.mkdtemp(prefix="optc-onnx-")
        try:
            path = os.path.join(workdir, MODEL_FILE)
            shared = _reference_initializers(onnx_program.model) if params == "reference" else None
            _save_streaming(onnx_program, path)
            written = sorted(os.listdir(workdir))
            if written != sorted([MODEL_FILE, DATA_FILE]):
                raise LoweringError(f"the exporter wrote {written}, expected {MODEL_FILE} and {DATA_FILE}",
                                    backend=self.name)
            onnx.checker.check_model(path, full_check=True)
            maps = backend_map(onnx.load(path, load_external_data=False), onnx_program.exported_program or ep, program,
                               ep.optc_source_graph)
            model = ONNXModel(signature, target, model_dir=workdir, threads=threads, backend_options=options,
                              backend_map=maps, shared=shared)
            if shared:
                model.watch_weights(tensors_holding([a.__array_interface__["data"][0] for a in shared.values()],
                                                    attr_tensors(program.graph_module)))
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        weakref.finalize(model, shutil.rmtree, workdir, True)
        return model

    def load(self, directory: str, manifest: dict) -> ONNXModel:
        target = target_from_manifest(manifest)
        options = dict(manifest.get("options", {}))
        signature = signature_from_manifest(manifest)
        common = dict(threads=options.get("threads"), pipeline=manifest.get("pipeline", ""), backend_options=options)
        try:
            if options.get("external_data"):
                return ONNXModel(signature, target, model_dir=os.path.abspath(directory), **common)
            with open(os.path.join(directory, MODEL_FILE), "rb") as f:
                data = f.read()
            return ONNXModel(signature, target, model_bytes=data, **common)
        except (OSError, RuntimeError) as e:  # onnxruntime raises its own RuntimeError subclasses
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"{directory}: ONNX Runtime cannot load '{MODEL_FILE}': {first}") from e


def _reference_initializers(model) -> dict:
    """The initializers of the exported ``model`` (an ONNX IR model) that a session can read in
    place, as arrays over the Program's own memory: name -> C-contiguous numpy array.

    The exporter gives each initializer the tensor it was exported from (``const_value.raw``): a
    weight of the Program, or -- for a linear weight, which it folds ``Transpose(W)`` into -- a
    transposed numpy view of it. Such a view (2-D, float32, read only as a ``MatMul``'s second
    operand) becomes ``W`` itself, and its ``MatMul`` readers ``com.microsoft.FusedMatMul`` with
    ``transB=1``: the same product, without a transposed copy. Anything else that is not
    contiguous, smaller than :data:`REFERENCE_MIN_BYTES`, or of a dtype numpy lacks (bfloat16) is
    left to the session's own copy. ``model`` is rewritten in place (before it is written out)."""
    import numpy as np
    import onnx_ir as ir
    out = {}
    transposed = False
    for name, value in model.graph.initializers.items():
        raw = getattr(value.const_value, "raw", None)
        if isinstance(raw, torch.Tensor):
            if raw.device.type != "cpu" or not raw.is_contiguous() or raw.dtype == torch.bfloat16 or raw.is_quantized:
                continue
            arr = raw.detach().numpy()
        elif isinstance(raw, np.ndarray):
            arr = raw
        else:
            continue
        if arr.nbytes < REFERENCE_MIN_BYTES:
            continue
        if arr.flags.c_contiguous:
            out[name] = arr
            continue
        uses = list(value.uses())
        if arr.ndim == 2 and arr.flags.f_contiguous and arr.dtype == np.float32 and uses and all(
                u.node.op_type == "MatMul" and u.node.domain in ("", "ai.onnx") and u.idx == 1
                and u.node.graph is model.graph for u in uses):
            w = arr.T      # C-contiguous: the weight as torch lays it out, [out, in]
            for u in uses:
                u.node.op_type, u.node.domain = "FusedMatMul", "com.microsoft"
                u.node.attributes["transB"] = ir.AttrInt64("transB", 1)
            value.const_value = ir.Tensor(w, name=name)
            value.shape = ir.Shape(w.shape)
            out[name] = w
            transposed = True
    if transposed:
        model.opset_imports.setdefault("com.microsoft", 1)
    return out


class BackendMap(dict):
    """optc node name (of the staged Program that was lowered) -> ``{"nodes": [ONNX node names],
    "value": ONNX value name or None}``."""


def backend_map(proto, ep: torch.export.ExportedProgram, program: Program,
                source_graph: "torch.fx.Graph | None" = None) -> BackendMap:
    """Which ONNX nodes each node of ``program`` became, and the ONNX value holding its result.

    The exporter writes, on each ONNX node, the node of the ExportedProgram it translated
    (``pkg.torch.onnx.fx_node``: ``%name : ...``; ``ep`` must be the exporter's own program, after
    its decompositions: ``ONNXProgram.exported_program``), and names that node's result value after
    it; torch.export records, on each of its nodes, the chain of nodes it was traced from
    (``from_node``). The chain is followed to the node of ``source_graph`` -- the graph
    :func:`~optc.backends.export.export_program` traced, a copy of ``program``'s with its names --
    matched by that graph's identity: names alone are not enough, a decomposition's new nodes
    reuse names (``flatten`` traced as a new ``view_3``). A node with no ONNX node left (folded by
    the exporter's optimizer, fused by ONNX Runtime's transformer optimizer) is absent."""
    names = {n.name for n in program.graph.nodes}
    source_id = id(source_graph) if source_graph is not None else None
    ep_to_optc: dict[str, str] = {}
    for n in ep.graph.nodes:
        stack = list(n.meta.get("from_node") or [])
        while stack:
            src = stack.pop(0)
            if getattr(src, "name", None) in names and (source_id is None or getattr(src, "graph_id", None) == source_id):
                ep_to_optc[n.name] = src.name
                break
            stack.extend(getattr(src, "from_node", None) or [])
        else:
            if n.name in names and n.op == "placeholder":
                ep_to_optc[n.name] = n.name
    outputs = {o.name for o in proto.graph.output}
    out = BackendMap()
    for node in proto.graph.node:
        meta = {m.key: m.value for m in node.metadata_props}
        fx_node = meta.get("pkg.torch.onnx.fx_node", "")
        if not fx_node.startswith("%"):
            continue
        ep_name = fx_node[1:].split(" ", 1)[0]
        optc_name = ep_to_optc.get(ep_name)
        if optc_name is None:
            continue
        entry = out.setdefault(optc_name, {"nodes": [], "value": None})
        entry["nodes"].append(node.name)
        for v in node.output:
            if v == ep_name or v in outputs:
                entry["value"] = v
    return out


def _has_op(proto, op_type: str) -> bool:
    return any(n.op_type == op_type for n in proto.graph.node) or \
        any(n.op_type == op_type for f in proto.functions for n in f.node)


def ort_transformer_fusions(proto, program: Program, target: Target, threads: int | None):
    """ONNX Runtime's transformer optimizer (``onnxruntime.transformers.optimizer``, graph
    fusions only, ``opt_level=0``: ONNX Runtime's own graph optimizations still run in the
    session) on ``proto``: BiasGelu / FastGelu (bias add + GELU, the tanh-GELU formula),
    attention where its patterns match. ``ORT_ENABLE_ALL`` does not do these. Its
    SkipLayerNormalization fusion is left out: that kernel is slower than what it replaces on
    CPU here (see :meth:`ONNXBackend.lower`).

    The fused model is kept only if it computes what ``proto`` does on the program's example
    inputs (1e-4 of the output scale); otherwise ``proto`` is kept and a warning names the
    difference. Returns ``(model, {fused op: count})``."""
    import numpy as np
    try:
        from onnxruntime.transformers.optimizer import optimize_model
    except ImportError as e:   # an onnxruntime build without its Python tools
        log.warning("onnx: ONNX Runtime's transformer optimizer is not available (%s); no fusions", e)
        return proto, {}
    # its modules log as top-level names (fusion_skiplayernorm, onnx_model, ...): quiet them
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("fusion", "onnx_model", "optimizer", "onnxruntime.transformers")):
            logging.getLogger(name).setLevel(logging.ERROR)
    import onnx
    work = onnx.ModelProto()
    work.CopyFrom(proto)   # the optimizer rewrites the model it is given in place
    from onnxruntime.transformers.fusion_options import FusionOptions
    options = FusionOptions("bert")
    options.enable_shape_inference = False   # the exporter's shapes are there; its pass rejects contrib ops
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = False   # measured slower
    if any(n.op_type == "Gelu" and any(a.name == "approximate" and a.s == b"tanh" for a in n.attribute)
           for n in work.graph.node):
        # onnxruntime 1.32's BiasGelu fusion ignores Gelu's approximate="tanh" (it computes the erf
        # form: 1.7e-4 of the output scale on the zoo's GPT): keep those GELUs as they are
        options.enable_gelu = options.enable_bias_gelu = options.enable_gemm_fast_gelu = False
    if any(n.op == "call_function" and n.target is torch.ops.aten.erf.default for n in program.graph.nodes):
        # an erf optc's fuse-gelu left is not an exact GELU; the optimizer's Gelu fusion takes a near
        # miss (x / 1.4142) for one, as ORT's GeluFusionL1 does (disabled in the session for the same
        # programs, ONNXBackend.lower)
        options.enable_gelu = options.enable_bias_gelu = False
    try:
        fused = optimize_model(work, model_type="bert", opt_level=0, num_heads=0, hidden_size=0,
                               optimization_options=options)
    except Exception as e:  # noqa: BLE001 - its pattern matchers crash on some graphs (an IndexError on a
        # [1, 1] layer norm, found by optc fuzz): the plain model is still right
        log.warning("onnx: ONNX Runtime's transformer optimizer failed (%s: %s); no fusions", type(e).__name__,
                    (str(e).strip().splitlines() or [""])[0])
        return proto, {}
    counts = {k: int(v) for k, v in (fused.get_fused_operator_statistics() or {}).items() if v}
    if not counts:
        return proto, {}
    new = fused.model
    flat = program.example_flat_inputs()
    try:
        # the fused model may not even load: onnxruntime 1.32's optimizer deleted the producer of a
        # graph output that a LayerNormalization also read ("Graph output (output_1) does not exist
        # in the graph", found by optc fuzz)
        sessions = [_session(m.SerializeToString(), target, threads) for m in (proto, new)]
        names = [i.name for i in sessions[0].get_inputs()]
        by_name = {s.name: t for s, t in zip(Signature.of(program).inputs, flat)}
        feed = {n: by_name[n].detach().cpu().contiguous().numpy() for n in names}
        ref, got = (s.run(None, feed) for s in sessions)
    except Exception as e:  # noqa: BLE001 - a fused model that does not run is not used
        log.warning("onnx: ONNX Runtime's transformer fusions produced a model that fails (%s); not used",
                    str(e).strip().splitlines()[0])
        return proto, {}
    for i, (a, b) in enumerate(zip(ref, got)):
        if a.dtype.kind != "f":
            ok = a.shape == b.shape and bool(np.array_equal(a, b))
        else:
            scale = max(float(np.max(np.abs(a), initial=0.0)), 1e-30)
            ok = a.shape == b.shape and float(np.max(np.abs(a.astype(np.float64) - b), initial=0.0)) <= 1e-4 * scale
        if not ok:
            log.warning("onnx: ONNX Runtime's transformer fusions change output %d on the example inputs; not used", i)
            return proto, {}
    return new, counts


_ATEN_OK: dict[torch._ops.OpOverload, bool] = {}


def _aten_exportable(op: torch._ops.OpOverload) -> bool:
    """Whether the exporter can handle ``op``: torchlib translates it, or a decomposition the
    exporter applies (torch.export's defaults, torch._decomp, a CompositeImplicit kernel) exists."""
    if op not in _ATEN_OK:
        ok = (op._opname.startswith("_assert") or op._opname.startswith("sym_constrain_range")  # dropped by the exporter
              or _registry(OPSET).is_registered(op) or op in torch._decomp.decomposition_table
              or (hasattr(op, "_can_decompose") and op._can_decompose()))
        if not ok:  # torch.export's default table materialises every CIA op: only when needed
            ok = op in torch.export.default_decompositions()
        _ATEN_OK[op] = bool(ok)
    return _ATEN_OK[op]


__all__ = ["ONNXBackend", "ONNXModel", "BackendMap", "backend_map", "OPSET", "EXTERNAL_DATA_THRESHOLD", "register_onnx_translation",
           "onnx_translations", "onnx_opset", "default_threads"]

from optc.backends import onnx_quant as _onnx_quant  # noqa: E402,F401  (QuantizeLinear/DequantizeLinear translations)
from optc.backends import onnx_contrib as _onnx_contrib  # noqa: E402  (the ort-contrib-ops stage pass)
