"""Presets: ``mudsc`` (the defaults) and ``paper`` (the MuDSC authors' settings), one name away
in the library (``MergeConfig.from_preset``, ``merge(preset=...)``) and on the command line
(``--preset``), explicit values winning; and the ``weight_similarity`` knob."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from cli_helpers import invoke
from test_merge import assert_pairs_recovered, case, permuted, rel_err

from mudsc.checkpoint import CONFIG_FILE
from mudsc.errors import ConfigError
from mudsc.merge import MergeConfig, merge, merge_models, method_similarity
from mudsc.methods import METHODS
from mudsc.presets import PRESETS, presets_help
from mudsc.similarity import weight_similarity
from mudsc.solvers.match import identity_match

PAPER = {
    "taps": "last", "weight_similarity": "correlation", "sweep_rule": "restart",
    "tolerance": 0.0, "alpha": 0.5, "zip_a": 0.5, "zip_b": 1.0, "repair": "auto",
    "max_sweeps": 100, "patience": 5, "stop_at": None,
}  # fmt: skip


def test_the_presets_and_their_values() -> None:
    assert PRESETS.names() == ["mudsc", "paper"]
    assert MergeConfig.from_preset("mudsc") == MergeConfig()
    paper = MergeConfig.from_preset("paper")
    assert paper.preset == "paper"
    assert {k: getattr(paper, k) for k in PAPER} == PAPER
    fields = {f.name for f in dataclasses.fields(MergeConfig)}
    for name in PRESETS:
        preset = PRESETS[name]
        assert set(preset.values()) <= fields - {"preset", "method", "device"}
        assert all(s.why for s in preset.settings)
        assert all(f"{s.field}=" in preset.description for s in preset.settings)
    assert "paper" in presets_help() and "taps=last" in presets_help()


def test_explicit_values_win_over_the_preset() -> None:
    cfg = MergeConfig.from_preset("paper", method="zipit", zip_a=0.3, taps="all")
    assert (cfg.method, cfg.zip_a, cfg.taps, cfg.preset) == ("zipit", 0.3, "all", "paper")
    assert cfg.sweep_rule == "restart"
    assert MergeConfig.from_preset(**{"preset": "paper", "method": "wzip"}).taps == "last"
    assert cfg.to_dict()["preset"] == "paper"


@pytest.mark.parametrize(
    ("make", "line"),
    [
        (lambda: MergeConfig.from_preset("papers"),
         r"^unknown preset 'papers'; valid presets: mudsc, paper$"),
        (lambda: MergeConfig(preset="nope"),
         r"^unknown preset 'nope'; valid presets: mudsc, paper$"),
        (lambda: MergeConfig.from_preset("paper", zipa=0.3),
         r"^unknown merge option\(s\) \['zipa'\]"),
        (lambda: MergeConfig(weight_similarity="cosine"),
         r"^unknown weight_similarity 'cosine'; valid: method, correlation, inner$"),
    ],
)  # fmt: skip
def test_a_bad_preset_or_knob_is_one_line(make, line: str) -> None:
    with pytest.raises(ConfigError, match=line) as err:
        make()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "avg"])
@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_permuted_copy_merges_back_under_the_paper_preset(name: str, method: str) -> None:
    c = case(name)
    other, perm = permuted(c, seed=3)
    cfg = MergeConfig.from_preset("paper", method=method, repair="none")
    result = merge_models([c.model, other], c.batches, cfg, spec=c.spec)
    assert rel_err(result.model, c.model, c.x) <= 1e-4
    assert_pairs_recovered(result, c.spec, [perm])


def test_permuted_resnet20_merges_back_under_the_paper_preset() -> None:
    c = case("resnet20")
    other, perm = permuted(c, seed=3)
    cfg = MergeConfig.from_preset("paper", method="mudsc-zip", repair="none")
    result = merge_models([c.model, other], c.batches, cfg, spec=c.spec)
    assert rel_err(result.model, c.model, c.x) <= 1e-4
    assert_pairs_recovered(result, c.spec, [perm])


def test_merge_takes_a_preset() -> None:
    c = case("mlp")
    a = merge([c.model, case("mlp", 2).model], c.batches, "mudsc-zip", preset="paper")
    b = merge([c.model, case("mlp", 2).model], c.batches, "mudsc-zip", **PAPER)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# -- weight_similarity --------------------------------------------------------------------


def test_correlation_changes_rebasin_and_leaves_mudsc_zip_alone() -> None:
    corr = MergeConfig(weight_similarity="correlation")
    mudsc_zip = METHODS["mudsc-zip"]
    assert method_similarity(mudsc_zip, corr) is mudsc_zip.similarity_record
    assert method_similarity(METHODS["zipit"], MergeConfig(weight_similarity="inner")) is (
        METHODS["zipit"].similarity_record
    )  # no weight sweeps: nothing to swap
    rebasin = method_similarity(METHODS["rebasin"], corr)
    assert rebasin.weights == "correlation" and rebasin.name == "weight-inner"
    c = case("mlp")
    states = [c.model.state_dict(), case("mlp", 2).model.state_dict()]
    space = c.spec.mergeable[0]
    matches = {s.name: identity_match(s.size, 2) for s in c.spec.mergeable}

    def weight(kind):
        return weight_similarity(c.spec, space.name, states, matches, kind)

    assert torch.equal(rebasin.compute(None, weight, 1.0), weight("correlation"))
    own = METHODS["rebasin"].similarity_record.compute(None, weight, 1.0)
    assert torch.equal(own, weight("inner")) and not torch.allclose(own, weight("correlation"))


def test_correlation_rebasin_is_wzip_similarity_with_alignment() -> None:
    c = case("vgg11")
    models = [c.model, case("vgg11", 2).model]
    results = {kind: merge_models(models, c.batches, MergeConfig(
        "rebasin", repair="none", patience=2, weight_similarity=kind), spec=c.spec)
        for kind in ("method", "correlation")}  # fmt: skip
    inner, corr = results["method"], results["correlation"]
    assert all(-1 <= v <= 1 for v in corr.space_values.values())
    assert any(abs(v) > 1 for v in inner.space_values.values())  # raw inner products


# -- the command line -----------------------------------------------------------------------


def test_cli_preset_paper_is_recorded_and_explicit_options_win(
    runs: dict[str, Path], data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "paper"
    result = invoke("merge", runs["a"], runs["b"], "--preset", "paper", "--zip-a", "0.3",
                    "--sweep-rule", "continue", "--max-sweeps", "3", "--data-dir", data_dir,
                    "--calibration-size", "100", "-o", out)  # fmt: skip
    assert result.exit_code == 0, result.output
    config = json.loads((out / CONFIG_FILE).read_text())["merge"]["config"]
    assert config["preset"] == "paper"
    assert (config["zip_a"], config["sweep_rule"], config["max_sweeps"]) == (0.3, "continue", 3)
    rest = {k: v for k, v in PAPER.items() if k not in ("zip_a", "sweep_rule", "max_sweeps")}
    assert {k: config[k] for k in rest} == rest
    dry = invoke("merge", runs["a"], runs["b"], "--preset", "paper", "--dry-run", "--data-dir",
                 data_dir, "--calibration-size", "100", "-o", tmp_path / "dry")  # fmt: skip
    assert dry.exit_code == 0, dry.output


def test_cli_unknown_preset_is_one_line(
    runs: dict[str, Path], data_dir: Path, tmp_path: Path
) -> None:
    result = invoke("merge", runs["a"], runs["b"], "--preset", "authors", "--data-dir", data_dir,
                    "-o", tmp_path / "x")  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown preset 'authors'; valid presets: mudsc, paper" in lines[0]
