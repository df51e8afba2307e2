"""A benchmark's result (:class:`BenchResult`): the table (text or Markdown), the acceptance bars
(:data:`BARS`) with confidence intervals, JSON, and the machine it ran on (:func:`machine_info`)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import statistics
import subprocess
from dataclasses import dataclass

import torch

from optc.tools.bench.candidates import Candidate
from optc.tools.bench.timing import median_ci, paired_ratios, percentile


#: (candidate, reference, most allowed ratio): the project's acceptance bars.
BARS = (("optc onnx", "onnxruntime", 1.0), ("optc torchscript", "eager", 1.0), ("optc tvm", "onnxruntime", 3.0),
        ("optc tvm tuned", "onnxruntime", 1.5))
#: Candidates measured only on request (their bar is left out when they are absent).
OPTIONAL_CANDIDATES = frozenset({"optc tvm tuned"})


@dataclass
class BenchResult:
    model: str
    inputs: str
    command: str
    machine: dict
    threads: int
    runs: int
    warmup: int
    candidates: list[Candidate]
    date: str
    wall_s: float = 0.0
    pause_ms: float = 0.0

    def by_name(self, name: str) -> Candidate | None:
        return next((c for c in self.candidates if c.name == name), None)

    def ratio(self, name: str, ref: str) -> tuple[float, float, float] | None:
        """The median over rounds of ``name``'s time / ``ref``'s time, and its 95% confidence
        interval (:func:`median_ci`)."""
        a, b = self.by_name(name), self.by_name(ref)
        if a is None or b is None or not a.times or not b.times:
            return None
        r = paired_ratios(a.times, b.times)
        return (statistics.median(r), *median_ci(r))

    def bars(self) -> list[tuple[str, str, float, tuple | None, str]]:
        """``(candidate, reference, bar, ratio, verdict)`` for each acceptance bar."""
        out = []
        for name, ref, bar in BARS:
            r = self.ratio(name, ref)
            cand = self.by_name(name)
            if cand is None and name in OPTIONAL_CANDIDATES:
                continue
            if r is None:
                refc = self.by_name(ref)
                if cand is None or refc is None:
                    why = f"no {name if cand is None else ref} row"
                else:
                    why = next((c.error for c in (cand, refc) if c.error), "no timings")
                verdict = f"not measured ({why})"
            else:
                verdict = "met" if r[0] <= bar else "NOT met"
                if r[1] <= bar <= r[2]:
                    verdict += " (not significant: the 95% CI contains the bar)"
            out.append((name, ref, bar, r, verdict))
        return out

    @staticmethod
    def from_json(d: dict) -> "BenchResult":
        """The result :meth:`to_json` wrote (to re-render a recorded run)."""
        cands = [Candidate(c["name"], c["kind"], error=c.get("error"), note=c.get("note", ""),
                           compile_s=c.get("compile_s"), peak_bytes=c.get("peak_rss_growth_bytes"),
                           max_rel_err=c.get("max_rel_err"), times=list(c.get("times_s", [])),
                           details={k: c[k] for k in ("compile_report",) if k in c})
                 for c in d["candidates"]]
        return BenchResult(model=d["model"], inputs=d["inputs"], command=d["command"], machine=d["machine"],
                           threads=d["threads"], runs=d["runs"], warmup=d["warmup"], candidates=cands,
                           date=d["date"], wall_s=d.get("wall_s", 0.0), pause_ms=d.get("pause_ms", 0.0))

    def to_json(self) -> dict:
        rows = []
        eager = self.by_name("eager")
        for c in self.candidates:
            row = {"name": c.name, "kind": c.kind, "error": c.error, "note": c.note,
                   "compile_s": c.compile_s, "peak_rss_growth_bytes": c.peak_bytes, "max_rel_err": c.max_rel_err,
                   "times_s": c.times, **c.details}
            if c.times:
                row["median_s"] = statistics.median(c.times)
                row["p10_s"], row["p90_s"] = percentile(c.times, 10), percentile(c.times, 90)
                if eager is not None and eager.times:
                    row["ratio_vs_eager"] = statistics.median(paired_ratios(c.times, eager.times))
            rows.append(row)
        return {"model": self.model, "inputs": self.inputs, "command": self.command, "date": self.date,
                "machine": self.machine, "threads": self.threads, "runs": self.runs, "warmup": self.warmup,
                "pause_ms": self.pause_ms,
                "wall_s": self.wall_s, "candidates": rows,
                "bars": [{"candidate": n, "reference": r, "bar": b, "ratio": q[0] if q else None,
                          "ci95": [q[1], q[2]] if q else None, "verdict": v}
                         for n, r, b, q, v in self.bars()]}

    # -- tables --
    def _rows(self) -> list[list[str]]:
        eager = self.by_name("eager")
        rows = []
        for c in self.candidates:
            if c.times:
                med = statistics.median(c.times)
                ratio = statistics.median(paired_ratios(c.times, eager.times)) if eager and eager.times else None
                lat = _ms(med)
                spread = f"{_ms(percentile(c.times, 10))}-{_ms(percentile(c.times, 90))}"
                rat = f"{ratio:.2f}x" if ratio is not None else "-"
            else:
                lat, spread, rat = "-", "-", "-"
            comp = f"{c.compile_s:.1f}" if c.compile_s is not None else "-"
            mem = f"{c.peak_bytes / 2 ** 20:.0f}" if c.peak_bytes is not None else ("n/a" if c.ok else "-")
            err = f"{c.max_rel_err:.1e}" if c.max_rel_err is not None else "-"
            note = c.error if c.error else c.note
            rows.append([c.name, lat, rat, spread, comp, mem, err, note])
        return rows

    def _protocol(self) -> str:
        return (f"{self.warmup} warm-up + {self.runs} timed rounds, each candidate once per round in random "
                f"order, {self.pause_ms:g} ms pause before each call")

    def pipelines(self) -> list[str]:
        """One line per optc candidate: the passes its pipeline ran."""
        return [f"pipeline of {c.name}: {c.details['compile_report']['pipeline'] or '(empty)'}"
                for c in self.candidates if "compile_report" in c.details]

    HEADER = ["candidate", "median ms", "x eager", "p10-p90 ms", "compile s", "peak MiB", "max rel err", "note"]

    def format(self, markdown: bool = False) -> str:
        m = self.machine
        lines = []
        if markdown:
            lines += [f"`{self.command}`", "",
                      f"- date: {self.date}; wall time {self.wall_s:.0f} s",
                      f"- machine: {m['cpu']}, {m['cores']} cores; {self.threads} threads used; "
                      f"load average {m['loadavg_start']} at start, {m['loadavg_end']} at end",
                      f"- versions: {_versions_text(m['versions'])}",
                      f"- model: {self.model}, inputs {self.inputs}; {self._protocol()}", ""]
            lines.append("| " + " | ".join(self.HEADER) + " |")
            lines.append("|" + "|".join("---:" if 0 < i < 7 else "---" for i in range(len(self.HEADER))) + "|")
            for r in self._rows():
                lines.append("| " + " | ".join(x.replace("|", "\\|") for x in r) + " |")
            lines.append("")
            for name, ref, bar, r, verdict in self.bars():
                shown = f"{r[0]:.3f}x (95% CI {r[1]:.3f}-{r[2]:.3f})" if r else "-"
                lines.append(f"- {name} / {ref} = {shown}; bar <= {bar:g}x: **{verdict}**")
            lines += [f"- {line}" for line in self.pipelines()]
            return "\n".join(lines) + "\n"
        lines += [f"command:  {self.command}",
                  f"date:     {self.date} (wall time {self.wall_s:.0f} s)",
                  f"machine:  {m['cpu']}, {m['cores']} cores; {self.threads} threads used; load average "
                  f"{m['loadavg_start']} -> {m['loadavg_end']}",
                  f"versions: {_versions_text(m['versions'])}",
                  f"model:    {self.model}, inputs {self.inputs}; {self._protocol()}", ""]
        rows = [self.HEADER] + self._rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.HEADER) - 1)]
        for r in rows:
            cells = [r[i].ljust(widths[i]) if i == 0 else r[i].rjust(widths[i]) for i in range(len(widths))]
            lines.append("  ".join(cells) + "  " + r[-1])
        lines.append("")
        for name, ref, bar, r, verdict in self.bars():
            shown = f"{r[0]:.3f}x (95% CI {r[1]:.3f}-{r[2]:.3f})" if r else "-"
            lines.append(f"{name} / {ref} = {shown}; bar <= {bar:g}x: {verdict}")
        lines += self.pipelines()
        return "\n".join(lines) + "\n"


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _versions_text(v: dict) -> str:
    return ", ".join(f"{k} {val}" for k, val in v.items() if val)


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    cores = os.cpu_count()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cpu = fields.get("Model name", cpu)
        if "Core(s) per socket" in fields and "Socket(s)" in fields:
            cores = int(fields["Core(s) per socket"]) * int(fields["Socket(s)"])
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    versions = {"python": platform.python_version()}
    for dist in ("optc", "torch", "onnxruntime", "onnx", "onnxscript", "apache-tvm"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    gcc = shutil.which("gcc")
    if gcc:
        try:
            first = subprocess.run([gcc, "--version"], capture_output=True, text=True, timeout=10).stdout.splitlines()
            versions["gcc"] = first[0].split()[-1] if first else None
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {"cpu": cpu, "cores": cores, "usable_cpus": affinity, "platform": platform.platform(),
            "versions": versions, "loadavg_start": _loadavg(), "loadavg_end": None}


def _loadavg() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _describe_inputs(args: tuple, kwargs: dict) -> str:
    def one(t):
        if isinstance(t, torch.Tensor):
            from optc.ir.program import dtype_short
            return f"{dtype_short(t.dtype)}[{','.join(map(str, t.shape))}]"
        return repr(t)
    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"
