"""The fast paths compute what the plain ones do: top-k, gathered scores, and RCE-KD's sets and loss."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import rcekd.kd.base as base
from rcekd.data import Dataset
from rcekd.kd import Teacher
from rcekd.kd.base import (
    gathered_scores,
    rowwise_isin,
    rowwise_positions,
    soft_cross_entropy,
    sorted_positions,
    student_vectors,
    teacher_scores,
    topk_items,
)
from rcekd.kd.rcekd import RCEKD, Z_CAP
from rcekd.kd.sampling import gumbel_topk
from rcekd.models import MF


def reference_topk(user_vecs: torch.Tensor, item_vecs: torch.Tensor, k: int, exclude: sp.csr_matrix | None = None):
    """(ids, scores): matmul over all items, −∞ on excluded pairs, torch.topk — the plain definition."""
    scores = user_vecs @ item_vecs.T
    if exclude is not None:
        coo = exclude.tocoo()
        scores[torch.from_numpy(coo.row.astype(np.int64)), torch.from_numpy(coo.col.astype(np.int64))] = -torch.inf
    return scores.topk(k, dim=1).indices, scores


def assert_same_ranking(got: torch.Tensor, expected: torch.Tensor, scores: torch.Tensor) -> None:
    """The same lists up to the order of (nearly) tied scores: position by position the same scores."""
    assert got.shape == expected.shape
    assert all(len(set(row.tolist())) == got.shape[1] for row in got)  # no item twice
    torch.testing.assert_close(scores.gather(1, got), scores.gather(1, expected), rtol=0, atol=1e-5)
    assert (got == expected).float().mean() > 0.99  # random scores: ties are rare


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of 4 × 16 items and chunks of 5 users, so small catalogues take the tiled path."""
    monkeypatch.setattr(base, "TOPK_USERS", 5)
    monkeypatch.setattr(base, "TOPK_GROUP", 4)
    monkeypatch.setattr(base, "TOPK_TILE_GROUPS", 16)


@pytest.mark.parametrize("with_exclude", [False, True])
@pytest.mark.parametrize("k", [3, 20, 60])  # 3 and 20 use the supergroup level, 60 does not
def test_tiled_topk_equals_matmul_topk(small_tiles: None, with_exclude: bool, k: int) -> None:
    torch.manual_seed(k)
    user_vecs, item_vecs = torch.randn(23, 6), torch.randn(1000, 6)  # 15 full tiles and 40 items after them
    exclude = sp.random(23, 1000, density=0.05, format="csr", random_state=k) if with_exclude else None
    expected, scores = reference_topk(user_vecs, item_vecs, k, exclude)
    got = topk_items(user_vecs, item_vecs, k, exclude)
    assert_same_ranking(got, expected, scores)
    if exclude is not None:
        assert not exclude.toarray()[np.arange(23)[:, None], got.numpy()].any()


def test_tiled_topk_on_a_gowalla_sized_catalogue() -> None:
    """The default tiles (the path Gowalla's 41k items take), student- and teacher-sized vectors."""
    torch.manual_seed(0)
    for dim, k in [(20, 200), (300, 50)]:
        user_vecs, item_vecs = torch.randn(70, dim), torch.randn(40_981, dim)
        expected, scores = reference_topk(user_vecs, item_vecs, k)
        assert_same_ranking(topk_items(user_vecs, item_vecs, k), expected, scores)


def test_topk_keeps_excluded_items_last_when_too_few_remain(small_tiles: None) -> None:
    torch.manual_seed(0)
    user_vecs, item_vecs = torch.randn(4, 3), torch.randn(200, 3)
    allowed = np.arange(10)  # user 0 may only rank 10 items
    exclude = sp.lil_matrix((4, 200), dtype=np.float32)
    exclude[0, np.setdiff1d(np.arange(200), allowed)] = 1
    got = topk_items(user_vecs, item_vecs, 12, exclude.tocsr())
    assert set(got[0, :10].tolist()) == set(allowed.tolist())


@pytest.mark.parametrize("find", [rowwise_positions, sorted_positions])
def test_rowwise_positions_match_brute_force(find) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    pool = torch.from_numpy(np.stack([rng.permutation(300)[:40] for _ in range(30)]))
    values = torch.from_numpy(np.stack([rng.permutation(300)[:25] for _ in range(30)]))
    got = find(values, pool)
    for row in range(30):
        where = {item: col for col, item in enumerate(pool[row].tolist())}
        assert got[row].tolist() == [where.get(item, 40) for item in values[row].tolist()]


def test_positions_kernel_keeps_the_first_column_of_a_repeated_id_and_refuses_negative_ids() -> None:
    pool = torch.tensor([[4, 9, 4, 1], [2, 2, 2, 2]])
    values = torch.tensor([[4, 1, 7], [2, 9, 0]])
    assert rowwise_positions(values, pool).tolist() == [[0, 3, 4], [0, 4, 4]]
    with pytest.raises(IndexError):
        rowwise_positions(torch.tensor([[-1]]), pool[:1])


@pytest.mark.parametrize("width", [1, 7])
def test_gathered_scores_gradients(width: int) -> None:
    torch.manual_seed(width)
    user_vecs = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    item_vecs = torch.randn(13, 4, dtype=torch.float64, requires_grad=True)
    items = torch.randint(0, 13, (9, width))
    items[0] = 5  # a row that repeats one item: each entry counts on its own
    assert torch.autograd.gradcheck(lambda u, i: gathered_scores(u, i, items), (user_vecs, item_vecs))


def test_gathered_scores_equal_the_einsum() -> None:
    torch.manual_seed(0)
    items = torch.randint(0, 500, (64, 150))
    grads = torch.randn(64, 150)
    results = []
    for fast in (True, False):
        user_vecs = torch.randn(64, 20, generator=torch.Generator().manual_seed(1)).requires_grad_()
        item_vecs = torch.randn(500, 20, generator=torch.Generator().manual_seed(2)).requires_grad_()
        if fast:
            scores = gathered_scores(user_vecs, item_vecs, items)
        else:
            scores = torch.einsum("bd,bkd->bk", user_vecs, item_vecs[items])
        scores.backward(grads)
        results.append((scores.detach(), user_vecs.grad, item_vecs.grad))
    for fast, plain in zip(*results, strict=True):
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)


def test_teacher_scores_equal_teacher_score(tiny_dataset: Dataset) -> None:
    torch.manual_seed(0)
    teacher = Teacher(MF(tiny_dataset.n_users, tiny_dataset.n_items, dim=16, init_std=0.5), logit_scale=3.0)
    users = torch.arange(tiny_dataset.n_users)
    items = torch.randint(0, tiny_dataset.n_items, (tiny_dataset.n_users, 12))
    torch.testing.assert_close(teacher_scores(teacher, users, items), teacher.score(users, items))


# ------------------------------------------------------------------ RCE-KD against the plain algorithm
def reference_plan(distiller: RCEKD, student: MF, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The sets as the first version computed them: broadcast isin, teacher logits per set (one chunk)."""
    d = distiller
    user_vecs, item_vecs = student_vectors(student)
    candidates = topk_items(user_vecs, item_vecs, d.mxK)
    teacher_top, student_top = d.teacher_top, candidates[:, : d.K]
    in_student_top = rowwise_isin(teacher_top, student_top)
    z = rowwise_isin(candidates, teacher_top).flip(1).cumsum(1).flip(1).clamp(max=Z_CAP).float()
    sampled = candidates.gather(1, gumbel_topk((z + 1) / d.tau_s, d.L, generator))
    in_sampled = rowwise_isin(teacher_top, sampled)
    overlap = (in_student_top if d.gamma_mode == "paper" else in_sampled).float().mean(1)
    return {
        "student_top": student_top,
        "a_items": torch.cat([sampled, teacher_top], 1),
        "a_valid": torch.cat([torch.ones_like(sampled, dtype=torch.bool), ~(in_student_top | in_sampled)], 1),
        "gamma": torch.exp(-d.beta * overlap),
    }


def reference_loss(distiller: RCEKD, users: torch.Tensor, counts: torch.Tensor, student: MF) -> torch.Tensor:
    """λ Σ_u count_u [(1−γ_u) CE(Q_S) + γ_u CE(A_u)] with teacher.score, student.score, soft_cross_entropy."""
    d, s, tau = distiller, distiller.state, distiller.tau
    top, a_items, a_valid = s["student_top"][users], s["a_items"][users], s["a_valid"][users]
    l1 = soft_cross_entropy(
        d.teacher.score(users, top) / tau, student.score(users, top) / tau, torch.ones_like(top, dtype=torch.bool)
    )
    l2 = soft_cross_entropy(d.teacher.score(users, a_items) / tau, student.score(users, a_items) / tau, a_valid)
    gamma = s["gamma"][users]
    return d.weight * (((1 - gamma) * l1 + gamma * l2) * counts).sum()


@pytest.mark.parametrize(
    ("gamma_mode", "tau", "sparse"), [("paper", 1.0, False), ("sampled", 2.0, False), ("paper", 1.0, True)]
)
def test_rcekd_sets_loss_and_gradients_match_the_plain_algorithm(
    tiny_dataset: Dataset, gamma_mode: str, tau: float, sparse: bool
) -> None:
    torch.manual_seed(0)
    teacher = MF(tiny_dataset.n_users, tiny_dataset.n_items, dim=16, init_std=0.5)
    student = MF(tiny_dataset.n_users, tiny_dataset.n_items, dim=8, init_std=0.3, sparse=sparse)
    distiller = RCEKD(
        Teacher(teacher), tiny_dataset, weight=7.0, seed=3, K=10, L=12, mxK=30, tau=tau, gamma_mode=gamma_mode
    )
    expected_sets = reference_plan(distiller, student, torch.Generator().manual_seed(3))
    distiller.on_epoch_start(student, 1)
    for name, expected in expected_sets.items():  # the same draws from the same seed
        torch.testing.assert_close(distiller.state[name], expected, msg=name)

    batch = next(student.batches(tiny_dataset.train, 64, np.random.default_rng(0)))
    users, counts = torch.unique(student.batch_users(batch), return_counts=True)
    losses, grads = [], []
    for compute in (lambda: distiller.loss(batch, student), lambda: reference_loss(distiller, users, counts, student)):
        student.zero_grad(set_to_none=True)
        loss = compute()
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.to_dense() for p in student.parameters()])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
    for fast, plain in zip(*grads, strict=True):
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
