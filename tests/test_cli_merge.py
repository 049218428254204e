"""`mudsc merge` end to end: a checkpoint with its merge card, scored by `mudsc eval`;
partial merges round-trip through a checkpoint; bad input is one clean error line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import invoke
from safetensors.torch import save_file

from mudsc.checkpoint import CONFIG_FILE, load_checkpoint
from mudsc.data import load_dataset
from mudsc.partial import PartialMerge


def test_merge_writes_a_checkpoint_with_a_merge_card(
    runs: dict[str, Path], data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ab"
    result = invoke("merge", runs["a"], runs["b"], "--method", "mudsc-zip", "--alpha", "auto",
                    "--data-dir", data_dir, "--calibration-size", "200", "--max-sweeps", "5",
                    "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((out / CONFIG_FILE).read_text())
    card = config["merge"]
    assert card["method"] == "mudsc-zip" and card["config"]["method"] == "mudsc-zip"
    assert card["alpha"] in [round(0.1 * k, 1) for k in range(1, 10)]
    assert len(card["alpha_scores"]) == 9
    assert card["alpha"] == float(max(card["alpha_scores"], key=card["alpha_scores"].get))
    assert card["space_similarity"] and all(-1 <= v <= 1 for v in card["space_similarity"].values())
    assert {"statistics", "sweeps", "apply", "repair"} <= set(card["timings"])
    assert card["versions"]["torch"] == torch.__version__
    assert config["tasks"] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]

    scored = invoke("eval", out, "--data-dir", data_dir, "--json")
    assert scored.exit_code == 0, scored.output
    row = json.loads(scored.stdout)
    assert len(row["per_task"]) == 2 and 0 <= row["joint"] <= 1


def test_partial_merge_round_trips_through_a_checkpoint(
    runs: dict[str, Path], data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "partial"
    result = invoke("merge", runs["a"], runs["b"], "--method", "zipit", "--stop-at", "features.2",
                    "--data-dir", data_dir, "--calibration-size", "100", "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    loaded = load_checkpoint(out)
    assert isinstance(loaded.model, PartialMerge) and loaded.model.n_models == 2
    x = torch.randn(3, 1, 28, 28)
    assert loaded.model(x).shape == (2, 3, 32)
    scored = invoke("eval", out, "--data-dir", data_dir, "--json")
    assert scored.exit_code == 0, scored.output
    assert len(json.loads(scored.stdout)["per_task"]) == 2


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--method", "bogus"], ["unknown method", "mudsc-zip"]),
        (["--alpha", "1.5"], ["alpha must be in [0, 1]"]),
        (["--stop-at", "nope"], ["nope"]),
    ],
)
def test_merge_bad_input_is_one_clean_error(
    runs: dict[str, Path], data_dir: Path, tmp_path: Path, args: list[str], words: list[str]
) -> None:
    out = tmp_path / "bad"
    result = invoke("merge", runs["a"], runs["b"], "--data-dir", data_dir,
                    "--calibration-size", "100", "-o", out, *args)  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.stderr.lstrip().startswith("error:")
    for word in words:
        assert word in " ".join(result.stderr.split()), result.stderr
    assert not out.exists()


def test_merge_refuses_to_overwrite(runs: dict[str, Path], data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "exists"
    out.mkdir()
    result = invoke("merge", runs["a"], runs["b"], "--data-dir", data_dir, "-o", out)
    assert result.exit_code == 2 and "--force" in result.stderr


def test_merge_and_eval_of_checkpoints_take_tensor_files(
    runs: dict[str, Path], data_dir: Path, tmp_path: Path
) -> None:
    """Calibration from a labelled file (alpha scored on its held-out tail) and evaluation
    on a labelled file that holds the test set give what the dataset route gives."""
    data = load_dataset("fashion-mnist", data_dir)
    calib = tmp_path / "calib.safetensors"
    save_file({"inputs": data.normalize(data.train_images[:120]).contiguous(),
               "labels": data.train_labels[:120].contiguous()}, str(calib))  # fmt: skip
    test = tmp_path / "test.pt"
    torch.save({"inputs": data.normalize(data.test_images), "labels": data.test_labels}, test)
    out = tmp_path / "ab"
    result = invoke("merge", runs["a"], runs["b"], "--calibration", calib, "--alpha", "auto",
                    "--max-sweeps", "3", "--batch-size", "50", "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    card = json.loads((out / CONFIG_FILE).read_text())["merge"]
    assert card["calibration"] == {"file": str(calib), "inputs": 120}
    assert card["calibration_batches"] == 2  # 96 fit inputs in batches of 50; 24 held out
    assert "held-out labelled slice" in card["alpha_score"] and len(card["alpha_scores"]) == 9

    from_file = invoke("eval", out, "--data-file", test, "--json")
    from_dataset = invoke("eval", out, "--data-dir", data_dir, "--json")
    assert from_file.exit_code == 0 and from_dataset.exit_code == 0, from_file.output
    assert json.loads(from_file.stdout) == json.loads(from_dataset.stdout)
