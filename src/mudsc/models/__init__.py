"""The reference model zoo (by name, via :func:`create`) and the shared class-embedding head.

Every zoo model maps an image batch to a (B, embed_dim) embedding ending in a plain
``nn.Linear`` named ``head``; cosine logits come from :class:`ClassEmbeddingHead`.
"""

from mudsc.models.head import ClassEmbeddingHead
from mudsc.models.mlp import MLP
from mudsc.models.registry import MODELS, ModelEntry, create, names, register
from mudsc.models.resnet import ResNet20, ResNet20GN, ResNet50
from mudsc.models.vgg import VGG11, VGG11BN
from mudsc.models.vit import ViT

__all__ = [
    "MLP",
    "MODELS",
    "VGG11",
    "VGG11BN",
    "ClassEmbeddingHead",
    "ModelEntry",
    "ResNet20",
    "ResNet20GN",
    "ResNet50",
    "ViT",
    "create",
    "names",
    "register",
]
