"""The fused soft cross-entropy of each user's list (RCE-KD's and vanilla CE's KD term), compiled.

Per batch row the pass computes the student's scores on the row's list, a softmax cross-entropy a
segment (RCE-KD: Q_S, then A_u), the loss and both gradients, while each item row is in cache. The
lists are a per-epoch :class:`ListTable`, checked once (ids in range, shapes, dtypes), not in each of
the ~23 batches a Gowalla user's term is computed in an epoch; a batch passes the indices of the table
rows it needs, and only those are checked.

Scoring each distinct item of a row once (RCE-KD's sample repeats about a third of Q_S) was tried and
not kept: on a Gowalla epoch it was no faster, as the pass's time is spread over its per-entry work
(scores, exps, scatters, about a third each), not concentrated in the dot products.

It runs on one thread. Blocks of rows on two threads, each scattering into its own item-gradient
buffer, were tried and not kept: on Gowalla's batches they were slower than one thread, because
torch's OpenMP threads spin after each parallel op (the row gathers, the buffers' zeroing) on the
cores the blocks need; only with ``OMP_WAIT_POLICY=PASSIVE`` did two blocks gain (1.4 s against
2.3 s of kernel time an epoch), a process-wide setting whose cost to torch's own ops was not measured.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any, NamedTuple

import numba
import numpy as np
import torch

from rcekd.kd.kernels import FASTMATH, FLOATS, as_numpy


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _list_ce_kernel(  # type: ignore[no-untyped-def]
    user_vecs, item_vecs, items, targets, valid, bounds, weights, scale, grad_users, grad_items
):
    n_rows, width = items.shape
    dim = user_vecs.shape[1]
    scores = np.empty(width, dtype=user_vecs.dtype)
    coef = np.empty(width, dtype=user_vecs.dtype)
    total = 0.0
    for r in range(n_rows):
        for j in range(width):
            item = items[r, j]
            acc = user_vecs[r, 0] * 0  # zero of the vectors' dtype
            for k in range(dim):
                acc += user_vecs[r, k] * item_vecs[item, k]
            scores[j] = acc * scale
        for q in range(bounds.shape[0] - 1):  # one soft cross-entropy a segment of the list
            lo, hi = bounds[q], bounds[q + 1]
            top = user_vecs[r, 0] * 0  # of the vectors' dtype: float32 exps are ~2× cheaper than float64 ones
            seen = False
            for j in range(lo, hi):
                coef[j] = 0
                if valid[r, j] and (not seen or scores[j] > top):
                    top = scores[j]
                    seen = True
            if not seen:  # no valid entry: no term
                continue
            sum_exp = top * 0
            mass = 0.0
            dot = 0.0
            for j in range(lo, hi):
                if valid[r, j]:
                    coef[j] = np.exp(scores[j] - top)  # kept: the softmax below reuses it
                    sum_exp += coef[j]
                    mass += targets[r, j]
                    dot += targets[r, j] * scores[j]
            weight = weights[r, q]
            total += weight * (mass * (top + np.log(sum_exp)) - dot)  # −Σ t_j log softmax(s)_j
            factor = weight * scale * mass / sum_exp
            for j in range(lo, hi):
                if valid[r, j]:  # d/ds_j = mass · softmax_j − t_j, times the chain's scale
                    coef[j] = factor * coef[j] - weight * scale * targets[r, j]
        for j in range(width):
            g = coef[j]
            if g != 0:
                item = items[r, j]
                for k in range(dim):
                    grad_users[r, k] += g * item_vecs[item, k]
                    grad_items[item, k] += g * user_vecs[r, k]
    return total


class ListTable(NamedTuple):
    """Each user's list of item ids (int64[n, w]), the fixed teacher side on it (float[n, w], rows
    summing to 1 a segment, or 0) and a bool mask of the entries that count, with the segments'
    column limits ``(0, ..., w)``: built once an epoch by :meth:`of`, which checks it."""

    items: torch.Tensor
    targets: torch.Tensor
    valid: torch.Tensor
    bounds: tuple[int, ...]
    n_items: int

    @classmethod
    def of(
        cls, items: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, bounds: tuple[int, ...], n_items: int
    ) -> ListTable:
        if items.device.type != "cpu" or targets.device.type != "cpu" or valid.device.type != "cpu":
            raise ValueError("list tables live on the CPU")
        if items.dtype != torch.int64 or items.dim() != 2:
            raise TypeError(f"items must be int64 [n, w], got {items.dtype} {tuple(items.shape)}")
        if targets.shape != items.shape or valid.shape != items.shape or valid.dtype != torch.bool:
            raise ValueError(f"targets and a bool valid mask must match items {tuple(items.shape)}")
        if targets.dtype not in FLOATS:
            raise TypeError(f"targets must be float32 or float64, got {targets.dtype}")
        width = items.shape[1]
        if not bounds or bounds[0] != 0 or bounds[-1] != width or any(b > c for b, c in pairwise(bounds)):
            raise ValueError(f"segment bounds must rise from 0 to {width}, got {bounds}")
        if items.numel() and (int(items.min()) < 0 or int(items.max()) >= n_items):
            raise IndexError(f"item ids must lie in [0, {n_items})")
        return cls(items.contiguous(), targets.contiguous(), valid.contiguous(), tuple(bounds), n_items)


class ListCrossEntropy(torch.autograd.Function):
    """Σ_r Σ_q weights[r, q] · CE(targets[row r, segment q], softmax(scale · scores[r, segment q]))
    over the valid entries, with ``scores[r, j] = user_vecs[r] · item_vecs[items[rows[r], j]]`` and
    ``rows`` the batch users' rows of ``table`` (a :class:`ListTable`).

    The forward pass also computes both gradients, while each item row is in cache for its score;
    backward only scales them. ``weights`` float[b, segments] (each user's γ, λ and row count).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        user_vecs: torch.Tensor,
        item_vecs: torch.Tensor,
        table: ListTable,
        rows: torch.Tensor,
        weights: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        user_vecs, item_vecs = user_vecs.detach().contiguous(), item_vecs.detach().contiguous()
        if user_vecs.device.type != "cpu" or item_vecs.device.type != "cpu" or rows.device.type != "cpu":
            raise ValueError("list kernels run on CPU tensors")
        if user_vecs.dtype not in FLOATS or item_vecs.dtype != user_vecs.dtype:
            raise TypeError(f"need float32 or float64 vectors of one dtype, got {user_vecs.dtype}, {item_vecs.dtype}")
        shapes = tuple(user_vecs.shape), tuple(item_vecs.shape)
        if user_vecs.dim() != 2 or item_vecs.dim() != 2 or shapes[0][1] != shapes[1][1] or not shapes[0][1]:
            raise ValueError(f"need user_vecs [b, d] and item_vecs [n, d] with d ≥ 1, got {shapes}")
        if item_vecs.shape[0] != table.n_items:
            raise ValueError(f"the table's ids are for {table.n_items} items, the vectors have {item_vecs.shape[0]}")
        if rows.dtype != torch.int64 or rows.shape != (user_vecs.shape[0],):
            raise ValueError(f"rows must be int64 [{user_vecs.shape[0]}], got {rows.dtype} {tuple(rows.shape)}")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= table.items.shape[0]):
            raise IndexError(f"rows must lie in [0, {table.items.shape[0]})")
        if weights.shape != (rows.shape[0], len(table.bounds) - 1):
            raise ValueError(f"weights must be [{rows.shape[0]}, {len(table.bounds) - 1}], got {tuple(weights.shape)}")
        grad_users = torch.zeros_like(user_vecs)
        grad_items = torch.zeros_like(item_vecs)
        total = _list_ce_kernel(
            as_numpy(user_vecs),
            as_numpy(item_vecs),
            table.items.index_select(0, rows).numpy(),  # the batch's rows: a whole-row copy streams
            table.targets.index_select(0, rows).to(user_vecs.dtype).numpy(),
            table.valid.index_select(0, rows).numpy(),
            np.asarray(table.bounds, dtype=np.int64),
            as_numpy(weights.to(user_vecs.dtype)),
            float(scale),
            grad_users.numpy(),
            grad_items.numpy(),
        )
        ctx.save_for_backward(grad_users, grad_items)
        return torch.tensor(total, dtype=user_vecs.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_users, grad_items = ctx.saved_tensors
        if float(grad) == 1.0:  # the usual case, a loss added as is: no pass over the item table
            return grad_users, grad_items, None, None, None, None
        return grad_users * grad, grad_items * grad, None, None, None, None
