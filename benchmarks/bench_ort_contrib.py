"""ONNX Runtime's contrib kernels: optc's ONNX backend with and without its ``ort-contrib-ops`` stage.

    python benchmarks/bench_ort_contrib.py [--models bert_base llama_0_5b] [--runs 20] [--threads 2]
                                           [--seq 128] [--llama-layers 30] [--json OUT]
    python benchmarks/bench_ort_contrib.py --kernel [--seq 128 512] [--runs 30]
    python benchmarks/bench_ort_contrib.py --gqa-kernel [--seq 128 512] [--runs 30]
    python benchmarks/bench_ort_contrib.py --rotary [--models llama_0_5b] [--runs 20] [--seq 128]

One Program per model (capture + the default pipeline), lowered twice by the ONNX backend: its
full stage, and the stage with ``ort-contrib-ops`` disabled (scaled_dot_product_attention left to
torchlib's decomposition: MatMul, Softmax, MatMul). Both sessions are timed interleaved in one
process with ONNX Runtime on a plain ``torch.onnx.export(dynamo=True)`` of the model beside them.
Reported: ``contrib / without`` and each against ORT plain (median of per-round ratios, 95% CI),
what the stage rewrote and refused, and the max relative error of each against eager. This is the
measurement ``backends/onnx_contrib.py`` keeps or drops a kernel by (docs/backends.md).

``--gqa-kernel``: grouped-query attention alone, Qwen2-0.5B's shape (14 query heads sharing 2
key/value heads of 64, causal): the standard ops with the key/value heads repeated, MultiHeadAttention
on the repeated heads, and GroupQueryAttention on the heads as they are.

With a model whose attention the stage gives to ``GroupQueryAttention`` (Llama), a fourth
candidate lowers the same Program with that rule off (MultiHeadAttention on the repeated heads).

``--rotary``: the stage with its ``ort-rotary-embedding`` rule on and off
(``ort-contrib-ops{rotary=true}`` / ``{rotary=false}``; everything else the same), the two sessions
timed interleaved: the whole-model effect of ``RotaryEmbedding`` (``rotary on / off``).

``--kernel``: the attention alone, BERT-base's shape (batch 1, 12 heads of 64): the ONNX that
torchlib writes for ``scaled_dot_product_attention`` between the heads' reshapes (Reshape,
Transpose, MatMul, Mul, Add of the mask, Softmax, MatMul, Transpose, Reshape) against one
``MultiHeadAttention`` node, both from ``[B, S, 768]`` query, key and value, with a zero mask
and with a causal one; each ratio the median of 30 rounds of 10 calls, interleaved.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import bench_real_models as real  # noqa: E402  (the models, as the real-model benchmark builds them)

import optc  # noqa: E402
from optc.backends.lowering import resolve, run_backend_stage  # noqa: E402
from optc.tools.bench import median_ci, paired_ratios  # noqa: E402
from optc.tools.bench.candidates import _ort, max_rel_error  # noqa: E402
from optc.tools.bench.timing import interleaved  # noqa: E402


def _lower(program, disable=(), rotary=None):
    """``program`` through the ONNX backend's stage and lowering; ``rotary`` True / False: the
    stage's ort-contrib-ops with its rotary rule on / off (None: its default)."""
    from optc.backends.stage import run_stage
    tgt, be = resolve("cpu", "onnx", {})
    if rotary is None:
        staged, report = run_backend_stage(program, be, tgt, disable=disable)
    else:
        passes = [f"ort-contrib-ops{{rotary={str(rotary).lower()}}}" if p == "ort-contrib-ops" else p
                  for p in be.stage(program, tgt)]
        staged, report = run_stage(program, passes, tgt, native_ops=be.native_ops(tgt), disable=disable)
    be.check_ops(staged, tgt)
    return be.lower(staged, tgt, threads=None), report


def rotary_rule(names, seq: int, runs: int, warmup: int) -> list[dict]:
    """The stage with its rotary rule on and off, the rest the same (module doc, ``--rotary``)."""
    rows = []
    print("| model | rotary on / off [95% CI] | ms: off, on | max rel err (off, on) | rotary rule |")
    print("|---|---|---|---|---|")
    for name in names:
        torch.manual_seed(0)
        model, inputs = real.MODELS[name](seq)
        with torch.no_grad():
            ref = model(*inputs)
        program = optc.optimize(optc.capture(model, inputs))[0]
        off, _ = _lower(program, rotary=False)
        on, report = _lower(program, rotary=True)
        rec = next(r for r in report.records if r.name.startswith("ort-contrib-ops"))
        fired = rec.stats.get("ort-rotary-embedding", 0)
        refused = sorted({why for rule, _, why in rec.rejections if rule == "ort-rotary-embedding"})
        del program
        gc.collect()
        fns = {"off": lambda c=off: c(*inputs), "on": lambda c=on: c(*inputs)}
        with torch.no_grad():
            errs = {k: max_rel_error(f(), ref) for k, f in fns.items()}
            t = interleaved(fns, runs=runs, warmup=warmup, pause_s=0.05)
        r = paired_ratios(t["on"], t["off"])
        med, ci = statistics.median(r), median_ci(r)
        ms = {k: statistics.median(v) * 1e3 for k, v in t.items()}
        print(f"| {name} | {med:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {ms['off']:.1f}, {ms['on']:.1f} | "
              f"{errs['off']:.1e}, {errs['on']:.1e} | {fired} lowered {refused} |", flush=True)
        rows.append({"model": name, "seq": seq, "on_over_off": (med, ci), "median_ms": ms, "max_rel_err": errs,
                     "lowered": fired, "refused": refused})
        del model, on, off, fns
        gc.collect()
    return rows


def _kernel_models(s: int, n: int = 12, h: int = 64):
    import numpy as np
    from onnx import TensorProto, helper
    d = n * h
    ins = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, s, d]) for x in "qkv"]
    ins.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [1, 1, s, s]))
    outs = [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, s, d])]

    def const(name, arr):
        kind = TensorProto.INT64 if arr.dtype == np.int64 else TensorProto.FLOAT
        return helper.make_tensor(name, kind, arr.shape, arr.flatten().tolist())
    inits = [const("s4", np.array([1, s, n, h], np.int64)), const("s3", np.array([1, s, d], np.int64)),
             const("sc", np.array(h ** -0.5, np.float32))]
    nodes = []
    for x in "qkv":
        nodes += [helper.make_node("Reshape", [x, "s4"], [x + "4"]),
                  helper.make_node("Transpose", [x + "4"], [x + "t"], perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Transpose", ["kt"], ["ktt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["qt", "ktt"], ["s"]), helper.make_node("Mul", ["s", "sc"], ["ss"]),
              helper.make_node("Add", ["ss", "bias"], ["sb"]), helper.make_node("Softmax", ["sb"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "vt"], ["ot"]),
              helper.make_node("Transpose", ["ot"], ["o4"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["o4", "s3"], ["o"])]
    standard = helper.make_model(helper.make_graph(nodes, "standard", ins, outs, inits),
                                 opset_imports=[helper.make_opsetid("", 20)])
    mha = helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "", "bias"], ["o"], domain="com.microsoft",
                           num_heads=n, scale=h ** -0.5)
    fused = helper.make_model(helper.make_graph([mha], "fused", ins, outs, []),
                              opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)])
    return standard, fused


def kernel(seqs, runs: int, threads: int) -> list[dict]:
    import numpy as np
    import onnxruntime as ort
    rows = []
    print("| seq | mask | MultiHeadAttention / standard [95% CI] | ms: standard, MultiHeadAttention | max abs diff |")
    print("|---|---|---|---|---|")
    for s in seqs:
        standard, fused = _kernel_models(s)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        sessions = {k: ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
                    for k, m in (("standard", standard), ("mha", fused))}
        rng = np.random.default_rng(0)
        for mask in ("zero", "causal"):
            feed = {x: rng.standard_normal((1, s, 768)).astype(np.float32) for x in "qkv"}
            feed["bias"] = np.zeros((1, 1, s, s), np.float32) if mask == "zero" else \
                np.triu(np.full((s, s), np.finfo(np.float32).min, np.float32), 1)[None, None]
            a, b = (sessions[k].run(None, feed)[0] for k in ("standard", "mha"))
            fns = {k: (lambda sess=sess: [sess.run(None, feed) for _ in range(10)]) for k, sess in sessions.items()}
            t = interleaved(fns, runs=runs, warmup=2)
            r = paired_ratios(t["mha"], t["standard"])
            med, ci = statistics.median(r), median_ci(r)
            ms = {k: statistics.median(v) * 100 for k, v in t.items()}   # per call: 10 calls per round
            diff = float(np.max(np.abs(a - b)))
            print(f"| {s} | {mask} | {med:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] | {ms['standard']:.3f}, {ms['mha']:.3f} | "
                  f"{diff:.1e} |", flush=True)
            rows.append({"seq": s, "mask": mask, "ratio": med, "ci": ci, "ms": ms, "max_abs_diff": diff})
    return rows


# Qwen2-0.5B's attention (14 query heads, 2 key/value heads of 64), batch 1, causal
B, N, NKV, H = 1, 14, 2, 64
REP = N // NKV


def _gqa_kernel_models(s):
    import numpy as np
    from onnx import TensorProto, helper
    f = TensorProto.FLOAT
    ins = [helper.make_tensor_value_info("q", f, [B, s, N * H]), helper.make_tensor_value_info("k", f, [B, s, NKV * H]),
           helper.make_tensor_value_info("v", f, [B, s, NKV * H])]
    outs = [helper.make_tensor_value_info("o", f, [B, s, N * H])]
    def const(name, arr):
        kind = TensorProto.INT64 if arr.dtype == np.int64 else TensorProto.FLOAT
        return helper.make_tensor(name, kind, arr.shape, arr.flatten().tolist())
    bias = np.triu(np.full((s, s), np.finfo(np.float32).min, np.float32), 1)[None, None]
    inits = [const("sq", np.array([B, s, N, H], np.int64)), const("skv", np.array([B, s, NKV, H], np.int64)),
             const("s5", np.array([B, NKV, 1, s, H], np.int64)), const("e5", np.array([B, NKV, REP, s, H], np.int64)),
             const("s4", np.array([B, N, s, H], np.int64)), const("s3", np.array([B, s, N * H], np.int64)),
             const("sc", np.array(H ** -0.5, np.float32)), const("bias", bias),
             const("perm_back", np.array([B, s, N * H], np.int64))][:-1]
    def repeat(x):   # [B,S,NKV*H] -> [B,N,S,H]
        return [helper.make_node("Reshape", [x, "skv"], [x + "4"]),
                helper.make_node("Transpose", [x + "4"], [x + "t"], perm=[0, 2, 1, 3]),
                helper.make_node("Reshape", [x + "t", "s5"], [x + "5"]),
                helper.make_node("Expand", [x + "5", "e5"], [x + "e"]),
                helper.make_node("Reshape", [x + "e", "s4"], [x + "r"])]
    nodes = [helper.make_node("Reshape", ["q", "sq"], ["q4"]), helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3])]
    nodes += repeat("k") + repeat("v")
    nodes += [helper.make_node("Transpose", ["kr"], ["ktt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["qt", "ktt"], ["sc0"]), helper.make_node("Mul", ["sc0", "sc"], ["ss"]),
              helper.make_node("Add", ["ss", "bias"], ["sb"]), helper.make_node("Softmax", ["sb"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", "vr"], ["ot"]),
              helper.make_node("Transpose", ["ot"], ["o4"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["o4", "s3"], ["o"])]
    ops = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    standard = helper.make_model(helper.make_graph(nodes, "standard", ins, outs, inits), opset_imports=ops)
    # MHA on repeated k/v (what optc emits today for HF Llama)
    mnodes = repeat("k") + repeat("v")
    for x in "kv":
        mnodes += [helper.make_node("Transpose", [x + "r"], [x + "bt"], perm=[0, 2, 1, 3]),
                   helper.make_node("Reshape", [x + "bt", "s3"], [x + "flat"])]
    mnodes += [helper.make_node("MultiHeadAttention", ["q", "kflat", "vflat", "", "", "bias"], ["o"], domain="com.microsoft",
                                num_heads=N, scale=H ** -0.5)]
    mha = helper.make_model(helper.make_graph(mnodes, "mha", ins, outs, inits), opset_imports=ops)
    gi = [helper.make_tensor("seqlens", TensorProto.INT32, [B], [s - 1] * B),
          helper.make_tensor("total", TensorProto.INT32, [], [s])]
    g = helper.make_node("GroupQueryAttention", ["q", "k", "v", "", "", "seqlens", "total"], ["o"], domain="com.microsoft",
                         num_heads=N, kv_num_heads=NKV, scale=H ** -0.5)
    gqa = helper.make_model(helper.make_graph([g], "gqa", ins, outs, gi), opset_imports=ops)
    return {"standard": standard, "mha": mha, "gqa": gqa}



def kernel_gqa(seqs, runs: int, threads: int) -> list[dict]:
    """Grouped-query attention alone: the standard ops with the key/value heads repeated
    (Reshape, Transpose, Expand, ...), MultiHeadAttention on the repeated heads (what the stage
    wrote before GroupQueryAttention), and GroupQueryAttention on the unrepeated heads."""
    import numpy as np
    import onnxruntime as ort
    rows = []
    print("| seq | GQA / standard | MHA on repeated / standard | GQA / MHA | ms: standard, MHA, GQA | max abs diff |")
    print("|---|---|---|---|---|---|")
    for s in seqs:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        sessions = {k: ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
                    for k, m in _gqa_kernel_models(s).items()}
        rng = np.random.default_rng(0)
        feed = {"q": rng.standard_normal((B, s, N * H)).astype(np.float32),
                "k": rng.standard_normal((B, s, NKV * H)).astype(np.float32),
                "v": rng.standard_normal((B, s, NKV * H)).astype(np.float32)}
        outs = {k: sess.run(None, feed)[0] for k, sess in sessions.items()}
        fns = {k: (lambda sess=sess: [sess.run(None, feed) for _ in range(10)]) for k, sess in sessions.items()}
        t = interleaved(fns, runs=runs, warmup=2)

        def ratio(a, b):
            r = paired_ratios(t[a], t[b])
            return statistics.median(r), median_ci(r)
        fmt = (lambda r: f"{r[0]:.3f} [{r[1][0]:.3f}, {r[1][1]:.3f}]")
        ms = {k: statistics.median(v) * 100 for k, v in t.items()}
        diff = max(float(np.max(np.abs(outs[k] - outs["standard"]))) for k in ("mha", "gqa"))
        print(f"| {s} | {fmt(ratio('gqa', 'standard'))} | {fmt(ratio('mha', 'standard'))} | {fmt(ratio('gqa', 'mha'))} | "
              f"{ms['standard']:.3f}, {ms['mha']:.3f}, {ms['gqa']:.3f} | {diff:.1e} |", flush=True)
        rows.append({"seq": s, "gqa_over_standard": ratio("gqa", "standard"), "mha_over_standard": ratio("mha", "standard"),
                     "gqa_over_mha": ratio("gqa", "mha"), "ms": ms, "max_abs_diff": diff})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=list(real.MODELS),
                    help="default: every model (with --rotary: llama_0_5b, the one with rotary embeddings)")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, nargs="+", default=[128])
    ap.add_argument("--kernel", action="store_true", help="the attention kernel alone (see the module doc)")
    ap.add_argument("--gqa-kernel", action="store_true", help="grouped-query attention alone (see the module doc)")
    ap.add_argument("--rotary", action="store_true", help="the stage with its rotary rule on and off (module doc)")
    ap.add_argument("--llama-layers", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    real.LLAMA_LAYERS = args.llama_layers
    torch.set_num_threads(args.threads)
    if args.kernel:
        real.finish(kernel(args.seq, args.runs, args.threads), args.json)
        return 0
    if args.gqa_kernel:
        real.finish(kernel_gqa(args.seq, args.runs, args.threads), args.json)
        return 0
    if len(args.seq) != 1:
        ap.error("--seq takes one length for the models (several only with --kernel)")
    seq = args.seq[0]
    if args.rotary:
        real.finish(rotary_rule(args.models or ["llama_0_5b"], seq, args.runs, args.warmup), args.json)
        return 0
    rows = []
    print("| model | contrib / without [95% CI] | contrib / ORT plain | without / ORT plain | ms: ORT plain, "
          "without, contrib | max rel err (without, contrib) | stage |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models or list(real.MODELS):
        torch.manual_seed(0)
        model, inputs = real.MODELS[name](seq)
        with torch.no_grad():
            ref = model(*inputs)
        program = optc.optimize(optc.capture(model, inputs))[0]
        plain = _ort(model, inputs, {}, args.threads)()
        without, _ = _lower(program, disable=("ort-contrib-ops",))
        contrib, report = _lower(program)
        rec = next(r for r in report.records if r.name == "ort-contrib-ops")
        fns = {"plain": plain, "without": lambda w=without: w(*inputs), "contrib": lambda c=contrib: c(*inputs)}
        if rec.stats.get("ort-group-query-attention"):
            # the grouped attentions as MultiHeadAttention on repeated key/value heads instead
            from optc.backends.onnx_contrib import SdpaAsOrtGroupQueryAttention
            check = SdpaAsOrtGroupQueryAttention.check
            SdpaAsOrtGroupQueryAttention.check = lambda self, node: None
            try:
                mha_only, _ = _lower(program)
            finally:
                SdpaAsOrtGroupQueryAttention.check = check
            fns["mha_only"] = lambda c=mha_only: c(*inputs)
        del program
        gc.collect()
        refused = sorted({why for *_, why in rec.rejections}) if rec.rejections else []
        with torch.no_grad():
            errs = {k: max_rel_error(fns[k](), ref) for k in fns if k != "plain"}
            t = interleaved(fns, runs=args.runs, warmup=args.warmup, pause_s=0.05)

        def ratio(a, b):
            r = paired_ratios(t[a], t[b])
            return statistics.median(r), median_ci(r)

        fmt = (lambda r: f"{r[0]:.3f} [{r[1][0]:.3f}, {r[1][1]:.3f}]")
        ms = {k: statistics.median(v) * 1e3 for k, v in t.items()}
        print(f"| {name} | {fmt(ratio('contrib', 'without'))} | {fmt(ratio('contrib', 'plain'))} | "
              f"{fmt(ratio('without', 'plain'))} | {ms['plain']:.1f}, {ms['without']:.1f}, {ms['contrib']:.1f} | "
              f"{errs['without']:.1e}, {errs['contrib']:.1e} | {rec.stats} {refused} |", flush=True)
        if "mha_only" in fns:
            print(f"|   {name}: GroupQueryAttention / MultiHeadAttention on repeated key/value heads: "
                  f"{fmt(ratio('contrib', 'mha_only'))}; MHA-only / ORT plain {fmt(ratio('mha_only', 'plain'))}; "
                  f"max rel err {errs['mha_only']:.1e} |", flush=True)
        rows.append({"model": name, "contrib_over_without": ratio("contrib", "without"),
                     "gqa_over_mha": ratio("contrib", "mha_only") if "mha_only" in fns else None,
                     "contrib_over_plain": ratio("contrib", "plain"), "without_over_plain": ratio("without", "plain"),
                     "median_ms": ms, "max_rel_err": errs, "stage": rec.stats, "refused": refused})
        del model, plain, without, contrib, fns
        gc.collect()
    real.finish(rows, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
