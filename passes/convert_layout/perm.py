"""convert-layout's permutation algebra and static-shape helpers.

A layout is a permutation ``P`` of a value's axes: ``physical = logical.permute(P)``.
"""

from __future__ import annotations

import torch
import torch.fx as fx

Perm = tuple  # of ints: physical = logical.permute(perm)


def identity(n: int) -> Perm:
    return tuple(range(n))


def is_identity(p) -> bool:
    return p is None or (isinstance(p, tuple) and p == tuple(range(len(p))))


def inverse(p: Perm) -> Perm:
    inv = [0] * len(p)
    for i, d in enumerate(p):
        inv[d] = i
    return tuple(inv)


def then(p: Perm, q: Perm) -> Perm:
    """The permutation of ``x.permute(p).permute(q)``."""
    return tuple(p[i] for i in q)


def drop_dims(p: Perm, dims) -> Perm:
    """The layout of a result that drops logical axes ``dims`` (a reduction without keepdim,
    ``select``, ``squeeze``) from a value in layout ``p``."""
    dims = set(dims)
    kept = [d for d in p if d not in dims]
    return tuple(d - sum(1 for x in dims if x < d) for d in kept)


def shape_of(node) -> list:
    """The shape of ``node``'s tensor value, or None."""
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return list(v.shape) if isinstance(v, torch.Tensor) else None


def static_dim(d) -> bool:
    """An int, or a SymInt with a known value."""
    return isinstance(d, int) or (isinstance(d, torch.SymInt) and d.node.maybe_as_int() is not None)


def is_one(d) -> bool:
    return static_dim(d) and int(d) == 1


def pair(v) -> list:
    """An int or a 1- or 2-element list as a 2-element list (kernel sizes, strides...)."""
    if isinstance(v, int):
        return [v, v]
    v = list(v)
    return v * 2 if len(v) == 1 else v
