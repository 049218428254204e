"""CIFAR-style ResNets: ResNet-20 (BatchNorm or GroupNorm) and a bottleneck ResNet-50.

Both use a 3x3 stride-1 stem without max pooling, so 28x28 and 32x32 inputs keep enough
resolution. Identity shortcuts are empty ``nn.Sequential`` modules, which ``torch.fx``
inlines away, so a trace shows a plain ``add`` of the block output and its input.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from mudsc.errors import ConfigError
from mudsc.models.registry import (
    common_args,
    positive_float,
    positive_int,
    register,
    scaled,
)

NormFactory = Callable[[int], nn.Module]


def _shortcut(in_ch: int, out_ch: int, stride: int, norm: NormFactory) -> nn.Module:
    """Projection (conv1x1 + norm) when the shape changes, else identity."""
    if stride == 1 and in_ch == out_ch:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), norm(out_ch))


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolutions, unit-scale norms (the usual ResNet initialisation)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """conv3x3-norm-ReLU-conv3x3-norm, plus shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = norm(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride, norm)
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4, plus shortcut, then ReLU."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = norm(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride, norm)
        self.relu3 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


class _ResNet20(nn.Module):
    """Shared body of ``resnet20`` and ``resnet20-gn``: 3 stages of 3 BasicBlocks."""

    def __init__(self, in_channels: int, embed_dim: int, width: int, norm: NormFactory) -> None:
        super().__init__()
        widths = (16 * width, 32 * width, 64 * width)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = norm(widths[0])
        self.relu = nn.ReLU()
        stages: list[nn.Sequential] = []
        in_ch = widths[0]
        for i, out_ch in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks = [
                BasicBlock(in_ch if j == 0 else out_ch, out_ch, stride if j == 0 else 1, norm)
                for j in range(3)
            ]
            stages.append(nn.Sequential(*blocks))
            in_ch = out_ch
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], embed_dim)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.head(self.pool(x).flatten(1))


@register("resnet20")
class ResNet20(_ResNet20):
    """ResNet-20 with BatchNorm; ``width`` w gives 16w/32w/64w channels."""

    def __init__(
        self, in_channels: int = 3, image_size: int = 32, embed_dim: int = 512, width: int = 1
    ) -> None:
        args = common_args(in_channels, image_size, embed_dim)
        width = positive_int("width", width)
        super().__init__(args["in_channels"], args["embed_dim"], width, nn.BatchNorm2d)
        self.arch = "resnet20"
        self.config = {**args, "width": width}


@register("resnet20-gn")
class ResNet20GN(_ResNet20):
    """ResNet-20 with GroupNorm(``groups``) in place of every BatchNorm."""

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        embed_dim: int = 512,
        width: int = 1,
        groups: int = 4,
    ) -> None:
        args = common_args(in_channels, image_size, embed_dim)
        width = positive_int("width", width)
        groups = positive_int("groups", groups)
        if (16 * width) % groups:
            raise ConfigError(
                f"resnet20-gn: groups={groups} does not divide the {16 * width} channels of the "
                f"first stage (16 x width {width}); choose groups dividing {16 * width}"
            )
        super().__init__(
            args["in_channels"], args["embed_dim"], width, lambda c: nn.GroupNorm(groups, c)
        )
        self.arch = "resnet20-gn"
        self.config = {**args, "width": width, "groups": groups}


@register("resnet50")
class ResNet50(nn.Module):
    """Bottleneck ResNet-50 (stages 3,4,6,3) with a CIFAR stem; base 64 x ``width`` channels."""

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        embed_dim: int = 512,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        args = common_args(in_channels, image_size, embed_dim)
        width = positive_float("width", width)
        self.arch = "resnet50"
        self.config = {**args, "width": width}

        base = scaled(64, width)
        self.conv1 = nn.Conv2d(args["in_channels"], base, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU()
        stages: list[nn.Sequential] = []
        in_ch = base
        for i, depth in enumerate((3, 4, 6, 3)):
            planes = base * 2**i
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(Bottleneck(in_ch, planes, stride, nn.BatchNorm2d))
                in_ch = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_ch, args["embed_dim"])
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(self.pool(x).flatten(1))
