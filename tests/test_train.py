"""Training source models: learns, is deterministic per seed, sees only its task, right lr."""

from __future__ import annotations

import math

import pytest
import torch
from fixtures_data import write_idx_dataset

from mudsc.data import ImageDataset, load_dataset
from mudsc.errors import MudscError
from mudsc.models import create
from mudsc.models.head import ClassEmbeddingHead
from mudsc.train import TrainConfig, fit, lr_at, sgd, train, train_config_dict

EMBED = 16
ARCH_ARGS = {"hidden": 32, "depth": 2}
TASK = [0, 2, 4, 6]
QUICK = TrainConfig(epochs=3, batch_size=64, lr=0.05, warmup_epochs=1, seed=0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> ImageDataset:
    root = tmp_path_factory.mktemp("idx")
    write_idx_dataset(root, n_train=320, n_test=80)
    return load_dataset("fashion-mnist", root)


@pytest.fixture
def head() -> ClassEmbeddingHead:
    return ClassEmbeddingHead.orthonormal(10, EMBED, seed=0)


def run(dataset: ImageDataset, head: ClassEmbeddingHead, config: TrainConfig = QUICK, **kw):
    return train("mlp", dataset, kw.pop("classes", TASK), head, config, dict(ARCH_ARGS), **kw)


def test_short_run_lowers_the_loss_and_learns(dataset, head) -> None:
    result = run(dataset, head, TrainConfig(epochs=5, batch_size=64, lr=0.05, warmup_epochs=1))
    losses = [h["loss"] for h in result.history]
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4, 5]
    assert losses[-1] < 0.5 * losses[0]
    assert result.history[-1]["accuracy"] > 0.9
    assert not result.model.training  # handed back ready for evaluation
    assert result.seconds > 0 and result.images_per_second > 0


def test_progress_hears_every_epoch_under_its_stage(dataset, head) -> None:
    heard: list[tuple[str, int, int, str]] = []
    result = run(dataset, head, progress=lambda *a: heard.append(a), stage="model 0")
    assert [(s, d, t) for s, d, t, *_ in heard] == [("model 0", e, 3) for e in range(4)]
    last = result.history[-1]
    assert heard[-1][3] == f"loss {last['loss']:.3f} acc {100 * last['accuracy']:.1f}%"


def test_same_seed_is_bit_identical_other_seed_differs(dataset, head) -> None:
    a = run(dataset, head).model.state_dict()
    b = run(dataset, head).model.state_dict()
    c = run(dataset, head, TrainConfig(**{**train_config_dict(QUICK), "seed": 1})).model
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in c.state_dict().items())


def test_trains_on_its_own_task_only(dataset, head, monkeypatch) -> None:
    """Every input is an image of the task and every logit row covers the task's classes."""
    import mudsc.train as train_module

    task_images = dataset.normalize(dataset.subset(TASK, "train")[0]).flatten(1)
    other = [c for c in range(10) if c not in TASK]
    other_images = dataset.normalize(dataset.subset(other, "train")[0]).flatten(1)
    seen_classes: list[list[int]] = []
    seen_inputs: list[torch.Tensor] = []
    forward, create = ClassEmbeddingHead.forward, train_module.create

    def head_spy(self, features, classes=None, scale=100.0):
        seen_classes.append(list(classes))
        return forward(self, features, classes, scale)

    def create_spy(*args, **kwargs):
        model = create(*args, **kwargs)
        model.register_forward_pre_hook(lambda _m, a: seen_inputs.append(a[0].flatten(1)))
        return model

    monkeypatch.setattr(ClassEmbeddingHead, "forward", head_spy)
    monkeypatch.setattr(train_module, "create", create_spy)
    config = TrainConfig(epochs=2, batch_size=64, lr=0.05, warmup_epochs=0, augment=False)
    run(dataset, head, config, classes=[6, 0, 4, 2])  # order must not matter
    assert seen_classes and all(c == sorted(TASK) for c in seen_classes)
    inputs = torch.cat(seen_inputs).detach()
    assert len(inputs) == 2 * len(task_images)  # each task image once per epoch
    exact = "donot_use_mm_for_euclid_dist"
    assert torch.cdist(inputs, task_images, compute_mode=exact).min(dim=1).values.max() < 1e-4
    assert torch.cdist(inputs, other_images, compute_mode=exact).min(dim=1).values.min() > 1.0


def test_scheduler_feeds_every_step(dataset, head, monkeypatch) -> None:
    import mudsc.train as train_module

    calls: list[tuple[int, int, int, float]] = []

    def spy(step: int, total: int, warmup: int, peak: float) -> float:
        calls.append((step, total, warmup, peak))
        return lr_at(step, total, warmup, peak)

    monkeypatch.setattr(train_module, "lr_at", spy)
    config = TrainConfig(epochs=3, batch_size=50, lr=0.05, warmup_epochs=1.5)
    run(dataset, head, config)
    n = len(dataset.subset(TASK, "train")[0])
    per_epoch = math.ceil(n / 50)
    steps = sorted({c[0] for c in calls})  # asked once per parameter group
    assert steps == list(range(3 * per_epoch))
    assert {c[1:] for c in calls} == {(3 * per_epoch, round(1.5 * per_epoch), 0.05)}


@pytest.mark.parametrize(
    "step,expected",
    [(0, 0.25), (1, 0.5), (3, 1.0), (4, 1.0), (6, 0.75), (8, 0.5), (11, 0.125), (12, 0.0)],
)
def test_lr_warm_up_then_linear_decay(step: int, expected: float) -> None:
    # 4 warm-up steps to peak 1.0, then 8 steps of decay to 0 at step 12.
    assert lr_at(step, total_steps=12, warmup_steps=4, peak=1.0) == pytest.approx(expected)


def test_lr_without_warm_up_starts_at_peak() -> None:
    assert [lr_at(s, 4, 0, 2.0) for s in range(5)] == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0])
    assert lr_at(99, 4, 0, 2.0) == 0.0  # never negative past the end


@pytest.mark.parametrize(
    "field,value",
    [
        ("epochs", 0),
        ("batch_size", 0),
        ("lr", 0.0),
        ("lr", -0.1),
        ("lr", float("nan")),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("weight_decay", -1e-4),
        ("warmup_epochs", -1.0),
        ("crop_padding", -1),
    ],
)
def test_bad_config_values_are_refused(field: str, value: float) -> None:
    with pytest.raises(MudscError, match=field):
        TrainConfig(**{field: value})


def test_bad_inputs_are_user_errors(dataset, head) -> None:
    with pytest.raises(MudscError, match="out of range"):
        run(dataset, head, classes=[0, 10])
    with pytest.raises(MudscError, match="embed_dim"):
        train("mlp", dataset, TASK, head, QUICK, {**ARCH_ARGS, "embed_dim": EMBED + 1})
    with pytest.raises(MudscError, match="unknown architecture"):
        train("no-such-net", dataset, TASK, head, QUICK)


def test_divergence_is_reported_not_returned(dataset, head) -> None:
    config = TrainConfig(epochs=2, batch_size=64, lr=1e30, warmup_epochs=0, momentum=0.0)
    with pytest.raises(MudscError, match="diverged"):
        run(dataset, head, config)


def test_empty_task_split_is_refused(head) -> None:
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    labels = torch.tensor([0, 0, 1, 1])
    data = ImageDataset("tiny", images, labels, images, labels, ["a", "b", "c"], (0.5,), (0.2,))
    with pytest.raises(MudscError, match="no images"):
        train("mlp", data, [2], ClassEmbeddingHead.orthonormal(3, EMBED), QUICK, dict(ARCH_ARGS))


def test_config_record_is_json_ready() -> None:
    record = train_config_dict(QUICK)
    assert record["lr"] == 0.05 and record["epochs"] == 3 and record["crop_padding"] is None
    assert TrainConfig(**record) == QUICK


def test_sgd_decays_matrices_only_and_spares_vit_tokens_unless_told() -> None:
    vit = create("vit", in_channels=1, image_size=8, embed_dim=EMBED)
    names = {id(p): n for n, p in vit.named_parameters()}

    def undecayed(optimizer: torch.optim.SGD) -> set[str]:
        decay, no_decay = optimizer.param_groups
        assert decay["weight_decay"] == QUICK.weight_decay and no_decay["weight_decay"] == 0.0
        assert len(decay["params"]) + len(no_decay["params"]) == len(names)
        return {names[id(p)] for p in no_decay["params"]}

    vectors = {n for n, p in vit.named_parameters() if p.ndim <= 1}
    assert vectors and undecayed(sgd([vit], QUICK)) == vectors | {"cls_token", "pos_embed"}
    assert undecayed(sgd([vit], QUICK, exempt=())) == vectors


def test_fit_averages_loss_and_sums_per_image_and_reports_each_epoch() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(10, 3), torch.randn(10, 1)
    config = TrainConfig(epochs=2, batch_size=4, lr=0.01, warmup_epochs=0)
    batches: list[list[int]] = []

    def batch_loss(idx: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        assert model.training
        batches.append(idx.tolist())
        return ((model(x[idx]) - y[idx]) ** 2).mean(), {"ones": float(len(idx))}

    heard: list[tuple] = []
    fitted = fit([model], sgd([model], config), 10, config, batch_loss,
                 torch.Generator().manual_seed(0), lambda *a: heard.append(a), "fit")  # fmt: skip
    assert [len(b) for b in batches] == [4, 4, 2] * 2
    assert sorted(sum(batches[:3], [])) == list(range(10))  # every image once per epoch
    assert [(r["epoch"], r["ones"]) for r in fitted.history] == [(1, 1.0), (2, 1.0)]
    assert [h[:3] for h in heard] == [("fit", e, 2) for e in range(3)]
    assert heard[-1][3] == f"loss {fitted.history[-1]['loss']:.3f}"  # no accuracy to show
    assert not model.training and fitted.seconds > 0


def test_fit_names_the_stage_that_diverged() -> None:
    model = torch.nn.Linear(1, 1)
    config = TrainConfig(epochs=1, batch_size=2)
    with pytest.raises(MudscError, match="^encoder: training diverged at epoch 1"):
        fit([model], sgd([model], config), 2, config,
            lambda idx: (model(torch.full((len(idx), 1), float("nan"))).mean(), {}),
            torch.Generator(), lambda *a: None, "encoder")  # fmt: skip
