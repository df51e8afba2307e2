"""A campaign's counts: :class:`CampaignReport` (per target, per op kind, the findings), as
text (:meth:`CampaignReport.format`) or JSON (:func:`report_json`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from optc.tools.fuzz.known_issues import known_issue
from optc.tools.fuzz.results import Mismatch, OracleResult, _first_line


@dataclass
class Finding:
    signature: tuple[str, str, str]
    first: Mismatch
    shrunk: Mismatch | None = None
    occurrences: int = 1
    reproducer: str | None = None
    models: list = field(default_factory=list)    # campaign model indices where it occurred


@dataclass
class CampaignReport:
    seed: int
    backends: tuple[str, ...]
    backend_rate: float | dict
    models: int = 0
    distinct: int = 0
    discarded: int = 0
    elapsed_s: float = 0.0
    per_target: dict[str, Counter] = field(default_factory=dict)
    time_per_target: dict[str, float] = field(default_factory=dict)
    kinds: Counter = field(default_factory=Counter)
    findings: dict[tuple, Finding] = field(default_factory=dict)
    notes: dict[str, Counter] = field(default_factory=dict)
    harness_errors: int = 0       # models the oracle itself failed on (not counted as models)
    code_digest: str = ""         # optc's source files when the campaign started (other people edit them)
    digests: set = field(default_factory=set, repr=False)   # the distinct models' spec digests

    def add(self, res: OracleResult, index: int | None = None) -> None:
        if res.discarded:
            self.discarded += 1
            return
        self.models += 1
        self.kinds.update(res.spec.kinds())
        for target, status in res.status.items():
            c = self.per_target.setdefault(target, Counter())
            c[status] += 1
            c["ran"] += status not in ("unavailable", "blocked")
            c["fired"] += status != "fired" and target in res.changed   # an unchecked or rounding run changed it too
        for target, note in res.notes.items():
            self.notes.setdefault(target, Counter())[note] += 1
        for target, t in res.times.items():
            self.time_per_target[target] = self.time_per_target.get(target, 0.0) + t
        for m in res.mismatches:
            f = self.findings.get(m.signature)
            if f is None:
                f = self.findings[m.signature] = Finding(m.signature, m)
            else:
                f.occurrences += 1
            if index is not None and len(f.models) < 1000:
                f.models.append(index)

    def format(self) -> str:
        lines = [f"optc fuzz: seed {self.seed}, {self.elapsed_s / 60:.1f} min, {self.models} models compared "
                 f"({self.distinct} distinct, {self.discarded} discarded: eager output not finite"
                 f"{f', {self.harness_errors} harness errors' if self.harness_errors else ''}); "
                 f"backends {', '.join(self.backends) or 'none'} at rate {_rate_text(self.backend_rate)}",
                 f"code: {self.code_digest}",
                 "",
                 f"{'target':<28}{'ran':>8}{'fired':>8}{'mismatch':>10}{'rounding':>10}{'refused':>9}{'unsupported':>13}"
                 f"{'unchecked':>11}{'unavailable':>13}{'ms/model':>10}"]
        for target in sorted(self.per_target, key=_target_order):
            c = self.per_target[target]
            ran = c["ran"]
            ms = 1e3 * self.time_per_target.get(target, 0.0) / max(ran, 1)
            fired = str(c["fired"]) if target.startswith(("pass:", "pipeline:")) else "-"
            lines.append(f"{target:<28}{ran:>8}{fired:>8}{c['mismatch']:>10}{c['rounding']:>10}{c['refused']:>9}{c['unsupported']:>13}"
                         f"{c['unchecked']:>11}{c['unavailable']:>13}{ms:>10.1f}")
        lines.append("")
        if self.kinds:      # the generator's coverage: how many models had each op kind
            lines.append("op kinds (models with at least one):")
            row = " "
            for name, n in sorted(self.kinds.items(), key=lambda kv: (-kv[1], kv[0])):
                item = f" {name} {n}"
                if len(row) + len(item) > 110:
                    lines.append(row)
                    row = " "
                row += item
            lines += [row, ""]
        if not self.findings:
            lines.append("no mismatches")
        for f in self.findings.values():
            m = f.shrunk or f.first
            known = known_issue(f.first)
            tag = ("UNEXPLAINED MISMATCH" if known is None else
                   f"KNOWN ({known.where} accuracy trade-off, accepted: {known.id})" if known.accepted else
                   f"KNOWN ({known.where} bug: {known.id})")
            lines.append(f"{tag} x{f.occurrences}: {f.first.target}: {f.first.kind}: {_first_line(f.first.detail)}")
            if f.reproducer:
                lines.append(f"  reproducer ({len(m.spec.ops)} ops): {f.reproducer}")
        for target, notes in sorted(self.notes.items()):
            for note, n in notes.most_common(5):
                lines.append(f"note x{n}: {target}: {note}")
        return "\n".join(lines)

    def merge(self, other: "CampaignReport") -> None:
        """Add ``other``'s counts (another worker of the same campaign) to this report."""
        self.models += other.models
        self.digests |= other.digests
        self.distinct = len(self.digests)
        self.discarded += other.discarded
        self.harness_errors += other.harness_errors
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)
        self.kinds.update(other.kinds)
        for t, c in other.per_target.items():
            self.per_target.setdefault(t, Counter()).update(c)
        for t, c in other.notes.items():
            self.notes.setdefault(t, Counter()).update(c)
        for t, v in other.time_per_target.items():
            self.time_per_target[t] = self.time_per_target.get(t, 0.0) + v
        for sig, f in other.findings.items():
            mine = self.findings.get(sig)
            if mine is None:
                self.findings[sig] = f
            else:
                mine.occurrences += f.occurrences
                mine.models = sorted(mine.models + f.models)[:1000]
                if mine.reproducer is None:
                    mine.shrunk, mine.reproducer = f.shrunk, f.reproducer

    @property
    def unexplained(self) -> list[Finding]:
        return [f for f in self.findings.values() if known_issue(f.first) is None]

    def __str__(self) -> str:
        return self.format()


def _rate_text(rate) -> str:
    return ",".join(f"{b}={r:g}" for b, r in rate.items()) if isinstance(rate, dict) else f"{rate:g}"


def _target_order(t: str):
    return (["capture", "pass", "pipeline", "backend"].index(t.split(":")[0]), t)


def report_json(report: CampaignReport) -> dict:
    return {"seed": report.seed, "backends": list(report.backends), "backend_rate": report.backend_rate,
            "code_digest": report.code_digest,
            "models": report.models, "distinct": report.distinct, "discarded": report.discarded,
            "harness_errors": report.harness_errors,
            "elapsed_s": report.elapsed_s, "kinds": dict(report.kinds),
            "per_target": {t: dict(c) for t, c in report.per_target.items()},
            "ms_per_model": {t: 1e3 * s / max(report.per_target.get(t, Counter())["ran"], 1)
                             for t, s in report.time_per_target.items()},
            "findings": [{"target": f.first.target, "kind": f.first.kind, "detail": f.first.detail[:2000],
                          "known": getattr(known_issue(f.first), "id", None),
                          "occurrences": f.occurrences, "reproducer": f.reproducer, "models": f.models,
                          "shrunk_spec": repr((f.shrunk or f.first).spec)} for f in report.findings.values()],
            "notes": {t: dict(c) for t, c in report.notes.items()}}
