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
from rcekd.kd.topk import row_topk

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
    truth = dataset.csr(split)
    mask = mask_matrix(dataset, split, protocol)
    evaluated = np.flatnonzero(np.diff(truth.indptr) > 0)
    max_k = max(ks)
    discounts = 1.0 / torch.log2(torch.arange(2, max_k + 2, dtype=torch.float64))
    ideal_prefix = torch.cat([torch.zeros(1, dtype=torch.float64), discounts.cumsum(0)])
    results: dict[str, list[torch.Tensor]] = {f"{m}@{k}": [] for k in ks for m in ("recall", "ndcg")}

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
        top = _top_columns(scores, max_k)

        t_rows, t_cols = _csr_rows_to_coords(truth, users_np)
        relevant = torch.zeros(len(users_np), dataset.n_items, dtype=torch.bool)
        relevant[t_rows, t_cols] = True
        hits = relevant.gather(1, top).double()
        n_relevant = torch.from_numpy(np.diff(truth.indptr)[users_np]).double()
        for k in ks:
            hits_k = hits[:, :k]
            results[f"recall@{k}"].append(hits_k.sum(1) / n_relevant)
            dcg = (hits_k * discounts[:k]).sum(1)
            idcg = ideal_prefix[n_relevant.clamp(max=k).long()]
            results[f"ndcg@{k}"].append(dcg / idcg)

    merged = {name: torch.cat(values).numpy() if values else np.zeros(0) for name, values in results.items()}
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
    """Evaluate a :class:`~rcekd.models.base.Recommender`: its vectors are computed once, then chunked."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            user_vecs, item_vecs = model.all_vectors()
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
