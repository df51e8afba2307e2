"""TVM backend: Relax through ``from_exported_program``, real default schedules, opt-in tuning.

Lowering:

1. ``optc::`` ops with a registered Relax translation (:func:`register_tvm_translation`) stay and
   are translated by the importer's custom convert map; the others are replaced by their ATen
   decomposition (:func:`~optc.backends.base.export_program`, which also keeps symbolic dims);
2. ``tvm.relax.frontend.torch.from_exported_program``'s steps (``run_decompositions``, then its
   ``ExportedProgramImporter``, whose fx node -> Relax table the node map keeps; never ``from_fx``:
   it computes eval-mode BatchNorm wrongly in 0.27), weights bound as constants, so the library
   is self-contained;
3. the pre-schedule pipeline (:func:`~optc.backends.tvm_schedule.pre_schedule_passes`):
   inference decompositions, fast math, conv2d to the ``layout`` (Relax ``ConvertLayout``; a no-op
   for a Program ``convert-layout`` converted already), legalization, operator
   fusion, layout-free weights;
4. optional MetaSchedule tuning (``tune`` > 0): tasks are the fused kernels with a reduction;
   records live in a persistent database (``tuning_db``) and a tuned kernel is used only after
   :func:`~optc.backends.tvm_schedule.check_kernel` found it correct (NaN-filled outputs, against
   the default schedule) and faster;
5. scheduling: checked tuned records first, then the default rules -- on CPU
   :class:`~optc.backends.tvm_schedule.CPUGeneric` and dlight's CPU reduction rule, on CUDA
   dlight's GPU rules (Matmul, GEMV, Reduction, GeneralReduction, Fallback); constant weight
   repacking is folded at compile time;
6. ``tvm.compile`` for the target -- ``{"kind": "llvm", "mcpu": <this host's CPU>,
   "num-cores": threads}`` or ``{"kind": "cuda", "arch": "sm_XY", ...}`` -- then
   ``export_library`` to ``model.so``, which the model loads back and runs with the Relax VM:
   what runs is what is saved.

Steps 3-6 run in a ``PassContext`` that leaves out the optional passes named by
``disabled_passes`` (:data:`OPTIONAL_PASSES`; ``optc bisect`` switches them) and records, with a
pass instrument, what the node map follows bindings through (``backends/tvm_map.py``): the
lowered model has a :attr:`~TVMModel.backend_map`, :meth:`~TVMModel.intermediate_values` (a
separate build) and :meth:`~TVMModel.node_times` (a separate VM over the same library).

Calls pass torch tensors to the VM with DLPack both ways (a copy only for an input that is not
contiguous or not 64-byte aligned), on a TVM thread pool of ``threads`` workers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from typing import TYPE_CHECKING, Callable

import torch

from optc.backends.base import (
    Backend, CompiledModel, Signature, auto_params, export_program, op_name, require, signature_from_manifest,
    target_from_manifest, tensors_holding,
)
from optc.errors import ArtifactError, BackendUnavailableError, LoweringError
from optc.memory import page_out_mapped, release_heap, release_mapped
from optc.ir.program import Program, attr_tensors
from optc.ir.source import node_source
from optc.target import Target

if TYPE_CHECKING:
    from optc.backends.tvm_map import BackendMap

log = logging.getLogger("optc.backends.tvm")

LIBRARY = "model.so"
PARAMS = "params.pt"
#: ``params="auto"`` passes the weights by reference above this many bytes of parameters
PARAMS_BY_REFERENCE_THRESHOLD = 512 * 1024 ** 2
PARAMS_MODES = ("auto", "bound", "copy", "reference")
LAYOUTS = ("NHWC", "NCHW")
#: The passes of optc's Relax build pipeline that a model compiles without (``disabled_passes``),
#: in pipeline order: option name -> the TVM pass names it leaves out of the ``PassContext``.
#: Legalization, ``call_tir`` lowering and the VM's own lowering cannot be left out.
OPTIONAL_PASSES: dict[str, tuple[str, ...]] = {
    "FastMathTransform": ("FastMathTransform",),          # polynomial exp / tanh / erf
    "ConvertLayout": ("ConvertLayout",),                  # conv2d to the ``layout``
    "FoldConstant": ("FoldConstant", "FoldConstantCallTIR"),   # constants (and weight repacking) at compile time
    "FuseOps": ("FuseOps", "FuseTIR"),                    # operator fusion
    "AttachAttrLayoutFreeBuffers": ("AttachAttrLayoutFreeBuffers", "SplitLayoutRewritePreproc"),  # CPU weight repacking
    "MetaScheduleApplyDatabase": ("MetaScheduleApplyDatabase",),   # tuned kernels
    "ApplyDefaultSchedule": ("ApplyDefaultSchedule",),    # the default schedules (CPU only: CUDA needs them)
    "RewriteDataflowReshape": ("RewriteDataflowReshape",),   # reshape as a view
    "StaticPlanBlockMemory": ("StaticPlanBlockMemory",),  # memory planning
    "KillAfterLastUse": ("KillAfterLastUse",),            # early frees
}
#: ``OPTIONAL_PASSES`` that a CUDA build cannot leave out
CUDA_REQUIRED = ("ApplyDefaultSchedule",)
TUNE_HINT = "tvm: tuning needs xgboost and psutil: pip install optc[tune]"
#: ``tune=True``: this many MetaSchedule trials for each kernel that has a reduction.
TUNE_TRIALS_PER_TASK = 64

# ---- translations of optc:: ops ----------------------------------------------------------------------
# OpOverload -> fn(node: torch.fx.Node, importer) -> relax.Expr, called by from_exported_program's
# custom convert map (inputs: importer.env[arg]; emit with importer.block_builder.emit(...)).
_TRANSLATIONS: dict[torch._ops.OpOverload, Callable] = {}
_LOCK = threading.Lock()


def register_tvm_translation(op: torch._ops.OpOverload, fn: Callable, *, replace: bool = False) -> None:
    """Translate ``op`` (``torch.ops.optc.quantize.default``) to Relax with ``fn(node, importer)``,
    which reads its inputs from ``importer.env[node.args[i]]`` and returns a Relax expression
    (e.g. ``importer.block_builder.emit(relax.op.quantize(x, scale, zp, axis, "int8"))``).
    Ops without one are lowered through their ATen decomposition."""
    if not isinstance(op, torch._ops.OpOverload):
        raise TypeError(f"register_tvm_translation takes an OpOverload (torch.ops.ns.op.default), got {op!r}")
    with _LOCK:
        if op in _TRANSLATIONS and not replace and _TRANSLATIONS[op] is not fn:
            raise ValueError(f"{op} already has a TVM translation (pass replace=True to override it)")
        _TRANSLATIONS[op] = fn


def _convert_map() -> dict[str, Callable]:
    """from_exported_program's custom convert map: keyed by ``node.target.__name__``."""
    return {op.__name__: fn for op, fn in _TRANSLATIONS.items()}


_SUPPORTED: dict[str, frozenset] = {}


def _importer_ops() -> frozenset:
    """Names (``conv2d.default``) of the ATen ops TVM's ExportedProgram importer translates."""
    if "ops" not in _SUPPORTED:
        from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter
        _SUPPORTED["ops"] = frozenset(k for k in ExportedProgramImporter().convert_map if isinstance(k, str))
    return _SUPPORTED["ops"]


_ATEN_OK: dict[torch._ops.OpOverload, bool] = {}


def _aten_lowerable(op: torch._ops.OpOverload) -> bool:
    """Translated by the importer, or decomposed first (``run_decompositions``'s core-ATen table,
    a CompositeImplicit kernel); a decomposition into an op TVM lacks is caught at import."""
    if op not in _ATEN_OK:
        ok = (op.__name__ in _importer_ops() or op._opname.startswith("_assert")
              or op._opname.startswith("sym_constrain_range") or op in torch._decomp.decomposition_table
              or (hasattr(op, "_can_decompose") and op._can_decompose()))
        if not ok:
            ok = op in torch.export.default_decompositions()
        _ATEN_OK[op] = bool(ok)
    return _ATEN_OK[op]


# ---- the compiled model --------------------------------------------------------------------------------
def default_threads() -> int:
    """Every core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class TVMModel(CompiledModel):
    """A Relax VM over ``model.so`` (a private temporary copy after lowering, the artifact's file
    after loading). ``threads``: TVM thread-pool workers (CPU; None = every core)."""

    backend = "tvm"
    own_copy_params = "bound"

    def __init__(self, signature: Signature, target: Target, *, library_path: str, threads: int | None = None,
                 backend_map: "BackendMap | None" = None, relax_module=None, build: Callable | None = None,
                 params: list[torch.Tensor] | None = None, **kw):
        super().__init__(signature, target, **kw)
        #: the weights ``main`` takes by reference (``params="reference"``): torch tensors, the
        #: Program's own after lowering, memory-mapped from ``params.pt`` after loading; None when
        #: the library has them bound as constants
        self.params = params
        import tvm
        from tvm import relax
        #: optc node (of the staged Program) -> its kernel calls and the Relax variable holding its
        #: result (``backends/tvm_map.py``); None for a model loaded from an artifact
        self.backend_map = backend_map
        # the imported Relax module (its constants share the Program's weights through DLPack) and
        # the build that made the library: what intermediate_values builds again, with outputs added
        self._relax_module = relax_module
        self._build = build
        self.library_path = library_path
        self.threads = threads or default_threads()
        if target.device == "cuda":
            self._dev = tvm.cuda(torch.cuda.current_device())
        else:
            self._dev = tvm.cpu()
            from optc.backends.tvm_schedule import configure_threads
            configure_threads(self.threads)
        self.library = tvm.runtime.load_module(library_path)
        self.vm = relax.VirtualMachine(self.library, self._dev)
        self._main = self.vm["main"]
        # weights by reference: their transforms (transposes, repacking) run once, here
        self._weights = _transformed(self.vm, params)
        # the VM has its own copy of the constants: the pages of the library's embedded copy that
        # loading read are handed back (read again from the file if TVM ever needs them)
        page_out_mapped([library_path])
        release_heap()

    def run_flat(self, inputs):
        import tvm
        self.check_weights()
        if self.target.device == "cuda":
            torch.cuda.current_stream().synchronize()
        else:
            from optc.backends.tvm_schedule import configure_threads
            configure_threads(self.threads)
        args = [tvm.runtime.from_dlpack(_aligned(t)) for t in inputs]
        out = self._main(*args, *self._weights)
        if self.target.device == "cuda":
            self._dev.sync()
        return [torch.from_dlpack(o) for o in _flatten(out)]

    # ---- the node map, an instrumented build, per-kernel times ----------------------------------------------
    def _args(self, inputs) -> list:
        import tvm
        return [tvm.runtime.from_dlpack(_aligned(t.to(self.device))) for t in inputs]

    def intermediate_values(self, inputs: list[torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
        """The Relax variables ``names`` (as :attr:`backend_map` names them) on ``inputs`` (flat, as
        :meth:`run_flat` takes them), from a separate build of a copy of the imported module whose
        ``main`` also returns them (a variable of a dataflow block leaves it as an output of the
        block), with the same pipeline and options (tuned records aside: the copy gets the default
        schedules); this model's library is not touched. A value is thus the one TVM computes for
        that variable of the imported program, whatever the passes did to it in between (a layout
        conversion, a fusion): the numbers cannot be another variable's. Where a value was internal
        to a fused kernel, the copy writes it out, so its kernels may differ from the library's by
        that. Empty for a model loaded from an artifact (it has no imported module)."""
        from tvm import relax

        from optc.backends.tvm_map import with_outputs
        if self._relax_module is None or self._build is None:
            return {}
        mod, wanted = with_outputs(self._relax_module, list(names))
        if not wanted:
            return {}
        vm = relax.VirtualMachine(self._build(mod), self._dev)
        if self.target.device != "cuda":
            from optc.backends.tvm_schedule import configure_threads
            configure_threads(self.threads)
        out = vm["main"](*self._args(inputs), *_transformed(vm, self.params))
        if self.target.device == "cuda":
            self._dev.sync()
        return {name: torch.from_dlpack(v).detach().cpu().clone() for name, v in zip(wanted, _flatten(out[1]))}

    def node_times(self, inputs: list[torch.Tensor], *, runs: int = 10, warmup: int = 2) -> dict[str, float]:
        """Median seconds per run of each kernel call of the library, keyed as the ``"nodes"`` of
        :attr:`backend_map` name them (``fused_matmul_add1``, ``add#3`` for the third call of
        ``add``): a separate VM over the same library, whose instrument (``set_instrument``) times
        each call of a PrimFunc between its before- and after-call hooks (on CUDA after a device
        synchronisation each side). This model's VM is not touched; VM builtins (allocation, shape
        checks) are not counted."""
        import statistics

        from tvm import relax

        from optc.backends.tvm_map import call_names
        vm = relax.VirtualMachine(self.library, self._dev)
        cuda = self.target.device == "cuda"
        calls: list[tuple[str, float]] = []
        start = [0.0]

        def instrument(func, symbol, before_run, ret_value, *args):
            if symbol.startswith("vm."):
                return 0
            if cuda:
                self._dev.sync()
            if before_run:
                start[0] = time.perf_counter()
            else:
                calls.append((symbol, time.perf_counter() - start[0]))
            return 0

        vm.set_instrument(instrument)
        if not cuda:
            from optc.backends.tvm_schedule import configure_threads
            configure_threads(self.threads)
        args = self._args(inputs) + list(self._weights)
        per_call: dict[str, list[float]] = {}
        for i in range(warmup + runs):
            calls.clear()
            vm["main"](*args)
            if i < warmup:
                continue
            for name, (_, t) in zip(call_names([c for c, _ in calls]), calls):
                per_call.setdefault(name, []).append(t)
        return {name: statistics.median(ts) for name, ts in per_call.items()}

    def save_artifacts(self, directory):
        shutil.copyfile(self.library_path, os.path.join(directory, LIBRARY))
        if self.params is None:
            return [LIBRARY]
        torch.save(list(self.params), os.path.join(directory, PARAMS))    # tensor by tensor, no second copy
        return [LIBRARY, PARAMS]

    def artifact_size(self) -> int:
        return os.path.getsize(self.library_path) + sum(t.nbytes for t in self.params or ())


def _transformed(vm, params) -> tuple:
    """``main``'s weight arguments: the weight transforms of ``params`` (torch tensors shared
    through DLPack), or nothing when the library has its weights bound. Run group by group where
    the library has them (``tvm_schedule/split_params.py``): a weight's aligned copy, when it
    needs one, lives only while its group is transformed."""
    from optc.backends.tvm_schedule.split_params import GROUP_PREFIX, GROUPS
    if params is None:
        return ()
    params = list(params)
    try:
        table = vm[GROUPS]().numpy().astype("int64").reshape(-1, 3)
    except Exception:  # noqa: BLE001 - a library without the split (one group, or built before it)
        return tuple(vm["main_transform_params"]([_weight_arg(t) for t in params]))
    groups: dict[int, tuple[list[int], list[int]]] = {}
    for g, kind, index in table.tolist():
        groups.setdefault(g, ([], []))[kind].append(index)
    outputs: dict[int, object] = {}
    for g in sorted(groups):
        inputs, outs = groups[g]
        res = vm[f"{GROUP_PREFIX}{g}"]([_weight_arg(params[i]) for i in inputs])
        outputs.update(zip(outs, res))
    return tuple(outputs[j] for j in range(len(outputs)))


def _weight_arg(t: torch.Tensor):
    """A weight as a TVM argument: shared, or an aligned copy (then the pages of a weight file it was
    read from are handed back rather than held beside the copy: optc.memory)."""
    import tvm
    a = _aligned(t)
    if a.data_ptr() != t.data_ptr():
        release_mapped([t])
    return tvm.runtime.from_dlpack(a)


def _aligned(t: torch.Tensor, align: int = 64) -> torch.Tensor:
    """``t`` itself unless it is not contiguous or not ``align``-byte aligned (TVM's kernels
    assume aligned buffers): then an aligned contiguous copy."""
    t = t.detach()
    if not t.is_contiguous() or t.data_ptr() % align:
        t = t.contiguous().clone()
    return t


def _flatten(out) -> list:
    import tvm
    if isinstance(out, tvm.runtime.Tensor):
        return [out]
    flat = []
    for o in out:
        flat.extend(_flatten(o))
    return flat


# ---- tuning database -------------------------------------------------------------------------------------
def default_tuning_root() -> str:
    base = os.environ.get("OPTC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "optc")
    return os.path.join(base, "tvm-tuning")


def model_key(mod, target_dict: dict) -> str:
    """A hash of the kernels of ``mod`` (structure, shapes, dtypes; not the weights) and the target:
    names the model's folder in the default tuning database."""
    import tvm_ffi
    from optc.backends.tvm_schedule import tir_functions
    hashes = sorted(str(tvm_ffi.structural_hash(f)) for f in tir_functions(mod).values())
    h = hashlib.sha256(json.dumps(target_dict, sort_keys=True).encode())
    for x in hashes:
        h.update(x.encode())
    return h.hexdigest()[:16]


# ---- the backend ---------------------------------------------------------------------------------------
class TVMBackend(Backend):
    name = "tvm"
    params_modes = PARAMS_MODES
    packages = (("tvm", "apache-tvm"),)

    def check_available(self, target: Target) -> None:
        for module, pip in self.packages:
            require(module, pip, backend=self.name)
        if target.device == "cuda":
            if not torch.cuda.is_available():
                raise BackendUnavailableError("tvm: target 'cuda' needs a CUDA GPU, and none is available here "
                                              "(torch.cuda.is_available() is False)")
            import tvm
            if not tvm.cuda(0).exist or not tvm.runtime.enabled("cuda"):
                raise BackendUnavailableError("tvm: target 'cuda' needs a TVM built with CUDA; this apache-tvm "
                                              "has no CUDA runtime (build TVM with USE_CUDA=ON)")

    def unsupported_reason(self, node, target):
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            if t in _TRANSLATIONS:
                return None
            if t.namespace == "aten" and not _aten_lowerable(t):
                return (f"ATen op {op_name(t)} has no TVM Relax translation (from_exported_program) "
                        "and no decomposition")
        return super().unsupported_reason(node, target)

    def stage(self, program: Program, target: Target) -> list[str]:
        """Decompositions, the optc ops without a Relax translation decomposed, half conv / linear /
        matmul in float32 (the importer's half ops do not type-check), then TVM's bugs and gaps."""
        half = any(isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dtype in (torch.float16, torch.bfloat16)
                   for n in program.graph.nodes)
        return ["decompose{backend=tvm}", "lower-optc-ops", *(["half-in-float32"] if half else []),
                "legalize{backend=tvm}"]

    def native_ops(self, target: Target) -> frozenset:
        return frozenset(_TRANSLATIONS)

    def lower(self, program: Program, target: Target, *, threads: int | None = None, tune: int | bool = 0,
              tuning_db: str | None = None, layout: str | None = None,
              disabled_passes: tuple | list = (), params: str = "auto") -> TVMModel:
        """``threads``: TVM thread-pool workers and the target's ``num-cores`` (default: every core
        this process may use). ``tune``: MetaSchedule trial budget (0 or False: off, the default
        schedules only; True: :data:`TUNE_TRIALS_PER_TASK` trials per kernel with a reduction). ``tuning_db``: the tuning database folder (default: a folder per model under
        ``~/.cache/optc/tvm-tuning``); given with ``tune=0`` its checked records are applied
        without tuning. ``layout``: the layout convolutions run in, ``"NHWC"`` or ``"NCHW"``; None
        (default) is the target's (``optc.target.LAYOUTS``: NHWC on CPU, NCHW on CUDA), the layout
        the target's default pipeline already converted the Program to (``convert-layout``), so
        Relax's ``ConvertLayout`` only converts what the pass left (docs/layout.md).
        ``disabled_passes``: names of :data:`OPTIONAL_PASSES` the build leaves out (TVM's
        ``PassContext(disabled_pass=...)``), saved in the manifest -- ``optc bisect`` switches them
        to find the TVM pass that brings a miscompile. ``params``: ``"bound"`` compiles the weights
        into the library as constants (their transposes and repacking folded at compile time);
        ``"copy"`` keeps them ``main``'s arguments -- the Program's own tensors, shared through
        DLPack, saved beside the library as ``params.pt`` -- transformed once when the model loads
        (``LiftTransformParams``: each linear weight transposed and repacked into the panels the
        CPU matmul kernel reads, a copy); ``"reference"`` is the same without the copy: linears
        read their weights as torch lays them out (``[N, K]``, ``NT_matmul`` kernels that pack a
        panel at a time as they run: slower, backends.md); both avoid the bound library's peak
        (constants serialized into the library and loaded back: about 8x the weights).
        ``"auto"`` (default): bound up to :data:`PARAMS_BY_REFERENCE_THRESHOLD` bytes of parameters
        or on CUDA; above it, ``copy`` unless the copy would take more than half the memory
        available (``base.auto_params``), then ``reference``."""
        import tvm
        from optc.backends import tvm_schedule as ts

        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise LoweringError(f"threads must be a positive int, got {threads!r}", backend=self.name)
        if tune is True:
            tune = -TUNE_TRIALS_PER_TASK          # resolved per tunable kernel by ts.tune
        elif tune is False:
            tune = 0
        elif not isinstance(tune, int) or tune < 0:
            raise LoweringError(f"tune must be True/False or a trial budget (an int >= 0), got {tune!r}",
                                backend=self.name)
        if layout is None:
            layout = target.layout if target.layout in LAYOUTS else "NCHW"
        if layout not in LAYOUTS:
            raise LoweringError(f"unknown layout {layout!r} (valid: {', '.join(LAYOUTS)})", backend=self.name)
        if isinstance(disabled_passes, str) or not all(isinstance(p, str) for p in disabled_passes):
            raise LoweringError(f"disabled_passes must be a list of pass names, got {disabled_passes!r}",
                                backend=self.name)
        optional = [p for p in OPTIONAL_PASSES if not (target.device == "cuda" and p in CUDA_REQUIRED)]
        unknown = [p for p in disabled_passes if p not in optional]
        if unknown:
            raise LoweringError(f"disabled_passes: {', '.join(unknown)} cannot be left out of the TVM build "
                                f"(optional passes: {', '.join(optional)})", backend=self.name)
        disabled_passes = [p for p in optional if p in disabled_passes]      # pipeline order, once each
        self.check_params(params)
        if params == "auto":
            weight_bytes = sum(p.nbytes for p in program.graph_module.parameters())
            params = "bound" if target.device != "cpu" or weight_bytes <= PARAMS_BY_REFERENCE_THRESHOLD or tune \
                else auto_params(program, target, self.name, "Its linears pack their weights as they run")
        if params in ("copy", "reference") and (target.device != "cpu" or tune):
            raise LoweringError(f"params={params!r} is built for the CPU target without tuning (the tuned "
                                "kernels' checks run on constant weights): use params='bound'", backend=self.name)
        as_arguments = params in ("copy", "reference")
        in_place = params == "reference"
        if tune and any(importlib.util.find_spec(m) is None for m in ("xgboost", "psutil")):
            raise BackendUnavailableError(TUNE_HINT)
        n_threads = threads or default_threads()
        if target.device == "cuda":
            tdict = ts.cuda_target(torch.cuda.current_device())
        else:
            tdict = ts.llvm_target(n_threads)
            ts.configure_threads(n_threads)   # FoldConstant runs kernels while compiling
        tvm_target = tvm.target.Target(tdict)
        signature = Signature.of(program)

        from optc.backends import tvm_map
        recorder = tvm_map.Recorder()
        disabled = [name for p in disabled_passes for name in OPTIONAL_PASSES[p]]

        def context(instruments=()):
            """The caller's PassContext, leaving out ``disabled`` too, with ``instruments`` added."""
            cur = tvm.transform.PassContext.current()
            return tvm.transform.PassContext(
                opt_level=cur.opt_level, required_pass=list(cur.required_pass),
                disabled_pass=[*cur.disabled_pass, *disabled], instruments=[*cur.instruments, *instruments],
                config=dict(cur.config))

        tuning: dict = {}

        def tuned(mod):
            """MetaSchedule on the pre-scheduled module: its checked records (``tuning`` is set)."""
            nonlocal tuning
            db_dir = os.path.abspath(os.path.expanduser(tuning_db)) if tuning_db else \
                os.path.join(default_tuning_root(), model_key(mod, tdict))
            database, tuning = ts.tune(mod, tvm_target, trials=tune, db_dir=db_dir, threads=n_threads)
            return database

        def build(mod, *, tuning_records=None, instruments=()):
            """The pre-schedule pipeline, ``tuning_records(module)`` (the database to apply), then the
            build: (the pre-scheduled module, the executable)."""
            with context(instruments):
                # a new module object: a Python pass of the pipeline may assign into the module it
                # is given, and the imported one is kept for intermediate_values
                mod = ts.pre_schedule_pipeline(tvm_target, layout, as_arguments, in_place)(
                    tvm.IRModule(dict(mod.functions), attrs=mod.attrs))
                database = tuning_records(mod) if tuning_records is not None else None
                executable = tvm.compile(mod, target=tvm_target, relax_pipeline=ts.build_pipeline(
                    tvm_target, layout, database, pre_scheduled=True, lift_params=as_arguments, in_place=in_place))
            return mod, executable

        t0 = time.perf_counter()
        with context():
            imported = self._import(program, keep_params=as_arguments)
        t1 = time.perf_counter()
        scheduled, executable = build(imported.mod, tuning_records=tuned if (tune or tuning_db) else None,
                                      instruments=[recorder.instrument])
        t2 = time.perf_counter()
        maps = None
        try:
            maps = tvm_map.build_map(imported, program, tvm_map.kernel_calls(recorder, scheduled, imported.mod["main"]))
        except Exception as e:  # noqa: BLE001 - a debugging aid must not cost the compile
            log.warning("tvm: no node map (%s: %s)", type(e).__name__, (str(e).strip().splitlines() or [""])[0][:160])
        workdir = tempfile.mkdtemp(prefix="optc-tvm-")
        try:
            path = os.path.join(workdir, LIBRARY)
            executable.export_library(path)
            # the executable and the scheduled module hold the folded weights (the library has them
            # now): released before the library is loaded, so that the two are not held at once
            del executable, scheduled
            release_heap()
            t3 = time.perf_counter()
            log.info("tvm: import %.1fs, tuning+build %.1fs, map+export %.1fs", t1 - t0, t2 - t1, t3 - t2)
            options = {"threads": threads, "layout": layout, "tune": tuning.get("trials", tune), "target": tdict,
                       "tuned_kernels": tuning.get("applied", 0), "disabled_passes": list(disabled_passes),
                       "params": params}
            model = TVMModel(signature, target, library_path=path, threads=threads, backend_options=options,
                             backend_map=maps, relax_module=imported.mod, params=imported.params,
                             build=lambda mod: build(mod)[1])   # default schedules: no tuning
            if imported.params:
                model.watch_weights(tensors_holding([t.data_ptr() for t in imported.params],
                                                    attr_tensors(program.graph_module)))
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        model.tuning = tuning
        weakref.finalize(model, shutil.rmtree, workdir, True)
        return model

    def _import(self, program: Program, keep_params: bool = False):
        """The Program as a Relax module (weights bound as constants, or with ``keep_params``
        ``main``'s arguments), with what the importer knew (:class:`~optc.backends.tvm_map.Imported`:
        ``from_exported_program``'s steps, its ``env`` kept)."""
        from optc.backends.tvm_map import import_program
        ep = export_program(program)
        try:
            return import_program(ep, _convert_map() or None, keep_params)
        except AssertionError as e:  # "Unsupported function types ['foo.default']"
            text = str(e)
            if "Unsupported function types" not in text:
                raise
            for node in program.graph.nodes:
                name = getattr(node.target, "__name__", None)
                if node.op == "call_function" and name and f"'{name}'" in text:
                    raise LoweringError(f"cannot lower: TVM's importer has no translation for {op_name(node.target)}",
                                        backend=self.name, op=op_name(node.target), node=node.name,
                                        source=node_source(node)) from None
            raise LoweringError(f"cannot lower: TVM's importer has no translation for {text.split('types', 1)[-1].strip()} "
                                "(an op that the program's ops decompose into)", backend=self.name) from None

    def load(self, directory: str, manifest: dict) -> TVMModel:
        from optc.backends import tvm_schedule as ts
        target = target_from_manifest(manifest)
        options = dict(manifest.get("options", {}))
        saved = options.get("target") or {}
        if saved.get("kind") == "llvm" and saved.get("mcpu") and saved["mcpu"] != ts.host_cpu():
            log.warning("%s was compiled for CPU %s; this machine is %s (it may lack instructions the "
                        "library uses)", directory, saved["mcpu"], ts.host_cpu())
        params = None
        if options.get("params") in ("copy", "reference"):
            try:   # memory-mapped: the weights are read from the file as the transforms use them
                params = torch.load(os.path.join(directory, PARAMS), mmap=True, weights_only=True)
            except Exception as e:  # noqa: BLE001 - torch.load raises many types for a bad file
                raise ArtifactError(f"{directory}: cannot load '{PARAMS}': {(str(e).strip().splitlines() or [''])[0]}") from e
        try:
            return TVMModel(signature_from_manifest(manifest), target,
                            library_path=os.path.join(os.path.abspath(directory), LIBRARY),
                            threads=options.get("threads"), pipeline=manifest.get("pipeline", ""),
                            backend_options=options, params=params)
        except (OSError, RuntimeError) as e:  # tvm.error.* derive from RuntimeError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"{directory}: TVM cannot load '{LIBRARY}': {first}") from e


__all__ = ["TVMBackend", "TVMModel", "LIBRARY", "PARAMS", "PARAMS_BY_REFERENCE_THRESHOLD", "OPTIONAL_PASSES", "register_tvm_translation",
           "default_tuning_root", "model_key", "default_threads"]

from optc.backends import tvm_quant as _tvm_quant  # noqa: E402,F401  (R.quantize / R.dequantize translations)
from optc.backends import tvm_layout as _tvm_layout  # noqa: E402,F401  (R.nn.conv2d/pools/resize2d in NHWC for the optc:: NHWC ops)
