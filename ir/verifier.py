"""The verifier: structural checks of a Program's graph, and numeric comparison of two programs.

Structure: the graph lints (definitions before uses, one output), every get_attr target
exists, every value node carries ``meta["val"]``, and -- with ``repropagate=True`` -- running
shape propagation again gives the same shapes and dtypes as the metadata says.

Numerics: run two programs (or a program and the eager model) on the same inputs and
compare every output leaf. The error is measured relative to the reference output's scale
(``max|a-b| / max(max|ref|, tiny)``), the measure the test suites use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from optc.errors import NumericMismatchError, VerificationError
from optc.ir.program import Program, get_attr


def verify(program: Program | fx.GraphModule, *, repropagate: bool = False) -> None:
    """Raise :class:`VerificationError` if the graph is structurally inconsistent."""
    gm = program.graph_module if isinstance(program, Program) else program
    try:
        gm.graph.lint()
    except Exception as e:  # fx raises RuntimeError with the offending node in the message
        raise VerificationError(f"graph does not lint: {e}") from e
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                get_attr(gm, node.target)
            except AttributeError:
                raise VerificationError(f"get_attr target '{node.target}' does not exist", node=node.name) from None
        if node.op in ("placeholder", "get_attr", "call_function") and "val" not in node.meta:
            raise VerificationError(f"{node.op} node has no meta['val'] (shape/dtype unknown)", node=node.name)
        if node.op == "call_function" and not callable(node.target):
            raise VerificationError(f"call target {node.target!r} is not callable", node=node.name)
        if node.op == "call_module":
            raise VerificationError("call_module nodes are not allowed in an optc Program", node=node.name)
    if isinstance(program, Program):
        out = gm.graph.output_node().args[0]
        if len(out) != program.out_spec.num_leaves:
            raise VerificationError(f"graph returns {len(out)} values, output spec expects {program.out_spec.num_leaves}")
        n_in = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
        n_leaves = sum(1 for leaf in program.input_leaves if leaf.is_tensor)
        if n_in != n_leaves:
            raise VerificationError(f"graph takes {n_in} inputs, input spec has {n_leaves} tensor leaves")
    if repropagate:
        _check_repropagation(gm)


def _check_repropagation(gm: fx.GraphModule) -> None:
    from optc.ir.rewrite import fake_mode_of, compute_val
    mode = fake_mode_of(gm)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        try:
            val = compute_val(node, mode)
        except Exception as e:  # shape propagation can fail with any op error
            raise VerificationError(f"shape propagation failed for {node.target}: {e}", node=node.name) from e
        _compare_meta(node, node.meta["val"], val)


def _compare_meta(node: fx.Node, recorded: Any, fresh: Any) -> None:
    if isinstance(recorded, torch.Tensor) and isinstance(fresh, torch.Tensor):
        if recorded.dtype != fresh.dtype or [str(s) for s in recorded.shape] != [str(s) for s in fresh.shape]:
            raise VerificationError(
                f"meta['val'] says {recorded.dtype}{list(recorded.shape)} but the op computes "
                f"{fresh.dtype}{list(fresh.shape)}", node=node.name)
    elif isinstance(recorded, (tuple, list)) and isinstance(fresh, (tuple, list)):
        if len(recorded) != len(fresh):
            raise VerificationError(f"meta['val'] has {len(recorded)} results, the op returns {len(fresh)}", node=node.name)
        for r, f in zip(recorded, fresh):
            _compare_meta(node, r, f)


# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NumericReport:
    max_abs_error: float
    max_rel_error: float          # max_abs_error / output scale, worst over outputs
    scale: float
    worst_output: int
    cosine: float                 # worst cosine similarity over outputs

    def __str__(self) -> str:
        return (f"max abs err {self.max_abs_error:.3g} (rel {self.max_rel_error:.3g} of scale "
                f"{self.scale:.3g}, output {self.worst_output}), cosine {self.cosine:.6f}")


def compare_outputs(ref: Any, got: Any) -> NumericReport:
    """Compare two output structures leaf by leaf (shapes must match)."""
    ref_leaves = [t for t in pytree.tree_leaves(ref)]
    got_leaves = [t for t in pytree.tree_leaves(got)]
    if len(ref_leaves) != len(got_leaves):
        raise NumericMismatchError(f"output count differs: {len(ref_leaves)} vs {len(got_leaves)}")
    worst = (0.0, 0.0, 1.0, 0, 1.0)
    for i, (r, g) in enumerate(zip(ref_leaves, got_leaves)):
        if not isinstance(r, torch.Tensor):
            continue
        if tuple(r.shape) != tuple(g.shape):
            raise NumericMismatchError(f"output {i}: shape {list(g.shape)} != expected {list(r.shape)}")
        r64 = r.detach().to(torch.float64).cpu()
        g64 = g.detach().to(torch.float64).cpu()
        if not torch.isfinite(g64).all() and torch.isfinite(r64).all():
            return NumericReport(math.inf, math.inf, float(r64.abs().max()) if r64.numel() else 0.0, i, -1.0)
        both_inf = torch.isinf(r64) & (r64 == g64)
        diff = torch.where(both_inf, torch.zeros_like(r64), (r64 - g64).abs())
        err = float(diff.max()) if diff.numel() else 0.0
        finite = r64[torch.isfinite(r64)]
        scale = max(float(finite.abs().max()) if finite.numel() else 0.0, 1e-12)
        rel = err / scale
        rf, gf = torch.nan_to_num(r64.flatten()), torch.nan_to_num(g64.flatten())
        denom = float(rf.norm() * gf.norm())
        cos = float(rf @ gf) / denom if denom > 0 else (1.0 if float(rf.norm()) == float(gf.norm()) else 0.0)
        if rel > worst[1] or (i == 0 and worst[1] == 0):
            worst = (err, rel, scale, i, min(cos, worst[4]))
        else:
            worst = (worst[0], worst[1], worst[2], worst[3], min(cos, worst[4]))
    return NumericReport(*worst)


def check_close(ref: Any, got: Any, *, rtol: float = 1e-4, what: str = "outputs") -> NumericReport:
    """Raise :class:`NumericMismatchError` if ``got`` differs from ``ref`` by more than
    ``rtol`` relative to the reference output scale."""
    rep = compare_outputs(ref, got)
    if not rep.max_rel_error <= rtol:
        raise NumericMismatchError(f"{what} differ: {rep} > tolerance {rtol:g}")
    return rep


def verify_numerics(reference: Program | Callable, candidate: Program | Callable, inputs: tuple,
                    kwargs: dict | None = None, *, rtol: float = 1e-4) -> NumericReport:
    """Run both on the same inputs and compare (see :func:`check_close`)."""
    kwargs = kwargs or {}
    with torch.no_grad():
        ref = reference(*inputs, **kwargs)
        got = candidate(*inputs, **kwargs)
    return check_close(ref, got, rtol=rtol)


def random_inputs_like(program: Program, seed: int = 0) -> tuple[tuple, dict]:
    """Fresh random inputs with the example inputs' shapes and dtypes (same structure).

    Floating inputs are standard normal; integer inputs are drawn within the range of the
    example's values (token ids, masks), so embeddings stay in bounds.
    """
    gen = torch.Generator().manual_seed(seed)

    def fresh(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_floating_point():
            return torch.randn(t.shape, generator=gen, dtype=t.dtype)
        if t.dtype == torch.bool:
            return torch.randint(0, 2, t.shape, generator=gen).bool()
        lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, 1)
        if lo == hi:
            return t.clone()
        return torch.randint(lo, hi + 1, t.shape, generator=gen, dtype=t.dtype)

    args, kwargs = pytree.tree_map(fresh, (program.example_args, program.example_kwargs))
    return tuple(args), dict(kwargs)
