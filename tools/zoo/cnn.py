"""The zoo's MLP and CNNs in plain ``torch.nn``: ``mlp``, ``small_cnn``, ``resnet18``,
``resnet50`` (torchvision's architecture and module names) and ``mobilenet_v2``.

Convolutions use Kaiming fan-in init; BatchNorm affine parameters and running statistics are
random and non-trivial (so BN folding is really tested), with the last BN of each residual
branch scaled down to gamma in ``[0.2, 0.5]`` (:func:`_init_fan_in`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from optc.tools.zoo.registry import _generator, _image_inputs, _register, _vector_inputs


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
