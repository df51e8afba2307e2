"""Fixtures shared by the debugging-tool tests (compare, bisect, reduce)."""

from __future__ import annotations

import textwrap

import pytest
import torch

OVERFLOW = textwrap.dedent("""\
    import torch


    class Overflow(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            h = self.lin(x)
            y = h * 300
            z = y * y
            return z.sum(-1)


    def make():
        torch.manual_seed(0)
        return Overflow().eval(), (torch.randn(4, 8) * 3,)
    """)


@pytest.fixture
def overflow_file(tmp_path):
    path = tmp_path / "overflow.py"
    path.write_text(OVERFLOW)
    return str(path)


@pytest.fixture
def wrong_mha_translation():
    """The ONNX translation of ``optc::ort_multihead_attention`` with a scale 1.5x too large: a
    backend miscompile inside one ONNX node that the optimized Program does not have. Restored
    afterwards."""
    pytest.importorskip("onnxruntime")
    from optc.backends import onnx as onnx_backend
    from optc.backends import onnx_contrib
    op = torch.ops.optc.ort_multihead_attention.default
    right = onnx_backend.onnx_translations()[op]

    def wrong(query, key, value, attention_bias=None, num_heads=1, scale=1.0, unidirectional=False):
        return onnx_contrib._translate_mha(query, key, value, attention_bias, num_heads, scale * 1.5, unidirectional)

    onnx_backend.register_onnx_translation(op, wrong, replace=True)
    yield
    onnx_backend.register_onnx_translation(op, right, replace=True)


# ---- a headless Chromium for the report tests ----------------------------------------------------------------
_BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _find_browser():
    import shutil
    import os
    explicit = os.environ.get("OPTC_CHROMIUM")
    if explicit:
        return explicit if shutil.which(explicit) or os.path.exists(explicit) else None
    return next((shutil.which(b) for b in _BROWSERS if shutil.which(b)), None)


def _install_browser():
    """Debian's ``chromium`` through apt, where this runs as root with apt-get (a CI container);
    ``OPTC_INSTALL_BROWSER=0`` turns that off. Returns the browser or None."""
    import os
    import shutil
    import subprocess
    if os.environ.get("OPTC_INSTALL_BROWSER", "1") == "0" or not shutil.which("apt-get") or os.geteuid() != 0:
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=300, check=False)
        subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"], env=env,
                       capture_output=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return _find_browser()


@pytest.fixture(scope="session")
def headless_chromium():
    """``run(path, timeout=60) -> (selftest result, console lines)``: the report at ``path`` opened
    from disk (``file://...#selftest``) in headless Chromium; the page's self-test (report.js) writes
    what it checked into ``<pre id="selftest">``, and every console message Chromium logged is
    returned. Skips when no Chromium is installed or installable."""
    import json
    import re
    import subprocess
    browser = _find_browser() or _install_browser()
    if browser is None:
        pytest.skip("no headless Chromium (install Debian's chromium, or set OPTC_CHROMIUM)")

    def run(path: str, timeout: float = 60):
        import os
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
               "--window-size=1400,900", "--dump-dom", "file://" + os.path.abspath(path) + "#selftest"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        m = re.search(r'<pre id="selftest">(.*?)</pre>', proc.stdout, re.S)
        assert m, f"the page's self-test did not run (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        import html
        console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
        return json.loads(html.unescape(m.group(1))), console

    return run
