"""TorchScript backend: the Program's flat graph as a frozen ``torch.jit`` module (``model.pt``).

Lowering:

1. every ``optc::`` op is replaced by its decomposition into ATen ops (TorchScript has no native
   translation for them, and an artifact must not depend on Python-registered kernels);
2. the graph is moved to the target's device (copies of its weights);
3. **static shapes**: ``torch.jit.trace(strict=False)`` on the example inputs.
   **dynamic shapes** (the Program was captured with symbolic dims): tracing would bake the
   example sizes into every ``view``/``reshape``, so the graph's own code is *scripted* instead
   (``torch.jit.script`` of the FX code, each ``OpOverload`` called through its packet): it is
   already shape-generic (``sym_size`` nodes become ``aten::size``). ``method="trace"`` with
   dynamic dims is an error, not a silently specialised model;
4. ``torch.jit.freeze`` (weights become constants, attribute accesses are folded) and, on CPU,
   ``torch.jit.optimize_for_inference`` (conv-bn folding, MKLDNN layouts where they pay).

The saved ``model.pt`` is the *frozen* module, plain TorchScript that ``torch.jit.load`` runs
without optc; ``optimize_for_inference`` is applied again when optc loads it (the MKLDNN-prepacked
constants it creates do not survive ``torch.jit.save``: "required keyword attribute 'value' is
undefined" on load).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
import weakref

import torch
import torch.fx as fx

from optc.backends.base import (
    Backend, CompiledModel, Signature, flat_outputs, graph_module_on, signature_from_manifest,
    target_from_manifest,
)
from optc.errors import ArtifactError, LoweringError
from optc.backends import torchscript_layout, torchscript_quant
from optc.ir.program import Program, copy_graph_module
from optc.target import Target

ARTIFACT = "model.pt"
METHODS = ("auto", "trace", "script")


class TorchScriptModel(CompiledModel):
    """The frozen module, saved once to a private temporary file (what :meth:`save_artifacts`
    copies), and the module that runs: on CPU the frozen module itself after
    optimize_for_inference, which works in place and whose MKLDNN-prepacked constants do not
    survive ``torch.jit.save``/``load`` (loading re-applies it). Nothing holds a serialized copy
    of the weights in memory."""

    backend = "torchscript"

    def __init__(self, frozen: torch.jit.ScriptModule, signature: Signature, target: Target, **kw):
        super().__init__(signature, target, **kw)
        workdir = tempfile.mkdtemp(prefix="optc-torchscript-")
        weakref.finalize(self, shutil.rmtree, workdir, True)
        self._path = os.path.join(workdir, ARTIFACT)
        torch.jit.save(frozen, self._path)
        self.module = frozen
        if self.backend_options.get("optimize") and target.device == "cpu":
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                self.module = torch.jit.optimize_for_inference(frozen)

    def run_flat(self, inputs):
        return flat_outputs(self.module(*inputs))

    def integer_coverage(self) -> dict:
        """Counted in the frozen graph: optc's TorchScript lowering of a quantized program runs every
        conv and linear in float32 on dequantized values (docs/quantization.md, "Backends")."""
        kinds = {"aten::conv2d": "conv", "aten::conv1d": "conv", "aten::conv3d": "conv", "aten::_convolution": "conv",
                 "aten::mkldnn_convolution": "conv", "prim::mkldnn_convolution": "conv",
                 "aten::linear": "matmul", "aten::matmul": "matmul", "aten::mm": "matmul", "aten::bmm": "matmul",
                 "quantized::conv2d": "qconv", "quantized::linear": "qmatmul"}
        counts = {"conv": [0, 0], "matmul": [0, 0]}
        for node in self.module.graph.nodes():
            kind = kinds.get(node.kind())
            if kind in ("qconv", "qmatmul"):
                counts[kind[1:]][0] += 1
                counts[kind[1:]][1] += 1
            elif kind:
                counts[kind][1] += 1
        return {"source": "the frozen TorchScript graph", "conv": tuple(counts["conv"]),
                "matmul": tuple(counts["matmul"])}

    def save_artifacts(self, directory):
        shutil.copyfile(self._path, os.path.join(directory, ARTIFACT))
        return [ARTIFACT]

    def artifact_size(self) -> int:
        return os.path.getsize(self._path)


class TorchScriptBackend(Backend):
    name = "torchscript"

    def stage(self, program: Program, target: Target) -> list[str]:
        """Decompositions, an NHWC program as channels-last (``torchscript_layout.py``), the optc
        ops without a TorchScript translation decomposed, then torch's bugs (``legalize``)."""
        return ["decompose{backend=torchscript}", *torchscript_layout.stage_passes(program.graph_module),
                "lower-optc-ops", "legalize{backend=torchscript}"]

    def native_ops(self, target: Target) -> frozenset:
        return frozenset(torchscript_quant.TRANSLATIONS)

    def lower(self, program: Program, target: Target, *, method: str = "auto",
              optimize: bool = True) -> TorchScriptModel:
        """``method``: ``auto`` (trace static programs, script dynamic ones), ``trace`` or ``script``.
        ``optimize``: run ``torch.jit.optimize_for_inference`` after freezing (CPU only)."""
        if method not in METHODS:
            raise LoweringError(f"unknown method '{method}' (valid: {', '.join(METHODS)})", backend=self.name)
        signature = Signature.of(program)
        if method == "auto":
            method = "script" if signature.is_dynamic else "trace"
        if method == "trace" and signature.is_dynamic:
            dims = sorted({d for s in signature.inputs for d in s.shape if isinstance(d, str)})
            raise LoweringError(f"method='trace' specialises every shape, but the program has dynamic dims "
                                f"{', '.join(dims)}: use method='script' (or 'auto'), or capture without "
                                "dynamic_shapes", backend=self.name)
        device = torch.device("cuda" if target.device == "cuda" else "cpu")
        gm = copy_graph_module(program.graph_module)    # the stage has run: layout, decompositions, legalization
        torchscript_quant.lower_quant_ops(gm)            # optc Q/DQ -> torch's quantize/dequantize ops
        gm = graph_module_on(gm, device)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if method == "trace":
                inputs = tuple(t.to(device) for t in program.example_flat_inputs())
                module = torch.jit.trace(gm, inputs, strict=False, check_trace=False)
            else:
                module = torch.jit.script(_scriptable(gm))
            module = torch.jit.freeze(module.eval())
        return TorchScriptModel(module, signature, target,
                                backend_options={"method": method, "optimize": bool(optimize)})

    def load(self, directory: str, manifest: dict) -> TorchScriptModel:
        target = target_from_manifest(manifest)
        device = "cuda" if target.device == "cuda" else "cpu"
        path = os.path.join(directory, ARTIFACT)
        try:
            module = torch.jit.load(path, map_location=device)
        except Exception as e:  # torch.jit.load raises RuntimeError for any malformed archive
            raise ArtifactError(f"{directory}: cannot load '{ARTIFACT}': {str(e).strip().splitlines()[0]}") from e
        return TorchScriptModel(module, signature_from_manifest(manifest), target,
                                pipeline=manifest.get("pipeline", ""), backend_options=manifest.get("options", {}))


def _scriptable(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every ``OpOverload`` target replaced by its packet: TorchScript resolves
    ``torch.ops.aten.view(x, [n, 1])`` by schema, but cannot call ``torch.ops.aten.view.default``."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            node.target = node.target.overloadpacket
    gm.recompile()
    return gm
