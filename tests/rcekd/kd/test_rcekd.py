"""RCE-KD specifics: sampling counts, the sampling distribution, sampled sets, γ at its limits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from rcekd.data import Dataset
from rcekd.kd import Teacher
from rcekd.kd.rcekd import RCEKD, Z_CAP, sampling_counts
from rcekd.kd.sampling import gumbel_topk
from rcekd.models import MF


def brute_force_counts(teacher_top: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    counts = np.zeros(candidates.shape, dtype=np.int64)
    for row in range(candidates.shape[0]):
        teacher_items = set(teacher_top[row].tolist())
        for position in range(candidates.shape[1]):
            below = sum(1 for item in candidates[row, position:] if item in teacher_items)
            counts[row, position] = min(below, Z_CAP)
    return counts


@pytest.mark.parametrize("n_teacher", [5, 80])  # 80 teacher items exercise the cap at 50
def test_sampling_counts_match_brute_force(n_teacher: int) -> None:
    rng = np.random.default_rng(n_teacher)
    candidates = np.stack([rng.permutation(300)[:120] for _ in range(25)])
    teacher_top = np.stack([rng.permutation(300)[:n_teacher] for _ in range(25)])
    got = sampling_counts(torch.from_numpy(teacher_top), torch.from_numpy(candidates)).numpy()
    np.testing.assert_array_equal(got, brute_force_counts(teacher_top, candidates))
    assert got.max() <= Z_CAP


def test_sampled_frequencies_follow_exp_z_over_tau() -> None:
    rng = np.random.default_rng(0)
    candidates = torch.from_numpy(rng.permutation(100)[:40]).repeat(40_000, 1)
    teacher_top = torch.from_numpy(candidates[0, [3, 10, 25, 30, 39]].numpy()).repeat(40_000, 1)
    z = sampling_counts(teacher_top, candidates).float()
    tau_s = 2.0  # a low temperature makes the distribution far from uniform, so the test has power
    generator = torch.Generator().manual_seed(1)
    first_draw = gumbel_topk((z + 1) / tau_s, 1, generator)[:, 0].numpy()
    expected_p = torch.softmax((z[0] + 1) / tau_s, 0).double().numpy()
    expected_p /= expected_p.sum()
    observed = np.bincount(first_draw, minlength=40)
    result = stats.chisquare(observed, expected_p * len(first_draw))
    assert result.pvalue > 1e-3, result
    # and the test can fail: a uniform expectation is rejected
    assert stats.chisquare(observed, np.full(40, len(first_draw) / 40)).pvalue < 1e-6


def test_draws_without_replacement_have_no_duplicates() -> None:
    generator = torch.Generator().manual_seed(0)
    log_weights = torch.randn(500, 60)
    draws = gumbel_topk(log_weights, 30, generator)
    assert all(len(set(row.tolist())) == 30 for row in draws)


def _distiller(dataset: Dataset, teacher_model: MF, **options: object) -> RCEKD:
    return RCEKD(Teacher(teacher_model), dataset, weight=1.0, seed=0, **{"K": 10, "L": 10, "mxK": 30, **options})


def test_sampled_sets_have_no_duplicates_and_exclude_student_top(tiny_dataset: Dataset) -> None:
    torch.manual_seed(0)
    teacher, student = (
        MF(tiny_dataset.n_users, tiny_dataset.n_items, dim=8, init_std=0.5),
        MF(tiny_dataset.n_users, tiny_dataset.n_items, dim=8, init_std=0.5),
    )
    distiller = _distiller(tiny_dataset, teacher)
    distiller.on_epoch_start(student, 1)
    items, valid = distiller.state["a_items"], distiller.state["a_valid"]
    student_top = distiller.state["student_top"]
    for row in range(items.shape[0]):
        chosen = items[row][valid[row]].tolist()
        assert len(chosen) == len(set(chosen))  # A_u is a set
        teacher_rest = set(distiller.teacher_top[row].tolist()) - set(student_top[row].tolist())
        assert teacher_rest <= set(chosen)  # Q_T2 is always in A_u


def test_gamma_is_one_without_overlap_and_exp_minus_beta_with_full_overlap(tiny_dataset: Dataset) -> None:
    torch.manual_seed(0)
    student = MF(tiny_dataset.n_users, tiny_dataset.n_items, dim=8, init_std=0.5)
    beta = 3.0

    same = _distiller(tiny_dataset, student, beta=beta)  # teacher == student: Q_T == Q_S
    same.on_epoch_start(student, 1)
    torch.testing.assert_close(same.state["gamma"], torch.full((tiny_dataset.n_users,), math.exp(-beta)))

    opposite = MF(tiny_dataset.n_users, tiny_dataset.n_items, dim=8)
    opposite.load_state_dict(
        {"user_emb.weight": -student.user_emb.weight.detach(), "item_emb.weight": student.item_emb.weight.detach()}
    )
    reverse = _distiller(tiny_dataset, opposite, beta=beta)  # teacher's top = student's bottom
    reverse.on_epoch_start(student, 1)
    torch.testing.assert_close(reverse.state["gamma"], torch.ones(tiny_dataset.n_users))


def test_reference_gamma_uses_the_sampled_overlap(tiny_dataset: Dataset) -> None:
    torch.manual_seed(0)
    student = MF(tiny_dataset.n_users, tiny_dataset.n_items, dim=8, init_std=0.5)
    # L = mxK: every candidate is sampled, so every teacher item the student lists is in the sample
    distiller = _distiller(tiny_dataset, student, gamma_mode="sampled", L=30, beta=2.0)
    distiller.on_epoch_start(student, 1)
    torch.testing.assert_close(distiller.state["gamma"], torch.full((tiny_dataset.n_users,), math.exp(-2.0)))


@pytest.mark.parametrize("ablation", ["none", "wo_sep", "wo_s", "wo_sampling", "const_gamma"])
def test_every_ablation_gives_a_finite_loss_with_student_gradients(tiny_dataset: Dataset, ablation: str) -> None:
    torch.manual_seed(0)
    teacher = MF(tiny_dataset.n_users, tiny_dataset.n_items, dim=8, init_std=0.5)
    student = MF(tiny_dataset.n_users, tiny_dataset.n_items, dim=4, init_std=0.1)
    distiller = _distiller(tiny_dataset, teacher, ablation=ablation)
    distiller.on_epoch_start(student, 1)
    batch = next(student.batches(tiny_dataset.train, 32, np.random.default_rng(0)))
    loss = distiller.loss(batch, student)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert student.user_emb.weight.grad is not None
    if ablation == "const_gamma":
        assert torch.all(distiller.state["gamma"] == 0.5)


def test_invalid_settings_are_refused(tiny_dataset: Dataset) -> None:
    teacher = MF(tiny_dataset.n_users, tiny_dataset.n_items, dim=4)
    with pytest.raises(ValueError, match="mxK"):
        _distiller(tiny_dataset, teacher, K=40, mxK=20)
    with pytest.raises(ValueError, match="ablation"):
        _distiller(tiny_dataset, teacher, ablation="wo_everything")
