"""Evaluation protocol: joint / per-task / avg accuracy on hand-made embeddings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mudsc.errors import MudscError
from mudsc.evaluate import Report, embed, evaluate, evaluate_embeddings
from mudsc.models.head import ClassEmbeddingHead

TASKS = [[0, 1], [2, 3]]


@pytest.fixture
def head() -> ClassEmbeddingHead:
    """Class c is the unit vector e_c, so cos(x, class c) = x_c / |x|. Class 4 is in no task."""
    return ClassEmbeddingHead(torch.eye(5))


def expect(joint: float, per_task: tuple[float, ...], avg: float, n_images: int):
    """A Report compared with float32 tolerance (accuracies are means of float32 tensors)."""
    tol = {"abs": 1e-6}
    return Report(pytest.approx(joint, **tol), pytest.approx(per_task, **tol),
                  pytest.approx(avg, **tol), n_images)  # fmt: skip


def unit(*coords: float) -> list[float]:
    """Five coordinates: the four given, then a filler making the vector unit-length."""
    return [*coords, math.sqrt(1.0 - sum(c * c for c in coords))]


def test_single_model_joint_per_task_avg(head) -> None:
    labels = torch.tensor([0, 1, 2, 3, 0, 2, 4])
    emb = torch.tensor(
        [
            [1.0, 0.5, 0.0, 0.0, 0.0],  # 0: joint 0 ok,  task0 0 ok
            [0.0, 0.2, 0.9, 0.0, 0.0],  # 1: joint 2 bad, task0 1 ok
            [0.0, 0.0, 0.3, 0.8, 0.0],  # 2: joint 3 bad, task1 3 bad
            [0.0, 0.0, 0.0, 1.0, 0.0],  # 3: joint 3 ok,  task1 3 ok
            [0.1, 0.9, 0.0, 0.0, 0.0],  # 0: joint 1 bad, task0 1 bad
            [0.0, 0.0, 1.0, 0.1, 0.0],  # 2: joint 2 ok,  task1 2 ok
            [9.0, 0.0, 0.0, 0.0, 9.0],  # class 4 is in no task: not counted
        ]
    )
    report = evaluate_embeddings([emb], labels, TASKS, head)
    assert report == expect(3 / 6, (2 / 3, 2 / 3), 2 / 3, 6)
    # The class-4 image is dropped, and class 4 is never predicted (argmax over the union).
    assert report.to_dict() == {
        "joint": 0.5,
        "per_task": pytest.approx([2 / 3, 2 / 3], abs=1e-6),
        "avg": pytest.approx(2 / 3, abs=1e-6),
        "n_images": 6,
    }


def test_ensemble_most_confident_model_wins_joint(head) -> None:
    """Model A is the expert of task 0, B of task 1; two-class softmax(100 cos) confidence is
    sigmoid(100 * margin), so the model with the larger cosine margin wins the joint vote."""
    labels = torch.tensor([0, 1, 2, 3])
    a = torch.tensor(
        [
            unit(0.50, 0.48, 0, 0),  # predicts 0, margin .02
            unit(0.40, 0.41, 0, 0),  # predicts 1, margin .01
            unit(0.45, 0.42, 0, 0),  # predicts 0, margin .03
            unit(0.20, 0.21, 0, 0),  # predicts 1, margin .01
        ]
    )
    b = torch.tensor(
        [
            unit(0, 0, 0.30, 0.29),  # predicts 2, margin .01 -> A wins: 0, right
            unit(0, 0, 0.33, 0.30),  # predicts 2, margin .03 -> B wins: 2, wrong
            unit(0, 0, 0.51, 0.50),  # predicts 2, margin .01 -> A wins: 0, wrong
            unit(0, 0, 0.30, 0.33),  # predicts 3, margin .03 -> B wins: 3, right
        ]
    )
    report = evaluate_embeddings([a, b], labels, TASKS, head)
    # Per task, each expert scores its own task's images: A gets 0 and 1 right, B 2 and 3.
    assert report == expect(0.5, (1.0, 1.0), 1.0, 4)
    # Model m is the expert of tasks[m]: a near-tie by B on image 1 would lose to A at 0.02.
    b_unsure = b.clone()
    b_unsure[1] = torch.tensor(unit(0, 0, 0.300, 0.295))  # margin .005 < A's .01: A says 1
    assert evaluate_embeddings([a, b_unsure], labels, TASKS, head).joint == 0.75


def test_one_task_in_any_class_order(head) -> None:
    labels = torch.tensor([0, 1, 1, 0])
    emb = torch.tensor([unit(0.9, 0.1, 0, 0), unit(0.2, 0.7, 0, 0), unit(0.6, 0.5, 0, 0),
                        unit(0.1, 0.3, 0, 0)])  # fmt: skip
    report = evaluate_embeddings([emb], labels, [[1, 0]], head)  # class order must not matter
    assert report == expect(0.5, (0.5,), 0.5, 4)


def test_evaluate_runs_models_then_scores(head) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 5))
    images = torch.randn(23, 1, 2, 2)
    labels = torch.randint(0, 4, (23,))
    expected = evaluate_embeddings([model(images.flatten(1)).detach()], labels, TASKS, head)
    assert evaluate(model, images, labels, TASKS, head, batch_size=5) == expected
    other = nn.Sequential(nn.Flatten(), nn.Linear(4, 5))
    pair = evaluate([model, other], images, labels, TASKS, head, batch_size=7)
    emb = [m(images.flatten(1)).detach() for m in (model, other)]
    assert pair == evaluate_embeddings(emb, labels, TASKS, head)


def test_embed_batches_in_eval_mode_and_restores_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.Dropout(0.5))
    model.train()
    images = torch.randn(10, 1, 2, 2)
    out = embed(model, images, batch_size=3, device="cpu")
    assert model.training  # mode handed back as found
    model.eval()
    assert torch.allclose(out, model(images), atol=1e-6)  # dropout was off inside embed
    assert out.shape == (10, 3) and out.dtype == torch.float32


@pytest.mark.parametrize(
    "tasks,words",
    [
        ([[0, 1], [1, 2]], "overlap"),
        ([[0, 7]], "out of range"),
        ([[0, -1]], "out of range"),
        ([], "at least one"),
        ([[0, 1], []], "at least one"),
    ],
)
def test_bad_tasks_are_user_errors(head, tasks, words: str) -> None:
    emb = torch.eye(5)[:4]
    with pytest.raises(MudscError, match=words):
        evaluate_embeddings([emb], torch.tensor([0, 1, 2, 3]), tasks, head)


def test_other_user_errors(head) -> None:
    emb = torch.eye(5)[:4]
    labels = torch.tensor([0, 1, 2, 3])
    with pytest.raises(MudscError, match="one task per model"):
        evaluate_embeddings([emb, emb], labels, [[0], [1], [2]], head)
    with pytest.raises(MudscError, match="no test images"):
        evaluate_embeddings([emb], labels, [[4]], head)
    with pytest.raises(MudscError, match="task 1"):
        evaluate_embeddings([emb[:2]], labels[:2], [[0, 1], [2, 4]], head)
    with pytest.raises(MudscError, match="at least one model"):
        evaluate([], torch.zeros(1, 1, 2, 2), labels[:1], [[0]], head)
