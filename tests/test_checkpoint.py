"""Checkpoints: bit-exact round trips, atomic writes, no silent overwrite, clear failures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mudsc.atomic as atomic_module
import mudsc.checkpoint as ckpt
from mudsc.atomic import atomic_directory, atomic_write_text, refuse_existing
from mudsc.checkpoint import CONFIG_FILE, HEAD_FILE, MODEL_FILE, load_checkpoint, save_checkpoint
from mudsc.errors import MudscError, ResourceError
from mudsc.models import ClassEmbeddingHead, create

PROVENANCE = {"kind": "train", "dataset": "fashion-mnist", "tasks": [[0, 2, 4]], "seed": 3}


def tiny_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create("mlp", in_channels=1, image_size=8, embed_dim=8, hidden=16, depth=2)


def tiny_resnet(seed: int = 0) -> torch.nn.Module:
    """ResNet-20 with non-default BN running statistics (and the int64 batch counter)."""
    torch.manual_seed(seed)
    model = create("resnet20", in_channels=1, image_size=8, embed_dim=8, width=1)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 1, 8, 8))
    return model.eval()


def leftovers(parent: Path) -> list[str]:
    """Hidden temporaries an atomic write may leave behind."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("make", [tiny_mlp, tiny_resnet], ids=["mlp", "resnet20"])
def test_round_trip_is_bit_exact(tmp_path: Path, make) -> None:
    model = make()
    head = ClassEmbeddingHead.orthonormal(6, 8, seed=5)
    out = save_checkpoint(tmp_path / "run", model, PROVENANCE, head)
    assert sorted(p.name for p in out.iterdir()) == sorted([MODEL_FILE, HEAD_FILE, CONFIG_FILE])
    loaded = load_checkpoint(out)
    assert_same_state(model, loaded.model)
    assert loaded.model.arch == model.arch and loaded.model.config == model.config
    assert not loaded.model.training
    assert torch.equal(loaded.head.embeddings, head.embeddings)
    assert loaded.head.to_config() == head.to_config()
    assert {k: loaded.config[k] for k in PROVENANCE} == PROVENANCE
    assert loaded.config["arch"] == model.arch and loaded.config["arch_args"] == model.config
    assert loaded.config["head"] == head.to_config() and "mudsc_version" in loaded.config
    assert loaded.tasks == [[0, 2, 4]] and loaded.dataset == "fashion-mnist"
    assert loaded.path == out
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(model(x), loaded.model(x))
    assert leftovers(tmp_path) == []


def test_head_is_optional(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "run", tiny_mlp(), {})
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded.head is None and loaded.tasks == [] and loaded.dataset is None


def test_refuses_to_overwrite_without_force_and_replaces_with_force(tmp_path: Path) -> None:
    target = tmp_path / "run"
    save_checkpoint(target, tiny_mlp(0), PROVENANCE)
    before = (target / MODEL_FILE).read_bytes()
    with pytest.raises(MudscError, match="already exists.*--force"):
        save_checkpoint(target, tiny_mlp(1), PROVENANCE)
    assert (target / MODEL_FILE).read_bytes() == before
    with pytest.raises(MudscError, match="--force"):
        refuse_existing(target, force=False)
    refuse_existing(target, force=True)
    refuse_existing(tmp_path / "absent", force=False)

    replacement = tiny_mlp(1)
    save_checkpoint(target, replacement, {**PROVENANCE, "seed": 4}, force=True)
    loaded = load_checkpoint(target)
    assert_same_state(replacement, loaded.model)
    assert loaded.config["seed"] == 4
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("keep", [0.5, 0.01], ids=["half", "header"])
def test_truncated_weights_are_reported(tmp_path: Path, keep: float) -> None:
    save_checkpoint(tmp_path / "run", tiny_mlp(), PROVENANCE)
    file = tmp_path / "run" / MODEL_FILE
    data = file.read_bytes()
    file.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(MudscError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "run")


def test_missing_or_corrupt_config_is_reported(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save_checkpoint(run, tiny_mlp(), PROVENANCE)
    config = (run / CONFIG_FILE).read_text()
    (run / CONFIG_FILE).write_text(config[: len(config) // 2])
    with pytest.raises(MudscError, match="corrupt"):
        load_checkpoint(run)
    (run / CONFIG_FILE).write_text(json.dumps({"dataset": "mnist"}))
    with pytest.raises(MudscError, match="incomplete"):
        load_checkpoint(run)
    (run / CONFIG_FILE).unlink()
    with pytest.raises(MudscError, match="not a mudsc checkpoint.*config.json"):
        load_checkpoint(run)
    with pytest.raises(MudscError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_missing_weights_or_bad_head_is_reported(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save_checkpoint(run, tiny_mlp(), PROVENANCE, ClassEmbeddingHead.orthonormal(6, 8))
    save_file({"other": torch.zeros(6, 8)}, str(run / HEAD_FILE))
    config = json.loads((run / CONFIG_FILE).read_text())
    del config["sha256"]  # as an older checkpoint (no digests) would be
    (run / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(MudscError, match="embeddings"):
        load_checkpoint(run)
    (run / MODEL_FILE).unlink()
    with pytest.raises(MudscError, match="incomplete"):
        load_checkpoint(run)


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save_checkpoint(run, tiny_mlp(), PROVENANCE)
    config = json.loads((run / CONFIG_FILE).read_text())
    config["arch_args"]["hidden"] = 32
    (run / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(MudscError, match="do not fit architecture 'mlp'"):
        load_checkpoint(run)
    plain = tmp_path / "mlp.pt"
    torch.save(tiny_mlp().state_dict(), plain)
    with pytest.raises(MudscError, match="do not fit architecture 'resnet20'"):
        load_checkpoint(plain, arch="resnet20", arch_args={"in_channels": 1, "image_size": 8})


def test_failure_inside_the_write_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    written: list[str] = []
    real_save = ckpt.write_safetensors

    def failing_save(tensors, file):
        digest = real_save(tensors, file)  # a file is already on disk
        written.append(str(file))
        if file.name == HEAD_FILE:
            raise OSError("disk full")
        return digest

    monkeypatch.setattr(ckpt, "write_safetensors", failing_save)
    head = ClassEmbeddingHead.orthonormal(6, 8)
    with pytest.raises(ResourceError, match="disk full"):  # one line, not an OSError
        save_checkpoint(tmp_path / "run", tiny_mlp(), PROVENANCE, head)
    assert len(written) == 2 and ".partial" in written[0]
    assert not (tmp_path / "run").exists()
    assert list(tmp_path.iterdir()) == []

    # A failed forced replacement keeps the previous checkpoint intact.
    monkeypatch.setattr(ckpt, "write_safetensors", real_save)
    save_checkpoint(tmp_path / "run", tiny_mlp(0), PROVENANCE)
    monkeypatch.setattr(ckpt, "write_safetensors", failing_save)
    with pytest.raises(ResourceError, match="unchanged"):
        save_checkpoint(tmp_path / "run", tiny_mlp(1), PROVENANCE, head, force=True)
    assert_same_state(tiny_mlp(0), load_checkpoint(tmp_path / "run").model)
    assert leftovers(tmp_path) == []


def test_atomic_directory_runs_the_writer_in_a_temporary(tmp_path: Path) -> None:
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        (tmp / "a.txt").write_text("x")

    out = atomic_directory(tmp_path / "deep" / "dir", force=False, write=write)
    assert out == tmp_path / "deep" / "dir" and (out / "a.txt").read_text() == "x"
    assert seen[0].parent == out.parent and seen[0].name.endswith(".partial")
    assert not seen[0].exists() and leftovers(out.parent) == []


def test_atomic_write_text(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "sub" / "notes.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"

    def broken_exchange(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(atomic_module, "_exchange", broken_exchange)
    with pytest.raises(ResourceError, match="rename failed"):
        atomic_write_text(target, "three")
    assert target.read_text() == "two"
    assert leftovers(target.parent) == []


@pytest.mark.parametrize("wrap", [False, True], ids=["state_dict", "wrapped"])
def test_plain_state_dict_file_loads_with_explicit_arch(tmp_path: Path, wrap: bool) -> None:
    model = tiny_mlp(2)
    plain = tmp_path / "weights.pt"
    state = model.state_dict()
    torch.save({"state_dict": state} if wrap else state, plain)
    with pytest.raises(MudscError, match="--arch"):
        load_checkpoint(plain)
    loaded = load_checkpoint(plain, arch="mlp", arch_args=model.config)
    assert_same_state(model, loaded.model)
    assert loaded.head is None and loaded.config == {"arch": "mlp", "arch_args": model.config}


def test_plain_safetensors_file_loads_with_explicit_arch(tmp_path: Path) -> None:
    model = tiny_mlp(3)
    plain = tmp_path / "weights.safetensors"
    save_file(model.state_dict(), str(plain))
    assert_same_state(model, load_checkpoint(plain, arch="mlp", arch_args=model.config).model)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "content",
    [b"not a checkpoint at all", b"", b"\x80\x04\x95\x10\x00\x00"],
    ids=["text", "empty", "cut-pickle"],
)
def test_corrupt_plain_file_is_reported(tmp_path: Path, content: bytes) -> None:
    plain = tmp_path / "weights.pt"
    plain.write_bytes(content)
    with pytest.raises(MudscError, match="truncated or corrupt"):
        load_checkpoint(plain, arch="mlp")


def test_non_tensor_file_and_foreign_model_are_refused(tmp_path: Path) -> None:
    plain = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], plain)
    with pytest.raises(MudscError, match="state dict of tensors"):
        load_checkpoint(plain, arch="mlp")
    with pytest.raises(MudscError, match="zoo models"):
        save_checkpoint(tmp_path / "x", torch.nn.Linear(2, 2), {})
    assert not (tmp_path / "x").exists()
