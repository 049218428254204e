"""A small pre-norm Vision Transformer with a class token, sized to train on a CPU.

Attention uses one fused ``qkv`` projection, split per head; ``B`` and ``T`` are read from
``x.shape`` so they stay symbolic under ``torch.fx``, every other size is fixed here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mudsc.errors import ConfigError
from mudsc.models.registry import common_args, positive_float, positive_int, register, scaled


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.dim = dim
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens = x.shape[0], x.shape[1]
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(batch, tokens, self.dim)
        return self.proj(x)


class MLPBlock(nn.Module):
    """Token-wise feed-forward: Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@register("vit")
class ViT(nn.Module):
    """Patch embedding, class token, learned positions, ``depth`` blocks, class-token head."""

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        embed_dim: int = 512,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        patch_size: int = 4,
        mlp_ratio: float = 2.0,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        args = common_args(in_channels, image_size, embed_dim)
        dim = positive_int("dim", dim)
        depth = positive_int("depth", depth)
        heads = positive_int("heads", heads)
        patch_size = positive_int("patch_size", patch_size)
        mlp_ratio = positive_float("mlp_ratio", mlp_ratio)
        width = positive_float("width", width)
        self.arch = "vit"
        self.config = {
            **args, "dim": dim, "depth": depth, "heads": heads, "patch_size": patch_size,
            "mlp_ratio": mlp_ratio, "width": width,
        }  # fmt: skip

        if args["image_size"] % patch_size:
            raise ConfigError(
                f"vit: image_size {args['image_size']} is not divisible by patch_size "
                f"{patch_size}; choose a patch_size that divides the image size"
            )
        model_dim = scaled(dim, width)
        if model_dim % heads:
            raise ConfigError(
                f"vit: model width {model_dim} (dim {dim} x width {width}) is not divisible by "
                f"heads={heads}; choose dim, width and heads so that heads divides dim x width"
            )
        tokens = (args["image_size"] // patch_size) ** 2
        self.patch_embed = nn.Conv2d(
            args["in_channels"], model_dim, kernel_size=patch_size, stride=patch_size
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, model_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, model_dim))
        hidden = scaled(model_dim, mlp_ratio)
        self.blocks = nn.Sequential(*(Block(model_dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(model_dim)
        self.head = nn.Linear(model_dim, args["embed_dim"])
        self._init_weights()

    def _init_weights(self) -> None:
        """Small truncated-normal tokens and linear weights, as in ViT/timm."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.blocks(x + self.pos_embed)
        return self.head(self.norm(x)[:, 0])
