"""Resolve a model named on the command line into a module and example inputs.

A model is named one of five ways (``optc dump``, ``optc compile`` and ``optc bench`` share
this module)::

    zoo:NAME                  a model of optc.tools.zoo (config overrides, --tiny, batch)
    path/to/file.py:factory   import the file by path, call factory()
    package.module:factory    importlib.import_module(package.module).factory()
    path/to/model.pt2         a program saved by torch.export.save; its .module() is used
    path/to/program.optc      optc's IR text (a dump, a reproducer) with its tensors from
                              program.optc.weights (optc.ir.parser)

A factory returns an ``nn.Module`` or ``(model, example_inputs)``, where ``example_inputs``
is a tuple of positional arguments, a single tensor or a dict of keyword arguments. Input
specs (``--input 1x3x224x224:float32``, one per positional argument) replace whatever
inputs the model came with.

Loading a file, a module or a ``.pt2`` runs code from it. Every user-facing failure --
unknown zoo model, missing file or factory, a factory or an import that raises, a
malformed input spec -- is a :class:`ModelLoadError` with one line that names the culprit.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn

from optc.errors import OptcError
from optc.ir.program import dtype_from_short, dtype_short
from optc.ir.source import user_frame_from_traceback

MODEL_FORMS = ("zoo:NAME", "path/to/file.py:factory", "package.module:factory", "path/to/model.pt2",
               "path/to/program.optc")


class ModelLoadError(OptcError):
    """A model or its inputs named on the command line cannot be resolved or built."""


@dataclass
class LoadedModel:
    """A resolved model: the module, its example call and where it came from."""

    model: nn.Module
    args: tuple
    kwargs: dict = field(default_factory=dict)
    label: str = ""          # as the user named it, e.g. "zoo:mlp" or "model.py:make"
    name: str | None = None  # a program name for capture (zoo name), or None for the class name
    program: Any = None      # the Program itself, for a .optc text (``model`` is its GraphModule)


# ---- input specs -------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpec:
    """``1x3x224x224:float32``: a shape and a dtype (default float32)."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    def __str__(self) -> str:
        return "x".join(str(d) for d in self.shape) + f":{dtype_short(self.dtype)}"

    def make(self, generator: torch.Generator) -> torch.Tensor:
        """Random values: normal for floats, integers in [0, 100), booleans for bool."""
        if self.dtype == torch.bool:
            return torch.randint(0, 2, self.shape, generator=generator).bool()
        if self.dtype.is_floating_point or self.dtype.is_complex:
            return torch.randn(self.shape, generator=generator, dtype=self.dtype)
        return torch.randint(0, 100, self.shape, generator=generator, dtype=self.dtype)


_SPEC_HELP = "expected SHAPE[:DTYPE], e.g. 1x3x224x224:float32 or 4x128:int64"


def parse_input_spec(text: str) -> InputSpec:
    """Parse ``1x3x224x224[:dtype]``; dims are separated by ``x`` (or ``,``)."""
    shape_text, sep, dtype_text = text.strip().partition(":")
    if sep and not dtype_text.strip():
        raise ModelLoadError(f"malformed input spec '{text}': empty dtype ({_SPEC_HELP})")
    dims = [d.strip() for d in re.split(r"[x,]", shape_text.strip())] if shape_text.strip() else []
    if not dims:
        raise ModelLoadError(f"malformed input spec '{text}': no shape ({_SPEC_HELP})")
    shape = []
    for d in dims:
        if not d.isdigit() or int(d) == 0:
            raise ModelLoadError(f"malformed input spec '{text}': dimension '{d}' is not a positive integer "
                                 f"({_SPEC_HELP})")
        shape.append(int(d))
    dtype = torch.float32
    if sep:
        try:
            dtype = dtype_from_short(dtype_text)
        except ValueError as e:
            raise ModelLoadError(f"malformed input spec '{text}': {e}") from None
    return InputSpec(tuple(shape), dtype)


def make_inputs(specs: Iterable[str | InputSpec], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """One tensor per spec, from a seeded generator (same specs, same tensors)."""
    gen = torch.Generator().manual_seed(seed)
    return tuple((s if isinstance(s, InputSpec) else parse_input_spec(s)).make(gen) for s in specs)


# ---- zoo config overrides ------------------------------------------------------------------
def parse_value(raw: str) -> Any:
    """``2`` -> int, ``0.5`` -> float, ``true``/``false`` -> bool, ``none`` -> None,
    ``8,16,16`` -> a tuple of those, anything else -> str."""
    if "," in raw:
        return tuple(parse_value(p.strip()) for p in raw.split(",") if p.strip())
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return raw


def parse_config(items: Iterable[str]) -> dict[str, Any]:
    """``["layers=2", "attention=sdpa"]`` -> ``{"layers": 2, "attention": "sdpa"}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ModelLoadError(f"malformed config override '{item}' (expected key=value, e.g. num_layers=2)")
        out[key] = parse_value(value.strip())
    return out


# ---- resolution ----------------------------------------------------------------------------
def load_model(spec: str, *, inputs: Iterable[str | InputSpec] = (), config: dict | None = None,
               tiny: bool = False, batch: int | None = None) -> LoadedModel:
    """Resolve ``spec`` (one of :data:`MODEL_FORMS`) into a model and example inputs.

    ``inputs`` (input specs), when given, replace the model's own example inputs. ``config``,
    ``tiny`` and ``batch`` apply to zoo models only.
    """
    input_specs = [s if isinstance(s, InputSpec) else parse_input_spec(s) for s in inputs]
    is_zoo = spec.startswith("zoo:")
    if not is_zoo and (config or tiny or batch is not None):
        raise ModelLoadError(f"--config, --tiny and --batch apply to zoo: models only, not '{spec}'")
    if is_zoo:
        loaded = _load_zoo(spec[4:], config or {}, tiny, 1 if batch is None else batch)
    elif spec.endswith(".pt2"):
        loaded = _load_pt2(spec)
    elif spec.endswith(".optc"):
        loaded = _load_optc(spec)
    elif ":" in spec:
        where, _, factory = spec.rpartition(":")
        if not where or not factory:
            raise ModelLoadError(f"cannot resolve model '{spec}' (expected one of: {', '.join(MODEL_FORMS)})")
        if where.endswith(".py") or os.sep in where or os.path.isfile(where):
            loaded = _load_file(spec, where, factory)
        else:
            loaded = _load_module(spec, where, factory)
    elif spec.endswith(".py"):
        raise ModelLoadError(f"model '{spec}' names no factory: write {spec}:FACTORY, where FACTORY() "
                             "returns a model or (model, example_inputs)")
    else:
        raise ModelLoadError(f"cannot resolve model '{spec}' (expected one of: {', '.join(MODEL_FORMS)})")
    if input_specs:
        loaded.args, loaded.kwargs = make_inputs(input_specs), {}
        if loaded.program is not None:
            loaded.program = _with_inputs(loaded.program, loaded.args, spec)
    if not loaded.args and not loaded.kwargs:
        raise ModelLoadError(f"model '{spec}' comes with no example inputs: pass --input SHAPE[:DTYPE] "
                             "once per positional argument, e.g. --input 1x3x224x224:float32")
    return loaded


def _load_zoo(name: str, config: dict, tiny: bool, batch: int) -> LoadedModel:
    try:
        from optc.tools import zoo
    except ImportError as e:
        raise ModelLoadError(f"the model zoo (optc.tools.zoo) cannot be imported: {e}") from None
    if batch < 1:
        raise ModelLoadError(f"batch must be at least 1, got {batch}")
    entry = zoo.get(name)   # UnknownModelError (an OptcError) lists the valid names
    unknown = sorted(set(config) - set(entry.default_config))
    if unknown:
        raise ModelLoadError(f"zoo model '{name}' has no config key '{unknown[0]}' "
                             f"(valid keys: {', '.join(entry.default_config)})")
    full = {**(zoo.tiny_config(name) if tiny else {}), **config}
    try:
        model, args = zoo.load(name, batch=batch, **full)
    except OptcError:
        raise
    except Exception as e:  # a bad config value surfaces as whatever the builder raises
        raise ModelLoadError(f"building zoo:{name} with {_show_config(full)} failed: "
                             f"{type(e).__name__}: {_first_line(e)}") from e
    return LoadedModel(model, tuple(args), {}, f"zoo:{name}", name)


def _load_file(spec: str, path: str, factory: str) -> LoadedModel:
    if not os.path.isfile(path):
        raise ModelLoadError(f"model file '{path}' does not exist" if not os.path.exists(path)
                             else f"model file '{path}' is not a file")
    abspath = os.path.abspath(path)
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    module_name = f"_optc_model_{stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, abspath)
    if module_spec is None or module_spec.loader is None:
        raise ModelLoadError(f"cannot import '{path}' as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    with _on_sys_path(os.path.dirname(abspath)):
        sys.modules[module_name] = module   # dataclasses and pickling look modules up by name
        try:
            module_spec.loader.exec_module(module)
        except BaseException as e:
            sys.modules.pop(module_name, None)
            if isinstance(e, KeyboardInterrupt):
                raise
            raise ModelLoadError(f"importing '{path}' raised {_describe_raise(e)}") from e
        fn = getattr(module, factory, None)
        if fn is None:
            found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                           and getattr(v, "__module__", None) == module_name)
            raise ModelLoadError(f"model file '{path}' has no factory '{factory}'"
                                 + (f" (callables defined there: {', '.join(found)})" if found else ""))
        return _call_factory(fn, f"{path}:{factory}", spec)


def _load_module(spec: str, module_name: str, factory: str) -> LoadedModel:
    with _on_sys_path(os.getcwd()):   # like `python -m`: packages in the working directory resolve
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
                raise ModelLoadError(f"no module named '{module_name}' (model '{spec}'; for a file "
                                     "write path/to/file.py:factory)") from None
            raise ModelLoadError(f"importing module '{module_name}' raised {_describe_raise(e)}") from e
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            raise ModelLoadError(f"importing module '{module_name}' raised {_describe_raise(e)}") from e
        fn = getattr(module, factory, None)
        if fn is None:
            raise ModelLoadError(f"module '{module_name}' has no factory '{factory}'")
        return _call_factory(fn, f"{module_name}:{factory}", spec)


def _call_factory(fn: Any, where: str, spec: str) -> LoadedModel:
    if isinstance(fn, nn.Module):   # `file.py:model` naming a module instance is fine too
        return LoadedModel(fn, (), {}, spec)
    if not callable(fn):
        raise ModelLoadError(f"'{where}' is a {type(fn).__name__}, not a factory function")
    try:
        result = fn()
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        raise ModelLoadError(f"factory '{where}' raised {_describe_raise(e)}") from e
    if isinstance(result, nn.Module):
        return LoadedModel(result, (), {}, spec)
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        model, inputs = result
        if isinstance(inputs, torch.Tensor):
            return LoadedModel(model, (inputs,), {}, spec)
        if isinstance(inputs, dict):
            return LoadedModel(model, (), dict(inputs), spec)
        if isinstance(inputs, (tuple, list)):
            return LoadedModel(model, tuple(inputs), {}, spec)
        raise ModelLoadError(f"factory '{where}' returned example inputs of type {type(inputs).__name__}; "
                             "expected a tuple of arguments, a tensor or a dict of keyword arguments")
    raise ModelLoadError(f"factory '{where}' returned {type(result).__name__}; expected an nn.Module "
                         "or a (model, example_inputs) tuple")


def _load_pt2(path: str) -> LoadedModel:
    if not os.path.isfile(path):
        raise ModelLoadError(f"exported program '{path}' does not exist")
    try:
        ep = torch.export.load(path)
    except Exception as e:  # a corrupt or foreign file fails in many ways inside torch
        raise ModelLoadError(f"cannot load '{path}' with torch.export.load: {type(e).__name__}: "
                             f"{_first_line(e)}") from e
    args, kwargs = (), {}
    example = getattr(ep, "example_inputs", None)
    if example is not None:
        args, kwargs = tuple(example[0]), dict(example[1] or {})
    name = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    return LoadedModel(ep.module(), args, kwargs, path, name)


def _load_optc(path: str) -> LoadedModel:
    """An ``.optc`` text and its ``.optc.weights``: no code runs (the weights load with
    ``weights_only=True``); a ParseError or WeightsError says what is wrong where."""
    if not os.path.isfile(path):
        raise ModelLoadError(f"program text '{path}' does not exist")
    from optc.ir.parser import load_program
    program = load_program(path)
    return LoadedModel(program.graph_module, tuple(program.example_args), {}, path, program.name, program)


def _with_inputs(program: Any, args: tuple, spec: str) -> Any:
    """``program`` with ``args`` as its example inputs, which must fit the types of its inputs."""
    import dataclasses
    specs = program.input_specs
    if len(args) != len(specs):
        raise ModelLoadError(f"'{spec}' takes {len(specs)} inputs, --input gives {len(args)}")
    for s, t in zip(specs, args):
        if t.dtype != s.dtype or t.dim() != len(s.shape) or any(
                isinstance(d, int) and d != n for d, n in zip(s.shape, t.shape)):
            raise ModelLoadError(f"--input {InputSpec(tuple(t.shape), t.dtype)} does not fit input %{s.name} of "
                                 f"'{spec}' ({dtype_short(s.dtype)}[{','.join(map(str, s.shape))}])")
    return dataclasses.replace(program, example_args=tuple(args), example_kwargs={})


# ---- helpers -------------------------------------------------------------------------------
@contextmanager
def _on_sys_path(directory: str) -> Iterator[None]:
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added and directory in sys.path:
            sys.path.remove(directory)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _describe_raise(e: BaseException) -> str:
    """``ValueError: boom (at /path/model.py:12)`` -- the innermost frame of the user's code."""
    if isinstance(e, SyntaxError) and e.filename:
        return f"SyntaxError: {e.msg} (at {e.filename}:{e.lineno})"
    where = user_frame_from_traceback(e.__traceback__)
    where = where.split("  `")[0] if where else None   # keep file:line, drop the quoted code
    if where and where.rsplit(":", 1)[0] == os.path.abspath(__file__):
        where = None   # the call itself failed (e.g. the factory needs arguments): no user line
    return f"{type(e).__name__}: {_first_line(e)}" + (f" (at {where})" if where else "")


def _show_config(config: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items()) or "the default config"
