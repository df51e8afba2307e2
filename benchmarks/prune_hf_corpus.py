"""Structured pruning over the HF corpus: which architectures get heads and channels pruned, and is
each surgery exact.

    python benchmarks/prune_hf_corpus.py [--names llama,gpt2,...] [--ratio 0.5] [--attention eager|sdpa]

Every architecture of ``tools/hf_corpus.py`` (small configs, random weights, nothing downloaded) is
captured and run through the TorchScript target's default pipeline (the fusions, without
``merge-parallel-linear``); then ``prune-heads`` and ``prune-channels`` each run on that program.
Per pass it prints the groups pruned out of those found, the first refusal, and the exactness of
the surgery: the largest relative difference between the pruned program and the unpruned one with
the removed channels' consumer weights zeroed (``zero_removed_channels``) on the example inputs;
float rounding only (about 1e-7) when the surgery is right. A coverage sweep, not a timing: needs the
``hf`` extra.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils._pytree import tree_flatten

import optc
from optc.passes.prune_channels import zero_removed_channels
from optc.tools import hf_corpus


def _flat(out) -> torch.Tensor:
    return torch.cat([t.detach().flatten().float() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)])


def sweep(names: list[str], ratio: float, attention: str = "eager") -> int:
    failures = 0
    print(f"{'model':14s} {'pass':15s} {'pruned':>7s} {'surgery err':>12s}  first refusal")
    for name in names:
        try:
            model, inputs = hf_corpus.build(name, attention=attention)
        except ValueError as e:          # transformers has no sdpa attention for this architecture
            print(f"{name:14s} not built: {str(e).splitlines()[0][:90]}")
            continue
        before, _ = optc.optimize(optc.capture(model, inputs), "default", "torchscript:cpu")
        for pass_name in ("prune-heads", "prune-channels"):
            pruned, report = optc.optimize(before, f"{pass_name}{{ratio={ratio}}}", "torchscript:cpu")
            rec = report.record(pass_name)
            plan = pruned.meta.get("prune_plan")
            err = "-"
            if plan is not None:
                zeroed = zero_removed_channels(before, plan)
                with torch.no_grad():
                    a, b = _flat(pruned.graph_module(*inputs)), _flat(zeroed.graph_module(*inputs))
                e = float((a - b).abs().max() / b.abs().max())
                err = f"{e:.1e}"
                failures += e > 1e-5
            why = rec.rejections[0][2] if rec.rejections else ""
            print(f"{name:14s} {pass_name:15s} {rec.stats.get('pruned', 0):>3d}/{rec.stats.get('groups', 0):<3d} "
                  f"{err:>12s}  {why[:90]}", flush=True)
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--names", default=",".join(hf_corpus.ENTRIES), help="corpus entries, comma-separated")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--attention", choices=("eager", "sdpa"), default="eager",
                    help="transformers' attention implementation the models are built with")
    args = ap.parse_args(argv)
    failures = sweep([n for n in args.names.split(",") if n], args.ratio, args.attention)
    if failures:
        print(f"{failures} surgeries were not exact", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
