"""Full-ranking metrics against a slow, obviously-correct reference (METHOD.md §5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import rcekd.metrics
from rcekd.data import Dataset, Interactions
from rcekd.metrics import (
    evaluate_model,
    evaluated_users,
    mask_matrix,
    metrics_of_top,
    paired_t_test,
    ranking_metrics,
)

N_USERS, N_ITEMS = 37, 50


@pytest.fixture(scope="module")
def random_dataset() -> Dataset:
    """Disjoint train/valid/test per user; some users have an empty valid or test split (or both), some
    more than 10 held-out items (where Recall@10's |gt| and NDCG's min(|gt|, K) matter)."""
    rng = np.random.default_rng(7)
    rows: dict[str, dict[int, np.ndarray]] = {"train": {}, "valid": {}, "test": {}}
    for user in range(N_USERS):
        sizes = (int(rng.integers(1, 21)), int(rng.integers(0, 14)), int(rng.integers(0, 14)))
        if user % 9 == 0:
            sizes = (sizes[0], 0, sizes[2])
        if user % 11 == 0:
            sizes = (sizes[0], sizes[1], 0)
        items = rng.permutation(N_ITEMS)
        bounds = np.cumsum(sizes)
        rows["train"][user] = items[: bounds[0]]
        rows["valid"][user] = items[bounds[0] : bounds[1]]
        rows["test"][user] = items[bounds[1] : bounds[2]]
    parts = {split: Interactions.from_rows(r, N_USERS) for split, r in rows.items()}
    return Dataset("random", N_USERS, N_ITEMS, parts["train"], parts["valid"], parts["test"])


@pytest.fixture(scope="module")
def random_scores() -> torch.Tensor:
    """Each row a permutation of 0..n_items-1: no ties, so the ranking is unambiguous."""
    generator = torch.Generator().manual_seed(3)
    return torch.stack([torch.randperm(N_ITEMS, generator=generator) for _ in range(N_USERS)]).float()


def user_items(dataset: Dataset, split: str, user: int) -> set[int]:
    part = dataset.split(split)
    return set(part.items[part.indptr[user] : part.indptr[user + 1]].tolist())


def reference_metrics(
    scores: torch.Tensor, dataset: Dataset, split: str, protocol: str, k: int
) -> tuple[list[int], list[float], list[float]]:
    """(users, recall@k, ndcg@k), one user at a time, straight from the definitions."""
    other = "test" if split == "valid" else "valid"
    users, recalls, ndcgs = [], [], []
    for user in range(dataset.n_users):
        truth = user_items(dataset, split, user)
        if not truth:
            continue
        masked = user_items(dataset, "train", user)
        if protocol == "strict":
            masked |= user_items(dataset, other, user)
        candidates = [item for item in range(dataset.n_items) if item not in masked]
        ranked = sorted(candidates, key=lambda item: -float(scores[user, item]))[:k]
        hits = [item in truth for item in ranked]
        dcg = sum(1 / math.log2(rank + 2) for rank, hit in enumerate(hits) if hit)
        idcg = sum(1 / math.log2(rank + 2) for rank in range(min(len(truth), k)))
        users.append(user)
        recalls.append(sum(hits) / len(truth))
        ndcgs.append(dcg / idcg)
    return users, recalls, ndcgs


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> int:
    """Chunks of 6 users, so a 37-user evaluation runs in several chunks (and a ragged last one)."""
    monkeypatch.setattr(rcekd.metrics, "CHUNK_SCORES", 6 * N_ITEMS)
    return 6


@pytest.mark.parametrize("protocol", ["strict", "paper"])
@pytest.mark.parametrize("split", ["valid", "test"])
def test_ranking_metrics_match_the_brute_force_reference(
    random_dataset: Dataset, random_scores: torch.Tensor, small_chunks: int, split: str, protocol: str
) -> None:
    calls: list[int] = []

    def score_fn(users: torch.Tensor) -> torch.Tensor:
        calls.append(len(users))
        return random_scores[users].clone()

    result = ranking_metrics(score_fn, random_dataset, split, protocol, ks=(10, 20))
    lengths = random_dataset.split(split).lengths()
    assert (lengths > 10).any() and (lengths == 0).any()
    evaluated = int((lengths > 0).sum())
    assert calls == [min(small_chunks, evaluated - start) for start in range(0, evaluated, small_chunks)]
    assert len(calls) >= 3
    for k in (10, 20):
        _, recalls, ndcgs = reference_metrics(random_scores, random_dataset, split, protocol, k)
        assert result[f"recall@{k}"] == pytest.approx(np.mean(recalls), abs=1e-9)
        assert result[f"ndcg@{k}"] == pytest.approx(np.mean(ndcgs), abs=1e-9)


def test_chunk_size_does_not_change_the_result(
    random_dataset: Dataset, random_scores: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = ranking_metrics(lambda users: random_scores[users].clone(), random_dataset)
    monkeypatch.setattr(rcekd.metrics, "CHUNK_SCORES", 1)  # one user per chunk
    chunked = ranking_metrics(lambda users: random_scores[users].clone(), random_dataset)
    assert chunked == pytest.approx(whole, abs=1e-12)


def test_protocols_differ_on_this_data(random_dataset: Dataset, random_scores: torch.Tensor) -> None:
    """Guards the reference comparison: strict and paper are not accidentally the same computation."""
    strict = ranking_metrics(lambda users: random_scores[users].clone(), random_dataset, "test", "strict")
    paper = ranking_metrics(lambda users: random_scores[users].clone(), random_dataset, "test", "paper")
    assert strict != paper


@pytest.mark.parametrize("split", ["valid", "test"])
def test_per_user_values_match_the_reference_and_skip_empty_users(
    random_dataset: Dataset, random_scores: torch.Tensor, small_chunks: int, split: str
) -> None:
    result = ranking_metrics(lambda users: random_scores[users].clone(), random_dataset, split, per_user=True)
    users, recalls, ndcgs = reference_metrics(random_scores, random_dataset, split, "strict", 10)
    empty = [u for u in range(N_USERS) if not user_items(random_dataset, split, u)]
    assert empty, "the fixture should have users with an empty split"
    assert result["users"].tolist() == users
    assert not set(empty) & set(result["users"].tolist())
    for name in ("recall@10", "ndcg@10", "recall@20", "ndcg@20"):
        assert result[name].shape == (len(users),)
    np.testing.assert_allclose(result["recall@10"], recalls, atol=1e-9)
    np.testing.assert_allclose(result["ndcg@10"], ndcgs, atol=1e-9)


def test_perfect_scores_give_ndcg_one(random_dataset: Dataset) -> None:
    truth = torch.from_numpy(random_dataset.csr("test").toarray())

    result = ranking_metrics(lambda users: truth[users].clone(), random_dataset, "test", ks=(10, 20))
    assert result["ndcg@10"] == pytest.approx(1.0)
    assert result["ndcg@20"] == pytest.approx(1.0)
    assert result["recall@20"] == pytest.approx(1.0)  # no user has more than 13 test items


def test_wrong_score_shape_is_refused(random_dataset: Dataset) -> None:
    with pytest.raises(ValueError, match="score_fn returned"):
        ranking_metrics(lambda users: torch.zeros(len(users), N_ITEMS - 1), random_dataset)


def test_strict_mask_is_train_plus_the_other_held_out_split(random_dataset: Dataset) -> None:
    train, valid, test = (random_dataset.csr(s).toarray() > 0 for s in ("train", "valid", "test"))
    assert np.array_equal(mask_matrix(random_dataset, "test", "strict").toarray() > 0, train | valid)
    assert np.array_equal(mask_matrix(random_dataset, "valid", "strict").toarray() > 0, train | test)
    assert np.array_equal(mask_matrix(random_dataset, "test", "paper").toarray() > 0, train)
    assert np.array_equal(mask_matrix(random_dataset, "valid", "paper").toarray() > 0, train)


@pytest.mark.parametrize(("split", "protocol"), [("train", "strict"), ("test", "lenient")])
def test_mask_matrix_refuses_bad_arguments(random_dataset: Dataset, split: str, protocol: str) -> None:
    with pytest.raises(ValueError):
        mask_matrix(random_dataset, split, protocol)


def test_paired_t_test_matches_scipy_and_the_textbook_formula() -> None:
    a = [0.212, 0.205, 0.219, 0.208, 0.215]
    b = [0.201, 0.203, 0.207, 0.204, 0.206]
    result = paired_t_test(a, b)
    reference = stats.ttest_rel(a, b, alternative="greater")
    diff = np.subtract(a, b)
    t = diff.mean() / (diff.std(ddof=1) / math.sqrt(len(diff)))
    assert result["t"] == pytest.approx(reference.statistic, rel=1e-12)
    assert result["t"] == pytest.approx(t, rel=1e-12)
    assert result["p"] == pytest.approx(reference.pvalue, rel=1e-12)
    assert result["p"] == pytest.approx(stats.t.sf(t, df=len(diff) - 1), rel=1e-9)
    assert result["mean_diff"] == pytest.approx(diff.mean(), rel=1e-12)


def test_paired_t_test_is_one_sided() -> None:
    better, worse = [3.0, 4.0, 5.0, 6.1], [1.0, 2.2, 3.0, 4.0]
    assert paired_t_test(better, worse)["p"] < 0.01
    assert paired_t_test(worse, better)["p"] > 0.99


@pytest.mark.parametrize(("a", "b"), [([1.0, 2.0], [1.0]), ([1.0], [2.0])])
def test_paired_t_test_needs_two_equal_length_samples(a: list[float], b: list[float]) -> None:
    with pytest.raises(ValueError, match="equal-length"):
        paired_t_test(a, b)


class _VectorModel(torch.nn.Module):
    """A model whose scores are given: user vectors = the score rows, item vectors = the identity."""

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.scores = scores

    def all_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scores, torch.eye(self.scores.shape[1])


@pytest.mark.parametrize("protocol", ["strict", "paper"])
@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluate_model_ranks_through_topk_items_and_matches_the_reference(
    random_dataset: Dataset, random_scores: torch.Tensor, split: str, protocol: str
) -> None:
    got = evaluate_model(_VectorModel(random_scores), random_dataset, split, protocol, ks=(5, 10))
    for k in (5, 10):
        _, recalls, ndcgs = reference_metrics(random_scores, random_dataset, split, protocol, k)
        assert got[f"recall@{k}"] == pytest.approx(np.mean(recalls), abs=1e-12)
        assert got[f"ndcg@{k}"] == pytest.approx(np.mean(ndcgs), abs=1e-12)
    assert got == ranking_metrics(lambda users: random_scores[users], random_dataset, split, protocol, ks=(5, 10))


def test_metrics_of_top_refuses_lists_that_do_not_fit(random_dataset: Dataset) -> None:
    n_evaluated = len(evaluated_users(random_dataset, "test"))
    with pytest.raises(ValueError, match="top list"):
        metrics_of_top(torch.zeros(n_evaluated, 4, dtype=torch.int64), random_dataset, "test", ks=(5,))
    with pytest.raises(ValueError, match="top list"):
        metrics_of_top(torch.zeros(n_evaluated + 1, 5, dtype=torch.int64), random_dataset, "test", ks=(5,))
