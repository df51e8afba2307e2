"""Real models at published sizes: optc against the routes a user would take without it.

    python benchmarks/bench_real_models.py [--models bert_base llama_0_5b] [--runs 20] [--threads 2]
                                           [--seq 128] [--json OUT]

Models (HF transformers, built from configs with random weights; eager attention, as written in
the model files, so that the fusions have something to do; batch 1, ``--seq`` tokens, prefill):

- ``bert_base``: ``BertModel(BertConfig())`` -- 12 layers, hidden 768, 12 heads (110 M parameters).
- ``llama_0_5b``: ``LlamaModel`` shaped like Qwen2-0.5B's decoder (hidden 896, 14 heads, 2 key/value
  heads, MLP 4864) with 30 layers and a 32,000-token vocabulary: 0.48 B parameters.

Candidates, timed interleaved in one process (``optc bench``'s machinery): eager PyTorch, ONNX
Runtime on a plain ``torch.onnx.export(dynamo=True)`` (``ORT_ENABLE_ALL``), optc's ONNX backend and
optc's TorchScript backend (default pipelines). Reported: ``optc onnx / ORT plain`` and ``optc
torchscript / eager``, each the median of per-round ratios with a 95% confidence interval, the
fusions optc's pipeline made, and the op types of the ONNX model optc's ONNX backend runs (which
fused ONNX Runtime kernels it ended up with).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys

import torch

from optc.tools import hf_corpus
from optc.tools.bench import machine_info, median_ci, paired_ratios
from optc.tools.bench.run import run_bench


def bert_base(seq: int = 128):
    T = hf_corpus._transformers()
    model = T.BertModel(T.BertConfig(attn_implementation="eager"), add_pooling_layer=False)
    return hf_corpus._Out(model).eval(), (hf_corpus._ids(seq=seq, vocab=30522),)


def llama_0_5b(seq: int = 128):
    T = hf_corpus._transformers()
    cfg = T.LlamaConfig(hidden_size=896, intermediate_size=4864, num_hidden_layers=LLAMA_LAYERS, num_attention_heads=14,
                        num_key_value_heads=2, vocab_size=32000, max_position_embeddings=2048,
                        attn_implementation="eager")
    model = T.LlamaModel(cfg)
    return hf_corpus._Out(model, use_cache=False).eval(), (hf_corpus._ids(seq=seq, vocab=32000),)


LLAMA_LAYERS = 30
MODELS = {"bert_base": bert_base, "llama_0_5b": llama_0_5b}


def _session_op_types(proto, threads: int, disabled=()) -> dict:
    """The op types ONNX Runtime runs for ``proto`` (a ModelProto, or the path of a model on disk) after its own graph optimizations (ORT_ENABLE_ALL):
    the optimized model it writes with ``optimized_model_filepath``, with the graph transformers
    optc's session leaves out left out here too."""
    import os
    import tempfile

    import onnx
    import onnxruntime as ort
    with tempfile.TemporaryDirectory() as d:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads
        so.optimized_model_filepath = os.path.join(d, "opt.onnx")
        if isinstance(proto, str):     # a model streamed to disk: its file, beside its external data
            src = proto
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.onnx.data")
        else:
            src = os.path.join(d, "in.onnx")
            onnx.save(proto, src, save_as_external_data=proto.ByteSize() > 1 << 30, location="in.onnx.data")
        ort.InferenceSession(src, so, providers=["CPUExecutionProvider"], disabled_optimizers=list(disabled))
        opt = onnx.load(so.optimized_model_filepath, load_external_data=False)
    return dict(collections.Counter(n.op_type for n in opt.graph.node).most_common())


def _ratio(c, ref):
    r = paired_ratios(c.times, ref.times)
    return statistics.median(r), median_ci(r)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--json", help="write the rows as JSON")
    ap.add_argument("--llama-layers", type=int, default=30, help="layers of llama_0_5b (a smoke run: 2)")
    ap.add_argument("--pair", choices=("both", "onnx", "torchscript"), default="both",
                    help="onnx: eager, ORT plain and optc onnx only; torchscript: eager and optc torchscript only "
                         "(each candidate holds its own copy of the weights: for a 0.5 B model all four in one "
                         "process need more than 24 GiB)")
    args = ap.parse_args(argv)
    global LLAMA_LAYERS
    LLAMA_LAYERS = args.llama_layers
    rows = []
    print("| model | params | optc onnx / ORT plain [95% CI] | optc torchscript / eager [95% CI] | eager ms | "
          "ORT plain ms | optc onnx ms | optc ts ms | max rel err (onnx, ts) | fusions |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        model, inputs = MODELS[name](args.seq)
        params = sum(p.numel() for p in model.parameters())
        backends = {"both": ("onnx", "torchscript"), "onnx": ("onnx",), "torchscript": ("torchscript",)}[args.pair]
        baselines = ("ort",) if args.pair != "torchscript" else ()
        res = run_bench(model, inputs, {}, label=name, backends=backends, baselines=baselines,
                        runs=args.runs, warmup=args.warmup, threads=args.threads,
                        progress=lambda m: print(f"  [{name}] {m}", file=sys.stderr, flush=True))
        by = {c.name: c for c in res.candidates}
        for c in res.candidates:
            if not c.ok:
                print(f"  [{name}] {c.name}: {c.error}", file=sys.stderr)
        eager, ort, onnx, ts = (by.get(k) for k in ("eager", "onnxruntime", "optc onnx", "optc torchscript"))
        r_onnx = _ratio(onnx, ort) if onnx and ort and onnx.ok and ort.ok else None
        r_ts = _ratio(ts, eager) if ts and ts.ok else None
        r_ts_ort = _ratio(ts, ort) if ts and ort and ts.ok and ort.ok else None
        # the fusions and the ONNX op types, from a fresh compile (the bench's candidates keep only callables)
        import onnx as onnx_lib

        import optc
        med = {k: (statistics.median(c.times) * 1e3 if c and c.ok and c.times else float("nan"))
               for k, c in (("eager", eager), ("ort", ort), ("onnx", onnx), ("ts", ts))}
        for c in res.candidates:
            c.run = None            # release the candidates' models before compiling once more
        import gc
        gc.collect()
        cm, rep = optc.compile(model, inputs, backend="onnx", check=False)
        fusions = {r.name: r.stats.get("fused") or r.stats.get("merged_groups") for r in rep.pipeline.records
                   if r.modified and r.name.startswith(("fuse", "merge"))}
        proto = onnx_lib.load_from_string(cm.model_bytes) if cm.model_bytes is not None else \
            f"{cm.model_dir}/model.onnx"
        kernels = _session_op_types(proto, args.threads, cm.backend_options.get("ort_disabled_optimizers", ()))
        del cm, proto
        fmt = (lambda r: f"{r[0]:.3f} [{r[1][0]:.3f}, {r[1][1]:.3f}]" if r else "n/a")
        print(f"| {name} | {params / 1e6:.0f} M | {fmt(r_onnx)} | {fmt(r_ts)} | {med['eager']:.1f} | {med['ort']:.1f} | "
              f"{med['onnx']:.1f} | {med['ts']:.1f} | {onnx.max_rel_err if onnx else float('nan'):.1e}, "
              f"{ts.max_rel_err if ts else float('nan'):.1e} | {fusions} |", flush=True)
        print(f"  ONNX Runtime runs for optc onnx (after ORT_ENABLE_ALL): {kernels}", flush=True)
        if r_ts_ort:
            print(f"  optc torchscript / ORT plain: {fmt(r_ts_ort)}", flush=True)
        rows.append({"model": name, "params": params, "onnx_over_ort": r_onnx, "ts_over_eager": r_ts,
                     "ts_over_ort": r_ts_ort,
                     "median_ms": med, "fusions": fusions, "onnx_op_types": kernels,
                     "compile_s": {c.name: c.compile_s for c in res.candidates},
                     "peak_bytes": {c.name: c.peak_bytes for c in res.candidates}})
        del model, res, by
    finish(rows, args.json)
    return 0


def finish(rows: list, path: str | None) -> None:
    """Print the machine; with ``path``, write the rows, the machine and the command line as JSON."""
    info = machine_info()
    print(f"\nmachine: {info}")
    if path:
        with open(path, "w") as f:
            json.dump({"rows": rows, "machine": info, "argv": sys.argv}, f, indent=1, default=str)


if __name__ == "__main__":
    raise SystemExit(main())
