"""Issue 12, item 2: hostile or broken files are refused cheaply, each with one line.

A catalogue per kind of input (experiment YAML, checkpoint config.json, model arguments,
partial-merge records, IDX / CIFAR / tensor / class-embedding files): every row is a file
or a value and the fragment of the one-line error it must give, before any large
allocation or blocking read.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from fixtures_data import IDX_STEMS, write_cifar_dataset, write_idx_dataset
from safetensors.torch import save_file

from mudsc.checkpoint_config import check_checkpoint_config
from mudsc.data import load_dataset
from mudsc.data.embedded import read_csv
from mudsc.data.files import read_tensor_file, split_batches
from mudsc.data.idx import read_idx
from mudsc.errors import CheckpointError, ConfigError, DataError, MudscError, ResourceError
from mudsc.experiments import POOLS, PoolEntry
from mudsc.experiments.config import (
    MAX_CONFIG_BYTES,
    check_fields,
    check_output_dir,
    load_config,
    parse_config,
)
from mudsc.models import MODELS, ModelEntry, create
from mudsc.models.head import ClassEmbeddingHead
from mudsc.partial import PartialMerge, build_partial
from mudsc.spaces import trace_model

MICRO = {
    "dataset": "embedded",
    "arch": "mlp",
    "arch_args": {"hidden": 32, "depth": 1},
    "embed_dim": 16,
    "pairs": 1,
}
BOMB = "\n".join(
    [
        'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
        *(
            f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]"
            for p, n in zip("abcdefgh", "bcdefghi", strict=True)
        ),
        "dataset: embedded",
        "arch_args: *i",
    ]
)


def _one_line(exc: pytest.ExceptionInfo[MudscError], limit: int = 400) -> str:
    text = str(exc.value)
    assert "\n" not in text and len(text) < limit, text
    return text


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def _loop(path: Path) -> Path:
    os.symlink(path.name + ".other", path)
    os.symlink(path.name, path.with_name(path.name + ".other"))
    return path


# --- experiment YAML files --------------------------------------------------------------


def _text(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text)


def _bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


YAML_FILES = [
    ("alias bomb", _text(BOMB), "expands to more than 10000 values"),
    ("recursive alias", _text("dataset: embedded\narch_args: &a [*a]\n"), "expands to more"),
    ("oversized", _text("#" * (MAX_CONFIG_BYTES + 1)), "larger than 1024 KB"),
    ("deep nesting", _text("a: " + "[" * 5000), "nests too deeply|not valid YAML"),
    ("bad syntax", _text("dataset: [embedded\n"), r"not valid YAML: .*\(line \d+, column"),
    ("python tag", _text("dataset: !!python/object/apply:os.system [ls]\n"), "not valid YAML"),
    ("not utf-8", _bytes(b"dataset: \xff\xfe\n"), "not UTF-8 text"),
    ("fifo", _fifo, "not a regular file"),
    ("symlink loop", _loop, "symlink loop"),
    ("directory", lambda path: path.mkdir(), "is a directory"),
]


@pytest.mark.parametrize(
    ("make", "words"), [r[1:] for r in YAML_FILES], ids=[r[0] for r in YAML_FILES]
)
def test_hostile_config_files_are_one_line(tmp_path: Path, make: Callable, words: str) -> None:
    path = tmp_path / "exp.yaml"
    make(path)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=words) as info:
        load_config(path)
    assert time.perf_counter() - start < 5
    _one_line(info)


def test_alias_bomb_is_small_and_its_expansion_is_never_printed(tmp_path: Path) -> None:
    assert len(BOMB) < 600
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "lol" not in _one_line(info)


def test_aliases_within_the_budget_still_work(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(
        "dataset: embedded\narch: mlp\narch_args: &args {hidden: 32, depth: 1}\n"
        "train: &train {epochs: 2, batch_size: 50}\nembed_dim: 16\npairs: 1\n"
    )
    cfg = load_config(path)
    assert cfg.arch_args == {"hidden": 32, "depth": 1} and cfg.train.epochs == 2


def test_echoed_values_are_capped(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**MICRO, "arch_args": "x" * 10_000})
    assert "a mapping" in _one_line(info, limit=250)
    nested: Any = ["y" * 50]
    for _ in range(30):
        nested = [nested] * 20  # 20**30 leaves if printed whole
    with pytest.raises(ConfigError) as info:
        parse_config({**MICRO, "merge": {"zip_a": nested}})
    assert "'merge.zip_a' must be a number" in _one_line(info, limit=250)


# --- wrong types in the experiment's fields ----------------------------------------------

WRONG_TYPES = [
    (
        {"arch_args": "width=4"},
        r"'arch_args' must be a mapping like \{width: 4\}, got 'width=4' \(a string\)",
    ),
    ({"arch_args": [1, 2]}, "'arch_args' must be a mapping.*(a list)"),
    (
        {"arch_args": {"hidden": "1e9"}},
        "argument 'hidden' of architecture 'mlp' must be an integer, got '1e9'",
    ),
    (
        {"arch_args": {"hidden": 1.0e9}},
        "'hidden' .* must be an integer, got 1000000000.0 \\(a float\\)",
    ),
    ({"arch_args": {"depth": True}}, "'depth' .* must be an integer, got True"),
    ({"arch_args": {"heads": 2}}, "architecture 'mlp' has no argument 'heads'"),
    ({"embed_dim": 1.0e9}, "'embed_dim' must be an integer >= 1, got 1000000000.0 \\(a float\\)"),
    (
        {"embed_dim": "1e9"},
        r"'embed_dim' must be .*\(YAML reads 1e9 and 1.0e9 as text; write 1.0e\+9\)",
    ),
    ({"pairs": True}, "'pairs' must be an integer >= 1, got True \\(true/false\\)"),
    ({"train": "fast"}, "'train' must be a mapping"),
    ({"train": {"epochs": True}}, "'train.epochs' must be an integer >= 1, got True"),
    ({"calibration": [100]}, "'calibration' must be a mapping"),
    ({"merge": {"zip_a": [1, 2]}}, "'merge.zip_a' must be a number, got \\[1, 2\\] \\(a list\\)"),
    ({"merge": {"max_sweeps": 1.0e9}}, "'merge.max_sweeps' must be an integer, got 1000000000.0"),
    ({"merge": {"repair": 3}}, "'merge.repair' must be a string, got 3"),
    ({"alpha_grid": "0.5"}, "'alpha_grid' must be a non-empty list"),
    ({"split_seeds": {"a": 1}}, "'split_seeds' must be a list of 1 integers"),
    ({"methods": {"zipit": 1}}, "'methods' must be a non-empty list"),
    ({"dataset": ["embedded"]}, "'dataset' must be a non-empty string, got \\['embedded'\\]"),
    (
        {"kind": "hetero", "pairs": None, "tasks": "classification"},
        "'tasks' must be a list of at least two",
    ),
    (
        {"kind": "hetero", "pairs": None, "task_pairs": {"a": "b"}},
        "'task_pairs' must be 'all' or a list",
    ),
]


@pytest.mark.parametrize(("change", "words"), WRONG_TYPES)
def test_fields_of_the_wrong_type_are_one_line(change: dict, words: str) -> None:
    raw = {k: v for k, v in {**MICRO, **change}.items() if v is not None}
    with pytest.raises(ConfigError, match=words) as info:
        parse_config(raw)
    _one_line(info)


def test_every_dataclass_field_is_type_checked_whoever_fills_it() -> None:
    cfg = parse_config(MICRO)
    check_fields(cfg)  # a valid config passes
    for bad, words in [
        (replace(cfg, head_seed="0"), "'head_seed' must be an integer, got '0'"),
        (replace(cfg, alpha_grid=(0.5, "x")), "'alpha_grid' must be a list \\(each a number\\)"),
        (
            replace(cfg, calibration=replace(cfg.calibration, augment=1)),
            "'calibration.augment' must be true or false, got 1",
        ),
        (replace(cfg, model_seeds=((1, True),)), "'model_seeds' must be a list"),
        (replace(cfg, data_dir=3), "'data_dir' must be a string or null"),
    ]:
        with pytest.raises(ConfigError, match=words):
            check_fields(bad)


def test_a_registered_kind_cannot_slip_a_wrong_type_through() -> None:
    sloppy = PoolEntry(
        "test-sloppy", object, keys=("head_seed",),
        fields=lambda raw: {"head_seed": raw.get("head_seed", 0)}, embed_dim=8,
    )  # fmt: skip
    POOLS.register(sloppy)
    try:
        raw = {"kind": "test-sloppy", "dataset": "embedded", "arch": "mlp", "head_seed": [1]}
        with pytest.raises(ConfigError, match=r"'head_seed' must be an integer, got \[1\]"):
            parse_config(raw)
    finally:
        POOLS.unregister("test-sloppy")


# --- names and output folders ------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../../x", "a/b", "a\\b", "..", ".", "", "  ", "x\x00y", "/abs", "n" * 101]
)
def test_names_cannot_escape_the_runs_folder(name: str) -> None:
    with pytest.raises(ConfigError, match="'name' must be") as info:
        parse_config({**MICRO, "name": name})
    _one_line(info)


def test_plain_names_are_fine() -> None:
    cfg = parse_config({**MICRO, "name": "cifar10-5+5 resnet20x4"})
    assert cfg.output_dir == "runs/cifar10-5+5 resnet20x4"


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("/", "is the current folder or a folder above it"),
        (".", "is the current folder"),
        ("..", "is the current folder or a folder above it"),
        (str(Path.home()), "your home folder|the current folder"),
        ("~", "starts with '~'"),
        ("~/runs", "starts with '~'"),
    ],
)
def test_output_dir_must_be_a_folder_of_its_own(value: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        parse_config({**MICRO, "output_dir": value})
    _one_line(info)


def test_output_dir_may_not_hold_the_config_file(tmp_path: Path) -> None:
    folder = tmp_path / "exp"
    folder.mkdir()
    for value in (str(folder), str(tmp_path)):
        path = folder / "a.yaml"
        path.write_text(yaml.safe_dump({**MICRO, "output_dir": value}))
        with pytest.raises(ConfigError, match="the config file's folder or a folder above it"):
            load_config(path)
    assert check_output_dir(str(folder / "runs"), folder) == str(folder / "runs")


# --- model arguments and sizes ------------------------------------------------------------

ARCH_ARGS = [
    ("mlp", {"hidden": 10**9}, ResourceError, r"needs at least \d+\.\d GB of weights"),
    ("mlp", {"depth": 10**9}, ResourceError, "more than 5000 parameters, buffers and submodules"),
    ("vgg11", {"width": 1e6}, ResourceError, "GB of weights"),
    ("mlp", {"hidden": "1e9"}, ConfigError, "'hidden' of architecture 'mlp' must be an integer"),
    ("mlp", {"hidden": 1e9}, ConfigError, r"got 1000000000.0 \(a float\)"),
    ("mlp", {"width": True}, ConfigError, "'width' .* must be a number, got True"),
    ("resnet20", {"width": 2.0}, ConfigError, "'width' .* must be an integer, got 2.0"),
    ("vit", {"depth": [1]}, ConfigError, "'depth' .* must be an integer"),
    ("mlp", {"bogus": 1}, ConfigError, "has no argument 'bogus'"),
]


@pytest.mark.parametrize(("arch", "args", "error", "words"), ARCH_ARGS)
def test_absurd_or_mistyped_arguments_are_refused_before_allocating(
    arch: str, args: dict, error: type[MudscError], words: str
) -> None:
    start = time.perf_counter()
    with pytest.raises(error, match=words) as info:
        create(arch, **args)
    assert time.perf_counter() - start < 15
    _one_line(info)


def test_the_meta_build_leaves_weights_and_random_state_as_they_were() -> None:
    for arch in ("mlp", "resnet20", "vit"):
        torch.manual_seed(0)
        plain = MODELS.get(arch).factory(in_channels=1, image_size=8, embed_dim=4)
        after_plain = torch.rand(3)
        torch.manual_seed(0)
        checked = create(arch, in_channels=1, image_size=8, embed_dim=4)
        assert torch.equal(torch.rand(3), after_plain)
        for a, b in zip(plain.state_dict().values(), checked.state_dict().values(), strict=True):
            assert torch.equal(a, b)


def test_a_factory_that_cannot_build_on_meta_is_built_for_real() -> None:
    def needs_values(size: int = 2) -> torch.nn.Module:
        scale = torch.ones(1).item()  # no meta kernel for .item()
        return torch.nn.Linear(size, int(scale * size))

    MODELS.register(ModelEntry("test-needs-values", needs_values))
    try:
        assert create("test-needs-values", size=3).weight.shape == (3, 3)
    finally:
        MODELS.unregister("test-needs-values")


def test_orthonormal_heads_check_types_and_size() -> None:
    with pytest.raises(ResourceError, match="GB of weights"):
        ClassEmbeddingHead.orthonormal(10**6, 10**6)
    with pytest.raises(ConfigError, match="num_classes must be an integer, got True"):
        ClassEmbeddingHead.orthonormal(True, 4)
    with pytest.raises(ConfigError, match="dim must be an integer, got 1e\\+20"):
        ClassEmbeddingHead.from_config({"kind": "orthonormal", "num_classes": 3, "dim": 1e20,
                                        "seed": 0})  # fmt: skip


# --- checkpoint config.json ------------------------------------------------------------

GOOD_CONFIG = {
    "mudsc_version": "0",
    "arch": "mlp",
    "arch_args": {"in_channels": 1, "image_size": 8, "embed_dim": 4, "hidden": 8},
    "kind": "train",
    "dataset": "embedded",
    "tasks": [[0, 1, 2]],
    "head": {"kind": "orthonormal", "num_classes": 10, "dim": 4, "seed": 0},
}
PARTIAL = {
    "format": "mudsc.partial/1",
    "stop_at": 1,
    "n_models": 2,
    "boundary": [],
    "spec": {"spaces": []},
    "trunk_spaces": [],
    "cut": {"node": "a", "module": "b"},
}

CHECKPOINT_CONFIGS = [
    ({"arch": 3}, "field 'arch' must be an architecture name, got 3"),
    ({"arch": "resnet21"}, "architecture 'resnet21', which this mudsc does not have"),
    ({"arch_args": "hidden=8"}, "field 'arch_args' must be a mapping"),
    ({"arch_args": [8]}, "field 'arch_args' must be a mapping"),
    ({"arch_args": {"hidden": 1e9}}, "'arch_args': argument 'hidden' .* must be an integer"),
    ({"arch_args": {"hidden": "8"}}, "'arch_args': argument 'hidden' .* must be an integer"),
    ({"arch_args": {"layers": 8}}, "'arch_args': architecture 'mlp' has no argument 'layers'"),
    ({"tasks": "0,1,2"}, "field 'tasks' must be a list of lists of class ids"),
    ({"tasks": [[0, "1"]]}, r"field 'tasks\[0\]' must be a list of class ids"),
    ({"tasks": [[0, True]]}, r"field 'tasks\[0\]'"),
    ({"tasks": [[-1]]}, r"field 'tasks\[0\]'"),
    ({"dataset": ["mnist"]}, "field 'dataset' must be a dataset name or null"),
    ({"head": "orthonormal"}, "field 'head' must be a mapping with kind"),
    ({"head": {"kind": "orthonormal", "num_classes": 1e9, "dim": 4}}, "'head.num_classes'"),
    ({"head": {"kind": "file", "path": 3}}, "field 'head.path'"),
    ({"partial": [1]}, "field 'partial': a partial-merge record must be a mapping"),
    ({"partial": {**PARTIAL, "n_models": 1e6}}, r"'n_models' must be an integer in 2..1024"),
    ({"partial": {**PARTIAL, "n_models": 10**6}}, r"'n_models' must be an integer in 2..1024"),
    ({"partial": {**PARTIAL, "n_models": True}}, r"'n_models' must be an integer"),
    ({"partial": {**PARTIAL, "stop_at": None}}, "'stop_at' must be a module path"),
    ({"partial": {**PARTIAL, "spec": "x"}}, "'spec' must be a mapping with a 'spaces' list"),
    ({"partial": {**PARTIAL, "boundary": [3]}}, "'boundary' must be a list"),
    ({"partial": {**PARTIAL, "format": "x" * 500}}, "not a partial-merge record"),
]


@pytest.mark.parametrize(("change", "words"), CHECKPOINT_CONFIGS)
def test_checkpoint_config_fields_are_checked(change: dict, words: str) -> None:
    with pytest.raises(CheckpointError, match=words) as info:
        check_checkpoint_config({**GOOD_CONFIG, **change}, "ckpt/config.json")
    assert _one_line(info).startswith("ckpt/config.json")


def test_a_valid_checkpoint_config_passes_unchanged() -> None:
    config = {**GOOD_CONFIG, "partial": PARTIAL, "train": {"epochs": 2}}
    assert check_checkpoint_config(config, "c.json") == config
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        check_checkpoint_config([GOOD_CONFIG], "c.json")
    # well typed but absurd: refused by create, still before any allocation
    args = {**GOOD_CONFIG["arch_args"], "hidden": 10**9}
    check_checkpoint_config({**GOOD_CONFIG, "arch_args": args}, "c.json")
    with pytest.raises(ResourceError, match="GB of weights"):
        create("mlp", **args)


# --- partial-merge records --------------------------------------------------------------


@pytest.fixture(scope="module")
def record() -> tuple[Callable[[], torch.nn.Module], torch.Tensor, dict, dict]:
    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return create("mlp", in_channels=1, image_size=4, embed_dim=4, hidden=8, depth=2)

    x = torch.randn(2, 1, 4, 4)
    model = make()
    pm = build_partial([model, make()], trace_model(model, x), {}, 1)
    state, meta = pm.to_record()
    return make, x, state, meta


def test_a_partial_record_rebuilds(record: tuple) -> None:
    make, x, state, meta = record
    assert PartialMerge.from_record(make, x, state, meta).n_models == 2


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda m: m.update(n_models=1e6), "'n_models' must be an integer in 2..1024"),
        (lambda m: m.update(n_models=3), "'n_models' is 3 but the tensors hold 2 models"),
        (lambda m: m.update(stop_at=[1]), "'stop_at' must be a module path"),
        (lambda m: m["spec"]["spaces"][0].update(size=10**9), "field 'spec': space"),
        (
            lambda m: m["spec"].update(spaces=[{"size": 3}]),
            r"field 'spec': merge spec: spaces\[0\] lacks the field 'name'",
        ),
    ],
)
def test_hostile_partial_records_are_refused_before_building(
    record: tuple, edit: Callable[[dict], None], words: str
) -> None:
    make, x, state, meta = record
    meta = json.loads(json.dumps(meta))
    edit(meta)
    with pytest.raises(CheckpointError, match=words) as info:
        PartialMerge.from_record(make, x, state, meta)
    _one_line(info)


# --- IDX files ---------------------------------------------------------------------------


def _idx_header(dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


IDX_FILES = [
    (
        "overflowing dims",
        False,
        _idx_header((2**32 - 1,) * 3) + b"\0" * 64,
        "truncated: dimensions",
    ),
    (
        "overflowing dims, gzip",
        True,
        _idx_header((2**32 - 1,) * 3),
        "more than a \\d+-byte gzip file",
    ),
    (
        "dims past the data",
        False,
        _idx_header((5, 28, 28)) + b"\0" * 100,
        "need 3920 bytes of data, found 100",
    ),
    ("trailing bytes", False, _idx_header((1, 2, 2)) + b"\0" * 9, "has trailing bytes"),
    ("gzip bomb", True, _idx_header((1, 2, 2)) + b"\0" * 20_000_000, "has trailing bytes"),
    ("truncated gzip payload", True, _idx_header((3, 28, 28)) + b"\0" * 100, "truncated"),
    ("short header", False, b"\0\0\x08\x03\0\0", "truncated IDX header"),
    ("empty", False, b"", "too short for an IDX header"),
]


@pytest.mark.parametrize(
    ("gz", "data", "words"), [r[1:] for r in IDX_FILES], ids=[r[0] for r in IDX_FILES]
)
def test_hostile_idx_files_are_one_line(tmp_path: Path, gz: bool, data: bytes, words: str) -> None:
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(gzip.compress(data, compresslevel=1) if gz else data)
    with pytest.raises(DataError, match=words) as info:
        read_idx(path, ndim=3)
    _one_line(info)


@pytest.mark.parametrize("make", [_fifo, _loop], ids=["fifo", "symlink loop"])
def test_idx_and_cifar_names_that_are_no_files_are_refused(tmp_path: Path, make: Callable) -> None:
    write_idx_dataset(tmp_path / "mnist", n_train=5, n_test=5)
    target = tmp_path / "mnist" / (IDX_STEMS["test_labels"] + ".gz")
    target.unlink()
    make(target)
    with pytest.raises(DataError, match="not a regular file|symlink loop") as info:
        load_dataset("mnist", tmp_path / "mnist")
    _one_line(info)
    write_cifar_dataset(tmp_path / "c", num_classes=10, n=10)
    batch = tmp_path / "c" / "cifar-10-batches-py" / "data_batch_2"
    batch.unlink()
    make(batch)
    with pytest.raises(DataError, match="not a regular file|symlink loop"):
        load_dataset("cifar10", tmp_path / "c")


def test_the_embedded_csv_is_read_within_a_cap(tmp_path: Path) -> None:
    path = tmp_path / "mnist_5k.csv.gz"
    path.write_bytes(gzip.compress(b"0," * 40_000_000, compresslevel=1))
    with pytest.raises(DataError, match="unpacks to more than 64 MB"):
        read_csv(path)
    with pytest.raises(DataError, match="not a regular file"):
        read_csv(_fifo(tmp_path / "fifo.csv.gz"))


# --- tensor files (calibration / eval inputs, class embeddings) ---------------------------


def _npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    header = f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (117 - len(header)) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()


def _lying_zip(path: Path, write: Callable[[Path], None]) -> None:
    """A zip whose central directory claims each member unpacks to ~4 GB."""
    write(path)
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at != -1:
        data[at + 24 : at + 28] = struct.pack("<I", 0xFFFFFFF0)
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))


def _save(value: Any) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        if path.suffix == ".pt":
            torch.save(value, path)
        elif path.suffix == ".safetensors":
            save_file(value, str(path))
        elif path.suffix == ".npz":
            np.savez_compressed(path, **value)
        else:
            np.save(path, value)

    return write


X = torch.rand(4, 1, 2, 2)
TENSOR_FILES = [
    (
        "huge npy shape",
        "x.npy",
        _bytes(_npy_header((10**12, 28, 28)) + b"\0" * 64),
        "declares shape \\(1000000000000, 28, 28\\)",
    ),
    (
        "truncated npy",
        "x.npy",
        _bytes(_npy_header((4, 3)) + b"\0" * 20),
        "48 bytes\\) but 20 bytes follow",
    ),
    (
        "object npy",
        "x.npy",
        _bytes(_npy_header((2,), "|O") + pickle.dumps([1, 2])),
        "is not numeric",
    ),
    (
        "lying npz",
        "x.npz",
        lambda p: _lying_zip(p, _save({"inputs": X.numpy()})),
        "claims 4294967280 bytes",
    ),
    ("lying pt", "x.pt", lambda p: _lying_zip(p, _save(X)), "claims 4294967280 bytes"),
    ("garbage safetensors", "x.safetensors", _bytes(b"\xff" * 64), "cannot read"),
    (
        "huge safetensors header",
        "x.safetensors",
        _bytes(struct.pack("<Q", 2**62) + b"{}"),
        "cannot read",
    ),
    ("1-d inputs", "x.pt", _save(torch.arange(5)), "give one non-empty example per row"),
    ("empty examples", "x.pt", _save(torch.zeros(3, 0, 4)), "give one non-empty example per row"),
    ("NaN inputs", "x.pt", _save(torch.full((2, 3), float("nan"))), "NaN or infinite"),
    (
        "complex inputs",
        "x.pt",
        _save(torch.zeros(2, 3, dtype=torch.complex64)),
        "dtype torch.complex64",
    ),
    (
        "matrix labels",
        "x.pt",
        _save({"inputs": X, "labels": torch.zeros(4, 2, dtype=torch.long)}),
        "'labels' has shape \\(4, 2\\)",
    ),
    (
        "negative labels",
        "x.pt",
        _save({"inputs": X, "labels": torch.tensor([0, -1, 0, 0])}),
        "negative class id",
    ),
    ("list, not tensor", "x.pt", _save({"inputs": [1, 2]}), "'inputs' is a list"),
    ("fifo", "x.pt", _fifo, "not a regular file"),
    ("symlink loop", "x.npy", _loop, "symlink loop"),
    ("directory", "x.safetensors", lambda p: p.mkdir(), "is a directory"),
]


@pytest.mark.parametrize(
    ("name", "make", "words"), [r[1:] for r in TENSOR_FILES], ids=[r[0] for r in TENSOR_FILES]
)
def test_hostile_tensor_files_are_one_line(
    tmp_path: Path, name: str, make: Callable, words: str
) -> None:
    path = tmp_path / name
    make(path)
    with pytest.raises(DataError, match=words) as info:
        read_tensor_file(path)
    _one_line(info)


@pytest.mark.parametrize("row", [1, 2, 4, 14, 15], ids=lambda i: TENSOR_FILES[i][0])
def test_class_embedding_files_get_the_same_checks(tmp_path: Path, row: int) -> None:
    _, name, make, words = TENSOR_FILES[row]
    path = tmp_path / name
    make(path)
    with pytest.raises(DataError, match=words):
        ClassEmbeddingHead.from_file(path)


def test_a_batch_size_of_zero_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="batch size must be positive"):
        split_batches(X, 0)
