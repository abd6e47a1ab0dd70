"""Full-ranking Recall@K and NDCG@K over all items, in user chunks so memory stays bounded.

Protocols (METHOD.md §5):

* ``strict`` (default, what serving does): mask every item the user interacted with outside the
  evaluated split (train and the other held-out split);
* ``paper``: mask training items only, as the paper's code does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch
from scipy import stats

from rcekd.data import Dataset
from rcekd.kd.kernels import FLOATS
from rcekd.kd.topk import row_topk, topk_items

PROTOCOLS = ("strict", "paper")
#: scores held per chunk (float32): 2**25 → 128 MiB, a good trade-off of speed and memory
CHUNK_SCORES = 2**25

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def mask_matrix(dataset: Dataset, split: str, protocol: str) -> sp.csr_matrix:
    """Items to exclude from the ranking when evaluating ``split`` under ``protocol``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if split == "train":
        raise ValueError("evaluate 'valid' or 'test', not the training split")
    mask = dataset.csr("train")
    if protocol == "strict":
        other = "test" if split == "valid" else "valid"
        mask = (mask + dataset.csr(other)).tocsr()
    return mask


def _csr_rows_to_coords(matrix: sp.csr_matrix, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    block = matrix[rows]
    coo = block.tocoo()
    return torch.from_numpy(coo.row.astype(np.int64)), torch.from_numpy(coo.col.astype(np.int64))


def ranking_metrics(
    score_fn: ScoreFn,
    dataset: Dataset,
    split: str = "test",
    protocol: str = "strict",
    ks: Sequence[int] = (10, 20),
    device: torch.device | str = "cpu",
    per_user: bool = False,
) -> dict[str, float] | dict[str, np.ndarray]:
    """Mean Recall@K / NDCG@K over users whose ``split`` is non-empty.

    ``score_fn(users)`` returns float[len(users), n_items] for a chunk of int64 user rows. With
    ``per_user=True`` the arrays of per-user values (and the evaluated users) come back instead, for
    paired significance tests.
    """
    device = torch.device(device)
    mask = mask_matrix(dataset, split, protocol)
    evaluated = evaluated_users(dataset, split)
    tops = []
    chunk = max(1, CHUNK_SCORES // max(dataset.n_items, 1))
    for start in range(0, len(evaluated), chunk):
        users_np = evaluated[start : start + chunk]
        users = torch.from_numpy(users_np).to(device)
        with torch.no_grad():
            scores = score_fn(users).float()
        if scores.shape != (len(users_np), dataset.n_items):
            raise ValueError(f"score_fn returned {tuple(scores.shape)}, expected ({len(users_np)}, n_items)")
        rows, cols = _csr_rows_to_coords(mask, users_np)
        scores[rows.to(device), cols.to(device)] = -torch.inf
        tops.append(_top_columns(scores, max(ks)))
    top = torch.cat(tops) if tops else torch.zeros(0, max(ks), dtype=torch.int64)
    return metrics_of_top(top, dataset, split, ks, per_user)


def evaluated_users(dataset: Dataset, split: str) -> np.ndarray:
    """The users whose ``split`` is non-empty, in id order: the rows a ranking is evaluated on."""
    return np.flatnonzero(np.diff(dataset.csr(split).indptr) > 0)


def metrics_of_top(
    top: torch.Tensor, dataset: Dataset, split: str, ks: Sequence[int] = (10, 20), per_user: bool = False
) -> dict[str, float] | dict[str, np.ndarray]:
    """Recall@K / NDCG@K of ``top`` (int64[n, ≥ max K], row r the ranked items of the r-th user of
    :func:`evaluated_users`), its hits looked up among the split's (user, item) pairs (no users ×
    items matrix)."""
    truth = dataset.csr(split)
    evaluated = evaluated_users(dataset, split)
    max_k = max(ks)
    if top.dim() != 2 or top.shape[0] != len(evaluated) or top.shape[1] < max_k:
        raise ValueError(
            f"need a top list of ≥ {max_k} items for each of the {len(evaluated)} users, got {tuple(top.shape)}"
        )
    discounts = 1.0 / torch.log2(torch.arange(2, max_k + 2, dtype=torch.float64))
    ideal_prefix = torch.cat([torch.zeros(1, dtype=torch.float64), discounts.cumsum(0)])
    # (user, item) → one int64 key; the split's keys sorted, the top lists' keys searched in them
    coo = truth.tocoo()
    truth_keys = np.sort(coo.row.astype(np.int64) * dataset.n_items + coo.col)
    keys = evaluated[:, None].astype(np.int64) * dataset.n_items + top[:, :max_k].numpy()
    # an evaluated user has a truth item, so truth_keys is empty only when keys are
    at = np.searchsorted(truth_keys, keys).clip(max=max(len(truth_keys) - 1, 0))
    hits = torch.from_numpy(truth_keys[at] == keys).double()
    n_relevant = torch.from_numpy(np.diff(truth.indptr)[evaluated]).double()
    merged: dict[str, np.ndarray] = {}
    for k in ks:
        hits_k = hits[:, :k]
        merged[f"recall@{k}"] = (hits_k.sum(1) / n_relevant).numpy()
        dcg = (hits_k * discounts[:k]).sum(1)
        merged[f"ndcg@{k}"] = (dcg / ideal_prefix[n_relevant.clamp(max=k).long()]).numpy()
    if per_user:
        return {**merged, "users": evaluated}
    return {name: float(values.mean()) if len(values) else 0.0 for name, values in merged.items()}


def _top_columns(scores: torch.Tensor, k: int) -> torch.Tensor:
    """int64[b, k] on CPU: each row's k best columns, best first. CPU floats go through the compiled
    :func:`rcekd.kd.topk.row_topk` (exact; torch's top-k copies
    every row into (value, index) pairs); other devices use torch."""
    if scores.device.type == "cpu" and scores.dtype in FLOATS:
        top = torch.empty(scores.shape[0], k, dtype=torch.int64)
        row_topk(scores.contiguous(), k, top)
        return top
    return scores.topk(k, dim=1).indices.cpu()


def evaluate_model(
    model: torch.nn.Module,
    dataset: Dataset,
    split: str = "test",
    protocol: str = "strict",
    ks: Sequence[int] = (10, 20),
) -> dict[str, float]:
    """Evaluate a :class:`~rcekd.models.base.Recommender`: its vectors are computed once; on CPU the
    evaluated users are ranked by :func:`rcekd.kd.topk.topk_items` (small cache-sized chunks, blocks
    of users on torch's threads: ~4× faster on Gowalla than scoring 800-user chunks), elsewhere in
    chunks of scores by :func:`ranking_metrics`. Both give the same top lists."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            user_vecs, item_vecs = model.all_vectors()
        if user_vecs.device.type == "cpu" and user_vecs.dtype in FLOATS and item_vecs.dtype == user_vecs.dtype:
            users = evaluated_users(dataset, split)
            mask = mask_matrix(dataset, split, protocol)[users]
            top = topk_items(user_vecs[torch.from_numpy(users)], item_vecs, max(ks), exclude=mask)
            return metrics_of_top(top, dataset, split, ks)  # type: ignore[return-value]
        result = ranking_metrics(
            lambda users: user_vecs[users] @ item_vecs.T, dataset, split, protocol, ks, user_vecs.device
        )
    finally:
        model.train(was_training)
    return result  # type: ignore[return-value]


def full_report(model: torch.nn.Module, dataset: Dataset) -> dict[str, dict[str, float]]:
    """The metrics block of a manifest: strict valid and test, plus the paper protocol's test."""
    return {
        "valid": evaluate_model(model, dataset, "valid"),
        "test": evaluate_model(model, dataset, "test"),
        "test_paper": evaluate_model(model, dataset, "test", protocol="paper"),
    }


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired t-test of ``a`` against ``b`` (pairs = same seed); one-sided p for mean(a) > mean(b)."""
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.shape != b_arr.shape or len(a_arr) < 2:
        raise ValueError("paired t-test needs two equal-length samples of at least 2 values")
    result = stats.ttest_rel(a_arr, b_arr, alternative="greater")
    return {"t": float(result.statistic), "p": float(result.pvalue), "mean_diff": float((a_arr - b_arr).mean())}
