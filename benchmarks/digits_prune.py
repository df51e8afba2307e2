"""Real accuracy on real data, offline: prune the zoo's small CNN on handwritten digits, recover by distillation.

    python benchmarks/digits_prune.py [--ratio 0.5] [--epochs 40] [--recover-steps 600] [--seed 0]

scikit-learn's bundled 8x8 digits (``sklearn.datasets.load_digits``: 1797 images, no
download), scaled to [0, 1), split 75/25 (stratified, seeded). The zoo's ``small_cnn`` at
its default width (16, 32, 64 channels) is trained from its seeded init with Adam; the
trained model is captured (dynamic batch), ``prune-channels{ratio=R}`` removes R of the
channels of every prunable group, and :func:`optc.recover` fine-tunes the pruned program
by distillation from the trained model's logits on the *training images only* (no labels).
Reports test accuracy of the original, the pruned and the recovered model, and the
parameters and FLOPs before and after. The bar: recovered within 1 point of the original.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

import optc
from optc.ir.stats import model_stats
from optc.tools import zoo


def load_data(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=0.25, random_state=seed,
                                           stratify=y.numpy())
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def train(model, x, y, *, epochs: int, seed: int, lr: float = 3e-3, batch: int = 64):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            j = perm[i:i + batch]
            loss = F.cross_entropy(model(x[j]), y[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def accuracy(fn, x, y) -> float:
    with torch.no_grad():
        return float((fn(x).argmax(-1) == y).float().mean()) * 100


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--recover-steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-2, help="recovery learning rate (cosine decay to 0)")
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)

    x_train, y_train, x_test, y_test = load_data(args.seed)
    model, _ = zoo.load("small_cnn")
    t0 = time.perf_counter()
    train(model, x_train, y_train, epochs=args.epochs, seed=args.seed)
    t_train = time.perf_counter() - t0
    acc_orig = accuracy(model, x_test, y_test)

    program = optc.capture(model, (x_test[:4],), dynamic_shapes="batch")
    pruned, report = optc.optimize(program, f"prune-channels{{ratio={args.ratio}}}")
    acc_pruned = accuracy(pruned, x_test, y_test)

    t0 = time.perf_counter()
    recovered = optc.recover(pruned, teacher=model, data=x_train, steps=args.recover_steps, lr=args.lr,
                             temperature=args.temperature, batch_size=64, seed=args.seed)
    t_recover = time.perf_counter() - t0
    acc_recovered = accuracy(recovered, x_test, y_test)

    before, after = model_stats(program).total, model_stats(recovered).total
    res = {
        "ratio": args.ratio, "train_images": len(x_train), "test_images": len(x_test),
        "accuracy_original": acc_orig, "accuracy_pruned": acc_pruned, "accuracy_recovered": acc_recovered,
        "params_before": before.params, "params_after": after.params,
        "flops_before": before.flops, "flops_after": after.flops,
        "train_s": t_train, "recover_s": t_recover, "recover_steps": args.recover_steps,
        "recover_loss": recovered.meta["recover"],
        "pass_stats": report.stats("prune-channels"),
    }
    print(f"digits: {len(x_train)} train / {len(x_test)} test images; small_cnn trained {args.epochs} epochs "
          f"({t_train:.1f} s)")
    print(report.format())
    print(f"params {before.params} -> {after.params} ({after.params / before.params:.2f}x), "
          f"FLOPs {before.flops} -> {after.flops} ({after.flops / before.flops:.2f}x)")
    print(f"test accuracy: original {acc_orig:.2f}%  pruned {acc_pruned:.2f}%  "
          f"recovered {acc_recovered:.2f}% (distillation, {args.recover_steps} steps, {t_recover:.1f} s)")
    gap = acc_orig - acc_recovered
    print(f"recovered - original: {-gap:+.2f} points ({'meets' if gap <= 1.0 else 'misses'} the 1-point bar)")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, optc {optc.__version__}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
