"""Two more of ONNX Runtime's contrib kernels, alone, against the standard ops they would replace.

    python benchmarks/bench_ort_kernels.py [SEQ ...] [--runs 30]      (default: 128 512)

- ``RotaryEmbedding`` (input ``[B, N, S, H]``, position ids, cos/sin caches ``[S, H/2]``) against
  the ops torchlib writes for ``optc::rotary_embedding``'s decomposition (Slice, Neg, Concat, Mul,
  Add; cos/sin ``[S, H]`` holding each angle twice), Qwen2-0.5B's 14 heads of 64;
- ``SkipSimplifiedLayerNormalization`` (residual add + RMSNorm, the sum also returned) against the
  Add, Pow, ReduceMean, Add, Sqrt, Div, Mul that ONNX Runtime's session itself fuses into
  SimplifiedLayerNormalization, hidden 896.

Median of per-round ratios (20 calls a round, 30 rounds, interleaved), 95% CI; 2 threads.
"""
import statistics
import sys

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, __file__.rsplit("/", 2)[0])
from optc.tools.bench import median_ci, paired_ratios
from optc.tools.bench.timing import interleaved
f = TensorProto.FLOAT
B, N, H, D = 1, 14, 64, 896

def sess(m):
    so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])

def ops():
    return [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]

def rope_models(s):
    # x [B, N, S, H]; cos/sin [S, H] (duplicated halves) as the standard decomposition reads them
    ins = [helper.make_tensor_value_info("x", f, [B, N, s, H]), helper.make_tensor_value_info("cos", f, [s, H]),
           helper.make_tensor_value_info("sin", f, [s, H])]
    outs = [helper.make_tensor_value_info("y", f, [B, N, s, H])]
    inits = [helper.make_tensor("h0", TensorProto.INT64, [1], [0]), helper.make_tensor("h1", TensorProto.INT64, [1], [H // 2]),
             helper.make_tensor("h2", TensorProto.INT64, [1], [H]), helper.make_tensor("ax", TensorProto.INT64, [1], [3])]
    nodes = [helper.make_node("Slice", ["x", "h0", "h1", "ax"], ["x1"]), helper.make_node("Slice", ["x", "h1", "h2", "ax"], ["x2"]),
             helper.make_node("Neg", ["x2"], ["nx2"]), helper.make_node("Concat", ["nx2", "x1"], ["rot"], axis=3),
             helper.make_node("Mul", ["x", "cos"], ["a"]), helper.make_node("Mul", ["rot", "sin"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    std = helper.make_model(helper.make_graph(nodes, "std", ins, outs, inits), opset_imports=ops())
    # RotaryEmbedding: input [B, N, S, H], position_ids [B, S], caches [S, H/2]
    ins2 = [helper.make_tensor_value_info("x", f, [B, N, s, H]), helper.make_tensor_value_info("pos", TensorProto.INT64, [B, s]),
            helper.make_tensor_value_info("cosc", f, [s, H // 2]), helper.make_tensor_value_info("sinc", f, [s, H // 2])]
    r = helper.make_node("RotaryEmbedding", ["x", "pos", "cosc", "sinc"], ["y"], domain="com.microsoft", num_heads=N)
    fused = helper.make_model(helper.make_graph([r], "rope", ins2, outs, []), opset_imports=ops())
    return std, fused

def skip_models(s):
    ins = [helper.make_tensor_value_info("x", f, [B, s, D]), helper.make_tensor_value_info("skip", f, [B, s, D])]
    outs = [helper.make_tensor_value_info("y", f, [B, s, D]), helper.make_tensor_value_info("sum", f, [B, s, D])]
    g = np.random.default_rng(1).standard_normal(D).astype(np.float32)
    inits = [helper.make_tensor("g", f, [D], g.tolist()), helper.make_tensor("two", f, [], [2.0]),
             helper.make_tensor("eps", f, [], [1e-6]), helper.make_tensor("axes", TensorProto.INT64, [1], [-1])]
    nodes = [helper.make_node("Add", ["x", "skip"], ["sum"]), helper.make_node("Pow", ["sum", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1), helper.make_node("Add", ["ms", "eps"], ["mse"]),
             helper.make_node("Sqrt", ["mse"], ["r"]), helper.make_node("Div", ["sum", "r"], ["n"]),
             helper.make_node("Mul", ["n", "g"], ["y"])]
    std = helper.make_model(helper.make_graph(nodes, "std", ins, outs, inits), opset_imports=ops())
    k = helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "g"], ["y", "", "", "sum"], domain="com.microsoft", epsilon=1e-6)
    fused = helper.make_model(helper.make_graph([k], "skip", ins, outs, inits[:1]), opset_imports=ops())
    return std, fused

def run(name, models, feeds, runs=30):
    s_std, s_f = sess(models[0]), sess(models[1])
    a = s_std.run(None, feeds[0])[0]; b = s_f.run(None, feeds[1])[0]
    fns = {"std": lambda: [s_std.run(None, feeds[0]) for _ in range(20)], "fused": lambda: [s_f.run(None, feeds[1]) for _ in range(20)]}
    t = interleaved(fns, runs=runs, warmup=2)
    r = paired_ratios(t["fused"], t["std"])
    ms = {k: statistics.median(v) * 50 for k, v in t.items()}
    print(f"| {name} | {statistics.median(r):.3f} [{median_ci(r)[0]:.3f}, {median_ci(r)[1]:.3f}] | {ms['std']:.3f}, {ms['fused']:.3f} | {float(np.abs(a - b).max()):.1e} |", flush=True)

def main() -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("seq", type=int, nargs="*", default=[128, 512])
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print("| kernel, seq | fused / standard [95% CI] | ms: standard, fused | max abs diff |")
    print("|---|---|---|---|")
    for s in args.seq:
        x = rng.standard_normal((B, N, s, H)).astype(np.float32)
        inv = 1.0 / (10000 ** (np.arange(0, H, 2) / H)); fr = np.outer(np.arange(s), inv).astype(np.float32)
        cos, sin = np.cos(np.concatenate([fr, fr], -1)), np.sin(np.concatenate([fr, fr], -1))
        run(f"RotaryEmbedding, {s}", rope_models(s), [{"x": x, "cos": cos, "sin": sin},
            {"x": x, "pos": np.arange(s, dtype=np.int64)[None].repeat(B, 0), "cosc": np.cos(fr), "sinc": np.sin(fr)}],
            runs=args.runs)
        xx, sk = rng.standard_normal((B, s, D)).astype(np.float32), rng.standard_normal((B, s, D)).astype(np.float32)
        run(f"SkipSimplifiedLayerNormalization, {s}", skip_models(s), [{"x": xx, "skip": sk}] * 2, runs=args.runs)

    return 0


if __name__ == "__main__":
    raise SystemExit(main())
