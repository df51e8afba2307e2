"""Accuracy recovery: fine-tune a pruned (or otherwise lossy) Program by knowledge distillation.

    pruned, _ = optc.optimize(program, "prune-channels{ratio=0.5}")
    recovered = optc.recover(pruned, teacher=model, data=train_x, steps=300)

The student is a copy of the Program whose floating-point ``nn.Parameter`` constants are
trained (BatchNorm running statistics and other buffers stay fixed: the graph's BatchNorm
runs in eval mode); the teacher is the original model (an ``nn.Module`` in eval mode, a
Program, or any callable), run under ``no_grad``. The loss matches the student's outputs
to the teacher's:

- ``kl`` (default for a single ``(batch, classes)`` output): ``KL(softmax(t/T) ||
  softmax(s/T)) * T^2`` (Hinton et al.);
- ``mse`` (the default otherwise): mean squared error over every output leaf.

Weights pruned by ``prune-magnitude`` stay zero: their masks (``node.meta["prune_mask"]``)
are applied to the gradients and re-applied after each step. Channels removed by
``prune-channels`` are gone from the graph, so nothing is needed for them.

``data``: a tensor of inputs (one model input; batches are drawn from its first dim), a
``torch.utils.data.Dataset`` (e.g. ``TensorDataset``), or an iterable of batches (each a
tensor or a tuple whose first ``n`` items are the ``n`` model inputs; extra items such as
labels are ignored), cycled until ``steps`` optimizer steps are done.

The input Program is not modified; the returned Program has new parameter tensors (no
``requires_grad``) and ``meta["recover"]`` with the first and last loss.
"""

from __future__ import annotations

import itertools
import math
import sys
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree

from optc.errors import InputSpecError, OptcError
from optc.ir.program import Program, get_attr

LOSSES = ("auto", "kl", "mse")


def recover(program: Program, teacher: nn.Module | Program | Callable, data: Any, *, steps: int = 200,
            lr: float = 1e-3, temperature: float = 2.0, batch_size: int | None = None, loss: str = "auto",
            weight_decay: float = 0.0, seed: int = 0, progress: bool = True) -> Program:
    """Fine-tune ``program`` for ``steps`` Adam steps to match ``teacher`` on ``data``; returns a new Program."""
    if not isinstance(program, Program):
        raise TypeError(f"recover() takes a Program (from optc.capture/optimize), got {type(program).__name__}")
    if loss not in LOSSES:
        raise OptcError(f"recover(): loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if steps < 0:
        raise OptcError(f"recover(): steps must be >= 0, got {steps}")
    if temperature <= 0:
        raise OptcError(f"recover(): temperature must be > 0, got {temperature}")
    student = program.clone()
    gm = student.graph_module
    params, masks = _trainable(gm)
    if not params:
        raise OptcError("recover(): the program has no floating-point parameters to train")
    n_inputs = len(program.input_specs)
    batch_size = batch_size or _static_batch(program) or 32
    batches = _batches(data, n_inputs, batch_size, seed)
    if isinstance(teacher, nn.Module):
        teacher.eval()

    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    # cosine decay to 0 over the run: large early steps win back accuracy, small late ones settle it
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: 0.5 * (1 + math.cos(math.pi * min(i, steps) / max(steps, 1))))
    first = last = None
    bar = _progress(steps, progress)
    try:
        for step in range(steps):
            inputs = next(batches)
            _check_batch(program, inputs)
            with torch.no_grad():
                target = _flat_outputs(teacher, program, inputs)
            out = list(gm(*inputs))
            value = _loss(out, target, loss, temperature)
            last = float(value.detach())
            if not math.isfinite(last):
                raise OptcError(f"recover(): the loss became {last} at step {step}; try a smaller lr")
            opt.zero_grad(set_to_none=True)
            value.backward()
            for p, m in masks:
                if p.grad is not None:
                    p.grad.mul_(m)
            opt.step()
            sched.step()
            with torch.no_grad():
                for p, m in masks:
                    p.mul_(m)
            first = last if first is None else first
            bar.update(1)
            bar.set_postfix(loss=f"{last:.4g}", refresh=False)
    finally:
        bar.close()
    for p in params:
        p.requires_grad_(False)
    student.meta["recover"] = {"steps": steps, "first_loss": first, "last_loss": last, "lr": lr,
                               "temperature": temperature, "loss": loss, "schedule": "cosine"}
    return student


# ---- parameters --------------------------------------------------------------------------------
def _trainable(gm: torch.fx.GraphModule) -> tuple[list[nn.Parameter], list[tuple[nn.Parameter, torch.Tensor]]]:
    """Give the student its own copy of every float Parameter (the input Program shares its
    tensors with others: they must never change in place) and collect the magnitude masks."""
    params: dict[str, nn.Parameter] = {}
    masks = []
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        obj = get_attr(gm, node.target)
        if not isinstance(obj, nn.Parameter) or not obj.is_floating_point():
            continue
        if node.target not in params:
            fresh = nn.Parameter(obj.detach().clone(), requires_grad=True)
            _set_attr(gm, node.target, fresh)
            params[node.target] = fresh
        mask = node.meta.get("prune_mask")
        if mask is not None:
            m = mask.to(dtype=obj.dtype, device=obj.device)
            if m.shape == obj.shape:
                masks.append((params[node.target], m))
    return list(params.values()), masks


def _set_attr(gm: nn.Module, target: str, value: nn.Parameter) -> None:
    *path, leaf = target.split(".")
    mod = gm
    for atom in path:
        mod = getattr(mod, atom)
    if leaf in mod._parameters:
        mod._parameters[leaf] = value
    else:
        setattr(mod, leaf, value)


# ---- data --------------------------------------------------------------------------------------
def _static_batch(program: Program) -> int | None:
    specs = program.input_specs
    if specs and specs[0].shape and isinstance(specs[0].shape[0], int):
        return specs[0].shape[0]
    return None


def _as_inputs(item: Any, n: int) -> list[torch.Tensor]:
    if isinstance(item, torch.Tensor):
        item = (item,)
    if isinstance(item, dict):
        raise OptcError("recover(): batches must be tensors or tuples of tensors (keyword inputs are not supported)")
    items = list(item)[:n]
    if len(items) < n or not all(isinstance(t, torch.Tensor) for t in items):
        raise OptcError(f"recover(): each batch must hold the model's {n} input tensor(s)")
    return items


def _batches(data: Any, n: int, batch_size: int, seed: int) -> Iterator[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    if isinstance(data, torch.Tensor):
        data = torch.utils.data.TensorDataset(data)
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        if len(data) == 0:
            raise OptcError("recover(): the data set is empty")
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True,
                                             drop_last=len(data) >= batch_size, generator=gen)
        return (_as_inputs(b, n) for b in itertools.chain.from_iterable(itertools.repeat(loader)))
    if not isinstance(data, Iterable):
        raise OptcError("recover(): data must be a tensor, a Dataset or an iterable of batches, "
                        f"got {type(data).__name__}")

    def cycle():
        while True:
            empty = True
            for b in data:
                empty = False
                yield _as_inputs(b, n)
            if empty:
                raise OptcError("recover(): the data yielded no batch")
            if iter(data) is data:      # a one-shot iterator: cannot cycle
                raise OptcError("recover(): the data iterator ran out before `steps` steps; pass a re-iterable "
                                "(a list, a Dataset or a DataLoader)")
    return cycle()


def _check_batch(program: Program, inputs: list[torch.Tensor]) -> None:
    for spec, t in zip(program.input_specs, inputs):
        if len(spec.shape) != t.dim() or any(isinstance(d, int) and d != s for d, s in zip(spec.shape, t.shape)):
            hint = (" (the program was captured with a static batch: capture it with dynamic_shapes='batch', "
                    "or use batch_size equal to the captured batch)" if spec.shape and isinstance(spec.shape[0], int)
                    and list(spec.shape[1:]) == list(t.shape[1:]) else "")
            raise InputSpecError(f"recover(): input '{spec.name}' expects shape {list(spec.shape)}, got "
                                 f"{list(t.shape)}{hint}")


# ---- loss ------------------------------------------------------------------------------------
def _flat_outputs(teacher, program: Program, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(teacher, Program):
        out = teacher.graph_module(*inputs)
    else:
        args = _unflatten_inputs(program, inputs)
        out = teacher(*args[0], **args[1])
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _unflatten_inputs(program: Program, inputs: list[torch.Tensor]) -> tuple[tuple, dict]:
    it = iter(inputs)
    leaves = [next(it) if leaf.is_tensor else leaf.const for leaf in program.input_leaves]
    args, kwargs = pytree.tree_unflatten(leaves, program.in_spec)
    return tuple(args), dict(kwargs)


def _loss(student: list[torch.Tensor], teacher: list[torch.Tensor], kind: str, temperature: float) -> torch.Tensor:
    if len(student) != len(teacher):
        raise OptcError(f"recover(): the program has {len(student)} outputs, the teacher {len(teacher)}")
    for s, t in zip(student, teacher):
        if s.shape != t.shape:
            raise OptcError(f"recover(): output shapes differ: program {list(s.shape)}, teacher {list(t.shape)}")
    if kind == "auto":
        kind = "kl" if len(student) == 1 and student[0].dim() == 2 and student[0].is_floating_point() else "mse"
    if kind == "kl":
        T = temperature
        total = 0.0
        for s, t in zip(student, teacher):
            s2, t2 = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
            total = total + F.kl_div(F.log_softmax(s2 / T, -1), F.log_softmax(t2 / T, -1), reduction="batchmean",
                                     log_target=True) * T * T
        return total
    return sum(F.mse_loss(s, t) for s, t in zip(student, teacher) if s.is_floating_point())


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="recover", file=sys.stderr, disable=not enabled, leave=False, dynamic_ncols=True)
