"""Study variants in ``mudsc experiment``: one training, one row per (variant, method)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mudsc.errors import ConfigError
from mudsc.experiments import runner
from mudsc.experiments.config import parse_config

MICRO = {
    "dataset": "embedded",
    "arch": "mlp",
    "arch_args": {"hidden": 32, "depth": 2},
    "embed_dim": 16,
    "pairs": 1,
    "train": {"epochs": 2, "batch_size": 50, "lr": 0.05, "warmup_epochs": 0.2, "augment": False},
    "train_images_per_class": 30,
    "test_images_per_class": 10,
    "methods": ["zipit", "mudsc-zip"],
    "alpha": 0.5,
    "calibration": {"size": 80, "batch_size": 40, "holdout": 0.25},
    "merge": {"max_sweeps": 3, "patience": 1},
}
VARIANTS = [
    {"name": "small", "calibration": {"size": 40}},
    {"name": "a0", "methods": ["mudsc-zip"], "merge": {"zip_a": 0.0}},
    {"name": "agree", "methods": ["mudsc-zip"], "alpha": "auto", "alpha_grid": [0.2, 0.8],
     "alpha_score": "agreement"},
    {"name": "loss", "methods": ["mudsc-zip"], "alpha": "auto", "alpha_grid": [0.2, 0.8],
     "alpha_score": "loss"},
    {"name": "stop-1", "methods": ["zipit"], "stop_at": 1},
]  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("study") / "out"
    cfg = parse_config({**MICRO, "variants": VARIANTS, "output_dir": str(out)}, name="s")
    return out, runner.run_experiment(cfg)


def test_every_variant_is_a_row_of_its_own_methods(study: tuple[Path, dict]) -> None:
    out, results = study
    rows = results["pairs"][0]["rows"]
    expected = ["zipit", "mudsc-zip", "zipit @ small", "mudsc-zip @ small", "mudsc-zip @ a0",
                "mudsc-zip @ agree", "mudsc-zip @ loss", "zipit @ stop-1"]  # fmt: skip
    assert [r for r in rows if not r.startswith(("model", "ensemble"))] == expected
    assert results["work"] == {"trained": 2, "merged": len(expected)}
    assert (out / "pairs" / "pair-0" / "merges" / "mudsc-zip@a0.json").is_file()
    assert "mudsc-zip @ loss" in (out / "results.md").read_text()


def test_a_variant_changes_its_merge_and_only_its_knob(study: tuple[Path, dict]) -> None:
    out, results = study
    merges = out / "pairs" / "pair-0" / "merges"
    a0 = json.loads((merges / "mudsc-zip@a0.json").read_text())
    assert a0["key"]["config"]["merge"]["zip_a"] == 0.0
    small = json.loads((merges / "zipit@small.json").read_text())
    assert small["key"]["config"]["calibration"]["size"] == 40
    base = json.loads((merges / "zipit.json").read_text())
    assert base["key"]["config"]["calibration"]["size"] == 80
    rows = results["pairs"][0]["rows"]
    for name in ("mudsc-zip @ agree", "mudsc-zip @ loss"):
        assert rows[name]["alpha"] in (0.2, 0.8)
        assert len(rows[name]["alpha_scores"]) == 2
    # the agreement score is a mean cosine in [-1, 1], the loss score minus a cross-entropy
    assert all(-1 <= v <= 1 for v in rows["mudsc-zip @ agree"]["alpha_scores"].values())
    assert all(v < 0 for v in rows["mudsc-zip @ loss"]["alpha_scores"].values())


def test_a_partial_merge_costs_more_than_one_model_and_less_than_two(
    study: tuple[Path, dict],
) -> None:
    _, results = study
    rows = results["pairs"][0]["rows"]
    assert rows["zipit"]["params"] == pytest.approx(1.0)
    assert rows["zipit"]["flops"] == pytest.approx(1.0)
    partial = rows["zipit @ stop-1"]
    assert 1.0 < partial["params"] < 2.0
    assert 1.0 < partial["flops"] < 2.0
    summary = results["summary"]["zipit @ stop-1"]
    assert summary["params"]["mean"] == pytest.approx(partial["params"])


def test_adding_a_variant_resumes_the_folder(study: tuple[Path, dict]) -> None:
    out, _ = study
    more = [*VARIANTS, {"name": "b-half", "methods": ["zipit"], "merge": {"zip_b": 0.5}}]
    cfg = parse_config({**MICRO, "variants": more, "output_dir": str(out)}, name="s")
    results = runner.run_experiment(cfg)
    assert results["work"] == {"trained": 0, "merged": 1}


@pytest.mark.parametrize(
    ("variants", "message"),
    [
        ("x", "'variants' must be a non-empty list"),
        ([{"merge": {"zip_a": 0.1}}], "needs a 'name'"),
        ([{"name": "a"}, {"name": "a"}], "names a variant twice"),
        ([{"name": "a@b"}], "without '@'"),
        ([{"name": "a", "zip_a": 0.1}], "unknown config key 'variants\\[0\\].zip_a'"),
        ([{"name": "a", "merge": {"zip_a": 2}}], "variants\\[0\\].merge"),
        ([{"name": "a", "calibration": {"size": 1}}], "variants\\[0\\].calibration.size"),
        ([{"name": "a", "alpha_score": "vibes"}], "alpha_score"),
        ([{"name": "a", "stop_at": 0}], "variants\\[0\\].stop_at"),
        ([{"name": "a", "methods": ["nope"]}], "nope"),
    ],
)
def test_a_bad_variant_is_one_line(variants: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as exc:
        parse_config({**MICRO, "variants": variants}, name="s")
    assert "\n" not in str(exc.value)


def test_a_variant_calibration_larger_than_the_data_is_refused(tmp_path: Path) -> None:
    cfg = parse_config(
        {**MICRO, "variants": [{"name": "big", "calibration": {"size": 100000}}],
         "output_dir": str(tmp_path / "o")}, name="s",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="variant 'big'"):
        runner.run_experiment(cfg)
    assert not (tmp_path / "o").exists()


def test_partial_merges_draw_the_frontier(study: tuple[Path, dict]) -> None:
    out, _ = study
    png = (out / "results-frontier.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    table = (out / "results.md").read_text()
    assert "params x" in table and "FLOPs x" in table


def test_the_study_table_has_a_line_per_variant(study: tuple[Path, dict]) -> None:
    out, _ = study
    table = (out / "results.md").read_text()
    head = "| variant | zipit | mudsc-zip |"
    assert head in table
    lines = table.split(head)[1].strip().splitlines()[1:7]
    assert [line.split("|")[1].strip() for line in lines] == [
        "(top level)", "small", "a0", "agree", "loss", "stop-1",
    ]  # fmt: skip
    assert lines[2].split("|")[2].strip() == ""  # a0 has no zipit row


def test_a_variant_stop_point_the_model_lacks_is_refused_before_training(tmp_path: Path) -> None:
    cfg = parse_config(
        {**MICRO, "variants": [{"name": "x", "stop_at": "no.such.layer"}],
         "output_dir": str(tmp_path / "o")}, name="s",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="variants.*'x'.*no.such.layer") as exc:
        runner.run_experiment(cfg)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "o").exists()
