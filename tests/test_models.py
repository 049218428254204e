"""The model zoo builds, traces and round-trips; the class-embedding head is exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.fx
from safetensors.torch import save_file

from mudsc.errors import MudscError
from mudsc.models import (
    MODELS,
    ClassEmbeddingHead,
    ModelEntry,
    create,
    names,
    register,
    registry,
)

# Small widths so the whole file runs in seconds on a CPU.
SMALL = {
    "mlp": {"hidden": 32, "depth": 2},
    "vgg11": {"width": 0.125},
    "vgg11-bn": {"width": 0.125},
    "resnet20": {"width": 1},
    "resnet20-gn": {"width": 1, "groups": 4},
    "resnet50": {"width": 0.125},
    "vit": {"dim": 16, "depth": 2, "heads": 2},
}
SHAPES = [(1, 28), (3, 32)]


def test_all_reference_models_registered() -> None:
    assert set(SMALL) <= set(names())


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("channels,size", SHAPES)
def test_forward_shape_and_trace(name: str, channels: int, size: int) -> None:
    torch.manual_seed(0)
    model = create(name, in_channels=channels, image_size=size, embed_dim=24, **SMALL[name])
    model.eval()
    x = torch.randn(2, channels, size, size)
    out = model(x)
    assert out.shape == (2, 24)
    assert torch.isfinite(out).all()
    assert isinstance(model.head, torch.nn.Linear)
    assert list(model.named_children())[-1][0] == "head"
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), out)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_config_round_trip(name: str) -> None:
    model = create(name, in_channels=1, image_size=28, embed_dim=16, **SMALL[name])
    assert model.arch == name
    config = json.loads(json.dumps(model.config))
    rebuilt = create(model.arch, **config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 28, 28)
    model.eval()
    rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), model(x))


def test_default_construction_and_structure() -> None:
    assert create("resnet20").layer3[0].conv1.out_channels == 64
    assert create("resnet20", width=4).layer1[0].conv1.out_channels == 64
    assert create("resnet50", width=0.125).conv1.out_channels == 8
    assert create("vgg11", width=0.25).features[0].out_channels == 16
    vit = create("vit")
    assert vit.cls_token.shape == (1, 1, 64)
    assert vit.pos_embed.shape == (1, 65, 64)
    assert vit.blocks[0].attn.qkv.out_features == 192
    pools = [m for m in create("vgg11", image_size=28, in_channels=1).features
             if isinstance(m, torch.nn.MaxPool2d)]  # fmt: skip
    assert len(pools) == 4
    mlp = create("mlp", in_channels=1, image_size=28, hidden=1024)
    assert [m.out_features for m in mlp.features if isinstance(m, torch.nn.Linear)] == [1024] * 3


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(MudscError, match="resnet20"):
        create("resnet21")


@pytest.mark.parametrize(
    "name,kwargs,word",
    [
        ("resnet20", {"depth": 3}, "depth"),
        ("resnet20", {"width": 0}, "width"),
        ("resnet20", {"width": 1.5}, "width"),
        ("vgg11", {"width": "wide"}, "width"),
        ("mlp", {"in_channels": -1}, "in_channels"),
        ("resnet20-gn", {"groups": 3}, "groups"),
        ("vit", {"patch_size": 5}, "patch_size"),
        ("vit", {"dim": 30, "heads": 4}, "heads"),
    ],
)
def test_bad_kwargs_raise(name: str, kwargs: dict, word: str) -> None:
    with pytest.raises(MudscError, match=word):
        create(name, **kwargs)


def test_register_custom_model_and_duplicate(monkeypatch: pytest.MonkeyPatch) -> None:
    # Register into a copy so the test model does not leak into other tests' names().
    monkeypatch.setattr(registry, "MODELS", registry.MODELS.copy())

    @register("test-tiny-linear")
    def tiny(in_channels: int = 3, image_size: int = 32, embed_dim: int = 512) -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(in_channels * image_size**2, embed_dim)
        )

    assert "test-tiny-linear" in names()
    assert create("test-tiny-linear", embed_dim=7)(torch.zeros(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(MudscError, match="an architecture named 'test-tiny-linear' is already"):
        register("test-tiny-linear")(tiny)


def test_register_then_unregister_leaves_zoo_unchanged() -> None:
    before = names()

    @register("test-tiny-flatten")
    def tiny(in_channels: int = 1, image_size: int = 4, embed_dim: int = 3) -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(in_channels * image_size**2, embed_dim)
        )

    try:
        assert MODELS["test-tiny-flatten"] == ModelEntry("test-tiny-flatten", tiny)
        assert create("test-tiny-flatten")(torch.zeros(2, 1, 4, 4)).shape == (2, 3)
    finally:
        MODELS.unregister("test-tiny-flatten")
    assert names() == before
    with pytest.raises(MudscError, match="unknown architecture 'test-tiny-flatten'"):
        create("test-tiny-flatten")


# ---------------------------------------------------------------- class-embedding head


def test_orthonormal_and_deterministic() -> None:
    head = ClassEmbeddingHead.orthonormal(10, dim=32, seed=3)
    e = head.embeddings
    assert e.shape == (10, 32)
    torch.testing.assert_close(e @ e.T, torch.eye(10), atol=1e-5, rtol=0)
    assert torch.equal(e, ClassEmbeddingHead.orthonormal(10, dim=32, seed=3).embeddings)
    assert not torch.allclose(e, ClassEmbeddingHead.orthonormal(10, dim=32, seed=4).embeddings)
    assert "embeddings" in dict(head.named_buffers())
    assert not list(head.parameters())


def test_orthonormal_too_many_classes() -> None:
    with pytest.raises(MudscError, match="dim"):
        ClassEmbeddingHead.orthonormal(5, dim=4)


def test_logits_are_scaled_cosine_and_select_classes() -> None:
    head = ClassEmbeddingHead(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
    features = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    s = 2**-0.5
    expected = 100 * torch.tensor([[1.0, 0.0, s], [s, s, 1.0]])
    torch.testing.assert_close(head(features), expected)
    torch.testing.assert_close(head(features, classes=[2, 0]), expected[:, [2, 0]])
    torch.testing.assert_close(head(features, scale=1.0), expected / 100)
    with pytest.raises(MudscError, match="class indices"):
        head(features, classes=[3])
    with pytest.raises(MudscError, match="dim"):
        head(torch.zeros(2, 5))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npy"])
def test_from_file_round_trip(tmp_path, suffix: str) -> None:
    table = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / f"emb{suffix}"
    if suffix == ".safetensors":
        save_file({"embeddings": table}, str(path))
    elif suffix == ".pt":
        torch.save(table, path)
    else:
        np.save(path, table.numpy())
    head = ClassEmbeddingHead.from_file(path)
    assert torch.equal(head.embeddings, table)
    cfg = json.loads(json.dumps(head.to_config()))
    assert cfg["kind"] == "file"
    assert torch.equal(ClassEmbeddingHead.from_config(cfg).embeddings, table)


def test_orthonormal_config_round_trip() -> None:
    head = ClassEmbeddingHead.orthonormal(4, dim=8, seed=1)
    cfg = head.to_config()
    assert cfg == {"kind": "orthonormal", "num_classes": 4, "dim": 8, "seed": 1}
    assert torch.equal(ClassEmbeddingHead.from_config(cfg).embeddings, head.embeddings)
    with pytest.raises(MudscError, match="kind"):
        ClassEmbeddingHead.from_config({"kind": "clip"})
    raw = ClassEmbeddingHead(torch.eye(3)).to_config()
    assert raw == {"kind": "tensor", "num_classes": 3, "dim": 3}
    with pytest.raises(MudscError, match="carries no values"):
        ClassEmbeddingHead.from_config(raw)


def test_from_file_errors(tmp_path) -> None:
    corrupt = tmp_path / "emb.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(MudscError, match="cannot read"):
        ClassEmbeddingHead.from_file(corrupt)
    with pytest.raises(MudscError, match="does not exist"):
        ClassEmbeddingHead.from_file(tmp_path / "missing.pt")
    wrong_key = tmp_path / "key.safetensors"
    save_file({"weights": torch.zeros(2, 2)}, str(wrong_key))
    with pytest.raises(MudscError, match="embeddings"):
        ClassEmbeddingHead.from_file(wrong_key)
    flat = tmp_path / "flat.npy"
    np.save(flat, np.ones(5, dtype=np.float32))
    with pytest.raises(MudscError, match="num_classes x dim"):
        ClassEmbeddingHead.from_file(flat)
