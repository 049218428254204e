"""VGG-11 (with or without BatchNorm), pooling only as often as the image size allows."""

from __future__ import annotations

from torch import Tensor, nn

from mudsc.models.registry import common_args, positive_float, register, scaled

# Channels per conv layer; "M" is a 2x2 max pool.
VGG11_LAYERS: tuple[int | str, ...] = (
    64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M",
)  # fmt: skip


class _VGG11(nn.Module):
    """Shared body of ``vgg11`` and ``vgg11-bn``; the public subclasses fix ``batch_norm``."""

    def __init__(
        self,
        arch: str,
        batch_norm: bool,
        in_channels: object,
        image_size: object,
        embed_dim: object,
        width: object,
    ) -> None:
        super().__init__()
        args = common_args(in_channels, image_size, embed_dim)
        width = positive_float("width", width)
        self.arch = arch
        self.config = {**args, "width": width}

        layers: list[nn.Module] = []
        channels, size = args["in_channels"], args["image_size"]
        for item in VGG11_LAYERS:
            if item == "M":
                # 28x28 inputs reach 1x1 one pool early: skip pools that would empty the map.
                if size // 2 >= 1:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            out = scaled(int(item), width)
            layers.append(nn.Conv2d(channels, out, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU())
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        hidden = scaled(512, width)
        self.classifier = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, args["embed_dim"])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.head(self.classifier(x))


@register("vgg11")
class VGG11(_VGG11):
    """VGG-11 without normalisation layers."""

    def __init__(
        self, in_channels: int = 3, image_size: int = 32, embed_dim: int = 512, width: float = 1.0
    ) -> None:
        super().__init__("vgg11", False, in_channels, image_size, embed_dim, width)


@register("vgg11-bn")
class VGG11BN(_VGG11):
    """VGG-11 with BatchNorm2d after every convolution."""

    def __init__(
        self, in_channels: int = 3, image_size: int = 32, embed_dim: int = 512, width: float = 1.0
    ) -> None:
        super().__init__("vgg11-bn", True, in_channels, image_size, embed_dim, width)
