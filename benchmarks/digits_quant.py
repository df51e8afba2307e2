"""Real accuracy on real data, offline: the zoo's small CNN trained on handwritten digits, then INT8
(insert-qdq, calibrated on training images) and half precision (to-half), on the Program and on
the backends that run them.

    python benchmarks/digits_quant.py [--epochs 40] [--calibration 256] [--seed 0] [--json FILE]

scikit-learn's bundled 8x8 digits (``sklearn.datasets.load_digits``: 1797 images, no download),
scaled to [0, 1), split 75/25 (stratified, seeded); ``small_cnn`` at its default width trained
from its seeded init exactly as ``benchmarks/digits_prune.py`` does. The trained model is captured
with a dynamic batch and

- INT8 static: ``default,insert-qdq{calibration=...}`` calibrated on ``--calibration`` training
  images (batches of 32; never test images), evaluated as the quantized Program (float emulation
  of the integer arithmetic) and compiled for ONNX Runtime, whose integer kernels (QLinearConv,
  QGemm) then run the test set;
- bfloat16 and float16: ``default,to-half{dtype=...}``, evaluated as the Program (torch's half CPU
  kernels) and on ONNX Runtime.

Reports the test accuracy of each, the number of test images whose prediction changed and how
far the logits moved (cosine against float32's, largest absolute change). The bars: INT8 loses at
most 0.5 accuracy points, bfloat16 at most 0.5.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings

import torch

import optc
from optc.tools import zoo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from digits_prune import accuracy, load_data, train  # noqa: E402  (the same data and training recipe)


def logits(fn, x, batch: int = 128) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i:i + batch]).float() for i in range(0, len(x), batch)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--calibration", type=int, default=256, help="training images insert-qdq calibrates on")
    ap.add_argument("--method", default="minmax", choices=("minmax", "percentile", "entropy"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    warnings.simplefilter("ignore")

    x_train, y_train, x_test, y_test = load_data(args.seed)
    model, _ = zoo.load("small_cnn")
    train(model, x_train, y_train, epochs=args.epochs, seed=args.seed)
    program = optc.capture(model, (x_test[:4],), dynamic_shapes="batch")
    ref_logits = logits(model, x_test)
    ref = ref_logits.argmax(-1)
    acc_fp32 = accuracy(model, x_test, y_test)

    rows = [("float32 (eager)", acc_fp32, 0, 1.0, 0.0)]
    calib = list(x_train[:args.calibration].split(32))
    variants = {
        "int8": f"default,insert-qdq{{calibration={args.method}}}",
        "bfloat16": "default,to-half{dtype=bfloat16}",
        "float16": "default,to-half{dtype=float16}",
    }
    reports = {}
    for label, pipeline in variants.items():
        data = calib if label == "int8" else None
        new, report = optc.optimize(program, pipeline, calibration_data=data)
        reports[label] = report
        for where, fn in (("Program", new), ("ONNX Runtime", None)):
            if fn is None:
                fn, _ = optc.compile(new, backend="onnx", threads=2)
            out = logits(fn, x_test)
            pred = out.argmax(-1)
            acc = float((pred == y_test).float().mean()) * 100
            cos = float(torch.nn.functional.cosine_similarity(out.double(), ref_logits.double(), dim=-1).mean())
            rows.append((f"{label} ({where})", acc, int((pred != ref).sum()), cos,
                         float((out - ref_logits).abs().max())))

    print(f"digits: {len(x_train)} train / {len(x_test)} test images; small_cnn trained {args.epochs} epochs")
    print(f"int8: {reports['int8'].records[-1].text}, calibrated on {args.calibration} training images")
    from optc.passes.insert_qdq import quant_report
    print(quant_report(optc.optimize(program, variants["int8"], calibration_data=calib)[0]).format())
    print(f"{'model':<28}{'test accuracy':>14}{'vs fp32':>10}{'changed':>9}{'logit cos':>11}{'max |dlogit|':>14}")
    for name, acc, changed, cos, dmax in rows:
        print(f"{name:<28}{acc:>13.2f}%{acc - acc_fp32:>+10.2f}{changed:>9}{cos:>11.6f}{dmax:>14.4f}")
    print(f"(changed: test images whose predicted class differs from float32's; logit cos: mean over test images "
          f"of the cosine of the 10 logits against float32's; float32's logits span "
          f"{float(ref_logits.min()):.1f}..{float(ref_logits.max()):.1f})")
    verdicts = []
    for label in ("int8", "bfloat16"):
        worst = min(row[1] for row in rows if row[0].startswith(label + " "))
        loss = acc_fp32 - worst
        verdicts.append(f"{label}: loses {loss:.2f} points at most ({'meets' if loss <= 0.5 else 'misses'} the "
                        "0.5-point bar)")
    print("\n".join(verdicts))
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, optc {optc.__version__}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "verdicts": verdicts, "args": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
