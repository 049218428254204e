"""Multi-layer perceptron on flattened images (the paper's MNIST model is 784-1024x3-512)."""

from __future__ import annotations

from torch import Tensor, nn

from mudsc.models.registry import common_args, positive_float, positive_int, register, scaled


@register("mlp")
class MLP(nn.Module):
    """flatten -> ``depth`` x (Linear -> ReLU) -> Linear ``head`` to the embedding."""

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        embed_dim: int = 512,
        hidden: int = 512,
        depth: int = 3,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        args = common_args(in_channels, image_size, embed_dim)
        hidden = positive_int("hidden", hidden)
        depth = positive_int("depth", depth)
        width = positive_float("width", width)
        self.arch = "mlp"
        self.config = {**args, "hidden": hidden, "depth": depth, "width": width}

        units = scaled(hidden, width)
        layers: list[nn.Module] = []
        fan_in = args["in_channels"] * args["image_size"] ** 2
        for _ in range(depth):
            layers += [nn.Linear(fan_in, units), nn.ReLU()]
            fan_in = units
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(units, args["embed_dim"])
        self._init_weights()

    def _init_weights(self) -> None:
        """He init, zero biases: PyTorch's default Linear init shrinks the signal ~2.3x per
        layer, and the cosine head's gradient grows as 1/|embedding|, so without a norm layer
        the default init makes the first steps ~6x too large and training collapses."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x.flatten(1)))
