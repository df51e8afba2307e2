"""A standalone reproducer of a :class:`~optc.tools.fuzz.results.Mismatch`: a folder anyone can replay.

:func:`write_reproducer` writes ``OUT/<target>-<digest>/`` with ``inputs.pt`` (the input sets,
``torch.save``) and ``repro.py``: a docstring (target, pipeline, backend, the observed error, the
model, its spec literal for a regression test), the model's source
(:func:`~optc.tools.fuzz.source.emit_source`), the check's settings, and the sources of
:func:`~optc.tools.fuzz.results.output_errors` and :func:`reproduces`, copied: it imports optc,
never this package. ``python repro.py`` exits 1 while the mismatch reproduces and 0 once optc
agrees with eager.
"""

from __future__ import annotations

import inspect
import os
import re

import torch

from optc.tools.fuzz.oracle import FACTOR, FLOOR, N_INPUT_SETS
from optc.tools.fuzz.results import Mismatch, output_errors
from optc.tools.fuzz.source import make_inputs


def reproduces(model, input_sets, *, pipeline, backend, target, plugins, factor, floor, exact) -> bool:
    """True if the mismatch reproduces: ``model`` captured on the first input set, ``pipeline``
    run (None: capture only), lowered for ``target`` if ``backend`` is set (None: the optimized
    Program itself), then compared with eager in float64 on every input set (``plugins``: modules
    that register passes outside optc). Its source is copied into every reproducer, so it
    imports what it needs itself."""
    import copy
    import importlib
    import traceback

    import torch

    import optc
    from optc.passes.manager import PassManager

    for mod in plugins:
        importlib.import_module(mod)
    model64 = copy.deepcopy(model).double()
    try:
        run = optc.capture(model, input_sets[0])
        if pipeline is not None:
            run, report = PassManager(pipeline, target=target, verify_each=True).run(run)
            print(report.format())
        if backend is not None:
            from optc.backends.base import lower
            run = lower(run, target)
    except Exception:
        traceback.print_exc()
        return True
    failed = False
    for k, inputs in enumerate(input_sets):
        with torch.no_grad():
            ref = model64(*[t.double() for t in inputs])
            eager = model(*inputs)
            try:
                got = run(*inputs)
                errors = output_errors(ref, eager, got)
            except Exception:
                traceback.print_exc()
                return True
        for i, (err, eager_err) in enumerate(errors):
            allowed = max(factor * eager_err, floor) if exact else float("inf")
            bad = not err <= allowed
            failed |= bad
            print(f"input set {k} output {i}: error {err:.3g}, allowed {allowed:.3g} "
                  f"(eager fp32 {eager_err:.3g}){'  MISMATCH' if bad else ''}")
    return failed


# read once: the files may change under a campaign
_COPIED_SOURCES = inspect.getsource(output_errors) + "\n\n" + inspect.getsource(reproduces)

_SETTINGS = '''
# ---- the check -----------------------------------------------------------------------------------
# pipeline None: capture only; backend None: run the optimized Program itself;
# plugins: modules that register passes outside optc
TARGET_NAME = {target!r}
CHECK = dict(
    pipeline={pipeline!r},
    backend={backend!r},
    target={target_text!r},
    plugins={plugins!r},
    factor={factor!r}, floor={floor!r}, exact={exact!r},
)
'''

_MAIN = '''
def check():
    """True if the mismatch reproduces."""
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    return reproduces(Model().eval(), torch.load(os.path.join(here, "inputs.pt")), **CHECK)


if __name__ == "__main__":
    import sys
    sys.exit(1 if check() else 0)
'''


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")


def write_reproducer(m: Mismatch, out_dir: str | os.PathLike = "fuzz-repro", *, note: str = "") -> str:
    """Write ``OUT/<target>-<digest>/repro.py`` and ``inputs.pt``; returns the repro.py path.

    ``python repro.py`` exits 1 while the mismatch reproduces and 0 once optc agrees with eager."""
    import optc
    spec = m.spec
    folder = os.path.join(os.fspath(out_dir), f"{_slug(m.target)}-{spec.digest()}")
    os.makedirs(folder, exist_ok=True)
    torch.save([make_inputs(spec, k) for k in range(N_INPUT_SETS)], os.path.join(folder, "inputs.pt"))
    exact = True
    if m.target.startswith("pass:"):
        from optc.passes.base import registry
        info = registry().get(m.target[5:])
        exact = bool(info.exact) if info is not None else True
    target_text = f"{m.backend}:cpu" if m.backend else "cpu"
    detail = m.detail if len(m.detail) < 1500 else m.detail[:1500] + " ..."
    doc = "\n".join([
        f'"""optc fuzz reproducer: {m.target} ({m.kind})',
        "",
        f"pipeline: {m.pipeline or '(none: capture only)'}",
        f"backend:  {m.backend or '(none)'}",
        f"observed: {detail}",
        f"versions: optc {optc.__version__}, torch {torch.__version__}",
        *([f"note:     {note}"] if note else []),
        "",
        "The model:",
        *("    " + line for line in spec.describe().splitlines()),
        "",
        "Run: python repro.py   (exit status 1 while the mismatch reproduces, 0 once optc agrees with eager)",
        "As a spec (tests/fuzz/test_regressions.py):",
        "    " + repr(spec),
        '"""',
        "",
    ])
    settings = _SETTINGS.format(target=m.target, pipeline=m.pipeline, backend=m.backend, target_text=target_text,
                                plugins=list(m.plugins), factor=FACTOR, floor=FLOOR, exact=exact)
    body = spec.source() + "\n" + settings + "\n\n" + _COPIED_SOURCES + "\n\n" + _MAIN
    path = os.path.join(folder, "repro.py")
    with open(path, "w") as f:
        f.write(doc.replace("\\", "\\\\") + body)
    return path
