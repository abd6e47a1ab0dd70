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
    Distiller,
    gathered_scores,
    rowwise_isin,
    rowwise_positions,
    soft_cross_entropy,
    sorted_positions,
    student_vectors,
    teacher_scores,
)
from rcekd.kd.ce import VanillaCE
from rcekd.kd.rcekd import RCEKD, Z_CAP
from rcekd.kd.sampling import gumbel_topk
from rcekd.kd.topk import TOPK_GROUP, group_maxima, row_topk, topk_items
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
    finite = scores.gather(1, expected).isfinite()  # excluded items (−∞) tie with each other
    assert (got == expected)[finite].float().mean() > 0.99  # random scores: other ties are rare


@pytest.mark.parametrize("with_exclude", [False, True])
@pytest.mark.parametrize("k", [1, 3, 20, 60, 1000])  # 1000: every item, −∞ ones included
def test_compiled_topk_equals_matmul_topk(with_exclude: bool, k: int) -> None:
    torch.manual_seed(k)
    user_vecs, item_vecs = torch.randn(23, 6), torch.randn(1000, 6)  # 1000 = 62 groups of 16 and 8 more
    exclude = sp.random(23, 1000, density=0.05, format="csr", random_state=k) if with_exclude else None
    expected, scores = reference_topk(user_vecs, item_vecs, k, exclude)
    got = topk_items(user_vecs, item_vecs, k, exclude)
    assert_same_ranking(got, expected, scores)
    if exclude is not None and k < 900:
        assert not exclude.toarray()[np.arange(23)[:, None], got.numpy()].any()


def test_compiled_topk_on_a_gowalla_sized_catalogue() -> None:
    """Gowalla's 41k items, student- and teacher-sized vectors, float32 and float64."""
    torch.manual_seed(0)
    for dim, k, dtype in [(20, 200, torch.float32), (300, 50, torch.float32), (20, 100, torch.float64)]:
        user_vecs, item_vecs = torch.randn(40, dim, dtype=dtype), torch.randn(40_981, dim, dtype=dtype)
        expected, scores = reference_topk(user_vecs, item_vecs, k)
        assert_same_ranking(topk_items(user_vecs, item_vecs, k), expected, scores)


def test_topk_exclude_is_checked_and_any_sparse_format_ranks_alike() -> None:
    """An exclusion matrix of the wrong shape is refused (its rows would be read off the CSR arrays
    unchecked); COO and CSR give the same ranking, with no excluded item in it."""
    torch.manual_seed(5)
    user_vecs, item_vecs = torch.randn(37, 6), torch.randn(300, 6)
    exclude = sp.random(37, 300, density=0.1, format="coo", random_state=5)
    from_coo = topk_items(user_vecs, item_vecs, 25, exclude)
    assert torch.equal(from_coo, topk_items(user_vecs, item_vecs, 25, exclude.tocsr()))
    assert not exclude.toarray()[np.arange(37)[:, None], from_coo.numpy()].any()
    with pytest.raises(ValueError, match="users × items"):
        topk_items(user_vecs, item_vecs, 25, exclude.tocsr()[:36])


def test_topk_keeps_excluded_items_last_when_too_few_remain() -> None:
    torch.manual_seed(0)
    user_vecs, item_vecs = torch.randn(4, 3), torch.randn(200, 3)
    allowed = np.arange(10)  # user 0 may only rank 10 items
    exclude = sp.lil_matrix((4, 200), dtype=np.float32)
    exclude[0, np.setdiff1d(np.arange(200), allowed)] = 1
    got = topk_items(user_vecs, item_vecs, 12, exclude.tocsr())
    assert set(got[0, :10].tolist()) == set(allowed.tolist())


def test_topk_ties_come_out_in_a_fixed_order() -> None:
    """Equal scores (e.g. a model at its initial zeros) rank the same way run after run."""
    user_vecs, item_vecs = torch.ones(3, 4), torch.ones(500, 4)
    first = topk_items(user_vecs, item_vecs, 50)
    assert len(set(first[0].tolist())) == 50
    assert torch.equal(first, topk_items(user_vecs, item_vecs, 50))


@pytest.mark.parametrize("with_exclude", [False, True])
@pytest.mark.parametrize("hint_from", ["last_epoch", "random", "repeats"])
def test_hinted_topk_equals_matmul_topk(with_exclude: bool, hint_from: str) -> None:
    """Any hint gives the exact ranking: a close one (last epoch's), a loose one (random items: the
    group maxima tighten it) and one of repeated ids (fewer than k: no help, no harm)."""
    torch.manual_seed(1)
    user_vecs, item_vecs, k = torch.randn(40, 8), torch.randn(6000, 8), 30
    exclude = sp.random(40, 6000, density=0.05, format="csr", random_state=2) if with_exclude else None
    if hint_from == "last_epoch":
        hint = topk_items(user_vecs + 0.05 * torch.randn(40, 8), item_vecs, 50, exclude)
    elif hint_from == "random":
        hint = torch.stack([torch.randperm(6000)[:k] for _ in range(40)])
    else:
        hint = torch.zeros(40, k, dtype=torch.int64)
    expected, scores = reference_topk(user_vecs, item_vecs, k, exclude)
    got = topk_items(user_vecs, item_vecs, k, exclude, hint=hint)
    assert_same_ranking(got, expected, scores)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 40, 255, 1000, 40_981])
def test_group_maxima_are_each_strided_groups_maximum(n: int) -> None:
    """Group g holds columns g, g + n_groups, …: its maximum, short last groups and NaN members included."""
    rng = np.random.default_rng(n)
    row = rng.normal(size=n).astype(np.float32)
    row[rng.random(n) < 0.05] = np.nan
    n_groups = -(-n // TOPK_GROUP)
    maxima = np.full(n_groups, 7.0, dtype=np.float32)
    group_maxima(row, n_groups, maxima)
    padded = np.full(n_groups * TOPK_GROUP, -np.inf, dtype=np.float32)
    padded[:n] = np.nan_to_num(row, nan=-np.inf)
    assert np.array_equal(maxima, padded.reshape(TOPK_GROUP, n_groups).max(0))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_group_maxima_keep_the_first_of_equal_members(dtype: type) -> None:
    """The same bits as a member-by-member scan in column order: of +0 and −0, the first one seen."""
    rng = np.random.default_rng(3)
    n = 16 * 70 + 5
    row = rng.choice(np.array([0.0, -0.0, -1.0, np.nan], dtype=dtype), size=n)
    n_groups = -(-n // TOPK_GROUP)
    maxima = np.empty(n_groups, dtype=dtype)
    group_maxima(row, n_groups, maxima)
    expected = np.full(n_groups, -np.inf, dtype=dtype)
    for i, value in enumerate(row):
        if value > expected[i % n_groups]:
            expected[i % n_groups] = value
    assert maxima.tobytes() == expected.tobytes()


@pytest.mark.parametrize("k", [5, 300, 500])
def test_topk_ranks_nan_scores_last(k: int) -> None:
    """A diverged model's NaN scores neither crash the ranking nor push finite scores out: the finite
    ones come first, best first, then the NaN ones (formerly a row with NaN could read out of bounds)."""
    torch.manual_seed(0)
    scores = torch.randn(4, 500)
    scores[0, ::2] = torch.nan  # half
    scores[1] = torch.nan  # all
    scores[2, 7] = torch.nan  # one
    scores[3, :16] = torch.nan  # a whole group's worth
    out = torch.empty(4, k, dtype=torch.int64)
    row_topk(scores, k, out)
    for row, ids in zip(scores, out, strict=True):
        assert len(set(ids.tolist())) == k
        finite = row[~row.isnan()]
        ranked = row[ids]
        n_finite = min(k, len(finite))
        assert torch.equal(ranked[:n_finite], finite.sort(descending=True).values[:n_finite])
        assert ranked[n_finite:].isnan().all()


def test_topk_is_exact_with_and_without_tied_top_scores() -> None:
    """Rows with tied top scores take the argsort path, rows without the integer sort: both give the
    best scores in order; without ties the one possible order, with ties the same order for a row
    ranked alone as in a batch."""
    torch.manual_seed(3)
    scores = torch.randint(-3, 4, (6, 700)).float()  # seven values: ties everywhere
    scores[3:] = torch.randn(3, 700)  # continuous: no ties
    out = torch.empty(6, 40, dtype=torch.int64)
    row_topk(scores, 40, out)
    for row, ids in zip(scores, out, strict=True):
        assert len(set(ids.tolist())) == 40
        assert torch.equal(row[ids], row.sort(descending=True).values[:40])
    assert torch.equal(out[3:], scores[3:].topk(40, dim=1).indices)
    for r in range(3):
        alone = torch.empty(1, 40, dtype=torch.int64)
        row_topk(scores[r : r + 1].clone(), 40, alone)
        assert torch.equal(alone[0], out[r])


def test_row_topk_checks_its_inputs() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.4, 0.2, 0.6, 0.8]])
    out = torch.full((2, 2), -1, dtype=torch.int64)
    row_topk(scores, 2, out, torch.tensor([[2, 3], [2, 3]]))
    assert out.tolist() == [[1, 2], [3, 2]]
    with pytest.raises(IndexError):
        row_topk(scores, 2, out, torch.tensor([[0, 4], [0, 1]]))
    with pytest.raises(ValueError):
        row_topk(scores, 5, torch.empty(2, 5, dtype=torch.int64))  # k over the columns
    with pytest.raises(TypeError):
        row_topk(scores, 2, out, torch.tensor([[0, 1], [0, 1]], dtype=torch.int32))
    with pytest.raises(ValueError):
        row_topk(scores, 2, torch.empty(2, 4, dtype=torch.int64)[:, :2])  # not contiguous


def test_distillers_hint_each_epoch_with_the_last_ranking(
    monkeypatch: pytest.MonkeyPatch, tiny_dataset: Dataset
) -> None:
    """RCE-KD ranks the student once per epoch, from the second epoch on with last epoch's list."""
    calls: list[torch.Tensor | None] = []
    plain = base.topk_items

    def spy(*args, hint=None, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(hint)
        return plain(*args, hint=hint, **kwargs)

    dataset = tiny_dataset
    teacher = Teacher(MF(dataset.n_users, dataset.n_items, dim=16, init_std=0.5))
    distiller = RCEKD(teacher, dataset, K=5, L=5, mxK=20)
    monkeypatch.setattr(base, "topk_items", spy)
    student = MF(dataset.n_users, dataset.n_items, dim=8)
    distiller.on_epoch_start(student, 1)
    first = distiller.state["items"].clone()
    distiller.on_epoch_start(student, 2)
    assert calls[0] is None and calls[1] is not None and calls[1].shape == (dataset.n_users, 20)
    torch.testing.assert_close(distiller.state["items"][:, :5], first[:, :5])  # same student: same Q_S


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


@pytest.mark.parametrize("ablation", ["none", "wo_sep", "wo_s", "wo_sampling", "const_gamma", "vanilla_ce"])
def test_fused_loss_equals_its_per_user_terms(tiny_dataset: Dataset, ablation: str) -> None:
    """The compiled path (RCE-KD's and vanilla CE's ``loss``) and the torch one (the base class's sum
    of ``user_loss``): same value and same gradients, for every RCE-KD ablation and for CE."""
    torch.manual_seed(1)
    teacher = Teacher(MF(tiny_dataset.n_users, tiny_dataset.n_items, dim=16, init_std=0.5))
    student = MF(tiny_dataset.n_users, tiny_dataset.n_items, dim=8, init_std=0.3)
    if ablation == "vanilla_ce":
        distiller: Distiller = VanillaCE(teacher, tiny_dataset, weight=5.0, K=8, tau=1.5)
    else:
        distiller = RCEKD(teacher, tiny_dataset, weight=5.0, K=8, L=10, mxK=25, tau=1.5, ablation=ablation)
    distiller.on_epoch_start(student, 1)
    batch = next(student.batches(tiny_dataset.train, 64, np.random.default_rng(1)))
    results = []
    for compute in (distiller.loss, lambda b, s: Distiller.loss(distiller, b, s)):
        student.zero_grad(set_to_none=True)
        loss = compute(batch, student)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    (fused, fused_grads), (plain, plain_grads) = results
    assert plain > 0
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    for got, expected in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
