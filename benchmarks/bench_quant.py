"""INT8 and BF16 on CPU: optc's programs against ONNX Runtime's and OpenVINO's own routes, in one process.

    python benchmarks/bench_quant.py [--models resnet50 mobilenet_v2 bert llama_0_5b] [--runs 30] [--threads 2]
                                     [--calibration 16] [--eval 8] [--torchscript] [--tvm] [--openvino] [--half]
                                     [--issue-table] [--llama-layers 30] [--skip LABEL ...] [--json FILE]

For each model (full size, batch 1: the zoo's ``resnet50``, ``mobilenet_v2``, ``bert``, and
``llama_0_5b``, bench_real_models.py's builder -- a Llama decoder shaped like Qwen2-0.5B's, 30
layers (``--llama-layers``), 0.48 B parameters, 128 tokens), from the same float32 model and the
same calibration data (``--calibration`` random inputs, ``random_inputs_like`` seeds 1..N: standard
normal images, token ids within the example's range):

``ort fp32``
    plain ONNX Runtime: ``torch.onnx.export(dynamo=True)`` of the eager model, ORT_ENABLE_ALL
    (the reference of every ratio);
``ort int8 (quantize_static)``
    ``onnxruntime.quantization.quantize_static`` on that same ONNX file after its
    ``quant_pre_process``: QDQ format, per-channel int8 weights, uint8 activations (ORT's fast x86
    setting: its signed x signed int8 kernels have no fast path), MinMax calibration on the same
    samples;
``optc fp32``
    ``optc.compile(backend="onnx")`` with the default pipeline (the float32 graph optimisations
    alone, for scale);
``optc int8``
    ``optc.compile(backend="onnx", pipeline="default,insert-qdq{...}", calibration_data=...)``
    (``--optc-pipeline`` to change it);
``optc fp32, no SkipLayerNorm`` / ``optc int8, with SkipLayerNorm`` (models with a layer norm)
    ONNX Runtime 1.32's CPU SkipLayerNormalization kernel is 8-15x slower than the Add +
    LayerNormalization it fuses; the ONNX backend leaves it out of quantized programs by default
    (``ort_disabled_optimizers``, ``ort_fusions``) and not of float ones: each the other way too;
``--openvino``
    OpenVINO with its defaults (``convert_model`` + ``compile_model``, its own precision choice;
    where ``convert_model(module)`` fails -- Llama: its TorchScript frontend has no ``aten::diff`` --
    ``convert_model`` of ``torch.export.export``'s program, noted), OpenVINO + NNCF's INT8
    (``nncf.quantize`` on the same calibration samples), and optc's INT8 program on optc's
    OpenVINO backend;
``--torchscript`` / ``--tvm``
    optc's float32 and INT8 programs on those backends: they lower Q/DQ natively but run conv /
    matmul in float32 on dequantized values (no integer kernels), so they are timed to show it;
``--half``
    ``to-half{dtype=float16|bfloat16}`` on ONNX Runtime (and TorchScript with ``--torchscript``),
    each also as a ratio against its own backend's float32 (bfloat16 on ONNX is refused by optc
    for the CPU: the row says why).

``--issue-table`` (with no ``--models``: all four models) turns on the issue's whole table:
``eager`` (the torch model called directly, under ``no_grad``), ``--openvino``, ``--torchscript``
and every optc backend at float32, bfloat16 (``default,to-half{dtype=bfloat16}``) and int8 where it
runs them -- onnx fp32 / int8 (bf16: optc refuses it at pipeline-build time, printed as the row's
note), torchscript fp32 / bf16 / int8, openvino fp32 (``optc fp32 (openvino)``: ``default`` on
optc's OpenVINO backend, which pins ``INFERENCE_PRECISION_HINT`` to f32) / bf16 / int8, and with
``--tvm`` also tvm fp32 / int8 (TVM has no bfloat16 kernels: noted). Then, per model, a targets
block, each from paired per-round ratios (median, 95% CI; never ratios of ratios), printed "met" /
"NOT met", with "not significant" where the CI contains the bar:

- best optc bf16 route / ``openvino (defaults)`` <= 0.8, with that route's cosine >= 0.999;
- best optc int8 route / ``ort fp32`` <= 0.30 on resnet50 and <= 0.25 on bert (the other two
  printed only), and best optc int8 route / ``openvino int8 (nncf.quantize)`` <= 0.85, each with a
  cosine >= max(NNCF's, quantize_static's);
- ``optc fp32 (openvino)`` / ``openvino (defaults)`` <= 1.0, and / ``openvino (f32)`` (OpenVINO with
  ``INFERENCE_PRECISION_HINT=f32``, a baseline of ``--issue-table``): OpenVINO's default runs bf16
  wherever the CPU has bf16 instructions, optc's OpenVINO backend keeps a float32 program in f32,
  so only the second compares the same arithmetic.

The "best route" is the fastest of the routes that meet the cosine condition (the fastest of all
when none does: then NOT met on its cosine). Also printed: whether the CPU has AMX (its
``amx*`` flags in /proc/cpuinfo) and the precision each OpenVINO compiled model runs in
(``INFERENCE_PRECISION_HINT``: OpenVINO's default picks bf16 on CPUs with AMX or AVX512-BF16).

``llama_0_5b``: every candidate holds its own copy of the ~1.9 GB of weights, so it runs eager,
ort fp32, ort int8 (quantize_static; ONNX files with external data), optc fp32 / int8 (onnx),
torchscript fp32 / bf16, openvino (defaults), openvino int8 (nncf.quantize), optc openvino fp32 /
bf16 / int8 -- not torchscript int8 (float kernels) nor TVM (``LARGE_DROPPED``); the OpenVINO model
optc keeps for ``save()`` is released after compiling. Extrapolated from 2- and 6-layer runs, the
peak is about 19 GB of a 24 GB machine; ``--skip LABEL ...`` leaves out more. A candidate that cannot
be built (or fails when run) is printed with the reason and the rest goes on.

Every candidate is timed interleaved in one process (``optc.tools.bench.interleaved``: random
order each round, 200 ms pause before each call), as the median of per-round ratios against ORT
fp32 with a 95% confidence interval of that median; accuracy is the cosine of each output (all
outputs flattened) against eager float32 on ``--eval`` held-out random inputs (seeds 1000..),
mean and minimum. Also printed: which integer kernels ONNX Runtime really runs (its optimised
graph, ``SessionOptions.optimized_model_filepath``), build seconds and the process's RSS after each
build, the machine (lscpu) and the load average at the start and the end; ``--json`` writes all of
it (with each candidate's per-round times, the targets, the AMX flags and OpenVINO's precisions).
The bars of the first INT8 issue: optc int8 <= 0.33x ORT fp32 on ResNet-50 and <= 0.40x on
BERT-base with a cosine at least ORT's quantizer's; MobileNetV2 cosine >= 0.99.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import gc
import importlib.metadata
import io
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.utils._pytree as pytree

import optc
from optc.ir.verifier import random_inputs_like
from optc.tools import bench, zoo
from optc.tools.bench.report import _loadavg

BARS = {"resnet50": 0.33, "bert": 0.40}
COSINE_BAR = {"mobilenet_v2": 0.99}
# --issue-table's targets (each a paired ratio: median of per-round ratios, 95% CI)
TARGET_BF16_OV = 0.8              # best optc bf16 route / OpenVINO (defaults), with cosine >= BF16_COSINE
BF16_COSINE = 0.999
TARGET_INT8_ORT = {"resnet50": 0.30, "bert": 0.25}   # best optc int8 route / ORT fp32 (others: printed only)
TARGET_INT8_NNCF = 0.85           # best optc int8 route / OpenVINO + NNCF INT8
TARGET_FP32_OV = 1.0              # optc fp32 on OpenVINO / OpenVINO (defaults)
ORT_FP32, ORT_Q = "ort fp32", "ort int8 (quantize_static)"
OV_DEFAULT, OV_NNCF = "openvino (defaults)", "openvino int8 (nncf.quantize)"
OV_F32 = "openvino (f32)"     # OpenVINO with INFERENCE_PRECISION_HINT=f32: what an fp32 program is compared with
BF16_PIPELINE = "default,to-half{dtype=bfloat16}"
BF16_ROUTES = ("torchscript bfloat16", "optc bfloat16 (openvino)", "optc bfloat16 (onnx)")
INT8_ROUTES = ("optc int8", "optc int8, with SkipLayerNorm", "optc int8 (openvino)",
               "torchscript int8 (float kernels)", "tvm int8 (float kernels)")
LLAMA, LLAMA_SEQ = "llama_0_5b", 128
LLAMA_LAYERS = 30                 # bench_real_models.py's default: 0.48 B parameters
#: models whose every candidate holds a ~1.9 GB copy of the weights: ONNX files with external data,
#: ORT's calibrator folding its intermediate outputs every sample, no TVM
LARGE = {LLAMA}
#: candidates left out for LARGE models (the rest fit in 24 GB together with the eager model)
LARGE_DROPPED = {
    "torchscript int8 (float kernels)": "float kernels on dequantized weights (several times ORT fp32 on the "
                                        "other models) and one more copy of the weights",
    "tvm fp32": "TVM's build time and one more copy of the weights",
    "tvm int8 (float kernels)": "TVM's build time and one more copy of the weights",
}
INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
               "MatMulInteger", "QLinearAdd", "QLinearMul", "QLinearSoftmax", "QLinearAveragePool",
               "QLinearGlobalAveragePool", "QLinearConcat", "NhwcMaxPool")
FLOAT_OPS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "MatMulNBits")


@contextlib.contextmanager
def quiet():
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def flat(out) -> torch.Tensor:
    return torch.cat([t.detach().float().reshape(-1) for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)])


def cosine(a, b) -> float:
    a, b = flat(a).double(), flat(b).double()
    return float(a @ b / (a.norm() * b.norm()))


def session(path_or_bytes, threads: int, optimized_path: str | None = None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if optimized_path:
        so.optimized_model_filepath = optimized_path
        # a model with external data: the optimised one gets its own data file (else ORT points it
        # at the original's, relative to the wrong folder)
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    os.path.basename(optimized_path) + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])


def ort_runner(sess):
    names = [i.name for i in sess.get_inputs()]

    def run(args, kwargs):
        tensors = [t for t in pytree.tree_leaves((tuple(args), dict(kwargs))) if isinstance(t, torch.Tensor)]
        feed = {n: t.detach().contiguous().numpy() for n, t in zip(names, tensors)}
        return [torch.from_numpy(v) for v in sess.run(None, feed)]
    return run


def ops_run(model, threads: int, workdir: str, tag: str) -> collections.Counter:
    """Op types of the graph ONNX Runtime runs for ``model`` (bytes or a path)."""
    import onnx
    path = os.path.join(workdir, f"{tag}.optimized.onnx")
    with quiet():
        session(model, threads, optimized_path=path)
    return collections.Counter(n.op_type for n in onnx.load(path, load_external_data=False).graph.node)


def kernel_summary(ops: collections.Counter) -> str:
    ints = ", ".join(f"{k} {ops[k]}" for k in INTEGER_OPS if ops[k])
    floats = ", ".join(f"{k} {ops[k]}" for k in FLOAT_OPS if ops[k])
    return f"integer: {ints or '-'}; float: {floats or '-'}"


class Reader:
    """onnxruntime.quantization.CalibrationDataReader over the calibration samples."""

    def __init__(self, names, samples):
        self.names, self.it = names, iter(samples)

    def get_next(self):
        s = next(self.it, None)
        if s is None:
            return None
        tensors = [t for t in pytree.tree_leaves(s) if isinstance(t, torch.Tensor)]
        return {n: t.numpy() for n, t in zip(self.names, tensors)}


def rss_gb(key: str = "VmRSS") -> float | None:
    """This process's resident memory (``VmRSS``) or its peak (``VmHWM``), in GB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


def release() -> None:
    """Collect garbage and give freed heap back to the system (the next build's RSS is then its own)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_amx() -> list[str]:
    """The AMX flags of this CPU (``grep -o 'amx[a-z_]*' /proc/cpuinfo``); empty: no AMX."""
    try:
        with open("/proc/cpuinfo") as f:
            return sorted(set(re.findall(r"\bamx[a-z_0-9]*", f.read())))
    except OSError:
        return []


def ov_precision(compiled_ov) -> str:
    """The precision an OpenVINO compiled model runs in (``INFERENCE_PRECISION_HINT``: f32, bf16, f16)."""
    p = compiled_ov.get_property("INFERENCE_PRECISION_HINT")
    return p.get_type_name() if hasattr(p, "get_type_name") else str(p)


def load_model(name: str, args: argparse.Namespace):
    """A zoo model, or ``llama_0_5b`` from bench_real_models.py (its builder, ``--llama-layers``
    layers, 128 tokens)."""
    if name != LLAMA:
        return zoo.load(name)
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import bench_real_models
    bench_real_models.LLAMA_LAYERS = args.llama_layers
    return bench_real_models.llama_0_5b(LLAMA_SEQ)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def bench_model(name: str, args: argparse.Namespace, workdir: str) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    threads = args.threads
    large = name in LARGE
    issue = args.issue_table
    skip = set(args.skip or ())
    torch.manual_seed(0)
    model, inputs = load_model(name, args)
    res = {"model": name, "params": sum(p.numel() for p in model.parameters()), "candidates": {}, "kernels": {},
           "build_s": {}, "notes": {}, "rss_gb": {"model loaded": rss_gb()}, "precision": {}}
    program = optc.capture(model, inputs)
    calib = [random_inputs_like(program, seed=s) for s in range(1, args.calibration + 1)]
    evals = [random_inputs_like(program, seed=1000 + s) for s in range(args.eval)]
    ex_args, ex_kwargs = program.example_args, program.example_kwargs
    has_layer_norm = any(n.target is torch.ops.aten.layer_norm.default for n in program.graph.nodes)
    del program       # only the inputs were needed: each optc candidate captures the model itself
    release()
    with torch.no_grad():
        refs = [model(*a, **k) for a, k in evals]
    runners: dict[str, callable] = {}

    def say(msg):
        print(f"  [{name}] {msg}", file=sys.stderr, flush=True)

    def note(label, text):
        res["notes"][label] = text
        say(f"{label}: {text}")

    def attempt(label, build) -> bool:
        """``build()`` returns the candidate's runner ``(args, kwargs) -> outputs``; a failure is
        noted (the row says why) and the rest goes on."""
        if label in skip:
            note(label, "skipped (--skip)")
            return False
        if large and label in LARGE_DROPPED:
            note(label, f"not built for {name}: {LARGE_DROPPED[label]}")
            return False
        say(f"building {label}")
        t0 = time.perf_counter()
        try:
            run = build()
        except Exception as e:  # noqa: BLE001 -- one candidate that cannot be built does not stop the table
            note(label, f"not timed: {first_line(e)}")
            release()
            return False
        runners[label] = run
        res["build_s"][label] = time.perf_counter() - t0
        release()
        res["rss_gb"][label] = rss_gb()
        return True

    # ---- eager -------------------------------------------------------------------------------------
    if issue:
        def eager(a, k):
            with torch.no_grad():
                return model(*a, **k)
        attempt("eager", lambda: eager)

    # ---- ORT fp32 and ORT's quantizer, on one float32 ONNX file ------------------------------------
    fp32_path = os.path.join(workdir, f"{name}.fp32.onnx")
    onnx_inputs: list[str] = []

    def build_ort_fp32():
        with quiet():
            exported = torch.onnx.export(model, tuple(ex_args), kwargs=dict(ex_kwargs) or None, dynamo=True,
                                         verbose=False)
        # large models: weights in a side file (quant_pre_process and quantize_static then keep them there)
        exported.save(fp32_path, external_data=True if large else None)
        del exported
        sess = session(fp32_path, threads)
        onnx_inputs.extend(i.name for i in sess.get_inputs())
        return ort_runner(sess)
    attempt(ORT_FP32, build_ort_fp32)

    pre_path, q_path = os.path.join(workdir, f"{name}.pre.onnx"), os.path.join(workdir, f"{name}.ortq.onnx")

    def build_ort_int8():
        if not onnx_inputs:
            raise RuntimeError("no float32 ONNX file (ort fp32 was not built)")
        ext = {"save_as_external_data": True, "all_tensors_to_one_file": True,
               "external_data_location": os.path.basename(pre_path) + ".data"} if large else {}
        t0 = time.perf_counter()
        try:
            with quiet():
                quant_pre_process(fp32_path, pre_path, **ext)
            src = pre_path
        except Exception as e:  # noqa: BLE001 -- the preprocessing is ORT's recommendation, not a requirement
            say(f"quant_pre_process failed ({first_line(e)}); quantizing the exported file directly")
            res["notes"]["quant_pre_process"] = f"failed ({first_line(e)}): quantize_static on the exported file"
            src = fp32_path
        res["build_s"]["quant_pre_process"] = time.perf_counter() - t0
        # MinMax calibration keeps only each tensor's ReduceMin / ReduceMax per sample (scalars): no
        # memory to save there (and ORT 1.32's CalibMaxIntermediateOutputs drops the samples it
        # should fold in: "No data is collected")
        with quiet():
            quantize_static(src, q_path, Reader(onnx_inputs, calib), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=large)
        return ort_runner(session(q_path, threads))
    if attempt(ORT_Q, build_ort_int8):
        try:
            res["kernels"][ORT_Q] = ops_run(q_path, threads, workdir, f"{name}.ortq")
        except Exception as e:  # noqa: BLE001
            note(f"kernels of {ORT_Q}", f"not read: {first_line(e)}")

    # ---- optc --------------------------------------------------------------------------------------
    def optc_candidate(label, backend, pipeline, data=None, **opts):
        box = {}

        def build():
            with quiet():
                compiled, report = optc.compile(model, tuple(ex_args), example_kwargs=dict(ex_kwargs) or None,
                                                backend=backend, pipeline=pipeline, calibration_data=data, **opts)
            box["compiled"] = compiled
            if report.quantization is not None:
                rep = report.quantization
                box["quant"] = {"layers": len(rep.layers), "output_sqnr_db": rep.output_sqnr_db,
                                "worst": [(la.node, la.module, la.sqnr_db) for la in rep.worst(3)]}
            return lambda a, k, c=compiled: c(*a, **k)
        attempt(label, build)
        return box.get("compiled"), box.get("quant")

    def onnx_source(compiled):
        return compiled.model_bytes if compiled.model_bytes is not None else \
            os.path.join(compiled.model_dir, "model.onnx")

    optc_candidate("optc fp32", "onnx", "default", threads=threads)
    compiled, quant = optc_candidate("optc int8", "onnx", args.optc_pipeline, calib, threads=threads)
    if compiled is not None:
        try:
            res["kernels"]["optc int8"] = ops_run(onnx_source(compiled), threads, workdir, f"{name}.optc")
        except Exception as e:  # noqa: BLE001
            note("kernels of optc int8", f"not read: {first_line(e)}")
    if quant is not None:
        res["optc_report"] = quant
    del compiled
    if has_layer_norm:
        # ONNX Runtime 1.32's CPU SkipLayerNormalization is 8-15x slower than Add + LayerNormalization
        # here; the ONNX backend leaves it out of quantized programs by default, not of float ones:
        # both programs both ways
        noskip = {"ort_fusions": False, "ort_disabled_optimizers": ("SkipLayerNormFusion",)}
        skip_ln = {"ort_fusions": "auto", "ort_disabled_optimizers": ()}
        optc_candidate("optc fp32, no SkipLayerNorm", "onnx", "default", threads=threads, **noskip)
        optc_candidate("optc int8, with SkipLayerNorm", "onnx", args.optc_pipeline, calib, threads=threads, **skip_ln)
    if issue or args.half:
        # refused by optc when the pipeline is built (before the capture): a row note, not a timing
        optc_candidate("optc bfloat16 (onnx)", "onnx", BF16_PIPELINE, threads=threads)
    if args.torchscript:
        optc_candidate("torchscript fp32", "torchscript", "default")
        if issue or args.half:
            optc_candidate("torchscript bfloat16", "torchscript", BF16_PIPELINE)
        optc_candidate("torchscript int8 (float kernels)", "torchscript", args.optc_pipeline, calib)
    if args.openvino:
        # OpenVINO as its users run it: convert_model + compile_model with its defaults (its own
        # precision choice), and NNCF's post-training INT8 (nncf.quantize) on the same calibration
        # samples; then optc's programs on the OpenVINO backend
        import nncf
        import openvino as ov
        leaves = [[t.detach().numpy() for t in pytree.tree_leaves((a, k)) if isinstance(t, torch.Tensor)]
                  for a, k in calib]
        core = ov.Core()
        ov_models = {}

        def ov_runner(compiled_ov):
            request = compiled_ov.create_infer_request()
            n_out = len(compiled_ov.outputs)

            def run(a, k):
                request.infer([t.detach().contiguous().numpy() for t in pytree.tree_leaves((a, k))
                               if isinstance(t, torch.Tensor)])
                return [torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(n_out)]
            return run

        def build_ov_default():
            try:
                with quiet():
                    ov_models["fp32"] = ov.convert_model(model, example_input=tuple(ex_args))
            except Exception as e:  # noqa: BLE001
                # convert_model traces the module with TorchScript, whose frontend lacks some ops
                # (aten::diff in transformers' mask code, on Llama); its torch.export route is the
                # other way OpenVINO documents
                why = str(e).split("No conversion rule found for operations:")[-1].strip().splitlines()[0] \
                    if "No conversion rule found" in str(e) else first_line(e)
                note(f"{OV_DEFAULT}: conversion", f"convert_model(ExportedProgram): convert_model(module) failed "
                     f"({why})")
                with quiet():
                    ov_models["fp32"] = ov.convert_model(
                        torch.export.export(model, tuple(ex_args), dict(ex_kwargs) or None))
            compiled_ov = core.compile_model(ov_models["fp32"], "CPU", {"INFERENCE_NUM_THREADS": threads})
            res["precision"][OV_DEFAULT] = ov_precision(compiled_ov)
            return ov_runner(compiled_ov)

        def build_nncf():
            if "fp32" not in ov_models:
                raise RuntimeError("no OpenVINO model (openvino (defaults) was not built)")
            with quiet():
                q_model = nncf.quantize(ov_models["fp32"], nncf.Dataset(leaves), subset_size=len(leaves))
            compiled_q = core.compile_model(q_model, "CPU", {"INFERENCE_NUM_THREADS": threads})
            res["precision"][OV_NNCF] = ov_precision(compiled_q)
            return ov_runner(compiled_q)
        def build_ov_f32():
            if "fp32" not in ov_models:
                raise RuntimeError("no OpenVINO model (openvino (defaults) was not built)")
            compiled = core.compile_model(ov_models["fp32"], "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                                     "INFERENCE_PRECISION_HINT": "f32"})
            res["precision"][OV_F32] = ov_precision(compiled)
            return ov_runner(compiled)
        attempt(OV_DEFAULT, build_ov_default)
        if issue:
            attempt(OV_F32, build_ov_f32)
        attempt(OV_NNCF, build_nncf)
        ov_models.clear()     # the compiled models hold what they run
        release()
        ov_routes = [("optc int8 (openvino)", args.optc_pipeline, calib)]
        if issue:
            ov_routes = [("optc fp32 (openvino)", "default", None), ("optc bfloat16 (openvino)", BF16_PIPELINE, None),
                         *ov_routes]
        for label, pipeline, data in ov_routes:
            compiled, _ = optc_candidate(label, "openvino", pipeline, data, threads=threads)
            if compiled is not None:
                res["precision"][label] = ov_precision(compiled.compiled)
                if data is not None:
                    res.setdefault("integer_coverage", {})[label] = compiled.integer_coverage()
                if large:
                    # the OpenVINO model kept for save() is one more copy of the weights; the
                    # compiled model (what runs) holds its own
                    compiled.ov_model = None
                    release()
                    res["rss_gb"][label] = rss_gb()
            del compiled
    if args.tvm:
        optc_candidate("tvm fp32", "tvm", "default", threads=threads)
        if issue:
            note("tvm bfloat16", "not built: TVM has no bfloat16 kernels (optc's TVM backend runs float32 / int8)")
        optc_candidate("tvm int8 (float kernels)", "tvm", args.optc_pipeline, calib, threads=threads)
    slow = {}
    if args.half:
        optc_candidate("optc float16 (onnx)", "onnx", "default,to-half{dtype=float16}", threads=threads)
        if args.torchscript:
            # torch's CPU float16 conv / matmul are not vectorised here (no AVX512-FP16): seconds per
            # call, so three calls outside the interleaved rounds
            optc_candidate("torchscript float16", "torchscript", "default,to-half{dtype=float16}")
            if "torchscript float16" in runners:
                slow["torchscript float16"] = runners.pop("torchscript float16")
    res["rss_gb"]["peak (all built)"] = rss_gb("VmHWM")

    # ---- accuracy on held-out inputs, then interleaved timing -------------------------------------
    for label, run in list(runners.items()):
        try:
            with torch.no_grad():
                cos = [cosine(run(a, k), r) for (a, k), r in zip(evals, refs)]
        except Exception as e:  # noqa: BLE001
            note(label, f"not timed: failed on the evaluation inputs: {first_line(e)}")
            del runners[label]
            continue
        res["candidates"][label] = {"cosine_mean": statistics.fmean(cos), "cosine_min": min(cos)}
    for label, run in slow.items():
        with torch.no_grad():
            cos = [cosine(run(a, k), r) for (a, k), r in zip(evals[:2], refs[:2])]
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                run(ex_args, ex_kwargs)
                ts.append(time.perf_counter() - t0)
        res["slow"] = {label: {"ms": statistics.median(ts) * 1e3, "cosine_mean": statistics.fmean(cos)}}
    fns = {label: (lambda run=run: run(ex_args, ex_kwargs)) for label, run in runners.items()}
    say(f"timing {len(fns)} candidates interleaved, {args.runs} rounds")
    errors: dict[str, BaseException] = {}
    times = bench.interleaved(fns, runs=args.runs, warmup=args.warmup, pause_s=bench.DEFAULT_PAUSE_MS / 1e3,
                              errors=errors)
    for label, e in errors.items():
        note(label, f"dropped from the timing: {first_line(e)}")
        res["candidates"].pop(label, None)
    times = {label: ts for label, ts in times.items() if ts}
    for label in times:
        c = res["candidates"][label]
        c["ms"] = statistics.median(times[label]) * 1e3
        c["times_s"] = times[label]
        c["ratio"], c["ratio_ci"] = paired(times, label, ORT_FP32) or (float("nan"), (float("nan"), float("nan")))
    # same-backend ratios: INT8 and half against their own backend's float32
    own = [("torchscript fp32", "torchscript int8 (float kernels)"), ("tvm fp32", "tvm int8 (float kernels)"),
           ("optc fp32", "optc float16 (onnx)"), ("optc fp32", "optc bfloat16 (onnx)"),
           ("torchscript fp32", "torchscript float16"), ("torchscript fp32", "torchscript bfloat16"),
           ("optc fp32 (openvino)", "optc bfloat16 (openvino)"), ("optc fp32 (openvino)", "optc int8 (openvino)")]
    for fp, q in own:
        r = paired(times, q, fp)
        if r:
            res["candidates"][q]["ratio_vs_own_fp32"] = r[0]
    res["targets"] = targets(name, res, times)
    runners.clear()
    fns.clear()
    release()
    return res


def paired(times: dict, label: str, ref: str):
    """The median of ``label``'s per-round time / ``ref``'s and its 95% CI; None without both."""
    if not times.get(label) or not times.get(ref):
        return None
    r = bench.paired_ratios(times[label], times[ref])
    return statistics.median(r), bench.median_ci(r)


def targets(name: str, res: dict, times: dict) -> list[dict]:
    """The issue's targets, from paired per-round ratios (never ratios of ratios). For a "best
    route" target the route is the fastest among those meeting the cosine condition (the fastest
    of all when none does, which then fails on its cosine)."""
    cands = res["candidates"]

    def cos(label):
        return cands[label]["cosine_mean"] if label in cands else None

    def one(title, routes, ref, bar, cos_bar=None, cos_why=""):
        row = {"target": title, "ref": ref, "bar": bar, "cosine_bar": cos_bar, "route": None, "ratio": None,
               "ci": None, "cosine": None, "others": {}}
        measured = {r: paired(times, r, ref) for r in routes if r in cands}
        measured = {r: v for r, v in measured.items() if v}
        if not measured:
            missing = ref if not times.get(ref) else "no route"
            why = res["notes"].get(ref, "") if missing == ref else ""
            row["verdict"] = f"not measured ({missing} timed: none{'; ' + why if why else ''})" \
                if missing == ref else "not measured (no route timed)"
            return row
        ok_cos = [r for r in measured if cos_bar is None or cos(r) >= cos_bar]
        best = min(ok_cos or measured, key=lambda r: measured[r][0])
        ratio, (lo, hi) = measured[best]
        row.update(route=best, ratio=ratio, ci=(lo, hi), cosine=cos(best),
                   others={r: v[0] for r, v in measured.items() if r != best})
        if cos_bar is not None and cos(best) < cos_bar:
            row["verdict"] = f"NOT met (cosine {cos(best):.5f} < {cos_bar:.5f}{cos_why})"
        elif bar is None:
            row["verdict"] = "no bar for this model (printed only)"
        else:
            row["verdict"] = "met" if ratio <= bar else "NOT met"
            if lo <= bar <= hi:
                row["verdict"] += " (not significant: the 95% CI contains the bar)"
        return row

    rows = [one(f"best optc bf16 route / {OV_DEFAULT} <= {TARGET_BF16_OV}, cosine >= {BF16_COSINE}",
                BF16_ROUTES, OV_DEFAULT, TARGET_BF16_OV, BF16_COSINE)]
    q_refs = [r for r in (OV_NNCF, ORT_Q) if r in cands]
    cos_bar = max((cos(r) for r in q_refs), default=None)
    cos_why = f", max of {' and '.join(q_refs)}" if q_refs else ""
    bar = TARGET_INT8_ORT.get(name)
    rows.append(one(f"best optc int8 route / {ORT_FP32} <= {bar if bar is not None else '(no bar)'}, cosine >= "
                    f"max(NNCF's, quantize_static's)", INT8_ROUTES, ORT_FP32, bar, cos_bar, cos_why))
    rows.append(one(f"best optc int8 route / {OV_NNCF} <= {TARGET_INT8_NNCF}, cosine >= max(NNCF's, "
                    f"quantize_static's)", INT8_ROUTES, OV_NNCF, TARGET_INT8_NNCF, cos_bar, cos_why))
    rows.append(one(f"optc fp32 (openvino) / {OV_DEFAULT} <= {TARGET_FP32_OV}", ("optc fp32 (openvino)",),
                    OV_DEFAULT, TARGET_FP32_OV))
    if OV_F32 in cands:    # the same precision: do optc's passes make OpenVINO slower?
        rows.append(one(f"optc fp32 (openvino) / {OV_F32} <= {TARGET_FP32_OV}", ("optc fp32 (openvino)",),
                        OV_F32, TARGET_FP32_OV))
    return rows


def format_result(res: dict, amx: list[str]) -> str:
    name = res["model"]
    lines = [f"\n== {name} (batch 1, {res['params'] / 1e6:.0f} M parameters) ==",
             f"{'candidate':<34}{'ms':>9}{'x ORT fp32':>12}{'95% CI':>16}{'cos mean':>11}{'cos min':>10}"]
    for label, c in res["candidates"].items():
        if "ms" not in c:
            continue
        lo, hi = c["ratio_ci"]
        own = f"  ({c['ratio_vs_own_fp32']:.2f}x its backend's fp32)" if "ratio_vs_own_fp32" in c else ""
        prec = f"  [OpenVINO precision hint {res['precision'][label]}]" if label in res["precision"] else ""
        lines.append(f"{label:<34}{c['ms']:>9.2f}{c['ratio']:>12.3f}{f'{lo:.3f}-{hi:.3f}':>16}"
                     f"{c['cosine_mean']:>11.5f}{c['cosine_min']:>10.5f}{own}{prec}")
    for label, c in res.get("slow", {}).items():
        lines.append(f"{label:<34}{c['ms']:>9.0f}  (3 calls, not interleaved)         {c['cosine_mean']:>11.5f}")
    for label, text in res["notes"].items():
        lines.append(f"{label:<34}  {text}")
    for label, ops in res["kernels"].items():
        lines.append(f"ORT runs for {label}: {kernel_summary(ops)}")
    rep = res.get("optc_report")
    if rep:
        lines.append(f"optc report: {rep['layers']} quantized layers, output SQNR {rep['output_sqnr_db']:.1f} dB; "
                     "worst: " + ", ".join(f"{n} ({m}) {db:.1f} dB" for n, m, db in rep["worst"]))
    for label, cov in res.get("integer_coverage", {}).items():
        lines.append(f"integer kernels of {label}: conv {cov['conv'][0]}/{cov['conv'][1]}, "
                     f"matmul {cov['matmul'][0]}/{cov['matmul'][1]}")
    lines.append("build s: " + ", ".join(f"{k} {v:.1f}" for k, v in res["build_s"].items()))
    lines.append("RSS GB after each build: " + ", ".join(f"{k} {v:.2f}" for k, v in res["rss_gb"].items()
                                                         if v is not None))
    cands = res["candidates"]
    ortq = cands.get(ORT_Q)
    if name in BARS and ortq:
        for label in ("optc int8", "optc int8, with SkipLayerNorm"):
            if label not in cands or "ms" not in cands[label]:
                continue
            c = cands[label]
            ok = c["ratio"] <= BARS[name] and c["cosine_mean"] >= ortq["cosine_mean"]
            lines.append(f"bar ({label}): <= {BARS[name]}x ORT fp32 and cosine >= ORT quantizer's "
                         f"({c['ratio']:.3f}x, {c['cosine_mean']:.5f} vs {ortq['cosine_mean']:.5f}): "
                         f"{'met' if ok else 'NOT met'}")
    if name in COSINE_BAR and "optc int8" in cands:
        c = cands["optc int8"]
        ok = c["cosine_mean"] >= COSINE_BAR[name]
        lines.append(f"bar: optc int8 cosine >= {COSINE_BAR[name]} ({c['cosine_mean']:.5f}): "
                     f"{'met' if ok else 'NOT met'}")
    lines.append(f"targets ({name}; CPU AMX: {', '.join(amx) if amx else 'none'}; OpenVINO default precision: "
                 f"{res['precision'].get(OV_DEFAULT, 'not measured')}):")
    for t in res.get("targets", []):
        if t["route"] is None:
            lines.append(f"  {t['target']}: {t['verdict']}")
            continue
        lo, hi = t["ci"]
        others = ", ".join(f"{r} {v:.3f}" for r, v in t["others"].items())
        lines.append(f"  {t['target']}: {t['route']} {t['ratio']:.3f}x [{lo:.3f}, {hi:.3f}], cosine "
                     f"{t['cosine']:.5f}: {t['verdict']}" + (f"  (other routes: {others})" if others else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=None,
                    help="zoo names or llama_0_5b (default: resnet50 mobilenet_v2 bert, and llama_0_5b with "
                         "--issue-table)")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calibration", type=int, default=16, help="random calibration inputs (both quantizers)")
    ap.add_argument("--eval", type=int, default=8, help="held-out random inputs for the cosine")
    ap.add_argument("--optc-pipeline", default="default,insert-qdq")
    ap.add_argument("--torchscript", action="store_true", help="also time optc's TorchScript fp32 and INT8")
    ap.add_argument("--tvm", action="store_true", help="also time optc's TVM fp32 and INT8 (slow to build)")
    ap.add_argument("--openvino", action="store_true",
                    help="also OpenVINO (defaults), OpenVINO + NNCF INT8 and optc INT8 on OpenVINO")
    ap.add_argument("--half", action="store_true", help="also time to-half (float16, bfloat16) on ONNX Runtime "
                    "(and TorchScript with --torchscript)")
    ap.add_argument("--issue-table", action="store_true",
                    help="every candidate of the issue's table (eager, --openvino, --torchscript, optc fp32 / "
                         "bf16 / int8 on each backend; TVM only with --tvm) and the targets")
    ap.add_argument("--llama-layers", type=int, default=LLAMA_LAYERS,
                    help=f"layers of llama_0_5b (default {LLAMA_LAYERS}, as bench_real_models.py; a smoke run: 2)")
    ap.add_argument("--skip", nargs="+", metavar="LABEL", help="candidates (row labels) not to build")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)
    if args.issue_table:
        args.openvino = args.torchscript = True
    if args.models is None:
        args.models = ["resnet50", "mobilenet_v2", "bert"] + ([LLAMA] if args.issue_table else [])
    torch.set_num_threads(args.threads)
    machine = bench.machine_info()
    for dist in ("openvino", "nncf", "transformers"):
        try:
            machine["versions"][dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    machine["amx"] = cpu_amx()
    print(f"bench_quant: {' '.join(sys.argv)}")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores ({machine['usable_cpus']} usable), "
          f"{args.threads} threads; load average at start {machine['loadavg_start']}")
    print(f"AMX: {', '.join(machine['amx']) if machine['amx'] else 'none'} (grep -o 'amx[a-z_]*' /proc/cpuinfo)")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v))
    results = []
    workdir = tempfile.mkdtemp(prefix="optc-bench-quant-")
    t_start = time.perf_counter()
    try:
        for name in args.models:
            t0 = time.perf_counter()
            res = bench_model(name, args, workdir)
            res["wall_s"] = time.perf_counter() - t0
            results.append(res)
            print(format_result(res, machine["amx"]), flush=True)
            for f in os.listdir(workdir):      # this model's ONNX files (a Llama's are GBs)
                os.remove(os.path.join(workdir, f))
            release()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    machine["loadavg_end"] = _loadavg()
    machine["peak_rss_gb"] = rss_gb("VmHWM")
    print(f"\nload average at end {machine['loadavg_end']}; wall {time.perf_counter() - t_start:.0f} s; "
          f"peak RSS {machine['peak_rss_gb']:.2f} GB")
    if args.json:
        def plain(o):
            if isinstance(o, collections.Counter):
                return dict(o)
            if isinstance(o, (np.floating, np.integer)):
                return o.item()
            return str(o)
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "argv": sys.argv, "results": results}, f, indent=1, default=plain)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
