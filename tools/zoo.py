"""Model zoo: reference PyTorch models for testing and benchmarking optc.

Every model is written in plain ``torch.nn`` (no torchvision), is built in ``eval()``
mode in fp32 with deterministic, seeded random weights (nothing is ever downloaded)
and can be captured with ``torch.export.export(model, inputs, strict=False)``.

Usage::

    from optc.tools import zoo

    zoo.names()                                   # ['mlp', 'small_cnn', 'resnet18', ...]
    model, inputs = zoo.load("resnet50")          # full size, batch 1
    model, inputs = zoo.load("bert", batch=4, attention="sdpa", num_layers=2)
    model, inputs = zoo.load("vit", **zoo.tiny_config("vit"))   # unit-test size
    out = model(*inputs)

Models
------
``mlp``
    3-layer MLP (ReLU, dropout), input ``(B, 64)``.
``small_cnn``
    conv-bn-relu x3 CNN for 8x8 grayscale digits (sklearn's digits), 10 classes;
    example inputs are in ``[0, 1)`` like digits scaled by 1/16.
``resnet18``, ``resnet50``
    torchvision's ResNet (BasicBlock / Bottleneck v1.5, same module names), with a
    ``width`` multiplier of the base width 64, ``image_size`` and ``num_classes``.
``mobilenet_v2``
    torchvision's MobileNetV2 (inverted residuals, depthwise convs, ReLU6),
    ``width_mult``, ``image_size``, ``num_classes``.
``bert``
    BERT encoder (BERT-base by default, post-LN), inputs ``input_ids`` and
    ``attention_mask`` (both int64 ``(B, seq_len)``); returns the last hidden state,
    or ``(hidden, pooled)`` with ``pooler=True``.
``gpt``
    GPT-2 decoder (GPT-2 small by default, pre-LN, causal mask from ``torch.tril``,
    tied LM head), input ``input_ids``; returns logits ``(B, seq_len, vocab_size)``.
``vit``
    ViT-B/16 (conv patch embedding, cls token, learned position embeddings, pre-LN);
    returns logits ``(B, num_classes)``.
``hf_bert``, ``hf_gpt2``, ``hf_resnet50``, ``hf_mobilenet_v2``, ``hf_vit``
    Hugging Face ``transformers`` models built from config objects with random
    weights (never ``from_pretrained``), wrapped to return a plain tensor. They need
    the optional ``hf`` extra; without it they are hidden from :func:`names` and
    building them raises :class:`ZooUnavailableError`.

The transformer models share three options selecting how the same computation is
written, so that rewrite passes have both forms to match; all variants of a model
built with the same config have identical weights (same ``state_dict``):

``attention``
    ``"explicit"``: ``softmax(q @ k.transpose(-1, -2) / sqrt(d) + mask) @ v`` with an
    (eval-mode) dropout on the probabilities, as Hugging Face BERT writes it;
    ``"sdpa"``: ``F.scaled_dot_product_attention``. q, k and v are always separate
    ``nn.Linear`` projections.
``norm``
    ``"module"``: ``nn.LayerNorm``; ``"decomposed"``: mean, sub, pow, mean, add eps,
    rsqrt, mul, mul weight, add bias written out.
``gelu``
    ``"module"``: ``nn.GELU()``; ``"module_tanh"``: ``nn.GELU(approximate="tanh")``;
    ``"erf"``: ``0.5 * x * (1 + erf(x / sqrt(2)))``; ``"tanh"``:
    ``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))`` (GPT-2's default).

Initialisation keeps activations finite and O(1) at any depth: convolutions use
Kaiming fan-in init; BatchNorm affine parameters and running statistics are random
and non-trivial (so BN folding is really tested), with the last BN of each residual
branch scaled down to gamma in ``[0.2, 0.5]``; linear layers use std ``1/sqrt(fan_in)``
(GPT-2 style ``1/sqrt(2 * num_layers)`` extra scaling on residual projections of
pre-LN models) and LayerNorm affine parameters are random too.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from optc.errors import OptcError

__all__ = [
    "ZooEntry",
    "UnknownModelError",
    "ZooUnavailableError",
    "names",
    "get",
    "load",
    "tiny_config",
    "is_available",
]


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


# --------------------------------------------------------------------------- init


def _randomize_bn(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.1)
        bn.running_mean.normal_(0.0, 0.1)
        bn.running_var.uniform_(0.5, 1.5)


def _init_fan_in(model: nn.Module, residual_bns: Iterable[nn.Module] = (),
                 linear_convs: Iterable[nn.Conv2d] = ()) -> nn.Module:
    """Kaiming fan-in convs, random BN, 1/sqrt(fan_in) linears; damp residual branches.

    Convs are initialised for a following ReLU (gain sqrt(2)) except ``linear_convs``
    (e.g. ResNet shortcut projections, gain 1), whose output is not rectified; the
    gamma of each BN in ``residual_bns`` (the last BN of a residual branch) is drawn
    from U(0.2, 0.5) so that activations stay O(1) through deep networks.
    """
    torch.manual_seed(0)  # weights must not depend on RNG use during construction
    linear_convs = {id(c) for c in linear_convs}
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            gain = "linear" if id(m) in linear_convs else "relu"
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity=gain)
            if m.bias is not None:
                nn.init.normal_(m.bias, 0.0, 0.01)
        elif isinstance(m, nn.BatchNorm2d):
            _randomize_bn(m)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, m.in_features**-0.5)
            if m.bias is not None:
                nn.init.normal_(m.bias, 0.0, 0.01)
    with torch.no_grad():
        for bn in residual_bns:
            bn.weight.uniform_(0.2, 0.5)
    return model


# --------------------------------------------------------------------------- mlp / cnn


class MLP(nn.Module):
    """Three linear layers with ReLU and dropout between them."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _build_mlp(*, in_features: int, hidden: int, num_classes: int, dropout: float) -> nn.Module:
    return _init_fan_in(MLP(in_features, hidden, num_classes, dropout))


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class SmallCNN(nn.Module):
    """conv-bn-relu, maxpool, conv-bn-relu x2, global avgpool, flatten, dropout, linear."""

    def __init__(self, in_channels: int, channels: tuple[int, int, int], num_classes: int,
                 dropout: float):
        super().__init__()
        c1, c2, c3 = channels
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, c1),
            nn.MaxPool2d(2),
            _conv_bn_relu(c1, c2),
            _conv_bn_relu(c2, c3),
            nn.AdaptiveAvgPool2d(1),
        )
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        return self.fc(self.dropout(x))


def _build_small_cnn(*, in_channels: int, image_size: int, channels: tuple[int, int, int],
                     num_classes: int, dropout: float) -> nn.Module:
    if len(channels) != 3:
        raise ValueError(f"small_cnn needs 3 channel counts, got {channels!r}")
    return _init_fan_in(SmallCNN(in_channels, tuple(channels), num_classes, dropout))


def _digits_inputs(batch: int, *, in_channels: int, image_size: int, **_: Any) -> tuple:
    return (torch.rand(batch, in_channels, image_size, image_size, generator=_generator()),)


# --------------------------------------------------------------------------- resnet


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 conv-bn with a residual connection."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """ResNet-50 block (v1.5: stride on the 3x3 conv): 1x1, 3x3, 1x1 conv-bn."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet with base width ``base_width`` (64 for the standard model)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int],
                 base_width: int = 64, num_classes: int = 1000):
        super().__init__()
        self.inplanes = base_width
        self.conv1 = nn.Conv2d(3, base_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, base_width, layers[0])
        self.layer2 = self._make_layer(block, base_width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, base_width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, base_width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(base_width * 8 * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def _resnet_factory(block, layers: list[int]) -> Callable[..., nn.Module]:
    def build(*, width: float, image_size: int, num_classes: int) -> nn.Module:
        base = max(1, int(round(64 * width)))
        model = ResNet(block, layers, base, num_classes)
        blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
        # Convs whose output is summed, not rectified: shortcut projections and the
        # last conv of each residual branch.
        linear = [b.downsample[0] for b in blocks if b.downsample is not None]
        linear += [b.conv3 if isinstance(b, Bottleneck) else b.conv2 for b in blocks]
        return _init_fan_in(model, [b.last_bn for b in blocks], linear)

    return build


# --------------------------------------------------------------------------- mobilenet


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:  # do not round down by more than 10%
        new_v += divisor
    return new_v


class ConvBNReLU6(nn.Sequential):
    """Conv (no bias), BatchNorm, ReLU6."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1):
        super().__init__(
            nn.Conv2d(cin, cout, kernel_size, stride, (kernel_size - 1) // 2,
                      groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection (+ residual)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(inp, hidden, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2."""

    # expand ratio t, channels c, repeats n, stride s
    SETTINGS = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2],
                [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]

    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        input_channel = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU6(3, input_channel, stride=2)]
        for t, c, n, s in self.SETTINGS:
            output_channel = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel,
                                                 s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(ConvBNReLU6(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.features(x)), 1)
        return self.classifier(x)


def _build_mobilenet_v2(*, width_mult: float, image_size: int, num_classes: int,
                        dropout: float) -> nn.Module:
    model = MobileNetV2(width_mult, num_classes, dropout)
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    residual_bns = [b.conv[-1] for b in blocks if b.use_res_connect]
    projections = [b.conv[-2] for b in blocks]  # linear bottlenecks: no ReLU6 after
    return _init_fan_in(model, residual_bns, projections)


# --------------------------------------------------------------------------- transformer parts

_ATTENTION = ("explicit", "sdpa")
_NORM = ("module", "decomposed")
_GELU = ("module", "module_tanh", "erf", "tanh")


def _check_options(attention: str, norm: str, gelu: str, hidden_size: int, num_heads: int) -> None:
    for key, value, valid in (("attention", attention, _ATTENTION), ("norm", norm, _NORM),
                              ("gelu", gelu, _GELU)):
        if value not in valid:
            raise ValueError(f"{key}={value!r} is not one of {', '.join(map(repr, valid))}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")


class DecomposedLayerNorm(nn.Module):
    """LayerNorm over the last dim written as primitive ops (same parameters as nn.LayerNorm)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5):
        super().__init__()
        self.normalized_shape = (normalized_shape,)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        centered = x - mean
        var = centered.pow(2).mean(-1, keepdim=True)
        x = centered * torch.rsqrt(var + self.eps)
        return x * self.weight + self.bias


class ErfGELU(nn.Module):
    """Exact GELU written with erf, as Hugging Face BERT does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class TanhGELU(nn.Module):
    """Tanh-approximated GELU written out, as GPT-2 (Hugging Face ``NewGELUActivation``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps) if kind == "module" else DecomposedLayerNorm(dim, eps)


def _make_gelu(kind: str) -> nn.Module:
    if kind == "module":
        return nn.GELU()
    if kind == "module_tanh":
        return nn.GELU(approximate="tanh")
    return ErfGELU() if kind == "erf" else TanhGELU()


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections.

    ``mask`` is either an additive float mask broadcastable to (B, heads, T, T), or a
    bool mask where True means "may attend".
    """

    def __init__(self, hidden_size: int, num_heads: int, attention: str, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.attention = attention
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, hidden_size)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        if self.attention == "explicit":
            scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            if mask is not None:
                if mask.dtype == torch.bool:
                    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
                else:
                    scores = scores + mask
            probs = self.attn_dropout(torch.softmax(scores, dim=-1))
            ctx = torch.matmul(probs, v)
        else:
            p = self.attn_dropout.p if self.training else 0.0
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out(ctx.transpose(1, 2).reshape(b, t, c))


class FeedForward(nn.Module):
    """Linear, GELU, linear."""

    def __init__(self, hidden_size: int, intermediate_size: int, gelu: str):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.act = _make_gelu(gelu)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PostLNBlock(nn.Module):
    """BERT encoder layer: x = LN(x + attn(x)); x = LN(x + ffn(x))."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, dropout: float,
                 eps: float, attention: str, norm: str, gelu: str):
        super().__init__()
        self.attn = SelfAttention(hidden_size, num_heads, attention, dropout)
        self.attn_dropout = nn.Dropout(dropout)
        self.attn_norm = _make_norm(norm, hidden_size, eps)
        self.ffn = FeedForward(hidden_size, intermediate_size, gelu)
        self.ffn_dropout = nn.Dropout(dropout)
        self.ffn_norm = _make_norm(norm, hidden_size, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn_norm(x + self.attn_dropout(self.attn(x, mask)))
        return self.ffn_norm(x + self.ffn_dropout(self.ffn(x)))


class PreLNBlock(nn.Module):
    """GPT-2 / ViT layer: x = x + attn(LN(x)); x = x + ffn(LN(x))."""

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, dropout: float,
                 eps: float, attention: str, norm: str, gelu: str):
        super().__init__()
        self.ln_1 = _make_norm(norm, hidden_size, eps)
        self.attn = SelfAttention(hidden_size, num_heads, attention, dropout)
        self.attn_dropout = nn.Dropout(dropout)
        self.ln_2 = _make_norm(norm, hidden_size, eps)
        self.ffn = FeedForward(hidden_size, intermediate_size, gelu)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn_dropout(self.attn(self.ln_1(x), mask))
        return x + self.ffn_dropout(self.ffn(self.ln_2(x)))


def _init_transformer(model: nn.Module, residual_scale: float = 1.0) -> nn.Module:
    """1/sqrt(fan_in) linears and convs, 1/sqrt(dim) embeddings, random LayerNorm affine.

    ``residual_scale`` multiplies the output projections of attention and FFN (GPT-2's
    1/sqrt(2 * num_layers) for pre-LN models).
    """
    torch.manual_seed(0)  # weights must not depend on RNG use during construction
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, m.in_features**-0.5)
            if m.bias is not None:
                nn.init.normal_(m.bias, 0.0, 0.02)
        elif isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            nn.init.normal_(m.weight, 0.0, fan_in**-0.5)
            if m.bias is not None:
                nn.init.normal_(m.bias, 0.0, 0.02)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, m.embedding_dim**-0.5)
        elif isinstance(m, (nn.LayerNorm, DecomposedLayerNorm)):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SelfAttention):
                m.out.weight.mul_(residual_scale)
            elif isinstance(m, FeedForward):
                m.fc2.weight.mul_(residual_scale)
    return model


# --------------------------------------------------------------------------- bert


class BertEmbeddings(nn.Module):
    """Word + position + token-type (all type 0) embeddings, LayerNorm, dropout."""

    def __init__(self, vocab_size: int, hidden_size: int, max_positions: int, type_vocab_size: int,
                 dropout: float, eps: float, norm: str):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_positions, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.norm = _make_norm(norm, hidden_size, eps)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("position_ids", torch.arange(max_positions)[None, :], persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        position_ids = self.position_ids[:, : input_ids.shape[1]]
        token_type_ids = torch.zeros_like(input_ids)
        x = (self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
             + self.position_embeddings(position_ids))
        return self.dropout(self.norm(x))


class Bert(nn.Module):
    """BERT encoder; forward(input_ids, attention_mask) -> hidden or (hidden, pooled)."""

    def __init__(self, *, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int, max_positions: int, type_vocab_size: int,
                 dropout: float, layer_norm_eps: float, attention: str, norm: str, gelu: str,
                 pooler: bool):
        super().__init__()
        self.embeddings = BertEmbeddings(vocab_size, hidden_size, max_positions, type_vocab_size,
                                         dropout, layer_norm_eps, norm)
        self.layers = nn.ModuleList(
            PostLNBlock(hidden_size, num_heads, intermediate_size, dropout, layer_norm_eps,
                        attention, norm, gelu)
            for _ in range(num_layers)
        )
        self.pooler = nn.Linear(hidden_size, hidden_size) if pooler else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        x = self.embeddings(input_ids)
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, mask)
        if self.pooler is None:
            return x
        return x, torch.tanh(self.pooler(x[:, 0]))


def _build_bert(*, seq_len: int, **cfg: Any) -> nn.Module:
    _check_options(cfg["attention"], cfg["norm"], cfg["gelu"], cfg["hidden_size"], cfg["num_heads"])
    if seq_len > cfg["max_positions"]:
        raise ValueError(f"seq_len {seq_len} > max_positions {cfg['max_positions']}")
    return _init_transformer(Bert(**cfg))


# --------------------------------------------------------------------------- gpt


class GPT(nn.Module):
    """GPT-2 decoder; forward(input_ids) -> logits (B, T, vocab_size); tied LM head."""

    def __init__(self, *, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                 intermediate_size: int, max_positions: int, dropout: float,
                 layer_norm_eps: float, attention: str, norm: str, gelu: str):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, hidden_size)
        self.wpe = nn.Embedding(max_positions, hidden_size)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            PreLNBlock(hidden_size, num_heads, intermediate_size, dropout, layer_norm_eps,
                       attention, norm, gelu)
            for _ in range(num_layers)
        )
        self.ln_f = _make_norm(norm, hidden_size, layer_norm_eps)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight
        self.register_buffer("position_ids", torch.arange(max_positions), persistent=False)
        causal = torch.tril(torch.ones(max_positions, max_positions, dtype=torch.bool))
        self.register_buffer("causal_mask", causal, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self.drop(self.wte(input_ids) + self.wpe(self.position_ids[:t]))
        mask = self.causal_mask[:t, :t]
        for block in self.blocks:
            x = block(x, mask)
        return self.lm_head(self.ln_f(x))


def _build_gpt(*, seq_len: int, **cfg: Any) -> nn.Module:
    _check_options(cfg["attention"], cfg["norm"], cfg["gelu"], cfg["hidden_size"], cfg["num_heads"])
    if seq_len > cfg["max_positions"]:
        raise ValueError(f"seq_len {seq_len} > max_positions {cfg['max_positions']}")
    model = GPT(**cfg)
    return _init_transformer(model, residual_scale=(2 * cfg["num_layers"]) ** -0.5)


# --------------------------------------------------------------------------- vit


class ViT(nn.Module):
    """Vision Transformer; forward(images) -> logits (B, num_classes) from the cls token."""

    def __init__(self, *, image_size: int, patch_size: int, in_channels: int, num_classes: int,
                 hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                 dropout: float, layer_norm_eps: float, attention: str, norm: str, gelu: str):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, hidden_size))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            PreLNBlock(hidden_size, num_heads, intermediate_size, dropout, layer_norm_eps,
                       attention, norm, gelu)
            for _ in range(num_layers)
        )
        self.norm = _make_norm(norm, hidden_size, layer_norm_eps)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = self.drop(torch.cat([cls, x], dim=1) + self.pos_embed)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def _build_vit(**cfg: Any) -> nn.Module:
    _check_options(cfg["attention"], cfg["norm"], cfg["gelu"], cfg["hidden_size"], cfg["num_heads"])
    model = _init_transformer(ViT(**cfg), residual_scale=(2 * cfg["num_layers"]) ** -0.5)
    with torch.no_grad():
        model.cls_token.normal_(0.0, cfg["hidden_size"] ** -0.5)
        model.pos_embed.normal_(0.0, cfg["hidden_size"] ** -0.5)
    return model


# --------------------------------------------------------------------------- hugging face


class _HFAdapter(nn.Module):
    """Wraps a transformers model: keyword call, plain tensor output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


class _HFBert(_HFAdapter):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return out.last_hidden_state


class _HFGPT2(_HFAdapter):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False, return_dict=True).logits


class _HFImageClassifier(_HFAdapter):
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, return_dict=True).logits


def _hf_attention_kwargs(attention: str) -> dict:
    if attention not in ("eager", "sdpa"):
        raise ValueError(f"attention={attention!r} is not one of 'eager', 'sdpa'")
    return {"attn_implementation": attention}


def _build_hf_bert(*, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                   intermediate_size: int, max_positions: int, seq_len: int,
                   attention: str) -> nn.Module:
    import transformers

    config = transformers.BertConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=intermediate_size,
        max_position_embeddings=max_positions, **_hf_attention_kwargs(attention),
    )
    return _HFBert(transformers.BertModel(config, add_pooling_layer=False))


def _build_hf_gpt2(*, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int,
                   max_positions: int, seq_len: int, attention: str) -> nn.Module:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
        n_positions=max_positions, use_cache=False, bos_token_id=min(50256, vocab_size - 1),
        eos_token_id=min(50256, vocab_size - 1), **_hf_attention_kwargs(attention),
    )
    return _HFGPT2(transformers.GPT2LMHeadModel(config))


def _build_hf_resnet50(*, width: float, image_size: int, num_classes: int) -> nn.Module:
    import transformers

    base = max(1, int(round(64 * width)))
    config = transformers.ResNetConfig(
        num_channels=3, embedding_size=base, hidden_sizes=[base * 4, base * 8, base * 16, base * 32],
        depths=[3, 4, 6, 3], layer_type="bottleneck", hidden_act="relu",
        downsample_in_first_stage=False, num_labels=num_classes,
    )
    model = transformers.ResNetForImageClassification(config)
    # Same init as the native resnet; HF's fan-out init with identity BN grows
    # activations block after block. Each block's branch is ``layer`` (a Sequential
    # of ResNetConvLayer: convolution, normalization, activation).
    blocks = [m for m in model.modules()
              if type(m).__name__ in ("ResNetBottleNeckLayer", "ResNetBasicLayer")]
    linear = [b.layer[-1].convolution for b in blocks]
    linear += [m.convolution for m in model.modules() if type(m).__name__ == "ResNetShortCut"]
    _init_fan_in(model, [b.layer[-1].normalization for b in blocks], linear)
    return _HFImageClassifier(model)


def _build_hf_mobilenet_v2(*, width_mult: float, image_size: int, num_classes: int) -> nn.Module:
    import transformers

    config = transformers.MobileNetV2Config(
        num_channels=3, image_size=image_size, depth_multiplier=width_mult, num_labels=num_classes,
    )
    model = transformers.MobileNetV2ForImageClassification(config)
    # HF's default init drives activations to denormals; use the native model's init.
    blocks = [m for m in model.modules() if type(m).__name__ == "MobileNetV2InvertedResidual"]
    residual_bns = [b.reduce_1x1.normalization for b in blocks if b.use_residual]
    _init_fan_in(model, residual_bns, [b.reduce_1x1.convolution for b in blocks])
    return _HFImageClassifier(model)


def _build_hf_vit(*, image_size: int, patch_size: int, num_classes: int, hidden_size: int,
                  num_layers: int, num_heads: int, intermediate_size: int,
                  attention: str) -> nn.Module:
    import transformers

    config = transformers.ViTConfig(
        image_size=image_size, patch_size=patch_size, num_channels=3, hidden_size=hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        intermediate_size=intermediate_size, num_labels=num_classes,
        **_hf_attention_kwargs(attention),
    )
    return _HFImageClassifier(transformers.ViTForImageClassification(config))


# --------------------------------------------------------------------------- registrations

_TRANSFORMER_TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128,
                     "seq_len": 16}

_register(
    "mlp", "3-layer MLP with ReLU and dropout, input (B, 64)",
    _build_mlp, _vector_inputs,
    {"in_features": 64, "hidden": 256, "num_classes": 10, "dropout": 0.1},
    {"hidden": 32}, heavy=False,
)
_register(
    "small_cnn", "conv-bn-relu x3 CNN for 8x8 grayscale digits, 10 classes",
    _build_small_cnn, _digits_inputs,
    {"in_channels": 1, "image_size": 8, "channels": (16, 32, 64), "num_classes": 10,
     "dropout": 0.1},
    {"channels": (8, 16, 16)}, heavy=False,
)
_register(
    "resnet18", "ResNet-18 (torchvision architecture), input (B, 3, 224, 224)",
    _resnet_factory(BasicBlock, [2, 2, 2, 2]), _image_inputs,
    {"width": 1.0, "image_size": 224, "num_classes": 1000},
    {"width": 0.125, "image_size": 32, "num_classes": 10}, heavy=False,
)
_register(
    "resnet50", "ResNet-50 v1.5 (torchvision architecture), input (B, 3, 224, 224)",
    _resnet_factory(Bottleneck, [3, 4, 6, 3]), _image_inputs,
    {"width": 1.0, "image_size": 224, "num_classes": 1000},
    {"width": 0.125, "image_size": 32, "num_classes": 10}, heavy=True,
)
_register(
    "mobilenet_v2", "MobileNetV2 (torchvision architecture), input (B, 3, 224, 224)",
    _build_mobilenet_v2, _image_inputs,
    {"width_mult": 1.0, "image_size": 224, "num_classes": 1000, "dropout": 0.2},
    {"width_mult": 0.25, "image_size": 32, "num_classes": 10}, heavy=False,
)
_register(
    "bert", "BERT-base encoder, inputs input_ids and attention_mask (B, 128) int64",
    _build_bert, _token_and_mask_inputs,
    {"vocab_size": 30522, "hidden_size": 768, "num_layers": 12, "num_heads": 12,
     "intermediate_size": 3072, "seq_len": 128, "max_positions": 512, "type_vocab_size": 2,
     "dropout": 0.1, "layer_norm_eps": 1e-12, "attention": "explicit", "norm": "module",
     "gelu": "module", "pooler": False},
    {**_TRANSFORMER_TINY, "vocab_size": 1000, "max_positions": 64}, heavy=True,
)
_register(
    "gpt", "GPT-2 small decoder (pre-LN, causal), input input_ids (B, 128) int64 -> logits",
    _build_gpt, _token_inputs,
    {"vocab_size": 50257, "hidden_size": 768, "num_layers": 12, "num_heads": 12,
     "intermediate_size": 3072, "seq_len": 128, "max_positions": 1024, "dropout": 0.1,
     "layer_norm_eps": 1e-5, "attention": "explicit", "norm": "module", "gelu": "tanh"},
    {**_TRANSFORMER_TINY, "vocab_size": 1000, "max_positions": 64}, heavy=True,
)
_register(
    "vit", "ViT-B/16 (pre-LN, cls token), input (B, 3, 224, 224) -> logits",
    _build_vit, _image_inputs,
    {"image_size": 224, "patch_size": 16, "in_channels": 3, "num_classes": 1000,
     "hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 3072,
     "dropout": 0.1, "layer_norm_eps": 1e-6, "attention": "explicit", "norm": "module",
     "gelu": "module"},
    {"image_size": 32, "patch_size": 8, "num_classes": 10, "hidden_size": 64, "num_layers": 2,
     "num_heads": 4, "intermediate_size": 128}, heavy=True,
)

_HF = ("transformers",)
_HF_TEXT_TINY = {"vocab_size": 1000, "hidden_size": 64, "num_layers": 2, "num_heads": 4,
                 "max_positions": 64, "seq_len": 16}

_register(
    "hf_bert", "transformers BertModel (BERT-base config, random weights) -> last_hidden_state",
    _build_hf_bert, _token_and_mask_inputs,
    {"vocab_size": 30522, "hidden_size": 768, "num_layers": 12, "num_heads": 12,
     "intermediate_size": 3072, "max_positions": 512, "seq_len": 128, "attention": "eager"},
    {**_HF_TEXT_TINY, "intermediate_size": 128}, heavy=True, requires=_HF,
)
_register(
    "hf_gpt2", "transformers GPT2LMHeadModel (GPT-2 small config, use_cache=False) -> logits",
    _build_hf_gpt2, _token_inputs,
    {"vocab_size": 50257, "hidden_size": 768, "num_layers": 12, "num_heads": 12,
     "max_positions": 1024, "seq_len": 128, "attention": "eager"},
    _HF_TEXT_TINY, heavy=True, requires=_HF,
)
_register(
    "hf_resnet50", "transformers ResNetForImageClassification (ResNet-50 config) -> logits",
    _build_hf_resnet50, _image_inputs,
    {"width": 1.0, "image_size": 224, "num_classes": 1000},
    {"width": 0.125, "image_size": 32, "num_classes": 10}, heavy=True, requires=_HF,
)
_register(
    "hf_mobilenet_v2", "transformers MobileNetV2ForImageClassification -> logits",
    _build_hf_mobilenet_v2, _image_inputs,
    {"width_mult": 1.0, "image_size": 224, "num_classes": 1000},
    {"width_mult": 0.35, "image_size": 32, "num_classes": 10}, heavy=False, requires=_HF,
)
_register(
    "hf_vit", "transformers ViTForImageClassification (ViT-B/16 config) -> logits",
    _build_hf_vit, _image_inputs,
    {"image_size": 224, "patch_size": 16, "num_classes": 1000, "hidden_size": 768,
     "num_layers": 12, "num_heads": 12, "intermediate_size": 3072, "attention": "eager"},
    {"image_size": 32, "patch_size": 8, "num_classes": 10, "hidden_size": 64, "num_layers": 2,
     "num_heads": 4, "intermediate_size": 128}, heavy=True, requires=_HF,
)
