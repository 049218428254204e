"""Hugging Face directories in and out (strictly local), input tensor files and their
errors, and `mudsc merge` / `mudsc eval` on two tiny random-init BERT classifiers."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_helpers import invoke
from safetensors.torch import save_file

from mudsc.data.files import read_tensor_file, split_batches
from mudsc.errors import MudscError

VOCAB, SEQ, CLASSES = 40, 8, 3


def tiny_bert(seed: int) -> Any:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=CLASSES,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two saved tiny BERT classifiers (seeds 0 and 1), token ids, a labelled set."""
    root = tmp_path_factory.mktemp("hf")
    for name, seed in (("a", 0), ("b", 1)):
        tiny_bert(seed).save_pretrained(root / name)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (24, SEQ), generator=g)
    torch.save(tokens, root / "calib.pt")
    labels = torch.randint(0, CLASSES, (24,), generator=g)
    torch.save({"inputs": tokens, "labels": labels}, root / "labelled.pt")
    return {"a": root / "a", "b": root / "b", "root": root,
            "calib": root / "calib.pt", "labelled": root / "labelled.pt"}  # fmt: skip


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection attempt fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- input tensor files ------------------------------------------------------------------

X = torch.arange(12, dtype=torch.int32).reshape(4, 3)
Y = torch.tensor([0, 1, 2, 1])


def _write(path: Path, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> Path:
    if path.suffix == ".pt":
        torch.save(inputs if labels is None else {"inputs": inputs, "labels": labels}, path)
    elif path.suffix == ".safetensors":
        save_file({"inputs": inputs} | ({} if labels is None else {"labels": labels}), str(path))
    elif path.suffix == ".npz":
        np.savez(path, inputs=inputs.numpy(), **({} if labels is None else {"labels": labels}))
    else:
        np.save(path, inputs.numpy())
    return path


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".npz", ".npy"])
def test_every_format_reads_the_same_inputs(tmp_path: Path, suffix: str) -> None:
    labelled = suffix != ".npy"
    file = read_tensor_file(_write(tmp_path / f"x{suffix}", X, Y if labelled else None))
    assert file.inputs.dtype == torch.int64 and torch.equal(file.inputs, X.long())
    assert (file.labels is not None) == labelled
    if labelled:
        assert torch.equal(file.labels, Y)
    assert [len(b) for b in split_batches(file.inputs, 3)] == [3, 1]
    assert len(file.head(2)) == 2


def test_float_inputs_are_images_in_float32(tmp_path: Path) -> None:
    file = read_tensor_file(_write(tmp_path / "x.npy", torch.rand(2, 1, 4, 4, dtype=torch.float64)))
    assert file.inputs.dtype == torch.float32 and file.inputs.shape == (2, 1, 4, 4)


@pytest.mark.parametrize(
    ("name", "inputs", "labels", "words"),
    [
        ("empty.pt", torch.zeros(0, 3, dtype=torch.long), None, "holds no examples"),
        ("bool.safetensors", torch.ones(4, 3, dtype=torch.bool), None, "dtype torch.bool"),
        ("float-labels.pt", X, Y.float(), "integer class ids"),
        ("short-labels.npz", X, Y[:3], "one class id per example"),
        ("x.csv", X, None, "unknown input-file format"),
    ],
)
def test_bad_input_files_are_one_clear_error(
    tmp_path: Path, name: str, inputs: torch.Tensor, labels: torch.Tensor | None, words: str
) -> None:
    path = tmp_path / name
    if path.suffix == ".csv":
        path.write_text("1,2,3\n")
    else:
        _write(path, inputs, labels)
    with pytest.raises(MudscError, match=words):
        read_tensor_file(path)


def test_unreadable_or_unlabelled_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(MudscError, match="does not exist"):
        read_tensor_file(tmp_path / "none.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a pickle")
    with pytest.raises(MudscError, match="cannot read"):
        read_tensor_file(tmp_path / "broken.pt")
    torch.save({"tokens": X}, tmp_path / "keys.pt")
    with pytest.raises(MudscError, match="no 'inputs' tensor"):
        read_tensor_file(tmp_path / "keys.pt")
    with pytest.raises(MudscError, match="needs a 'labels' tensor"):
        read_tensor_file(_write(tmp_path / "x.npy", X), labelled=True)
    with pytest.raises(MudscError, match="asked for 9 examples"):
        read_tensor_file(_write(tmp_path / "y.npy", X)).head(9)
    with pytest.raises(MudscError, match="batch size must be positive"):
        split_batches(X, 0)


# --- Hugging Face directories ------------------------------------------------------------


def test_a_directory_round_trips_with_its_merge_card(hf: dict[str, Path], tmp_path: Path) -> None:
    from transformers import BertForSequenceClassification

    from mudsc.hf import MERGE_CARD_FILE, is_hf_directory, load_hf_model, save_hf_model

    assert is_hf_directory(hf["a"]) and not is_hf_directory(tmp_path)
    model = load_hf_model(hf["a"])
    assert isinstance(model, BertForSequenceClassification) and not model.training
    out = save_hf_model(tmp_path / "out", model, {"method": "avg"})
    assert json.loads((out / MERGE_CARD_FILE).read_text()) == {"method": "avg"}
    assert json.loads((out / "config.json").read_text())["model_type"] == "bert"
    again = BertForSequenceClassification.from_pretrained(out, local_files_only=True)
    for (name, v), w in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(v, w), name
    assert not list(tmp_path.glob(".out.*")), "no temporary sibling is left behind"
    with pytest.raises(MudscError, match="already exists"):
        save_hf_model(out, model, {})
    with pytest.raises(MudscError, match="not a Hugging Face model"):
        save_hf_model(tmp_path / "zoo", torch.nn.Linear(2, 2), {})


def test_hub_names_and_incomplete_directories_are_refused(
    hf: dict[str, Path], tmp_path: Path, no_network: None
) -> None:
    from mudsc.hf import load_hf_model

    with pytest.raises(MudscError, match="never downloads"):
        load_hf_model("bert-base-uncased")
    with pytest.raises(MudscError, match="not a Hugging Face model directory"):
        load_hf_model(tmp_path)
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((hf["a"] / "config.json").read_text())
    with pytest.raises(MudscError, match="has no model.safetensors"):
        load_hf_model(weightless)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    config = json.loads((hf["a"] / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps(config | {"architectures": ["NoSuchNet"]}))
    (unknown / "model.safetensors").write_bytes((hf["a"] / "model.safetensors").read_bytes())
    with pytest.raises(MudscError, match="unknown architecture 'NoSuchNet'"):
        load_hf_model(unknown)


# --- the command line --------------------------------------------------------------------


def _user_error(result: Any, words: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and words in " ".join(result.stderr.split())


def test_merge_of_hf_models_is_refused_without_calibration_or_mixed(
    hf: dict[str, Path], tmp_path: Path
) -> None:
    out, other = tmp_path / "m", tmp_path / "checkpoint"
    other.mkdir()
    _user_error(invoke("merge", hf["a"], hf["b"], "-o", out), "needs --calibration FILE")
    _user_error(invoke("merge", hf["a"], other, "--calibration", hf["calib"], "-o", out),
                "all sources must be of one kind")  # fmt: skip
    _user_error(invoke("merge", hf["a"], hf["b"], "--calibration", hf["calib"], "--alpha", "auto",
                       "-o", out), "give the --calibration file 'labels'")  # fmt: skip
    _user_error(invoke("merge", hf["a"], "org/model", "--calibration", hf["calib"], "-o", out),
                "nothing is downloaded")  # fmt: skip
    _user_error(invoke("merge", hf["a"], hf["b"], "--calibration", hf["calib"], "--data", "mnist",
                       "-o", out), "not both")  # fmt: skip
    _user_error(invoke("eval", hf["a"]), "needs --data-file FILE")
    _user_error(invoke("eval", hf["a"], hf["b"], "--data-file", hf["labelled"]), "one Hugging Face")
    assert not out.exists()


def test_eval_scores_a_hf_classifier_on_a_labelled_file(hf: dict[str, Path]) -> None:
    result = invoke("eval", hf["a"], "--data-file", hf["labelled"], "--json", "--batch-size", 10)
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    model, data = tiny_bert(0), torch.load(hf["labelled"])
    with torch.no_grad():
        expected = (model(data["inputs"]).logits.argmax(1) == data["labels"]).float().mean()
    assert row == {"model": str(hf["a"]), "accuracy": pytest.approx(float(expected)),
                   "examples": 24}  # fmt: skip


@pytest.mark.parametrize("alpha", ["0.5", "auto"])
def test_cli_merges_two_hf_directories_into_one_that_loads(
    hf: dict[str, Path], tmp_path: Path, alpha: str
) -> None:
    from transformers import BertForSequenceClassification

    out = tmp_path / "merged"
    calib = hf["labelled"] if alpha == "auto" else hf["calib"]
    result = invoke("merge", hf["a"], hf["b"], "--calibration", calib, "--batch-size", 8,
                    "--alpha", alpha, "--max-sweeps", 3, "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    card = json.loads((out / "mudsc_merge.json").read_text())
    assert card["sources"] == [str(hf["a"]), str(hf["b"])]
    assert card["calibration"] == {"file": str(calib), "inputs": 24}
    assert card["architecture"] == "BertForSequenceClassification"
    merged = BertForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    with torch.no_grad():
        logits = merged(torch.load(hf["calib"])).logits
    assert logits.shape == (24, CLASSES) and torch.isfinite(logits).all()
    scored = invoke("eval", out, "--data-file", hf["labelled"], "--json")
    assert scored.exit_code == 0, scored.output
    assert 0 <= json.loads(scored.stdout)["accuracy"] <= 1


def test_cli_merge_of_a_model_with_itself_gives_the_model_back(
    hf: dict[str, Path], tmp_path: Path
) -> None:
    from transformers import BertForSequenceClassification

    """Exact up to rounding: one calibration batch, so REPAIR's one-pass measurement is exact
    (with several batches it standardises each batch on its own; see renorm.apply_repair)."""
    out = tmp_path / "same"
    result = invoke("merge", hf["a"], hf["a"], "--calibration", hf["calib"], "--max-sweeps", 2,
                    "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    merged = BertForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    tokens = torch.load(hf["calib"])
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, tiny_bert(0)(tokens).logits,
                                   atol=1e-5, rtol=1e-5)  # fmt: skip


def test_eval_refuses_a_hf_classifier_with_nan_weights(hf: dict[str, Path], tmp_path: Path) -> None:
    model = tiny_bert(0)
    with torch.no_grad():
        model.classifier.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "broken")
    _user_error(invoke("eval", tmp_path / "broken", "--data-file", hf["labelled"]),
                "NaN or infinite values in 'classifier.weight'")  # fmt: skip


def test_alpha_auto_on_too_few_labelled_examples_is_refused_before_merging(
    hf: dict[str, Path], tmp_path: Path
) -> None:
    data = torch.load(hf["labelled"])
    few = _write(tmp_path / "few.pt", data["inputs"][:8], data["labels"][:8])
    out = tmp_path / "m"
    _user_error(invoke("merge", hf["a"], hf["b"], "--calibration", few, "--alpha", "auto",
                       "-o", out), "fewer than the")  # fmt: skip
    assert not out.exists()
