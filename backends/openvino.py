"""OpenVINO backend: a Program -> an OpenVINO model compiled for the CPU device.

Lowering, by ``route``:

- ``"export"`` (default for float programs): the staged Program is exported again
  (``torch.export``, like every backend) and converted by OpenVINO's PyTorch frontend
  (``openvino.convert_model(ExportedProgram)``). optc's ``optc::`` ops are decomposed by the stage
  first (OpenVINO's frontend knows only ATen).
- ``"onnx"`` (default for quantized programs): optc's ONNX lowering (the same exporter, opset
  and translations as the ONNX backend, ``QuantizeLinear``/``DequantizeLinear`` for optc's Q/DQ
  ops) written to a temporary file, then ``openvino.convert_model(path)``: OpenVINO's
  low-precision transformations turn the Q/DQ pairs into INT8 kernels, which the ATen form of the
  same ops (rounding and clamping arithmetic) would not give.

Precision is the program's, not the runtime's choice: ``INFERENCE_PRECISION_HINT`` is ``f32`` for
a program that computes in float32 (OpenVINO would otherwise run BF16 on CPUs with AMX and change
the numbers silently), ``bf16`` / ``f16`` for a ``to-half`` program computing in that dtype.
``threads`` sets ``INFERENCE_NUM_THREADS`` (default: every core this process may use); the latency
hint with one stream. The artifact is OpenVINO's IR (``model.xml`` + ``model.bin``, weights kept in
float32: ``compress_to_fp16=False``) with the manifest; loading reads and compiles it with the
saved settings. Needs ``pip install optc[openvino]``; a missing package is a one-line
``BackendUnavailableError``. CPU only (OpenVINO's GPU device is Intel's, not CUDA).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import warnings
import weakref

import torch

from optc.backends.base import (
    Backend, CompiledModel, Signature, export_program, signature_from_manifest, target_from_manifest,
)
from optc.errors import ArtifactError, BackendUnavailableError, LoweringError
from optc.ir.program import Program
from optc.target import Target

log = logging.getLogger("optc.backends.openvino")

XML, BIN = "model.xml", "model.bin"
ROUTES = ("auto", "export", "onnx")
_PRECISION = {torch.float32: "f32", torch.float64: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def _compile(ov_model, threads: int, precision: str):
    import openvino as ov
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
              "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    return ov.Core().compile_model(ov_model, "CPU", config)


class OpenVINOModel(CompiledModel):
    backend = "openvino"

    def __init__(self, ov_model, signature: Signature, target: Target, *, threads: int, precision: str, **kw):
        super().__init__(signature, target, **kw)
        self.ov_model = ov_model
        self.threads, self.precision = threads, precision
        self.compiled = _compile(ov_model, threads, precision)
        self.request = self.compiled.create_infer_request()
        n_in, n_out = len(self.compiled.inputs), len(self.compiled.outputs)
        if n_in != len(signature.inputs) or n_out != len(signature.outputs):
            raise LoweringError(f"the OpenVINO model has {n_in} inputs and {n_out} outputs, the program "
                                f"{len(signature.inputs)} and {len(signature.outputs)}", backend="openvino")

    def integer_coverage(self) -> dict:
        """Counted in OpenVINO's runtime model (the graph the CPU plugin executes): a Convolution /
        FullyConnected / MatMul whose ``runtimePrecision`` is u8 or i8 runs an integer kernel."""
        import collections
        kinds = {"Convolution": "conv", "GroupConvolution": "conv", "Deconvolution": "conv",
                 "FullyConnected": "matmul", "MatMul": "matmul"}
        counts: dict = collections.Counter()
        floats: dict = collections.Counter()
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            rt = op.get_rt_info()
            layer = rt["layerType"].astype(str) if "layerType" in rt else ""
            if layer not in kinds:
                continue
            precision = rt["runtimePrecision"].astype(str) if "runtimePrecision" in rt else ""
            integer = precision in ("u8", "i8")
            counts[(kinds[layer], integer)] += 1
            if not integer:
                floats[f"{layer} {precision}"] += 1
        out = {"source": "OpenVINO's runtime model (CPU)", "float_ops": dict(floats)}
        for kind in ("conv", "matmul"):
            out[kind] = (counts[(kind, True)], counts[(kind, True)] + counts[(kind, False)])
        return out

    def run_flat(self, inputs):
        self.request.infer([t.detach().contiguous().numpy() for t in inputs])
        # the request's output buffers are reused by the next call: copy
        return [torch.from_numpy(self.request.get_output_tensor(i).data.copy())
                for i in range(len(self.compiled.outputs))]

    def save_artifacts(self, directory):
        import openvino as ov
        ov.save_model(self.ov_model, os.path.join(directory, XML), compress_to_fp16=False)
        return [XML, BIN]

    def artifact_size(self) -> int:
        with tempfile.TemporaryDirectory() as d:
            return sum(os.path.getsize(os.path.join(d, f)) for f in self.save_artifacts(d))


def _program_precision(program: Program) -> str:
    from optc.backends.check import compute_dtype
    dtypes = [s.dtype for s in Signature.of(program).outputs if getattr(s, "dtype", None) is not None]
    least = compute_dtype(program, dtypes[0] if dtypes else torch.float32)
    return _PRECISION.get(least, "f32")


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


_UNCONVERTED = re.compile(r"No conversion rule found for operations: ([^\n]+)")
_FAILED = re.compile(r"Conversion is failed for: ([^\n]+)")


def _conversion_failure(exc: BaseException) -> tuple[list[str], str | None, str | None] | None:
    """What OpenVINO's frontend says in its conversion summary: ``(ops, why, node)`` -- the ops it has
    no conversion for (``aten.histc.default``, or ONNX op types on the onnx route; ``why`` None), or
    else the ops it tried and failed to convert (``aten.cat.default``; its own ``SequenceMark`` left
    out) with the last line of the first one's message (``Axis -2 out of the tensor rank range
    [-1, 0].``) and the node it names (``cat_1``); None when the error has no such summary."""
    text = str(exc)
    m = _UNCONVERTED.search(text)
    ops = [op.strip() for op in m.group(1).split(",") if op.strip()] if m else []
    if ops:
        return ops, None, None
    m = _FAILED.search(text)
    ops = [op.strip() for op in m.group(1).split(",") if op.strip() and "." in op] if m else []
    if not ops:
        return None
    start = text.find(f"-- {ops[0]} with a message:")
    block = text[start:].split("\n-- ", 1)[0].split("\n\nSummary", 1)[0] if start >= 0 else ""
    lines = [ln.strip() for ln in block.splitlines()[1:] if ln.strip()]
    node = re.search(r"conversion of operation ([\w.]+)/" + re.escape(ops[0]), block)
    return ops, (lines[-1] if lines else "no reason given"), (node.group(1) if node else None)


def _unconverted_error(ops: list[str], program: Program, route: str, why: str | None = None,
                       node_name: str | None = None) -> LoweringError:
    """A LoweringError naming the ops OpenVINO cannot convert (or, with ``why``, failed to convert),
    and the node of the program OpenVINO names or else the first that calls one of them (its op,
    name and the user's source line)."""
    from optc.backends.base import op_name
    from optc.backends.lowering import _find_node
    from optc.ir.source import node_source
    # OpenVINO writes ``aten.histc.default``; the lowering's node finder reads ``aten::histc.default``
    node = next((n for n in program.graph.nodes if n.name == node_name), None) if node_name else None
    node = node or _find_node(", ".join(op.replace(".", "::", 1) for op in ops), program)
    msg = (f"OpenVINO ({route} route) has no conversion for {', '.join(ops)}" if why is None else
           f"OpenVINO ({route} route) failed to convert {', '.join(ops)}: {why}")
    msg += "" if node is not None else (" (an op torch.export's decompositions made; the program's own ops are "
                                        "all convertible)" if why is None else "")
    if node is None:
        return LoweringError(msg, backend="openvino")
    return LoweringError(msg, backend="openvino", op=op_name(node.target), node=node.name,
                         source=node_source(node))


class OpenVINOBackend(Backend):
    name = "openvino"
    packages = (("openvino", "openvino"),)

    def check_available(self, target: Target) -> None:
        if target.device != "cpu":
            raise BackendUnavailableError(f"openvino: target '{target.device}' is not supported (OpenVINO's GPU "
                                          "device is Intel's; optc lowers to its CPU device only)")
        super().check_available(target)

    def stage(self, program: Program, target: Target) -> list[str]:
        """Decompositions, then every ``optc::`` op as ATen (Q/DQ ops too: the ``onnx`` route
        translates what is left of them itself), then the legalizations: the ONNX exporter's for a
        quantized program (the ``onnx`` route goes through it), OpenVINO's own otherwise."""
        from optc.ir.quant_ops import is_quant_op
        quantized = any(n.op == "call_function" and is_quant_op(n.target) for n in program.graph.nodes)
        return ["decompose{backend=openvino}", "lower-optc-ops",
                "legalize{backend=onnx}" if quantized else "legalize{backend=openvino}"]

    def native_ops(self, target: Target) -> frozenset:
        # the onnx route keeps the ops it has ONNX translations for (Q/DQ); the export route none
        from optc.backends.onnx import onnx_translations
        from optc.ir.quant_ops import is_quant_op
        return frozenset(op for op in onnx_translations() if is_quant_op(op))

    def lower(self, program: Program, target: Target, *, threads: int | None = None, route: str = "auto",
              precision: str | None = None) -> OpenVINOModel:
        """``threads``: OpenVINO's inference threads (default: every core). ``route``: ``"export"``
        (OpenVINO's PyTorch frontend on the ExportedProgram), ``"onnx"`` (optc's ONNX model through
        OpenVINO's ONNX frontend) or ``"auto"`` (onnx for quantized programs, export otherwise).
        ``precision``: ``f32``, ``bf16`` or ``f16`` (default: the dtype the program computes in)."""
        import openvino as ov
        from optc.ir.quant_ops import is_quant_op
        if route not in ROUTES:
            raise LoweringError(f"route must be one of {', '.join(ROUTES)}, got {route!r}", backend=self.name)
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise LoweringError(f"threads must be a positive int, got {threads!r}", backend=self.name)
        if precision is not None and precision not in ("f32", "bf16", "f16"):
            raise LoweringError(f"precision must be f32, bf16 or f16, got {precision!r}", backend=self.name)
        signature = Signature.of(program)
        for s in (*signature.inputs, *signature.outputs):
            if getattr(s, "dtype", None) in (torch.bfloat16,):
                raise LoweringError(f"{s.name} is bfloat16: the OpenVINO backend passes tensors through numpy, "
                                    "which has no bfloat16 (keep the model's inputs and outputs float32: to-half "
                                    "does)", backend=self.name)
        quantized = any(n.op == "call_function" and is_quant_op(n.target) for n in program.graph.nodes)
        if route == "auto":
            route = "onnx" if quantized else "export"
        if route == "export" and quantized:
            raise LoweringError("route='export' cannot lower optc's quantize/dequantize ops (OpenVINO's PyTorch "
                                "frontend does not know them); route='onnx' (the default for a quantized program) "
                                "gives OpenVINO QuantizeLinear/DequantizeLinear, which it runs as INT8 kernels",
                                backend=self.name)
        precision = precision or ("f32" if quantized else _program_precision(program))
        threads = threads or _default_threads()
        ep = export_program(program)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if route == "export":
                    ov_model = ov.convert_model(ep)
                else:
                    ov_model, workdir = self._via_onnx(ep, signature)
            except Exception as e:  # noqa: BLE001 - OpenVINO raises its own OpConversionFailure (a RuntimeError)
                failure = _conversion_failure(e)
                if failure is None:
                    raise
                ops, why, node_name = failure
                raise _unconverted_error(ops, program, route, why=why, node_name=node_name) from e
        options = {"threads": threads, "route": route, "precision": precision}
        try:
            model = OpenVINOModel(ov_model, signature, target, threads=threads, precision=precision,
                                  backend_options=options)
            if route == "export":
                # convert_model(ExportedProgram) shares the program's weight memory (no copy): the
                # compiled model keeps those tensors alive, or a weight only the program held (a
                # folded or converted one) is freed under it once optc.compile releases the program
                model._shared_weights = list(ep.state_dict.values()) + list(ep.constants.values())
        except BaseException:
            if route == "onnx":
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        if route == "onnx":   # OpenVINO may read the ONNX weights lazily: the folder lives as long as the model
            weakref.finalize(model, shutil.rmtree, workdir, True)
        return model

    def _via_onnx(self, ep, signature: Signature):
        import openvino as ov
        from optc.backends.onnx import OPSET, _export
        onnx_program = _export(ep, OPSET, [s.name for s in signature.inputs],
                               [f"output_{i}" for i in range(len(signature.outputs))], True)
        workdir = tempfile.mkdtemp(prefix="optc-openvino-")
        try:
            path = os.path.join(workdir, "model.onnx")
            onnx_program.save(path, external_data=True)
            return ov.convert_model(path), workdir
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise

    def load(self, directory: str, manifest: dict) -> OpenVINOModel:
        import openvino as ov
        options = dict(manifest.get("options", {}))
        path = os.path.join(directory, XML)
        try:
            ov_model = ov.Core().read_model(path)
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError for a malformed IR
            raise ArtifactError(f"{directory}: cannot read '{XML}': {str(e).strip().splitlines()[0]}") from e
        return OpenVINOModel(ov_model, signature_from_manifest(manifest), target_from_manifest(manifest),
                             threads=options.get("threads") or _default_threads(),
                             precision=options.get("precision", "f32"), pipeline=manifest.get("pipeline", ""),
                             backend_options=options)
