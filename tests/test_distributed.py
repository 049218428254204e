"""Merges spread over two gloo ranks equal the single-process merge (every method, a
BatchNorm and a LayerNorm model, alpha='auto', evaluation), a failing rank makes every rank
raise instead of hanging, and `torchrun -m mudsc merge` writes what `mudsc merge` writes.

One spawn of two ranks runs every case (process start-up dominates on a 2-core machine);
each rank saves what it computed and the parent compares with its own single-process run.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_helpers import invoke
from safetensors.torch import load_file

import mudsc
from mudsc import distributed
from mudsc.checkpoint import save_checkpoint
from mudsc.errors import DataError, MudscError
from mudsc.evaluate import evaluate
from mudsc.merge import MergeConfig, merge_models
from mudsc.models import create
from mudsc.models.head import ClassEmbeddingHead
from mudsc.renorm import reset_batchnorm

METHODS = ("avg", "rebasin", "act-align", "zipit", "wzip", "mudsc-align", "mudsc-zip")
WORLD = 2
SRC = Path(mudsc.__file__).resolve().parents[1]


def _pair(arch: str, **kwargs: Any) -> list[torch.nn.Module]:
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(create(arch, **kwargs).eval())
    return models


def _batches(n: int, size: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 8, 8, generator=gen) for _ in range(n)]


def _bn_models() -> list[torch.nn.Module]:
    return _pair("resnet20", image_size=8, embed_dim=8)


def _ln_models() -> list[torch.nn.Module]:
    return _pair("vit", image_size=8, embed_dim=8, dim=16, depth=1, heads=2, patch_size=4)


def _merge(models: list[torch.nn.Module], method: str, **config: Any) -> dict[str, Any]:
    """The merged state and the alpha of one merge (3 calibration batches: uneven shards)."""
    cfg = MergeConfig(method=method, max_sweeps=3, **config)
    result = merge_models(models, _batches(3, 6, seed=7), cfg)
    return {"state": result.model.state_dict(), "alpha": result.alpha}


def _eval() -> dict[str, Any]:
    """Evaluation of a source model (7 batches of 4 images over 2 ranks)."""
    gen = torch.Generator().manual_seed(3)
    images, labels = torch.randn(27, 3, 8, 8, generator=gen), torch.arange(27) % 4
    head = ClassEmbeddingHead.orthonormal(4, dim=8)
    return evaluate(_bn_models()[0], images, labels, [[0, 1], [2, 3]], head, batch_size=4).to_dict()


def _cases() -> dict[str, Callable[[], dict[str, Any]]]:
    cases: dict[str, Callable[[], dict[str, Any]]] = {}
    for method in METHODS:
        cases[f"bn-{method}"] = lambda m=method: _merge(_bn_models(), m)
        cases[f"ln-{method}"] = lambda m=method: _merge(_ln_models(), m)
    cases["bn-auto"] = lambda: _merge(_bn_models(), "mudsc-zip", alpha="auto",
                                      alpha_grid=(0.3, 0.7))  # fmt: skip
    cases["ln-auto"] = lambda: _merge(_ln_models(), "mudsc-zip", alpha="auto",
                                      alpha_grid=(0.3, 0.7))  # fmt: skip
    cases["eval"] = _eval
    return cases


def _forward_calls() -> int:
    """Forward passes this rank ran to reset BatchNorm on 3 batches."""
    model, calls = _bn_models()[0], []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    reset_batchnorm(model, _batches(3, 4, seed=2), "cpu")
    return len(calls)


def _refuse_three(module: torch.nn.Module, args: tuple) -> None:
    if args[0].shape[0] == 3:
        raise RuntimeError("a batch of 3 breaks this model")


def _bad_shard() -> None:
    """Batch 1 (rank 1's) passes every up-front check but breaks the forward pass: only
    rank 1's statistics pass fails."""
    batches = _batches(3, 4, seed=1)
    batches[1] = batches[1][:3]
    models = _bn_models()
    for model in models:
        model.register_forward_pre_hook(_refuse_three)
    merge_models(models, batches, MergeConfig(method="zipit"))


def _failing_outside_loops() -> None:
    """Rank 1 fails before any collective (a file it cannot read); rank 0 merges on."""
    with distributed.session():
        if distributed.rank() == 1:
            raise DataError("calibration file is truncated; re-export it")
        _merge(_bn_models(), "zipit")


def _outcome(fn: Callable[[], None]) -> str:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def _worker(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init}", rank=rank, world_size=WORLD,
        timeout=timedelta(seconds=120),
    )  # fmt: skip
    try:
        results = {name: case() for name, case in _cases().items()}
        results["calls"] = _forward_calls()
        results["failures"] = {
            "bad-shard": _outcome(_bad_shard),
            "outside-loops": _outcome(_failing_outside_loops),
        }
        torch.save(results, Path(out) / f"rank{rank}.pt")
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        torch.distributed.destroy_process_group()


def _assert_same(got: Any, want: Any, where: str) -> None:
    """Every tensor within 1e-6 of the reference, relative to the tensor's largest entry."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            _assert_same(got[k], want[k], f"{where}/{k}")
    elif isinstance(want, torch.Tensor):
        scale = want.abs().max().item() if want.numel() and want.is_floating_point() else 0.0
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * scale, msg=where)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), where
    else:
        assert got == want, where


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every case run by two gloo ranks (one spawn), as each rank saved it."""
    out = tmp_path_factory.mktemp("ranks")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, str(out / "init"), str(out)))
             for r in range(WORLD)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank hung"
    assert [p.exitcode for p in procs] == [0] * WORLD
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("case", list(_cases()))
def test_two_ranks_equal_one_process(ranks: list[dict[str, Any]], case: str) -> None:
    want = _cases()[case]()
    for r, got in enumerate(ranks):
        _assert_same(got[case], want, f"rank {r}: {case}")


def test_each_rank_runs_its_share(ranks: list[dict[str, Any]]) -> None:
    assert [r["calls"] for r in ranks] == [2, 1]  # batches 0, 2 and batch 1


def test_a_failing_rank_makes_every_rank_raise(ranks: list[dict[str, Any]]) -> None:
    bad = [r["failures"]["bad-shard"] for r in ranks]
    assert bad[1].startswith("DataError: calibration batch 1 (model 0) does not fit")
    assert bad[0].startswith("DataError: rank 1 failed: calibration batch 1 (model 0)")
    outside = [r["failures"]["outside-loops"] for r in ranks]
    assert outside[1] == "DataError: calibration file is truncated; re-export it"
    assert outside[0] == "DataError: rank 1 failed: calibration file is truncated; re-export it"


def test_single_process_is_untouched() -> None:
    assert not distributed.active() and distributed.is_root() and distributed.world_size() == 1
    items = [1, 2, 3]
    assert distributed.shard(items) is items
    with pytest.raises(MudscError, match="rank"):  # the rank-less message stays the user's
        with distributed.guard():
            raise MudscError("rank-less failure")


# -- torchrun end to end ------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _checkpoints(root: Path) -> list[Path]:
    """Two tiny BatchNorm checkpoints on Fashion-MNIST's 1 x 28 x 28 images."""
    paths = []
    head = ClassEmbeddingHead.orthonormal(10, dim=16)
    for seed, task in ((0, [0, 1, 2, 3, 4]), (1, [5, 6, 7, 8, 9])):
        torch.manual_seed(seed)
        model = create("resnet20", in_channels=1, image_size=28, embed_dim=16)
        path = root / f"src{seed}"
        save_checkpoint(path, model, {"kind": "train", "dataset": "fashion-mnist",
                                      "tasks": [task]}, head)  # fmt: skip
        paths.append(path)
    return paths


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
         "--master_port", str(_free_port()), "-m", "mudsc", *args],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_torchrun_merge_and_eval_equal_one_process(data_dir: Path, tmp_path: Path) -> None:
    a, b = _checkpoints(tmp_path)
    args = [str(a), str(b), "--method", "zipit", "--data-dir", str(data_dir),
            "--calibration-size", "40", "--batch-size", "8"]  # fmt: skip
    single = invoke("merge", *args, "-o", tmp_path / "one")
    assert single.exit_code == 0, single.output
    run = _torchrun("merge", *args, "-o", str(tmp_path / "two"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("saved") == 1  # rank 0 alone reports (and writes)
    one, two = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    _assert_same(two, one, "torchrun merge")
    card = json.loads((tmp_path / "two" / "config.json").read_text())["merge"]
    assert card["method"] == "zipit"

    eval_args = [str(tmp_path / "one"), "--data-dir", str(data_dir), "--batch-size", "64",
                 "--json"]  # fmt: skip
    scored = _torchrun("eval", *eval_args)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert json.loads(scored.stdout) == json.loads(invoke("eval", *eval_args).stdout)
