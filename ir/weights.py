"""Models that were never materialised: a model built on the ``meta`` device plus its weights.

``optc.compile(model, inputs, weights=...)`` (and ``optc compile path.py:factory --weights F``)
calls :func:`with_weights` before capture. ``weights`` is a ``.safetensors`` file, a folder of
them (a sharded checkpoint: every ``*.safetensors`` in it), a list of those, or a mapping of
names to tensors. Safetensors files are opened with the ``safetensors`` package, which maps them
into memory: a tensor's bytes are read from the file when something touches them (the passes
that compute with a weight, the backend writing it out), and they are page cache, not a second
copy the process allocates.

What it checks, each failure a :class:`WeightsError` naming the tensor:

- every parameter and persistent buffer on the ``meta`` device has a tensor of that name in the
  weights (tied parameters: one name of the group is enough);
- each tensor's shape is the model's (a dtype that differs is cast to the model's);
- after loading, no tensor of the model is left on ``meta`` -- a non-persistent buffer (HF's
  rotary ``inv_freq``) is not in a checkpoint: build it for real, or pass it in the weights.

Names: the model's ``state_dict`` names. When no name matches as is, one prefix is looked for
(checkpoints of ``LlamaForCausalLM`` say ``model.layers.0...``, a ``LlamaModel`` says
``layers.0...``; a wrapper module adds its own) and applied to every name.

The user's model is never modified: the loaded model is a structural copy sharing the model's
real tensors. A model without meta tensors gets the named tensors replaced the same way.
"""

from __future__ import annotations

import copy
import glob
import logging
import os
from typing import Any, Iterable, Mapping

import torch
import torch.nn as nn

from optc.errors import WeightsError

log = logging.getLogger("optc.weights")


def meta_tensors(model: nn.Module) -> list[str]:
    """Names of the model's parameters and buffers (persistent or not) on the ``meta`` device."""
    return [n for n, t in list(model.named_parameters(remove_duplicate=False)) +
            list(model.named_buffers(remove_duplicate=False)) if t.is_meta]


class _Source:
    """Name -> tensor over safetensors files (opened lazily, memory-mapped) and mappings."""

    def __init__(self, weights: Any):
        self.files: dict[str, Any] = {}          # name -> safe_open handle
        self.tensors: dict[str, torch.Tensor] = {}
        self._handles = []
        for item in _items(weights):
            if isinstance(item, Mapping):
                for k, v in item.items():
                    if not isinstance(v, torch.Tensor):
                        raise WeightsError(f"weights: '{k}' is a {type(v).__name__}, not a tensor")
                    self.tensors[str(k)] = v
                continue
            for path in _files(item):
                try:
                    from safetensors import safe_open
                except ImportError as e:
                    raise WeightsError("weights from .safetensors files need the safetensors package "
                                       "(pip install safetensors)") from e
                try:
                    handle = safe_open(path, framework="pt", device="cpu")
                except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                    raise WeightsError(f"weights: cannot read '{path}': {(str(e).splitlines() or [''])[0]}") from e
                self._handles.append(handle)
                for k in handle.keys():
                    if k in self.files or k in self.tensors:
                        raise WeightsError(f"weights: tensor '{k}' is in more than one file ('{path}' and another)")
                    self.files[k] = (handle, path)

    def names(self) -> set[str]:
        return set(self.files) | set(self.tensors)

    def get(self, name: str) -> torch.Tensor:
        if name in self.tensors:
            return self.tensors[name]
        handle, path = self.files[name]
        try:
            return handle.get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"weights: cannot read tensor '{name}' from '{path}': "
                               f"{(str(e).splitlines() or [''])[0]}") from e

    def where(self, name: str) -> str:
        return self.files[name][1] if name in self.files else "the given mapping"


def _items(weights: Any) -> Iterable[Any]:
    if isinstance(weights, (str, os.PathLike, Mapping)):
        return [weights]
    if isinstance(weights, (list, tuple)):
        return list(weights)
    raise WeightsError(f"weights must be a .safetensors file, a folder of them, a mapping of names to tensors or "
                       f"a list of those; got {type(weights).__name__}")


def _files(item: Any) -> list[str]:
    path = os.fspath(item)
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not found:
            raise WeightsError(f"weights: folder '{path}' has no .safetensors file")
        return found
    if not os.path.exists(path):
        raise WeightsError(f"weights: '{path}' does not exist")
    if not path.endswith(".safetensors"):
        raise WeightsError(f"weights: '{path}' is not a .safetensors file (other formats: load them and pass a "
                           "mapping of names to tensors)")
    return [path]


def weight_files(weights: Any) -> list[str]:
    """The safetensors files ``weights`` names (files, and the files of folders); mappings add none."""
    try:
        return [f for item in _items(weights) if not isinstance(item, Mapping) for f in _files(item)]
    except WeightsError:
        return []


def _prefixes(expected: list[str], available: set[str]) -> tuple[str, str]:
    """``(model_prefix, file_prefix)`` such that file name = file_prefix + name[len(model_prefix):]
    for the model's names: ("", "") when names match as they are."""
    if any(n in available for n in expected):
        return "", ""
    for name in expected:
        for key in available:
            if key.endswith("." + name):
                return "", key[: -len(name)]
            if name.endswith("." + key):
                return name[: -len(key)], ""
    return "", ""


def with_weights(model: nn.Module, weights: Any) -> nn.Module:
    """A copy of ``model`` with its tensors taken from ``weights`` (module docstring)."""
    if not isinstance(model, nn.Module):
        raise WeightsError(f"weights= applies to an nn.Module, got {type(model).__name__}")
    source = _Source(weights)
    available = source.names()
    state = model.state_dict(keep_vars=True)          # parameters and persistent buffers, tied names included
    groups: dict[int, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(id(t), []).append(name)
    model_prefix, file_prefix = _prefixes(list(state), available)
    if model_prefix or file_prefix:
        log.info("weights: model names '%s...' are '%s...' in the weights", model_prefix, file_prefix)

    def key_of(name: str) -> str | None:
        if not name.startswith(model_prefix):
            return None
        key = file_prefix + name[len(model_prefix):]
        return key if key in available else None

    loaded: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    used: set[str] = set()
    for names in groups.values():
        t = state[names[0]]
        keys = [(n, key_of(n)) for n in names]
        hit = next(((n, k) for n, k in keys if k is not None), None)
        if hit is None:
            if t.is_meta:
                missing.append(names[0])
            continue
        _, key = hit
        value = source.get(key)
        used.add(key)
        if tuple(value.shape) != tuple(t.shape):
            raise WeightsError(f"weights: tensor '{key}' ({source.where(key)}) has shape {list(value.shape)}, the "
                               f"model's '{names[0]}' has {list(t.shape)}")
        if value.dtype != t.dtype:
            log.info("weights: '%s' is %s in the weights, %s in the model: cast", key, value.dtype, t.dtype)
            value = value.to(t.dtype)
        for n in names:
            loaded[n] = value
    if missing:
        shown = ", ".join(f"'{n}'" for n in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WeightsError(f"weights: no tensor for {shown} (the model has them on the meta device; the weights "
                           f"have {len(available)} tensors)")
    # a structural copy: real tensors shared (deepcopy's memo), meta ones replaced below
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if not t.is_meta}
    clone = copy.deepcopy(model, memo)
    clone.load_state_dict(loaded, strict=False, assign=True)
    # non-persistent buffers are not in the state dict: taken from the weights when they are there
    for name in meta_tensors(clone):
        key = name if name in available else key_of(name)
        owner_name, _, leaf = name.rpartition(".")
        owner = clone.get_submodule(owner_name) if owner_name else clone
        if key is None or leaf not in owner._buffers:
            continue
        value = source.get(key)
        if tuple(value.shape) != tuple(owner._buffers[leaf].shape):
            raise WeightsError(f"weights: tensor '{key}' has shape {list(value.shape)}, the model's buffer '{name}' "
                               f"has {list(owner._buffers[leaf].shape)}")
        owner._buffers[leaf] = value.to(owner._buffers[leaf].dtype)
        used.add(key)
    unused = available - used
    if unused:
        log.warning("weights: %d tensors of the weights are not in the model (first: '%s')", len(unused),
                    sorted(unused)[0])
    left = meta_tensors(clone)
    if left:
        shown = ", ".join(f"'{n}'" for n in left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
        raise WeightsError(f"weights: {shown} still on the meta device after loading (a non-persistent buffer is "
                           "not in a checkpoint: build it for real, or pass it in the weights)")
    return clone


__all__ = ["WeightsError", "with_weights", "meta_tensors", "weight_files"]
