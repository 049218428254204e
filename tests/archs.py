"""Test-only architectures that exercise the tracing rules beyond the model zoo."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DenseNetish(nn.Module):
    """Dense block: every conv reads the channel concatenation of all earlier maps."""

    def __init__(self, growth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv_a = nn.Conv2d(6, growth, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(growth)
        self.conv_b = nn.Conv2d(6 + growth, growth, 3, padding=1)
        self.bn = nn.BatchNorm2d(6 + 2 * growth)
        self.head = nn.Linear(6 + 2 * growth, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x))
        a = F.relu(self.bn_a(self.conv_a(x)))
        b = F.relu(self.conv_b(torch.cat([x, a], 1)))
        y = F.relu(self.bn(torch.cat([x, a, b], dim=1)))
        return self.head(y.mean((2, 3)))


class MobileNetish(nn.Module):
    """Depthwise-separable blocks (multiplier 1 and 2), ending in a C*H*W flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6()
        )
        self.dw = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6()
        )
        self.pw = nn.Sequential(nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU6())
        self.dw2 = nn.Conv2d(6, 12, 3, stride=2, padding=1, groups=6)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(12 * 4, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pw(self.dw(self.stem(x)))
        return self.head(self.pool(F.relu(self.dw2(x))).flatten(1))


class GroupedConvNet(nn.Module):
    """Grouped convolutions (groups=4) chained, with GroupNorm of the same groups."""

    def __init__(self, groups: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.g1 = nn.Conv2d(8, 12, 3, padding=1, groups=groups)
        self.gn = nn.GroupNorm(groups, 12)
        self.g2 = nn.Conv2d(12, 16, 1, groups=groups)
        self.head = nn.Linear(16, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.gn(self.g1(x)))
        return self.head(F.relu(self.g2(x)).mean((2, 3)))


class _Patches(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 4, stride=4)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class MHANet(nn.Module):
    """Pre-norm transformer block built on nn.MultiheadAttention (batch_first, bias_k/v)."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.patches = _Patches(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True, add_bias_kv=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patches(x)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.fc2(F.gelu(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


class SDPABlock(nn.Module):
    """Separate q/k/v projections, F.scaled_dot_product_attention and a SwiGLU MLP."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.patches = _Patches(dim)
        self.norm = nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.gate_up = nn.Linear(dim, 2 * 12)
        self.down = nn.Linear(12, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patches(x)
        b, t, d = x.shape
        h = self.norm(x)
        q, k, v = (
            p(h).view(b, t, self.heads, d // self.heads).transpose(1, 2)
            for p in (self.q, self.k, self.v)
        )
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        x = x + self.down(F.silu(gate) * up)
        return self.head(x[:, 0])


class EinsumAttention(nn.Module):
    """Attention written with torch.einsum (scores and values), heads by a reshape."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.patches = _Patches(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patches(x)
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        a = torch.einsum("bqhd,bkhd->bhqk", q, k).softmax(-1)
        y = torch.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, t, d)
        return self.head((x + self.out(y)).mean(1))


class Mixer(nn.Module):
    """MLP-Mixer block: a token-mixing MLP across patches, then a channel MLP."""

    def __init__(self, dim: int = 8, tokens: int = 4, hidden: int = 6) -> None:
        super().__init__()
        self.patches = _Patches(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.token_fc1 = nn.Linear(tokens, hidden)
        self.token_fc2 = nn.Linear(hidden, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.channel_fc1 = nn.Linear(dim, 2 * dim)
        self.channel_fc2 = nn.Linear(2 * dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patches(x)
        y = self.norm1(x).transpose(1, 2)
        x = x + self.token_fc2(F.gelu(self.token_fc1(y))).transpose(1, 2)
        x = x + self.channel_fc2(F.gelu(self.channel_fc1(self.norm2(x))))
        return self.head(x.mean(1))


class Branchy(nn.Module):
    """Data-dependent Python control flow: cannot be traced symbolically."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _BranchyInner()
        self.head = nn.Linear(4, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.inner(x))


class _BranchyInner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.fc(x.flatten(1))
        if y.sum() > 0:
            return y
        return -y


class Rolled(nn.Module):
    """torch.roll along channels (order-sensitive) between two conv stages."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = torch.roll(F.relu(self.conv2(x)), 1, dims=1)
        return self.head(F.relu(self.conv3(x)).mean((2, 3)))


@torch.fx.wrap
def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """An opaque (fx-wrapped) helper the rules know nothing about."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class Shuffled(nn.Module):
    """A custom function wrapped as an fx leaf: must be reported and fixed."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = channel_shuffle(F.relu(self.conv1(x)), 2)
        return self.head(F.relu(self.conv2(x)).mean((2, 3)))


class ConvNeXtish(nn.Module):
    """Depthwise conv, channels-last LayerNorm + Linear MLP, a layer-scale parameter."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))
        self.head = nn.Linear(dim, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))) * self.gamma
        return self.head((x + y.permute(0, 3, 1, 2)).mean((-2, -1)))


class SqueezeExcite(nn.Module):
    """Channel gating by a squeeze-and-excitation branch, plus an option-A (zero-padded,
    strided) shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.se1 = nn.Conv2d(8, 2, 1)
        self.se2 = nn.Conv2d(2, 8, 1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv(x))
        y = self.down(x) + F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))
        gate = torch.sigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(y, 1)))))
        return self.head((y * gate).mean((2, 3)))


class TokenModel(nn.Module):
    """Token ids -> Embedding, a hand-written RMSNorm, and one Linear applied twice."""

    vocab = 11

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(self.vocab, dim)
        self.scale = nn.Parameter(torch.ones(dim))
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.shared = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.emb(tokens)
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale
        x = x + self.fc2(F.gelu(self.fc1(h)))
        x = self.shared(F.relu(self.shared(x)))
        return self.head(x.mean(1))


class TorchEncoder(nn.Module):
    """nn.TransformerEncoder between an input projection and a head: its residual stream is
    neither the model's input nor its output (torch.fx sees the encoder as one opaque leaf)."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(self.proj(x)))


class Upsampler(nn.Module):
    """Transposed convolutions, plain, grouped (groups=4) and depthwise, with BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 12, 4, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(12)
        self.grouped = nn.ConvTranspose2d(12, 8, 3, padding=1, groups=4)
        self.depthwise = nn.ConvTranspose2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.up(F.relu(self.stem(x)))))
        x = F.relu(self.depthwise(F.relu(self.grouped(x))))
        return self.head(x.mean((2, 3)))


class FunctionalConvs(nn.Module):
    """Convolutions called functionally on the module's own parameters, transposed too."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.Parameter(torch.randn(8, 6, 4, 4) / 8)
        self.up_bias = nn.Parameter(torch.zeros(6))
        self.depthwise = nn.Parameter(torch.randn(6, 1, 3, 3) / 3)
        self.mix = nn.Parameter(torch.randn(7, 6, 1, 1) / 3)
        self.head = nn.Linear(7, 5)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(F.conv_transpose2d(x, self.up, bias=self.up_bias, stride=2, padding=1))
        x = F.relu(F.conv_transpose2d(x, self.depthwise, padding=1, groups=6))
        x = F.relu(F.conv2d(x, self.mix))
        return self.head(x.mean((2, 3)))


ARCHS = {
    "densenet": DenseNetish,
    "mobilenet": MobileNetish,
    "grouped": GroupedConvNet,
    "mha": MHANet,
    "sdpa": SDPABlock,
    "einsum": EinsumAttention,
    "mixer": Mixer,
    "rolled": Rolled,
    "shuffled": Shuffled,
    "convnext": ConvNeXtish,
    "squeeze-excite": SqueezeExcite,
    "upsampler": Upsampler,
    "functional-convs": FunctionalConvs,
}
