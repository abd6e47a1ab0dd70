"""The contract every KD method honours, and the behaviour KD exists for: a student closer to its teacher."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from rcekd.checkpoint import model_from_weights
from rcekd.data import Dataset
from rcekd.kd import DISTILLERS, Teacher, make_distiller
from rcekd.models import MF
from rcekd.train import TrainConfig, train

#: settings scaled to the 60-item tiny dataset (the defaults assume catalogues of thousands)
OPTIONS: dict[str, dict[str, Any]] = {
    "rcekd": {"K": 10, "L": 10, "mxK": 30, "weight": 50.0},
    "ce": {"K": 30, "weight": 50.0},  # K=10 would be mostly training items here
    "cd": {"n_samples": 5, "mxK": 20, "weight": 5.0},
    "rrd": {"K": 10, "L": 20, "mxK": 30, "weight": 0.5},
    "dcd": {"mxK": 30, "n_samples": 10, "weight": 0.5},
    "hetcomp": {"p": 2, "top_k": 20, "n_negatives": 30, "max_positives": 10, "weight": 0.5},
}


@pytest.fixture(scope="module")
def teacher_and_trajectory(tiny_dataset: Dataset) -> tuple[Teacher, list[Teacher]]:
    torch.manual_seed(0)
    model = MF(tiny_dataset.n_users, tiny_dataset.n_items, dim=16, init_std=0.1)
    result = train(
        model, tiny_dataset, TrainConfig(epochs=40, batch_size=64, eval_every=4, patience=100, trajectory_every=10)
    )
    early = [Teacher(model_from_weights(model.config(), state)) for _, state in result.trajectory[:2]]
    teacher = Teacher(model)
    return teacher, [*early, teacher]


def _make(method: str, teacher: Teacher, trajectory: list[Teacher], dataset: Dataset, seed: int = 0):  # type: ignore[no-untyped-def]
    options = dict(OPTIONS[method])
    if method == "hetcomp":
        options["trajectory"] = trajectory
    return make_distiller(method, teacher, dataset, seed=seed, **options)


def _student(dataset: Dataset, seed: int = 0) -> MF:
    torch.manual_seed(seed)
    return MF(dataset.n_users, dataset.n_items, dim=8, init_std=0.1)


def _first_batch_loss(method: str, teacher_and_trajectory, dataset: Dataset, seed: int = 0):  # type: ignore[no-untyped-def]
    teacher, trajectory = teacher_and_trajectory
    student = _student(dataset)
    distiller = _make(method, teacher, trajectory, dataset, seed)
    distiller.on_epoch_start(student, 1)
    batch = next(student.batches(dataset.train, 64, np.random.default_rng(seed)))
    return distiller.loss(batch, student), student, teacher


@pytest.mark.parametrize("method", sorted(DISTILLERS))
class TestDistillerContract:
    def test_loss_is_a_finite_positive_scalar(self, method: str, teacher_and_trajectory, tiny_dataset: Dataset) -> None:
        loss, _, _ = _first_batch_loss(method, teacher_and_trajectory, tiny_dataset)
        assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0

    def test_gradients_reach_the_student_only(self, method: str, teacher_and_trajectory, tiny_dataset: Dataset) -> None:
        loss, student, teacher = _first_batch_loss(method, teacher_and_trajectory, tiny_dataset)
        loss.backward()
        grads = [p.grad for p in student.parameters()]
        assert any(g is not None and (g.coalesce().values() if g.is_sparse else g).abs().sum() > 0 for g in grads)
        assert all(not p.requires_grad and p.grad is None for p in teacher.model.parameters())
        assert not teacher.user_vecs.requires_grad and not teacher.item_vecs.requires_grad

    def test_same_seed_same_loss_other_seed_other_loss(
        self, method: str, teacher_and_trajectory, tiny_dataset: Dataset
    ) -> None:
        first, _, _ = _first_batch_loss(method, teacher_and_trajectory, tiny_dataset, seed=3)
        again, _, _ = _first_batch_loss(method, teacher_and_trajectory, tiny_dataset, seed=3)
        other, _, _ = _first_batch_loss(method, teacher_and_trajectory, tiny_dataset, seed=4)
        assert first.item() == again.item()
        assert first.item() != other.item()

    def test_training_leaves_the_teacher_untouched(
        self, method: str, teacher_and_trajectory, tiny_dataset: Dataset
    ) -> None:
        teacher, trajectory = teacher_and_trajectory
        before = (teacher.user_vecs.clone(), teacher.item_vecs.clone())
        weights_before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
        student = _student(tiny_dataset)
        train(
            student,
            tiny_dataset,
            TrainConfig(epochs=3, batch_size=64, eval_every=3),
            distiller=_make(method, teacher, trajectory, tiny_dataset),
        )
        torch.testing.assert_close(teacher.user_vecs, before[0], rtol=0, atol=0)
        torch.testing.assert_close(teacher.item_vecs, before[1], rtol=0, atol=0)
        for name, tensor in teacher.model.state_dict().items():
            torch.testing.assert_close(tensor, weights_before[name], rtol=0, atol=0)


def _top10_overlap(student: MF, teacher: Teacher, dataset: Dataset) -> float:
    exclude = dataset.csr("train")
    student_top = Teacher(student).topk(10, exclude)
    teacher_top = teacher.topk(10, exclude)
    return float((student_top.unsqueeze(2) == teacher_top.unsqueeze(1)).any(2).float().mean())


def test_every_method_brings_the_student_closer_to_its_teacher(teacher_and_trajectory, tiny_dataset: Dataset) -> None:
    teacher, trajectory = teacher_and_trajectory
    config = TrainConfig(epochs=20, batch_size=64, eval_every=20, patience=100)
    alone = _student(tiny_dataset)
    train(alone, tiny_dataset, config)
    baseline = _top10_overlap(alone, teacher, tiny_dataset)
    overlaps = {}
    for method in sorted(DISTILLERS):
        student = _student(tiny_dataset)
        train(student, tiny_dataset, config, distiller=_make(method, teacher, trajectory, tiny_dataset))
        overlaps[method] = _top10_overlap(student, teacher, tiny_dataset)
    assert all(value > baseline for value in overlaps.values()), (baseline, overlaps)


def test_cd_labels_do_not_depend_on_the_thread_count(
    teacher_and_trajectory, tiny_dataset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch splits an element-wise op among its threads, and each part's tail takes a scalar sigmoid
    that can round differently from the vector one: CD's labels are computed on one thread."""
    teacher, trajectory = teacher_and_trajectory
    threads_seen: list[int] = []
    plain_sigmoid = torch.sigmoid

    def spy(tensor: torch.Tensor) -> torch.Tensor:
        threads_seen.append(torch.get_num_threads())
        return plain_sigmoid(tensor)

    monkeypatch.setattr(torch, "sigmoid", spy)
    threads = torch.get_num_threads()
    labels = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            distiller = _make("cd", teacher, trajectory, tiny_dataset)
            distiller.on_epoch_start(_student(tiny_dataset), 1)
            labels.append(distiller.state["labels"])
    finally:
        torch.set_num_threads(threads)
    assert threads_seen and set(threads_seen) == {1}
    assert torch.equal(labels[0], labels[1])
