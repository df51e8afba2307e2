"""``optc report``'s page in headless Chromium: how long the first render takes.

    python benchmarks/bench_report.py [--runs 5] [--out DIR] [--screenshot docs/img/report.png] [--json OUT]

Builds the reports (``optc report``; build time printed) of
- ``bert``: optc's BERT-base (12 layers, hidden 768) after the default pipeline, with ONNX Runtime
  (error, time, FLOPs, parameter and weight overlays);
- ``bert48``: the same encoder with 48 layers, captured only (``--pipeline dce``): over 2,000 nodes;
- ``bert240``: 240 layers, hidden 16, captured only: over 10,000 nodes;
and opens each from disk ``--runs`` times in headless Chromium (``--dump-dom``, one process a run),
interleaved with an empty page as the baseline. Reported per page: the browser's wall time from
start to the dumped DOM (load, parse, first layout and render) against the empty page's, and the
page's own measure of its first render (``performance.now()`` from the viewer's start to the drawn
graph: ``data-first-render-ms``), median of the runs. A timing measured here, never in a test.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_real_models import finish  # noqa: E402

PAGES = {
    "bert": ["zoo:bert", "--backend", "onnx"],
    "bert48": ["zoo:bert", "--config", "num_layers=48", "--pipeline", "dce", "--no-time"],
    "bert240": ["zoo:bert", "--config", "num_layers=240", "--config", "hidden_size=16", "--config", "num_heads=2",
                "--config", "intermediate_size=32", "--pipeline", "dce", "--no-time"],
}


def browser() -> str:
    for b in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(b):
            return shutil.which(b)
    raise SystemExit("bench_report: no chromium on PATH (apt-get install chromium)")


def open_page(path: str, fragment: str = "") -> tuple[float, float | None]:
    cmd = [browser(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900", "--dump-dom",
           "file://" + os.path.abspath(path) + fragment]
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300).stdout
    wall = time.perf_counter() - t
    m = re.search(r'data-first-render-ms="([\d.]+)"', out)
    return wall, float(m.group(1)) if m else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--pages", nargs="+", default=list(PAGES), choices=list(PAGES))
    ap.add_argument("--out", default=None, help="keep the reports in this folder")
    ap.add_argument("--screenshot", default=None, help="write a screenshot of the bert report here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="optc-bench-report-")
    os.makedirs(out, exist_ok=True)
    empty = os.path.join(out, "empty.html")
    with open(empty, "w") as f:
        f.write("<!DOCTYPE html><html><body></body></html>")
    built = {}
    for name in args.pages:
        path = os.path.join(out, f"{name}.html")
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "optc.tools.cli", "report", *PAGES[name], "--out", path],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"optc report {name} failed:\n{proc.stderr[-2000:]}")
        built[name] = (path, time.perf_counter() - t, proc.stdout.strip())
        print(f"{name}: built in {built[name][1]:.1f} s: {built[name][2]}", flush=True)
    walls = {name: [] for name in ["(empty page)", *args.pages]}
    renders = {name: [] for name in args.pages}
    for _ in range(args.runs):
        walls["(empty page)"].append(open_page(empty)[0])
        for name in args.pages:
            wall, render = open_page(built[name][0])
            walls[name].append(wall)
            if render is not None:
                renders[name].append(render)
    base = statistics.median(walls["(empty page)"])
    rows = []
    print(f"\n{'page':<14}{'nodes':>8}{'MiB':>7}{'wall s':>9}{'- empty s':>11}{'x empty':>9}{'first render ms':>17}")
    print(f"{'(empty page)':<14}{'':>8}{'':>7}{base:>9.2f}{0:>11.2f}{1:>9.2f}{'':>17}")
    for name in args.pages:
        path = built[name][0]
        nodes = int(re.search(r"(\d+) nodes", built[name][2]).group(1))
        w = statistics.median(walls[name])
        r = statistics.median(renders[name]) if renders[name] else float("nan")
        mib = os.path.getsize(path) / 2**20
        print(f"{name:<14}{nodes:>8}{mib:>7.1f}{w:>9.2f}{w - base:>11.2f}{w / base:>9.2f}{r:>17.0f}")
        rows.append({"page": name, "nodes": nodes, "mib": mib, "wall_s": w, "empty_s": base, "first_render_ms": r,
                     "build_s": built[name][1], "walls": walls[name], "renders": renders[name]})
    if args.screenshot and "bert" in built:
        subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        "--window-size=1500,950", f"--screenshot={os.path.abspath(args.screenshot)}",
                        "file://" + os.path.abspath(built["bert"][0]) + "#open=layers.0,layers.0.attn&overlay=time"
                        "&select=ort_multihead_attention_default"], capture_output=True, timeout=120)
        print(f"screenshot: {args.screenshot}")
    finish(rows, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
