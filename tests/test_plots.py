"""Figures of mudsc.plots: pure geometry, the three computations, and the three commands.

Tiny untrained models (an MLP with 32 hidden units, REPAIR path; a width-1 ResNet-20, BN
path) on a few embedded MNIST images keep the whole file fast; what is checked is
plumbing and geometry (shapes, finiteness, where points are drawn), not merge quality.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from matplotlib.colorbar import Colorbar
from typer.testing import CliRunner

from mudsc.apply import apply_matches
from mudsc.checkpoint import save_checkpoint
from mudsc.cli import app
from mudsc.data import draw_calibration, load_dataset
from mudsc.errors import MudscError
from mudsc.merge import MergeConfig, merge_models
from mudsc.methods import METHODS
from mudsc.models import create
from mudsc.models.head import ClassEmbeddingHead
from mudsc.plots.diagnose import (
    cluster_pairs,
    compute_diagnosis,
    mean_over_pairs,
    plot_diagnosis,
    rank_agreement,
)
from mudsc.plots.interpolate import (
    EvalSet,
    Renormaliser,
    compute_interpolation,
    lerp_state,
    load_interpolation,
    model_with_state,
    plot_interpolation,
    task_metrics,
    weighted_matches,
)
from mudsc.plots.landscape import (
    compute_landscape,
    grid_axes,
    load_landscape,
    parameter_keys,
    parameter_vector,
    pca_plane,
    plot_landscape,
    state_from_vector,
)
from mudsc.plots.style import METHOD_COLORS, method_color, save_figure, save_npz
from mudsc.solvers.match import identity_match, match_from_unmerge

TASKS = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
FAST = {"max_sweeps": 3, "patience": 1}


@pytest.fixture(scope="module")
def dataset():
    return load_dataset("embedded")


@pytest.fixture(scope="module")
def head():
    return ClassEmbeddingHead.orthonormal(10, 16)


def _shrink(x: torch.Tensor) -> torch.Tensor:
    """28x28 -> 14x14: a quarter of the compute for the library-level tests."""
    return torch.nn.functional.avg_pool2d(x, 2)


@pytest.fixture(scope="module")
def evalset(dataset, head):
    full = EvalSet.sample(dataset, TASKS, head, 40, seed=0)
    return EvalSet(_shrink(full.images), full.labels, full.tasks, head)


@pytest.fixture(scope="module")
def batches(dataset):
    drawn = draw_calibration(dataset, list(range(10)), 32, 32, 0, "cpu")
    return [_shrink(x) for x in drawn.batches]


def _pair(arch: str, image_size: int = 14, **kwargs):
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(
            create(arch, in_channels=1, image_size=image_size, embed_dim=16, **kwargs).eval()
        )
    return models


@pytest.fixture(scope="module")
def mlps():
    return _pair("mlp", hidden=32)


@pytest.fixture(scope="module")
def resnets():
    return _pair("resnet20", image_size=7, width=1)


def _titles(fig):
    return [ax.get_title() for ax in fig.axes]


# -- pure parts ---------------------------------------------------------------------------


def test_pca_plane_projects_points_of_a_plane_exactly():
    rng = np.random.default_rng(0)
    e = np.linalg.qr(rng.normal(size=(20, 2)))[0].T
    coords = rng.normal(size=(6, 2)) * [5.0, 1.0]
    center = rng.normal(size=20)
    pts = center + coords @ e
    plane = pca_plane(pts)
    np.testing.assert_allclose(plane.basis @ plane.basis.T, np.eye(2), atol=1e-10)
    np.testing.assert_allclose(plane.explained.sum(), 1.0, atol=1e-10)
    assert plane.explained[0] >= plane.explained[1]
    proj = plane.project(pts)
    np.testing.assert_allclose(np.stack([plane.point(u, v) for u, v in proj]), pts, atol=1e-9)
    np.testing.assert_allclose(plane.residual(pts), 0, atol=1e-9)
    off = pts[0] + 3.0 * np.linalg.qr(np.c_[e.T, rng.normal(size=20)])[0][:, 2]
    assert plane.residual(off)[0] == pytest.approx(3.0)
    with pytest.raises(MudscError, match="at least 3"):
        pca_plane(pts[:2])


def test_grid_is_square_and_covers_every_point():
    pts = np.array([[0.0, 0.0], [4.0, 1.0], [1.0, -1.0]])
    us, vs = grid_axes(pts, 5, margin=0.25)
    assert len(us) == len(vs) == 5
    assert np.diff(us)[0] == pytest.approx(np.diff(vs)[0])
    assert us[0] < 0 and us[-1] > 4 and vs[0] < -1 and vs[-1] > 1
    with pytest.raises(MudscError, match="resolution"):
        grid_axes(pts, 1)


def test_parameter_vector_round_trip(mlps):
    model = mlps[0]
    keys = parameter_keys(model)
    state = model.state_dict()
    vec = parameter_vector(state, keys)
    assert vec.shape == (sum(p.numel() for p in model.parameters()),)
    back = state_from_vector(vec * 2, keys, state)
    for k in keys:
        torch.testing.assert_close(back[k], state[k] * 2)
    with pytest.raises(MudscError, match="entries"):
        state_from_vector(np.zeros(len(vec) + 1), keys, state)


def test_pairs_and_rank_agreement():
    # units 0,1 of model 0 and 0,1 of model 1 (stacked 0..3): clusters {0, 2}, {1, 3} -> 2
    # cross pairs; a zip-like cluster {0, 1, 2} -> three pairs, one within model 0.
    u = np.array([[1, 0], [0, 1], [1, 0], [0, 1]], dtype=float)
    assert cluster_pairs(u).tolist() == [[0, 2], [1, 3]]
    z = np.array([[1, 0], [1, 0], [1, 0], [0, 1]], dtype=float)
    assert cluster_pairs(z).tolist() == [[0, 1], [0, 2], [1, 2]]
    s = np.arange(16, dtype=float).reshape(4, 4)
    assert mean_over_pairs(s, cluster_pairs(u)) == pytest.approx((2 + 7) / 2)
    assert mean_over_pairs(s, np.zeros((0, 2), dtype=int)) is None
    a = np.arange(9.0)
    assert rank_agreement(a, a**3) == pytest.approx(1.0)
    assert rank_agreement(a, -a) == pytest.approx(-1.0)
    assert rank_agreement(a, np.ones(9)) is None


def test_weighted_matches_interpolate_repair_targets():
    m = identity_match(3, 2)
    w = weighted_matches({"s": m}, (1.0, 0.0))["s"]
    torch.testing.assert_close(w.merge_of(0), torch.eye(3, dtype=w.merge.dtype))
    assert w.merge_of(1).abs().sum() == 0
    half = weighted_matches({"s": m}, (0.5, 0.5))["s"]
    torch.testing.assert_close(half.merge, m.merge)
    zipped = match_from_unmerge(torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]]), 2, 0.0)
    with pytest.raises(MudscError, match="weights"):
        weighted_matches({"s": zipped}, (1.0,))


def test_lerp_state_ends_and_integer_buffers():
    a = {"w": torch.zeros(3), "n": torch.tensor(4)}
    b = {"w": torch.ones(3), "n": torch.tensor(9)}
    torch.testing.assert_close(lerp_state(a, b, 0.0)["w"], a["w"])
    torch.testing.assert_close(lerp_state(a, b, 1.0)["w"], b["w"])
    torch.testing.assert_close(lerp_state(a, b, 0.25)["w"], torch.full((3,), 0.25))
    assert lerp_state(a, b, 0.7)["n"].item() == 4


def test_every_method_has_its_own_colour(tmp_path):
    assert set(METHOD_COLORS) == set(METHODS)
    assert len(set(METHOD_COLORS.values())) == len(METHOD_COLORS)
    assert method_color("not-a-method") == method_color("not-a-method")
    from mudsc.plots.style import new_figure

    fig = new_figure(2, 2)
    fig.add_subplot().plot([0, 1])
    with pytest.raises(MudscError, match="PNG"):
        save_figure(fig, tmp_path / "x.jpg")
    save_figure(fig, tmp_path / "x.png")
    save_npz(tmp_path / "x.npz", {"a": np.zeros(2)})
    assert sorted(os.listdir(tmp_path)) == ["x.npz", "x.png"]  # no temporary files left
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x.png").stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would
    with pytest.raises(MudscError, match="not a landscape"):
        load_landscape(tmp_path / "x.npz")


# -- the computations ---------------------------------------------------------------------


def test_landscape_marks_merges_at_their_own_parameters(mlps, evalset, batches, tmp_path):
    methods = ("zipit", "mudsc-zip")
    land = compute_landscape(
        mlps[0], mlps[1], evalset, batches, methods, resolution=3, merge_options=FAST
    )
    assert land.loss.shape == (3, 3, 3) and np.isfinite(land.loss).all()
    assert land.points.shape == (6, 2) and land.paths.shape == (2, 5, 2)
    assert land.point_loss.shape == (6, 3) and np.isfinite(land.point_loss).all()
    np.testing.assert_allclose(land.loss[-1], land.loss[:-1].mean(axis=0))
    keys = land.parameter_keys
    # Frame method: its merged weights (before REPAIR) projected with the plane's basis.
    plain = merge_models(mlps, batches, MergeConfig(method="zipit", repair="none", **FAST))
    vec = parameter_vector(plain.model.state_dict(), keys)
    i = land.point_index("zipit", "merged")
    np.testing.assert_allclose(land.plane.project(vec)[0], land.points[i], atol=1e-6)
    # Other method: moved into the frame by a permutation, so its function is unchanged.
    result = land.merges["mudsc-zip"]
    other = apply_matches(result.spec, [m.state_dict() for m in mlps], result.matches)
    x = batches[0][:8]
    framed = model_with_state(mlps[0], land.merged_states["mudsc-zip"])
    torch.testing.assert_close(framed(x), model_with_state(mlps[0], other)(x), atol=1e-4, rtol=1e-4)
    j = land.point_index("mudsc-zip", "merged")
    proj = land.plane.project(parameter_vector(land.merged_states["mudsc-zip"], keys))[0]
    np.testing.assert_allclose(proj, land.points[j], atol=1e-6)
    # The merge is the midpoint of its path.
    np.testing.assert_allclose(land.paths[0, 2], land.points[i], atol=1e-6)

    fig = plot_landscape(land)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title().split(" (")[0] for ax in panels] == [
        "Task 0 loss", "Task 1 loss", "Mean loss over tasks",
    ]  # fmt: skip
    assert all("PC1" in ax.get_xlabel() and "PC2" in ax.get_ylabel() for ax in panels)
    cbars = [ax for ax in fig.axes if isinstance(getattr(ax, "_colorbar", None), Colorbar)]
    assert len(cbars) == 1 and "loss" in cbars[0].get_ylabel()
    stars = [c for c in panels[0].collections if c.get_label() == "merged"]
    assert len(stars) == 1
    np.testing.assert_allclose(stars[0].get_offsets()[0], land.points[i], atol=1e-6)
    legend_text = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(t.startswith("zipit") for t in legend_text)
    assert "merged model" in legend_text
    png = save_figure(fig, tmp_path / "land.png")
    npz = save_npz(tmp_path / "land.npz", land.arrays())
    assert png.stat().st_size > 10_000
    saved = np.load(npz)
    assert saved["loss"].shape == (3, 3, 3) and saved["basis"].shape == (2, len(vec))
    again = load_landscape(npz)  # redraw from the data file alone
    np.testing.assert_allclose(again.loss, land.loss)
    assert again.point_roles == land.point_roles and again.frame == "zipit"
    assert len(plot_landscape(again).axes) == 4
    np.testing.assert_allclose(
        (vec - saved["center"]) @ saved["basis"].T, saved["points"][i], rtol=1e-4, atol=1e-2
    )


def test_interpolation_with_batchnorm_reset(resnets, evalset, batches, tmp_path):
    tiny = EvalSet(_shrink(evalset.images), evalset.labels, evalset.tasks, evalset.head)
    interp = compute_interpolation(
        resnets[0], resnets[1], tiny, [_shrink(x) for x in batches], "act-align", steps=3,
        merge_options=FAST,
    )  # fmt: skip
    assert interp.loss.shape == (3, 3, 2) == interp.accuracy.shape
    assert np.isfinite(interp.loss).all()
    assert ((0 <= interp.accuracy) & (interp.accuracy <= 1)).all()
    assert interp.renorm == "BN reset"
    naive, aligned = interp.variants.index("naive"), interp.variants.index("aligned")
    # A permutation leaves each end point's function unchanged.
    np.testing.assert_allclose(interp.loss[aligned, [0, -1]], interp.loss[naive, [0, -1]],
                               rtol=1e-4)  # fmt: skip
    back = load_interpolation(json.loads(json.dumps(interp.to_dict(), allow_nan=False)))
    np.testing.assert_allclose(back.loss, interp.loss)
    np.testing.assert_allclose(back.accuracy, interp.accuracy)
    fig = plot_interpolation(back)
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(titled) == 3 and titled[-1].get_title() == "Mean over tasks"
    assert sum("accuracy" in ax.get_ylabel() for ax in fig.axes) == 3
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == [
        "naive (no alignment)",
        "aligned (act-align)",
        "aligned (act-align) + BN reset",
    ]
    assert save_figure(fig, tmp_path / "i.png").stat().st_size > 10_000


def test_batchnorm_landscape_marks_the_merged_model_itself(resnets, evalset, batches):
    tiny = EvalSet(_shrink(evalset.images), evalset.labels, evalset.tasks, evalset.head)
    small = [_shrink(x) for x in batches]
    land = compute_landscape(resnets[0], resnets[1], tiny, small, ["act-align"], resolution=2)
    assert land.renorm == "BN reset" and np.isfinite(land.loss).all()
    merged = land.merges["act-align"].model  # BN reset changed buffers only, not parameters
    vec = parameter_vector(merged.state_dict(), land.parameter_keys)
    i = land.point_index("act-align", "merged")
    np.testing.assert_allclose(land.plane.project(vec)[0], land.points[i], atol=1e-6)
    # Alignment is a permutation: source A in the merged basis is model A, loss unchanged.
    a = land.point_index("act-align", "source A")
    model_a = model_with_state(resnets[0], resnets[0].state_dict())
    Renormaliser("bn", small, "cpu")(model_a)
    losses, _ = task_metrics(model_a, tiny, "cpu")
    np.testing.assert_allclose(land.point_loss[a, :2], losses, rtol=1e-4)


def test_diagnosis_values_and_figure(mlps, batches, tmp_path):
    diag = compute_diagnosis(mlps[0], mlps[1], batches, ("zipit", "wzip"), merge_options=FAST)
    assert [s.name for s in diag.spaces] == ["features.0", "features.2", "features.4"]
    for s in diag.spaces:
        assert s.spearman is not None and -1 <= s.spearman <= 1
        assert set(s.matched) == {"zipit", "wzip"}
        pairs = s.matched["zipit"]["cross_model_pairs"] + s.matched["zipit"]["within_model_pairs"]
        assert pairs >= s.size  # n merges, each at least one pair
        w, a = diag.cross[s.name]
        assert w.shape == a.shape == (s.size, s.size)
    json.dumps(diag.to_dict(), allow_nan=False)
    fig = plot_diagnosis(diag)
    titles = _titles(fig)
    assert sum("Spearman rho" in t for t in titles) == 3
    assert any(t.startswith("Agreement") for t in titles)
    assert sum(t.startswith("Mean") for t in titles) == 2
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)
    assert save_figure(fig, tmp_path / "d.png").stat().st_size > 10_000


# -- the commands -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, head):
    root = tmp_path_factory.mktemp("ckpt")
    for model, task, name in zip(_pair("mlp", 28, hidden=32), TASKS, "ab", strict=True):
        save_checkpoint(root / name, model, {"kind": "train", "dataset": "embedded",
                                             "tasks": [task]}, head)  # fmt: skip
    return root / "a", root / "b"


SMALL = ["--calibration-size", "32", "--batch-size", "32"]


def test_cli_landscape_writes_png_and_npz_and_refuses_overwrite(checkpoints, tmp_path):
    out = tmp_path / "l.png"
    args = ["landscape", *map(str, checkpoints), "-o", str(out), "--methods", "zipit,avg",
            "--resolution", "3", "--data-size", "60", *SMALL]  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = np.load(tmp_path / "l.npz")
    assert saved["loss"].shape == (3, 3, 3) and np.isfinite(saved["loss"]).all()
    assert json.loads(str(saved["meta"]))["frame"] == "zipit"
    assert out.stat().st_size > 10_000
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
    bad = runner.invoke(app, [*args, "--force", "--methods", "nope"])
    assert bad.exit_code == 2 and "unknown method" in bad.output


def test_cli_diagnose_json(checkpoints, tmp_path):
    out = tmp_path / "d.png"
    result = CliRunner().invoke(
        app, ["diagnose", *map(str, checkpoints), "-o", str(out), "--methods", "zipit",
              "--json", *SMALL],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads((tmp_path / "d.json").read_text())
    assert len(printed["spaces"]) == 3 and out.stat().st_size > 10_000


def test_cli_interpolate(checkpoints, tmp_path):
    out = tmp_path / "i.png"
    args = ["interpolate", *map(str, checkpoints), "-o", str(out), "--method", "zipit",
            "--data-size", "60", *SMALL]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--steps", "3"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "i.json").read_text())
    assert data["t"] == [0.0, 0.5, 1.0] and data["renorm"] == "REPAIR"
    assert len(data["variants"]["aligned + renorm"]["loss"]) == 3
    assert out.stat().st_size > 10_000
    runner = CliRunner()
    assert runner.invoke(app, args).exit_code == 2  # exists, no --force
    assert runner.invoke(app, [*args, "--force", "--steps", "2"]).exit_code == 0
    assert json.loads((tmp_path / "i.json").read_text())["t"] == [0.0, 1.0]
