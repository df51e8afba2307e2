"""Op views: a call node seen as the layer or normalisation it computes.

- :class:`Layer` / :func:`as_layer`: a convolution (1-3d, transposed or not, ``aten.convolution``)
  or ``aten.linear`` as ``y = W (*) x + b`` per output channel, with its channel axis and count;
  :func:`layer_refusal` says why its constants cannot absorb a per-channel affine map;
- :class:`BatchNorm` / :func:`as_batch_norm`: any of the BatchNorm ops torch.export leaves
  (``aten.batch_norm``, ``_native_batch_norm_legit*``, ``native_batch_norm``) with its
  arguments by name and the node holding the normalised value; :func:`bn_refusal` says why it
  is not an affine map with constant coefficients, :func:`bn_layer_refusal` why it does not
  normalise a layer's output channels.

Views never mutate the graph. Used by the folding passes and the channel-dependency analysis.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from optc.ir.rewrite import arg, attr_value, is_op

aten = torch.ops.aten

_CONVS = (aten.conv1d, aten.conv2d, aten.conv3d)
_CONV_TRANSPOSES = (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
_CONVOLUTIONS = (aten.convolution.default, aten._convolution.default)   # transposed flag at 6, groups at 8


# ---- layers: convolution or linear ------------------------------------------------------
@dataclass(frozen=True)
class Layer:
    """A convolution or linear node seen as ``y = W (*) x + b`` per output channel."""

    node: fx.Node
    kind: str              # "conv", "conv_transpose" or "linear"
    weight: Any            # the weight argument (a get_attr node when foldable)
    bias: Any              # the bias argument: a node or None
    groups: int

    @property
    def what(self) -> str:
        """The name used in refusal messages."""
        return "linear" if self.kind == "linear" else "conv"

    @property
    def channel_axis(self) -> int:
        """The axis of the output that holds the output channels."""
        rank = self.node.meta["val"].dim()
        if self.kind == "linear":
            return rank - 1
        spatial = self.weight.meta["val"].dim() - 2
        return rank - spatial - 1     # 1 for a batched input, 0 for an unbatched one

    @property
    def out_channels(self) -> int:
        w = self.weight.meta["val"]
        return int(w.shape[1]) * self.groups if self.kind == "conv_transpose" else int(w.shape[0])


def as_layer(node: Any) -> Layer | None:
    """``node`` as a :class:`Layer` if it is a convolution or ``aten.linear`` call."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    weight, bias = arg(node, 1, "weight"), arg(node, 2, "bias")
    if not isinstance(weight, fx.Node) or not isinstance(weight.meta.get("val"), torch.Tensor):
        return None
    if is_op(node, aten.linear):
        return Layer(node, "linear", weight, bias, 1)
    if is_op(node, *_CONVS):
        return Layer(node, "conv", weight, bias, 1)
    if is_op(node, *_CONV_TRANSPOSES):
        groups = arg(node, 6, "groups", 1)
        return Layer(node, "conv_transpose", weight, bias, groups) if isinstance(groups, int) else None
    if is_op(node, *_CONVOLUTIONS):
        transposed, groups = arg(node, 6, "transposed"), arg(node, 8, "groups")
        if not isinstance(transposed, bool) or not isinstance(groups, int):
            return None
        return Layer(node, "conv_transpose" if transposed else "conv", weight, bias, groups)
    return None


def _shared(node: fx.Node, user: fx.Node) -> bool:
    """Whether the constant ``node`` is read by anything besides ``user``."""
    if any(u is not user for u in node.users):
        return True
    return any(n is not node and n.op == "get_attr" and n.target == node.target for n in node.graph.nodes)


def layer_refusal(layer: Layer) -> str | None:
    """Why ``layer``'s weight and bias cannot absorb a per-channel affine map, or None."""
    users = len(layer.node.users)
    if users != 1:
        return f"{layer.what} output has {users} users"
    w = attr_value(layer.weight)
    if w is None:
        return f"{layer.what} weight %{layer.weight.name} is not a constant"
    if not w.is_floating_point():
        return f"{layer.what} weight is not floating point ({w.dtype})"
    if layer.bias is not None and attr_value(layer.bias) is None:
        return f"{layer.what} bias %{getattr(layer.bias, 'name', layer.bias)} is not a constant"
    if _shared(layer.weight, layer.node):
        return f"{layer.what} weight is shared with another node"
    if layer.bias is not None and _shared(layer.bias, layer.node):
        return f"{layer.what} bias is shared with another node"
    return None


# ---- batch norm ---------------------------------------------------------------------------
# op -> (index of `training` or a constant, index of eps, has running-stat arguments, returns a tuple)
_BN_OPS = {
    aten.batch_norm.default: (5, 7, True, False),
    aten._native_batch_norm_legit_no_training.default: (False, 6, True, True),
    aten._native_batch_norm_legit.default: (5, 7, True, True),
    aten.native_batch_norm.default: (5, 7, True, True),
    aten._native_batch_norm_legit.no_stats: (3, 5, False, True),
    aten._native_batch_norm_legit_functional.default: (5, 7, True, True),
}


@dataclass(frozen=True)
class BatchNorm:
    """A BatchNorm call: ``input`` normalised over dim 1 with the given parameters."""

    node: fx.Node
    input: Any
    weight: Any            # gamma: node or None
    bias: Any              # beta: node or None
    mean: Any
    var: Any
    eps: Any
    training: Any
    output: fx.Node | None  # the node holding the normalised value (the call, or its getitem 0)
    tuple_refusal: str | None


def as_batch_norm(node: Any) -> BatchNorm | None:
    """``node`` as a :class:`BatchNorm` if it is one of the BatchNorm ops (see docstring)."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in _BN_OPS:
        return None
    train_i, eps_i, has_stats, returns_tuple = _BN_OPS[node.target]
    training = train_i if isinstance(train_i, bool) else arg(node, train_i, "training")
    mean = arg(node, 3, "running_mean") if has_stats else None
    var = arg(node, 4, "running_var") if has_stats else None
    output, why = node, None
    if returns_tuple:
        output = None
        for u in node.users:
            if u.op == "call_function" and u.target is operator.getitem and isinstance(u.args[1], int):
                if u.args[1] == 0:
                    output = u
                elif u.users:
                    why = f"bn's saved statistics (output {u.args[1]}) are used by %{next(iter(u.users)).name}"
            else:
                why = f"bn's result tuple is used directly by %{u.name}"
    return BatchNorm(node, node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias"), mean, var,
                     arg(node, eps_i, "eps"), training, output, why)


def bn_refusal(bn: BatchNorm) -> str | None:
    """Why ``bn`` is not an affine map with constant per-channel coefficients, or None."""
    if bn.training is not False:
        return "bn is in training mode" if bn.training is True else f"bn training flag is not constant ({bn.training!r})"
    if bn.mean is None or bn.var is None:
        return "bn has no running statistics"
    for what, n in (("running_mean", bn.mean), ("running_var", bn.var)):
        if attr_value(n) is None:
            return f"bn {what} is not a constant"
    for what, n in (("weight", bn.weight), ("bias", bn.bias)):
        if n is not None and attr_value(n) is None:
            return f"bn {what} is not a constant"
    if not isinstance(bn.eps, (int, float)):
        return f"bn eps is not a constant ({bn.eps!r})"
    if bn.tuple_refusal:
        return bn.tuple_refusal
    if bn.output is None:
        return "bn's normalised output is unused"
    if not bool((attr_value(bn.var).double() + bn.eps > 0).all()):
        return "bn running_var + eps is not positive"
    return None


def bn_layer_refusal(bn: BatchNorm, layer: Layer) -> str | None:
    """Why ``bn`` does not normalise ``layer``'s output channels, or None."""
    ch = layer.channel_axis
    if ch != 1:
        return f"bn normalises dim 1 of the {layer.what} output, but its channels are dim {ch}"
    n = int(attr_value(bn.mean).numel())
    if n != layer.out_channels:
        return f"bn has {n} channels, the {layer.what} {layer.out_channels}"
    return None
