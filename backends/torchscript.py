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
   ``torch.jit.optimize_for_inference`` (conv-bn folding, MKLDNN layouts where they pay);
5. on CPU, every linear as oneDNN's (:func:`onednn_linears`) over its weight packed into oneDNN's
   layout (``params="copy"``) or over the user's weight itself (``params="reference"``).

The saved ``model.pt`` is the *frozen* module, plain TorchScript that ``torch.jit.load`` runs
without optc; ``optimize_for_inference`` and step 5 are applied again when optc loads it (the
MKLDNN-prepacked constants they create do not survive ``torch.jit.save``: "required keyword
attribute 'value' is undefined" on load).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
import weakref

import torch
import torch.fx as fx

from optc.backends.base import (
    Backend, CompiledModel, Signature, auto_params, flat_outputs, graph_module_on,
    signature_from_manifest, target_from_manifest,
)
from optc.errors import ArtifactError, LoweringError
from optc.backends import torchscript_layout, torchscript_quant
from optc.ir.program import Program, attr_tensors, copy_graph_module
from optc.memory import mapped, release_mapped
from optc.target import Target

ARTIFACT = "model.pt"
METHODS = ("auto", "trace", "script")
#: ``params`` (CPU, ``optimize=True``): each linear of the running module is oneDNN's
#: (``mkldnn::_linear_pointwise``) over -- ``"copy"``: its weight packed into oneDNN's blocked
#: layout (a copy); ``"reference"``: the weight itself, the user's parameter (oneDNN reorders it on
#: each call: slower, no copy); ``"auto"``: reference only where a copy would crowd the memory
#: (:func:`~optc.backends.base.auto_params`), copy otherwise
PARAMS_MODES = ("auto", "copy", "reference")
#: weights oneDNN's linear takes: float16 needs AVX512-FP16 or AVX-NE-CONVERT, which CPUs mostly lack
ONEDNN_LINEAR_DTYPES = (torch.float32, torch.bfloat16)

log = logging.getLogger("optc.backends")


class TorchScriptModel(CompiledModel):
    """The frozen module, saved once to a private temporary file (what :meth:`save_artifacts`
    copies), and the module that runs: on CPU the frozen module itself after
    optimize_for_inference, which works in place and whose MKLDNN-prepacked constants do not
    survive ``torch.jit.save``/``load`` (loading re-applies it). Nothing holds a serialized copy
    of the weights in memory."""

    backend = "torchscript"

    def __init__(self, frozen: torch.jit.ScriptModule, signature: Signature, target: Target, *,
                 source_lines: tuple[str, dict[int, str]] | None = None, **kw):
        super().__init__(signature, target, **kw)
        #: (the FX code's file name, {line: FX node}) of the code traced or scripted; None once loaded
        self._source_lines = source_lines
        self._backend_map: dict | None = None
        workdir = tempfile.mkdtemp(prefix="optc-torchscript-")
        weakref.finalize(self, shutil.rmtree, workdir, True)
        self._path = os.path.join(workdir, ARTIFACT)
        torch.jit.save(frozen, self._path)
        self.module = frozen
        if self.backend_options.get("optimize") and target.device == "cpu":
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                self.module = torch.jit.optimize_for_inference(frozen)
                params = self.backend_options.get("params", "copy")
                if torch.backends.mkldnn.is_available():
                    onednn_linears(self.module, pack=params == "copy")

    def run_flat(self, inputs):
        self.check_weights()
        return flat_outputs(self.module(*inputs))

    # ---- the node map and an instrumented run ----------------------------------------------------------
    @property
    def backend_map(self) -> dict | None:
        """optc node (of the staged Program) -> its TorchScript nodes and the value holding its
        result, in the graph that runs (frozen and, on CPU, optimized for inference); None for a
        model loaded from an artifact. TorchScript records, on each node it traced or scripted, the
        line of the FX code that made it (``<eval_with_key>.N(LINE)``), and each line of that code
        is one FX node. A node TorchScript's own passes created (``prim::mkldnn_convolution``, a
        linear's ``matmul`` + ``add``) has no line: its FX node keeps the nodes it still has but no
        value when a value it has feeds such an unattributed computation (the value would not be the
        FX node's result)."""
        if self._backend_map is None and self._source_lines is not None:
            self._backend_map = torchscript_backend_map(self.module.graph, *self._source_lines)
        return self._backend_map

    def intermediate_values(self, inputs: list[torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
        """The TorchScript values ``names`` (debug names, as :attr:`backend_map` gives them) on
        ``inputs``, from a copy of the running graph that returns them too, run as a separate
        function; this model's module is not touched. MKLDNN tensors come back dense."""
        graph = self.module.graph
        where = {o.debugName(): (i, j) for i, n in enumerate(graph.nodes()) for j, o in enumerate(n.outputs())}
        wanted = [n for n in dict.fromkeys(names) if n in where]
        if not wanted:
            return {}
        copy = graph.copy()
        nodes = list(copy.nodes())
        # each value cloned where it is made: later in-place ops (add_, relu_ on a buffer it
        # aliases) would otherwise change it before the run returns it
        none = copy.insertConstant(None)
        none.node().moveBefore(nodes[0])
        extras = []
        for n in wanted:
            producer = nodes[where[n][0]]
            value = list(producer.outputs())[where[n][1]]
            clone = copy.create("aten::clone", [value, none])
            clone.output().setType(value.type())
            clone.insertAfter(producer)
            extras.append(clone.output())
        ret = copy.return_node()
        original = ret.inputsAt(0)
        tup = copy.create("prim::TupleConstruct", [original, *extras])
        tup.output().setType(torch._C.TupleType([original.type(), *[e.type() for e in extras]]))
        tup.insertBefore(ret)
        ret.replaceInput(0, tup.output())
        fn = torch._C._create_function_from_graph("optc_instrumented", copy)
        with torch.no_grad():
            out = fn(self.module._c, *inputs)
        values = {}
        for name, v in zip(wanted, out[1:]):
            if isinstance(v, torch.Tensor):
                values[name] = (v.to_dense() if v.is_mkldnn else v).detach().cpu()
        return values

    def integer_coverage(self) -> dict:
        """Counted in the frozen graph: optc's TorchScript lowering of a quantized program runs every
        conv and linear in float32 on dequantized values (docs/quantization.md, "Backends")."""
        kinds = {"aten::conv2d": "conv", "aten::conv1d": "conv", "aten::conv3d": "conv", "aten::_convolution": "conv",
                 "aten::mkldnn_convolution": "conv", "prim::mkldnn_convolution": "conv",
                 "aten::linear": "matmul", "aten::matmul": "matmul", "mkldnn::_linear_pointwise": "matmul",
                 "aten::mm": "matmul", "aten::bmm": "matmul",
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

    params_modes = PARAMS_MODES

    def lower(self, program: Program, target: Target, *, method: str = "auto",
              optimize: bool = True, params: str = "auto") -> TorchScriptModel:
        """``method``: ``auto`` (trace static programs, script dynamic ones), ``trace`` or ``script``.
        ``optimize``: run ``torch.jit.optimize_for_inference`` after freezing and, where torch has
        oneDNN, run the linears as oneDNN's (CPU only).
        ``params`` (:data:`PARAMS_MODES`): ``"copy"`` packs each linear weight into oneDNN's layout
        (a copy beside the user's model), ``"reference"`` runs oneDNN's linear on the user's weight
        itself (no copy; an 8-layer Llama 1.10x slower at 128 tokens, 1.26x per decode step,
        docs/backends.md), ``"auto"`` (default) reference only where a copy of the weights would
        take more than :data:`~optc.backends.base.REFERENCE_WHEN_OVER` of the memory available,
        with a warning."""
        if method not in METHODS:
            raise LoweringError(f"unknown method '{method}' (valid: {', '.join(METHODS)})", backend=self.name)
        self.check_params(params)
        if params == "reference" and target.device != "cpu":
            raise LoweringError("params='reference' is for the CPU target (a CUDA model holds its weights on the "
                                "device): use params='copy'", backend=self.name)
        if params == "auto":
            params = auto_params(program, target, self.name,
                                 "Unpacked weights run about 1.1x slower (1.3x per decode step)")
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
        if optimize and target.device == "cpu":
            _linear_over_weight_view(gm)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if method == "trace":
                inputs = tuple(t.to(device) for t in program.example_flat_inputs())
                module = torch.jit.trace(gm, inputs, strict=False, check_trace=False)
            else:
                module = torch.jit.script(_scriptable(gm))
            module = torch.jit.freeze(module.eval())
        model = TorchScriptModel(module, signature, target, source_lines=_fx_lines(gm),
                                 backend_options={"method": method, "optimize": bool(optimize), "params": params})
        if target.device == "cpu":
            # the frozen constants are the Program's tensors (the user's parameters), some packed into
            # copies: a later in-place write would reach some and not others, and not the artifact.
            # Weights read from a weight file are nobody's to write: holding them would keep the file's
            # pages mapped beside their packed copies
            weights = attr_tensors(program.graph_module)
            model.watch_weights({name: t for (name, t), m in zip(weights.items(), mapped(weights.values())) if not m})
        return model

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


def onednn_linears(module: torch.jit.ScriptModule, *, pack: bool) -> int:
    """Each ``aten::matmul(x, C)`` of the frozen ``module``'s graph whose ``C`` is a constant 2-D
    float32/bfloat16 tensor (a linear's ``t(W)``, :func:`_linear_over_weight_view`) as oneDNN's
    linear, ``mkldnn::_linear_pointwise(x, W, b)``, in place; an ``aten::add`` of a constant bias
    that only reads the product is folded in. Measured on the AMD EPYC of docs/benchmarks.md, one
    thread: 2.4x faster than ``matmul`` (MKL) on a 128 x 896 x 4864 linear. ``pack``: ``W`` is
    packed into oneDNN's layout once (a new tensor, registered as an attribute of ``module``);
    otherwise ``W`` itself is the constant (a view of the same storage, which oneDNN reorders on
    each call), left as ``matmul`` when it is not contiguous. A packed ``W`` read from a weight
    file (``optc.compile(weights=...)``) has its pages handed back
    (:func:`optc.memory.release_mapped`). The new node keeps the replaced node's source line (the
    node map). Returns how many linears it rewrote."""
    graph = module.graph
    self_value = next(graph.inputs())
    count = 0
    for node in [n for n in graph.nodes() if n.kind() == "aten::matmul"]:    # (adds folded in are destroyed)
        if node.inputsAt(1).node().kind() != "prim::Constant":
            continue
        wt = node.inputsAt(1).toIValue()
        if not isinstance(wt, torch.Tensor) or wt.dim() != 2 or wt.dtype not in ONEDNN_LINEAR_DTYPES \
                or wt.device.type != "cpu" or wt.is_mkldnn:
            continue
        weight = wt.t()
        if not pack and not weight.is_contiguous():
            continue
        result, bias = node, None
        uses = node.output().uses()
        if len(uses) == 1 and uses[0].user.kind() == "aten::add" and uses[0].offset == 0:
            add = uses[0].user
            b, alpha = add.inputsAt(1), add.inputsAt(2)
            if b.node().kind() == "prim::Constant" and alpha.node().kind() == "prim::Constant" \
                    and alpha.toIValue() == 1:
                bt = b.toIValue()
                if isinstance(bt, torch.Tensor) and bt.dim() == 1 and bt.shape[0] == weight.shape[0] \
                        and bt.dtype == weight.dtype and not bt.is_mkldnn:
                    result, bias = add, b
        with graph.insert_point_guard(result):
            if pack:
                name = f"packed_linear_weight_{count}"
                module._c._register_attribute(name, torch._C.TensorType.get(),
                                              torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None))
                release_mapped([weight])      # read from a weight file: its pages are not needed any more
                get = graph.create("prim::GetAttr", [self_value]).s_("name", name)
                get.output().setType(torch._C.TensorType.get())
                graph.insertNode(get)
                w_value = get.output()
            else:
                w_value = graph.insertConstant(weight)
            none = graph.insertConstant(None)
            scalars = graph.create("prim::ListConstruct")        # Scalar?[]: no post-op arguments
            scalars.output().setType(torch._C.ListType(torch._C.OptionalType(torch._C.NumberType.get())))
            graph.insertNode(scalars)
            out = graph.insert("mkldnn::_linear_pointwise",
                               [node.inputsAt(0), w_value, bias if bias is not None else none,
                                graph.insertConstant("none"), scalars.output(), none])
        out.node().copyMetadata(result)
        result.output().replaceAllUsesWith(out)
        if result is not node:
            result.destroy()
        node.destroy()
        count += 1
    torch._C._jit_pass_dce(graph)
    return count


def _linear_over_weight_view(gm: fx.GraphModule) -> int:
    """Each ``aten.linear(x, W, b)`` with a constant ``W`` as ``matmul(x, t(W)) (+ b)``, in place;
    the count. ``optimize_for_inference`` makes that very rewrite of a frozen constant linear
    (``FrozenLinearTranspose``), but with ``t(W)`` *cloned* contiguous: a second copy of every
    linear weight while the user's model holds the first (0.5 GiB of a 168 M-parameter Llama; the
    measured speed with and without it is the same, docs/benchmarks.md). Here ``freeze`` folds
    ``t(W)`` into a constant that is a view of ``W``'s storage, and the pass finds no linear left.
    The last new node takes the linear's name and the others name it as their owner
    (``meta["optc_part_of"]``), so the node map gives the linear both TorchScript nodes."""
    aten = torch.ops.aten
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        x, w, b = (list(node.args) + [None, None])[:3]
        if not isinstance(w, fx.Node) or w.op != "get_attr":
            continue
        name = node.name
        with gm.graph.inserting_before(node):
            wt = gm.graph.call_function(aten.t.default, (w,))
            out = gm.graph.call_function(aten.matmul.default, (x, wt))
            if b is not None:
                wt.meta["optc_part_of"] = out.meta["optc_part_of"] = name   # the node map's owner
                out = gm.graph.call_function(aten.add.Tensor, (out, b))
        out.meta = dict(node.meta)
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        out.name = name
        count += 1
    if count:
        gm.recompile()
    return count


def _scriptable(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every ``OpOverload`` target replaced by its packet: TorchScript resolves
    ``torch.ops.aten.view(x, [n, 1])`` by schema, but cannot call ``torch.ops.aten.view.default``."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            node.target = node.target.overloadpacket
    gm.recompile()
    return gm


def _fx_lines(gm: fx.GraphModule) -> tuple[str, dict[int, str], dict[str, list[str]]] | None:
    """The file name TorchScript records for ``gm``'s generated code, ``{line: FX node name}``
    (each line of FX code assigns one node: ``name = torch.ops.aten....``) and each node's users."""
    import linecache
    import re
    filename = getattr(gm.forward, "__code__", None) and gm.forward.__code__.co_filename
    if not filename:
        return None
    # a node the lowering made as part of another (``_linear_over_weight_view``) counts as its owner
    owner = {n.name: n.meta.get("optc_part_of", n.name) for n in gm.graph.nodes}
    lines = {}
    for i, line in enumerate(linecache.getlines(filename), 1):
        m = re.match(r"\s+(\w+) = ", line)
        if m and m.group(1) in owner:
            lines[i] = owner[m.group(1)]
    users = {n.name: [owner[u.name] for u in n.users] for n in gm.graph.nodes if "optc_part_of" not in n.meta}
    return filename, lines, users


def torchscript_backend_map(graph, filename: str, lines: dict[int, str], users: dict[str, list[str]]) -> dict:
    """``{FX node: {"nodes": [...], "value": debug name or None}}`` for the top-level nodes of a
    TorchScript ``graph`` (see :attr:`TorchScriptModel.backend_map`).

    The value of an FX node's last TorchScript node is its result when every node reading it is
    another FX node's, the graph's output, a conversion back to dense, or a node without a line
    while some FX user of the node has no TorchScript node with a line either (a linear that
    ``optimize_for_inference`` made ``matmul`` + ``add``: that is the user). A node without a line
    that reads it while every FX user is accounted for continues the same FX node (``addmm`` as
    ``mm`` with a line, then ``add`` without one): no value."""
    import re
    pattern = re.compile(re.escape(filename) + r"\((\d+)\)")
    owner: dict = {}
    for node in graph.nodes():
        m = pattern.search(node.sourceRange() or "")
        fx_name = lines.get(int(m.group(1))) if m else None
        if fx_name is not None and node.kind() != "prim::Constant":
            owner[node] = fx_name
    out: dict[str, dict] = {}
    for node, fx_name in owner.items():
        entry = out.setdefault(fx_name, {"nodes": [], "value": None})
        entry["nodes"].append(f"{node.kind()} %{node.outputsAt(0).debugName()}" if node.outputsSize() else node.kind())
    for fx_name, entry in out.items():
        last = [n for n, f in owner.items() if f == fx_name][-1]
        if last.outputsSize() != 1:
            continue
        value = last.outputsAt(0)
        while True:   # through a layout conversion back to dense
            uses = [u.user for u in value.uses()]
            if len(uses) == 1 and uses[0].kind() == "aten::to_dense" and uses[0] not in owner:
                value = uses[0].outputsAt(0)
                continue
            break
        uses = [u.user for u in value.uses()]
        unseen_user = any(x not in out for x in users.get(fx_name, ()) if x != "output")
        final = all(u in owner and owner[u] != fx_name or u.kind() in ("prim::TupleConstruct", "prim::Return")
                    or u.kind() == "aten::to_dense" or (u not in owner and unseen_user) for u in uses)
        in_place = any(u.kind().endswith("_") and u.kind() != "aten::to_dense" for u in uses)
        if final and not in_place and isinstance(value.type(), torch._C.TensorType):
            entry["value"] = value.debugName()
    return out
