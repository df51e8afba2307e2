"""Peak memory of compiling a Llama-family decoder, per route, against its weight bytes.

    python benchmarks/bench_memory.py [--routes plain optc-onnx optc-torchscript optc-tvm]
                                      [--layers 24] [--hidden 1024] [--seq 128] [--json OUT]

The model: ``LlamaModel`` built from a config (hidden 1024, 24 layers, 16 heads, 4 key/value
heads, MLP 2816, vocabulary 32000: 303 M parameters, 1.13 GiB of float32 weights; random
weights, nothing downloaded), called on ``--seq`` token ids. Each route runs in a fresh Python
process, so that its peak resident set (``ru_maxrss`` of that process, what ``/usr/bin/time -v``
prints as "Maximum resident set size") is its own:

- ``plain``: ``torch.onnx.export(model, dynamo=True)`` saved with external data, then an ONNX
  Runtime session created from the file and run once -- what a user does without optc;
- ``optc-B``: ``optc.compile(model, (ids,), backend=B)`` with the default pipeline and the
  compile-time check, then one call of the compiled model;
- ``optc-onnx-reference``: ``optc-onnx`` with ``params="reference"``: the session runs on the
  model's own weights instead of a copy (what ``params="auto"`` picks only where the copy would
  not fit in the memory available); ``optc-torchscript-reference`` the same for TorchScript (its
  linears over the model's weights rather than packed copies), ``optc-tvm-reference`` for TVM
  (linears reading the weights in place rather than the load-time transposed and repacked copy);
- ``optc-onnx-meta``: the same model built on the ``meta`` device (nothing materialised) and
  ``optc.compile(..., backend="onnx", weights=[model.safetensors, rotary buffers])``: the weights
  memory-mapped from a safetensors file written beforehand by another process (the rotary
  ``inv_freq`` buffers, which no checkpoint holds, computed by a real rotary module);
- ``optc-torchscript-meta``, ``optc-tvm-meta``, ``optc-openvino-meta``: the same to the other
  backends;
- ``optc-torchscript-bf16-meta``: the same from a meta model to TorchScript with
  ``default,to-half{dtype=bfloat16}`` (the weights cast to bfloat16 as they are read; the error
  against eager float32 is bfloat16's);
- ``optc-onnx-int8-meta``: the same to ONNX with ``default,insert-qdq{scheme=dynamic}`` (int8
  weights, activations quantized at run time: weight-only calibration).

Reported per route: peak RSS, its ratio to the weight bytes, what the process held after
building the model (the model itself), and the wall time. Both the model's own copy of the
weights and the route's are in the peak: the ratio of a route that holds nothing beyond the
user's model and a runtime that reads the weights once is about 2.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROUTES = ("plain", "optc-onnx", "optc-onnx-reference", "optc-torchscript", "optc-torchscript-reference", "optc-tvm",
          "optc-tvm-reference",
          "optc-openvino", "optc-onnx-meta", "optc-torchscript-meta", "optc-tvm-meta", "optc-openvino-meta", "optc-torchscript-bf16-meta",
          "optc-onnx-int8-meta")
# the meta routes: backend and pipeline
META = {"optc-onnx-meta": ("onnx", "default"), "optc-torchscript-meta": ("torchscript", "default"),
        "optc-tvm-meta": ("tvm", "default"), "optc-openvino-meta": ("openvino", "default"),
        "optc-torchscript-bf16-meta": ("torchscript", "default,to-half{dtype=bfloat16}"),
        "optc-onnx-int8-meta": ("onnx", "default,insert-qdq{scheme=dynamic}")}


def _config(layers: int, hidden: int):
    import transformers as T
    heads = max(hidden // 64, 1)
    return T.LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1), vocab_size=32000,
                         max_position_embeddings=2048, attn_implementation="eager")


def _build(layers: int, hidden: int, seq: int, device: str = "cpu"):
    import torch
    import transformers as T
    torch.manual_seed(0)
    with torch.device(device):
        model = T.LlamaModel(_config(layers, hidden)).eval()

    class Out(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids, use_cache=False).last_hidden_state

    ids = torch.randint(0, 32000, (1, seq), generator=torch.Generator().manual_seed(0))
    return Out(model).eval(), ids


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _weights_file(layers: int, hidden: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"optc-bench-llama-{layers}x{hidden}.safetensors")


def _write_weights(layers: int, hidden: int) -> None:
    from safetensors.torch import save_file
    model, _ = _build(layers, hidden, 1)
    path = _weights_file(layers, hidden)
    save_file({k: v.contiguous() for k, v in model.m.state_dict().items()}, path + ".tmp")
    os.replace(path + ".tmp", path)


def _child(route: str, layers: int, hidden: int, seq: int) -> dict:
    import torch
    torch.set_num_threads(2)
    model, ids = _build(layers, hidden, seq, device="meta" if route.endswith("-meta") else "cpu")
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    params = sum(p.numel() for p in model.parameters())
    held_kib = _rss_kib()
    t0 = time.perf_counter()
    if route in META:
        backend, pipeline = META[route]
        import optc
        import transformers as T
        rope = T.models.llama.modeling_llama.LlamaRotaryEmbedding(_config(layers, hidden))   # real: a few floats
        extra = {f"rotary_emb.{n}": b for n, b in rope.named_buffers()}
        weights = [_weights_file(layers, hidden), extra]
        compiled, report = optc.compile(model, (ids,), backend=backend, pipeline=pipeline, weights=weights)
        with torch.no_grad():
            got = compiled(ids)
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # then eager on the same weights (memory-mapped again), after the peak was read: does
        # the compiled model match the model it was compiled from?
        from optc.ir.weights import with_weights
        with torch.no_grad():
            ref = with_weights(model, weights)(ids)
        err = float((got - ref).abs().max() / ref.abs().max())
        return {"route": route, "params": params, "weight_bytes": weight_bytes, "peak_rss_bytes": peak,
                "ratio": peak / weight_bytes, "model_held_bytes": held_kib * 1024, "wall_s": wall,
                "max_rel_err_vs_eager": err, "check": str(report.check.outputs[0].error) if report.check else None}
    elif route == "plain":
        import onnxruntime as ort
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "model.onnx")
            torch.onnx.export(model, (ids,), path, dynamo=True, external_data=True, verbose=False)
            so = ort.SessionOptions()
            so.intra_op_num_threads = 2
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})
    else:
        import optc
        backend = route.split("-")[1]
        options = {"params": "reference"} if route.endswith("-reference") else {}
        compiled, report = optc.compile(model, (ids,), backend=backend, **options)
        with torch.no_grad():
            compiled(ids)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"route": route, "params": params, "weight_bytes": weight_bytes, "peak_rss_bytes": peak,
            "ratio": peak / weight_bytes, "model_held_bytes": held_kib * 1024, "wall_s": wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--routes", nargs="+", default=[r for r in ROUTES if "openvino" not in r], choices=ROUTES,
                    help="default: all but the OpenVINO routes (the openvino extra)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--write-weights", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.write_weights:
        _write_weights(args.layers, args.hidden)
        return 0
    if args.child:
        print(json.dumps(_child(args.child, args.layers, args.hidden, args.seq)))
        return 0
    rows = []
    print("| route | params | weights | peak RSS | peak / weights | model alone | wall s |")
    print("|---|---|---|---|---|---|---|")
    if any(r.endswith("-meta") for r in args.routes) and not os.path.exists(_weights_file(args.layers, args.hidden)):
        print(f"writing {_weights_file(args.layers, args.hidden)} (another process)", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, __file__, "--write-weights", "--layers", str(args.layers), "--hidden",
                        str(args.hidden)], check=True)
    for route in args.routes:
        cmd = [sys.executable, __file__, "--child", route, "--layers", str(args.layers), "--hidden",
               str(args.hidden), "--seq", str(args.seq)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            tail = (p.stderr.strip().splitlines() or ["?"])[-1]
            print(f"| {route} | failed (exit {p.returncode}): {tail[:200]} |||||| ", flush=True)
            rows.append({"route": route, "error": tail, "returncode": p.returncode})
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        gib = 1024 ** 3
        print(f"| {route} | {r['params'] / 1e6:.0f} M | {r['weight_bytes'] / gib:.2f} GiB | "
              f"{r['peak_rss_bytes'] / gib:.2f} GiB | {r['ratio']:.2f}x | {r['model_held_bytes'] / gib:.2f} GiB | "
              f"{r['wall_s']:.0f} |" + (f" max rel err vs eager {r['max_rel_err_vs_eager']:.1e}" if "max_rel_err_vs_eager" in r
                                        else ""), flush=True)
        rows.append(r)
    from optc.tools.bench import machine_info
    info = machine_info()
    print(f"\nmachine: {info}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "machine": info, "argv": sys.argv}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
