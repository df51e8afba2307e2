"""The zoo's registry: :class:`ZooEntry`, :func:`names`, :func:`get`, :func:`load`,
:func:`tiny_config`, the errors, and the example inputs the models share.

A model family registers each model with :func:`_register` (its factory, example inputs, default
and tiny configs); ``build`` runs the factory under a fixed seed, so weights are deterministic.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from optc.errors import OptcError


# --------------------------------------------------------------------------- errors


class UnknownModelError(OptcError, KeyError):
    """No zoo model has this name; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ZooUnavailableError(OptcError, ImportError):
    """The model needs an optional dependency that is not installed."""


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model.

    ``build(**config)`` returns the model in eval mode with deterministic weights;
    ``example_inputs(batch=1, **config)`` returns a tuple of positional arguments.
    Both accept any subset of ``default_config`` (missing keys take the defaults) and
    reject unknown keys. ``requires`` names optional packages the model needs.
    """

    name: str
    description: str
    build: Callable[..., nn.Module]
    example_inputs: Callable[..., tuple]
    default_config: dict
    heavy: bool
    requires: tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        """Whether every package in ``requires`` can be imported."""
        return all(importlib.util.find_spec(pkg) is not None for pkg in self.requires)


_REGISTRY: dict[str, ZooEntry] = {}
_TINY: dict[str, dict] = {}


def names(*, include_unavailable: bool = False) -> list[str]:
    """Names of the zoo models, in registration order.

    Models whose optional dependencies are missing (the ``hf_*`` adapters without
    ``transformers``) are left out unless ``include_unavailable`` is true.
    """
    return [n for n, e in _REGISTRY.items() if include_unavailable or e.available]


def get(name: str) -> ZooEntry:
    """The entry called ``name``; raises :class:`UnknownModelError` if there is none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = ", ".join(_REGISTRY)
        raise UnknownModelError(f"unknown zoo model {name!r}; valid names: {valid}") from None


def is_available(name: str) -> bool:
    """Whether model ``name`` can be built here (its optional dependencies are installed)."""
    return get(name).available


def load(name: str, batch: int = 1, **config: Any) -> tuple[nn.Module, tuple]:
    """Build model ``name`` and example inputs of batch size ``batch``.

    ``config`` overrides keys of the entry's ``default_config``.
    """
    entry = get(name)
    return entry.build(**config), entry.example_inputs(batch, **config)


def tiny_config(name: str) -> dict:
    """A full config of the same architecture, small enough for unit tests."""
    get(name)
    return dict(_TINY[name])


def _merge(name: str, defaults: dict, config: dict) -> dict:
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise TypeError(
            f"zoo model {name!r} has no config key(s) {', '.join(unknown)}; "
            f"valid keys: {', '.join(defaults)}"
        )
    return {**defaults, **config}


_EXTRAS = {"transformers": "hf"}  # optional package -> optc extra that installs it


def _require(name: str, packages: Iterable[str]) -> None:
    for pkg in packages:
        if importlib.util.find_spec(pkg) is None:
            extra = _EXTRAS[pkg]
            raise ZooUnavailableError(f"{name} needs the {extra!r} extra: pip install optc[{extra}]")


def _register(
    name: str,
    description: str,
    factory: Callable[..., nn.Module],
    inputs: Callable[..., tuple],
    defaults: dict,
    tiny: dict,
    heavy: bool,
    requires: tuple[str, ...] = (),
) -> None:
    frozen_defaults = dict(defaults)

    def build(**config: Any) -> nn.Module:
        cfg = _merge(name, frozen_defaults, config)
        _require(name, requires)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = factory(**cfg)
        return model.eval()

    def example_inputs(batch: int = 1, **config: Any) -> tuple:
        cfg = _merge(name, frozen_defaults, config)
        return inputs(batch, **cfg)

    build.__name__ = build.__qualname__ = f"build_{name}"
    build.__doc__ = f"Build {name!r} (eval mode, seeded weights). {description}"
    example_inputs.__name__ = example_inputs.__qualname__ = f"example_inputs_{name}"
    example_inputs.__doc__ = f"Example positional inputs for {name!r}."
    unknown_tiny = set(tiny) - set(defaults)
    assert not unknown_tiny, f"tiny config of {name} has unknown keys {unknown_tiny}"
    _REGISTRY[name] = ZooEntry(
        name=name,
        description=description,
        build=build,
        example_inputs=example_inputs,
        default_config=dict(defaults),
        heavy=heavy,
        requires=tuple(requires),
    )
    _TINY[name] = {**defaults, **tiny}


# --------------------------------------------------------------------------- inputs


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def _vector_inputs(batch: int, *, in_features: int, **_: Any) -> tuple:
    return (torch.randn(batch, in_features, generator=_generator()),)


def _image_inputs(batch: int, *, image_size: int, in_channels: int = 3, **_: Any) -> tuple:
    return (torch.randn(batch, in_channels, image_size, image_size, generator=_generator()),)


def _token_inputs(batch: int, *, vocab_size: int, seq_len: int, **_: Any) -> tuple:
    ids = torch.randint(0, vocab_size, (batch, seq_len), generator=_generator(), dtype=torch.int64)
    return (ids,)


def _token_and_mask_inputs(batch: int, *, vocab_size: int, seq_len: int, **_: Any) -> tuple:
    (ids,) = _token_inputs(batch, vocab_size=vocab_size, seq_len=seq_len)
    # Sample b keeps seq_len - (b % 4) * (seq_len // 8) tokens: batch 1 is unpadded,
    # larger batches exercise the padding mask.
    lengths = seq_len - (torch.arange(batch) % 4) * (seq_len // 8)
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).to(torch.int64)
    return ids, mask
