"""Frozen class embeddings shared by all models, and cosine logits against them.

Every model projects into the same embedding space, so its last layer can be merged like
any other; the head only turns an embedding into ``scale * cos(feature, class)`` logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mudsc.data.files import load_tensors
from mudsc.errors import ConfigError, DataError
from mudsc.inputs import regular_file
from mudsc.models.registry import check_memory, given

_SUFFIXES = (".safetensors", ".pt", ".npz", ".npy")


class ClassEmbeddingHead(nn.Module):
    """Holds a (num_classes x dim) buffer of class embeddings; computes scaled cosine logits."""

    embeddings: Tensor

    def __init__(self, embeddings: Tensor, config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or 0 in embeddings.shape:
            shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings)
            raise DataError(
                f"class embeddings must be a non-empty (num_classes x dim) tensor, got {shape}"
            )
        if embeddings.is_complex() or embeddings.dtype == torch.bool:
            raise DataError(f"class embeddings must be real numbers, got dtype {embeddings.dtype}")
        embeddings = embeddings.detach().to(torch.float32).clone()
        if not torch.isfinite(embeddings).all():
            raise DataError("class embeddings contain NaN or infinite values; fix the source")
        if (embeddings.norm(dim=1) == 0).any():
            raise DataError("a class embedding is all zeros, so its cosine is undefined")
        self.register_buffer("embeddings", embeddings)
        self._config = dict(config) if config is not None else None

    @property
    def num_classes(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def forward(
        self, features: Tensor, classes: Sequence[int] | None = None, scale: float = 100.0
    ) -> Tensor:
        """Logits ``scale * cos(features, embeddings[classes])``, shape (B, len(classes))."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ConfigError(
                f"features of shape {tuple(features.shape)} do not match the class embeddings "
                f"(dim {self.dim}); the model's embed_dim must equal the head's dim"
            )
        table = self.embeddings
        if classes is not None:
            index = list(classes)
            bad = [c for c in index if not 0 <= int(c) < self.num_classes]
            if bad or not index:
                raise ConfigError(
                    f"class indices {bad or index} are invalid: need a non-empty list of "
                    f"indices in [0, {self.num_classes})"
                )
            table = table[torch.tensor(index, dtype=torch.long, device=table.device)]
        feats = F.normalize(features, dim=1)
        table = F.normalize(table.to(features.dtype), dim=1)
        return scale * feats @ table.T

    @classmethod
    def orthonormal(cls, num_classes: int, dim: int = 512, seed: int = 0) -> ClassEmbeddingHead:
        """Deterministic orthonormal embeddings: QR of a Gaussian drawn from ``seed``."""
        for name, value in (("num_classes", num_classes), ("dim", dim), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"head {name} must be an integer, got {given(value)}")
        if num_classes < 1 or dim < 1:
            raise ConfigError(f"need num_classes >= 1 and dim >= 1, got {num_classes}, {dim}")
        if num_classes > dim:
            raise ConfigError(
                f"cannot make {num_classes} orthonormal vectors in {dim} dimensions; "
                f"use dim >= num_classes"
            )
        # the float64 Gaussian and its Q factor: refused before a too-large draw
        check_memory(2 * 8 * dim * num_classes, f"a {num_classes} x {dim} class-embedding head")
        gen = torch.Generator().manual_seed(int(seed))
        gauss = torch.randn(dim, num_classes, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(gauss)
        # QR is unique only up to column signs; fix them so the result depends on the seed only.
        q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)
        config = {"kind": "orthonormal", "num_classes": num_classes, "dim": dim, "seed": seed}
        return cls(q.T.contiguous(), config)

    @classmethod
    def from_file(cls, path: str | Path) -> ClassEmbeddingHead:
        """Load a (num_classes x dim) tensor from .safetensors / .npz (key "embeddings"), .pt
        (a tensor, or a dict with that key) or .npy."""
        path = Path(path)
        if path.suffix not in _SUFFIXES:
            raise DataError(
                f"class-embedding file {path} has unsupported type {path.suffix!r}; "
                f"use one of {', '.join(_SUFFIXES)}"
            )
        value = load_tensors(regular_file(path, "class-embedding file"))
        if isinstance(value, Mapping):
            if "embeddings" not in value:
                raise DataError(
                    f"{path} has no tensor named 'embeddings' (found {sorted(value)[:10]}); "
                    f"save the table under the key 'embeddings'"
                )
            value = value["embeddings"]
        if not isinstance(value, Tensor):
            raise DataError(f"{path} does not hold a tensor (got {type(value).__name__})")
        head = cls(value)
        head._config = {
            "kind": "file", "path": str(path), "num_classes": head.num_classes, "dim": head.dim,
        }  # fmt: skip
        return head

    def to_config(self) -> dict[str, Any]:
        """JSON-able description from which :meth:`from_config` rebuilds this head."""
        if self._config is None:
            # Built from a raw tensor: describe it; the values must travel separately.
            return {"kind": "tensor", "num_classes": self.num_classes, "dim": self.dim}
        return dict(self._config)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ClassEmbeddingHead:
        """Rebuild a head from :meth:`to_config` output."""
        kind = cfg.get("kind") if isinstance(cfg, Mapping) else None
        if kind == "orthonormal":
            missing = [k for k in ("num_classes", "dim", "seed") if k not in cfg]
            if missing:
                raise ConfigError(f"class-embedding head config lacks {missing[0]!r}")
            return cls.orthonormal(cfg["num_classes"], cfg["dim"], cfg["seed"])
        if kind == "file":
            path = cfg.get("path")
            if not isinstance(path, str):
                raise ConfigError(f"class-embedding head config needs a 'path', got {given(path)}")
            head = cls.from_file(cfg["path"])
            expected = (cfg.get("num_classes", head.num_classes), cfg.get("dim", head.dim))
            if (head.num_classes, head.dim) != tuple(expected):
                raise ConfigError(
                    f"class-embedding file {cfg['path']} holds {head.num_classes}x{head.dim} "
                    f"embeddings but the config expects {given(expected[0])}x{given(expected[1])}"
                )
            return head
        if kind == "tensor":
            raise ConfigError(
                "a class-embedding head config of kind 'tensor' carries no values; build the "
                "head with ClassEmbeddingHead(embeddings) or save them and use from_file"
            )
        raise ConfigError(
            f"class-embedding head config {given(cfg)} needs kind 'orthonormal' or 'file'"
        )
