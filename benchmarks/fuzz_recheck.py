"""Run the models a campaign found mismatches on through the same targets again, on today's code.

    python benchmarks/fuzz_recheck.py CAMPAIGN.json [--max-ops 10]

CAMPAIGN.json is what ``optc fuzz --json`` wrote. For every finding it regenerates each recorded
model (``SEED:k``), runs the oracle on the finding's target only, and prints per model the status
(``ok``/``fired``: agrees now; ``rounding``: float32 rounding, see docs/fuzzing.md; ``mismatch``:
still a finding, with the known-issue id when it is one) -- the "fixed / worked around / explained"
column of a campaign's counts.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections import Counter

from optc.tools.fuzz import known_issue, random_spec_choices, run_target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("campaign")
    ap.add_argument("--max-ops", type=int, default=10)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    data = json.load(open(args.campaign))
    seed = data["seed"]
    totals: Counter = Counter()
    still = 0
    for f in data["findings"]:
        target = f["target"]
        print(f"{target} {f['kind']} x{f['occurrences']}: {f['detail'].splitlines()[0][:110]}")
        for k in f["models"]:
            spec, _ = random_spec_choices(f"{seed}:{k}", args.max_ops, None)
            res = run_target(spec, target)
            status = res.status.get(target)
            known = [known_issue(m) for m in res.mismatches]
            if res.mismatches and all(known):
                status = f"known:{known[0].id}" + (" (accepted)" if known[0].accepted else "")
            elif res.mismatches:
                still += 1
            totals[status] += 1
            detail = res.mismatches[0].detail.splitlines()[0][:100] if res.mismatches else res.notes.get(target, "")
            print(f"  model {k}: {status}  {detail}")
    print("totals:", dict(totals), f"- {still} still unexplained")
    return 1 if still else 0


if __name__ == "__main__":
    raise SystemExit(main())
