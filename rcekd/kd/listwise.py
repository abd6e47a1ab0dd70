"""The Plackett–Luce ranking loss of RRD and DCD in one compiled pass over each row's list (CPU).

Per row the torch form (:func:`rcekd.kd.sampling.listwise_loss` on :func:`~rcekd.kd.base.student_scores`)
runs a gather kernel, a reversed logcumsumexp and about fifteen other ops each way over [b, w]: on a
Gowalla batch of DCD ~170 ms, most of the method's epoch. Here one loop per row scores the list, sums
the tails, takes the loss and writes both gradients while the row's vectors are in cache.

For a row with ranked scores s_0..s_{n-1} (best first) and scores b_l that must stay below them, over
the valid entries: loss = Σ_k [log Z_k − s_k], Z_k = Σ_{j≥k} e^{s_j} + Σ_l e^{b_l}; so
∂/∂s_k = e^{s_k} Σ_{m≤k} 1/Z_m − 1 and ∂/∂b_l = e^{b_l} Σ_m 1/Z_m. Exponentials are shifted by the
row's largest valid score and summed in float64, so no tail underflows to 0.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import torch

from rcekd.kd.kernels import FASTMATH, as_numpy, check_lists


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _listwise_kernel(  # type: ignore[no-untyped-def]
    query_vecs, target_vecs, lists, valid, n_ranked, weights, grad_query, grad_targets
):
    n_rows, width = lists.shape
    dim = query_vecs.shape[1]
    scores = np.empty(width, dtype=np.float64)
    expo = np.empty(width, dtype=np.float64)
    tails = np.empty(max(n_ranked, 1), dtype=np.float64)
    coef = np.empty(width, dtype=query_vecs.dtype)
    total = 0.0
    for r in range(n_rows):
        top = -np.inf
        ranked = False
        for j in range(width):
            target = lists[r, j]
            acc = query_vecs[r, 0] * 0
            for k in range(dim):
                acc += query_vecs[r, k] * target_vecs[target, k]
            scores[j] = acc
            coef[j] = 0
            if valid[r, j]:
                top = max(top, scores[j])
                ranked |= j < n_ranked
        if not ranked:  # no valid ranked entry: no term
            continue
        tail = 0.0
        for j in range(width - 1, -1, -1):  # the below part first, then Z_k from the end of the ranking
            expo[j] = np.exp(scores[j] - top) if valid[r, j] else 0.0
            tail += expo[j]
            if j < n_ranked:
                tails[j] = tail
        weight = weights[r]
        inverse_sum = 0.0  # Σ_{m ≤ k, valid} 1/Z_m
        row_loss = 0.0
        for j in range(n_ranked):
            if valid[r, j]:
                row_loss += np.log(tails[j]) + top - scores[j]
                inverse_sum += 1.0 / tails[j]
                coef[j] = weight * (expo[j] * inverse_sum - 1.0)
        for j in range(n_ranked, width):
            if valid[r, j]:
                coef[j] = weight * expo[j] * inverse_sum
        total += weight * row_loss
        for j in range(width):
            g = coef[j]
            if g != 0:
                target = lists[r, j]
                for k in range(dim):
                    grad_query[r, k] += g * target_vecs[target, k]
                    grad_targets[target, k] += g * query_vecs[r, k]
    return total


class ListwiseLoss(torch.autograd.Function):
    """Σ_r weights[r] · (−log Plackett–Luce likelihood of row r's list): the first ``n_ranked``
    entries of ``lists[r]`` in that order, above the rest; entries where ``valid`` is False are left
    out. Scores are ``query_vecs[r] · target_vecs[lists[r, j]]``. Loss and both gradients are
    computed in forward; backward only scales them."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        query_vecs: torch.Tensor,
        target_vecs: torch.Tensor,
        lists: torch.Tensor,
        valid: torch.Tensor,
        n_ranked: int,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        query_vecs, target_vecs = query_vecs.detach().contiguous(), target_vecs.detach().contiguous()
        check_lists(query_vecs, target_vecs, lists)
        if valid.shape != lists.shape or valid.dtype != torch.bool:
            raise ValueError(f"valid must be a bool mask shaped like lists {tuple(lists.shape)}")
        if not 0 <= n_ranked <= lists.shape[1]:
            raise ValueError(f"n_ranked must lie in [0, {lists.shape[1]}], got {n_ranked}")
        if weights.shape != (lists.shape[0],):
            raise ValueError(f"weights must be [{lists.shape[0]}], got {tuple(weights.shape)}")
        grad_query = torch.zeros_like(query_vecs)
        grad_targets = torch.zeros_like(target_vecs)
        total = _listwise_kernel(
            as_numpy(query_vecs),
            as_numpy(target_vecs),
            as_numpy(lists),
            as_numpy(valid),
            int(n_ranked),
            as_numpy(weights.to(torch.float64)),
            grad_query.numpy(),
            grad_targets.numpy(),
        )
        ctx.save_for_backward(grad_query, grad_targets)
        return torch.tensor(total, dtype=query_vecs.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_query, grad_targets = ctx.saved_tensors
        return grad_query * grad, grad_targets * grad, None, None, None, None
