"""The pass registry's module list (``passes/_load_all.py``) against what is in ``passes/``: every pass
module is listed and registers the passes named after it, every listed module exists, and no pass
module imports another (shared code lives in ``ir/``)."""

import ast
import pkgutil
from pathlib import Path

import optc.passes
from optc.passes import _load_all
from optc.passes.base import registry

PASSES_DIR = Path(optc.passes.__path__[0])


def _modules() -> set[str]:
    return {m.name for m in pkgutil.iter_modules(optc.passes.__path__)}


def _home(pass_name: str) -> str:
    return _load_all.FAMILIES.get(pass_name, pass_name.replace("-", "_"))


def _registered_by() -> dict[str, str]:
    """pass name -> the module of passes/ that registered it (passes registered by tests left out)."""
    out = {}
    for name, info in registry().items():
        parts = info.fn.__module__.split(".")
        if parts[:2] == ["optc", "passes"] and len(parts) > 2:
            out[name] = parts[2]
    return out


def test_every_module_is_a_listed_pass_module_or_declared_not_a_pass():
    listed, not_passes = set(_load_all.PASS_MODULES), _load_all.NOT_PASSES
    assert not listed & not_passes
    assert _modules() - listed - not_passes == set(), "add the new pass module to PASS_MODULES in passes/_load_all.py"
    assert listed - _modules() == set(), "PASS_MODULES names a module that does not exist"
    assert not_passes - _modules() == set()
    assert len(listed) == len(_load_all.PASS_MODULES)


def test_each_pass_lives_in_the_module_named_after_it():
    by = _registered_by()
    assert by, "no pass registered"
    wrong = {name: mod for name, mod in by.items() if mod != _home(name)}
    assert wrong == {}, "a pass registered outside passes/<its_name>.py (or <its_name>/); see FAMILIES"
    assert set(by.values()) == set(_load_all.PASS_MODULES), "a listed module registers no pass, or a module " \
                                                            "registers passes without being listed"
    assert set(_load_all.FAMILIES) <= set(by)


def test_no_pass_module_imports_another():
    pass_modules = set(_load_all.PASS_MODULES)
    found = []
    for path in sorted(PASSES_DIR.rglob("*.py")):
        own = path.relative_to(PASSES_DIR).parts[0].removesuffix(".py")
        if own not in pass_modules:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):     # from optc.passes.x import y; from optc.passes import x
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[:2] == ["optc", "passes"] and len(parts) > 2 and parts[2] in pass_modules \
                        and parts[2] != own:
                    found.append(f"{path.relative_to(PASSES_DIR)} imports {name}")
    assert found == []
