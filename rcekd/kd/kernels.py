"""Compiled CPU kernels for the KD hot paths: each user's list scores and their gradients, and the
fused soft cross-entropy of a list (exact top-k of score rows is in :mod:`rcekd.kd.topk`).

Every KD method scores a few hundred items per batch user, for every row of every batch. Through
torch ops this either gathers b × w × d item rows (memory-bound) or goes through sparse kernels whose
item gradient needs a sort of the b · w item ids each batch; both spent ~10 ms a Gowalla batch on
what is ~6 M multiply-adds. These loops do it in one pass each, in cache, with no sort: the item
gradient is a scatter-add, which a serial loop does without atomics. :class:`ListCrossEntropy` goes
one step further for CE-style terms (RCE-KD): scores, softmaxes, loss and both gradients in one pass
over each user's list.

:func:`list_scores` (and :class:`ListScores`, its autograd form), :func:`list_grads`,
:class:`ListCrossEntropy` and :func:`list_positions` are the only entry points: they
check devices, dtypes, shapes and id ranges (numba does not bounds-check, so an id out of range would
read or write outside the tables), make the inputs contiguous, and call the kernels on NumPy views of
the tensors' memory.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numba
import numpy as np
import torch

# reassoc/contract let LLVM vectorise the d-long dot products; the order of the sums is fixed for a
# given machine, so results are deterministic, and equal to torch's up to float rounding
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
#: the vector dtypes the kernels are compiled for
FLOATS = (torch.float32, torch.float64)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _scores_kernel(user_vecs, item_vecs, items, out):  # type: ignore[no-untyped-def]
    n_rows, width = items.shape
    dim = user_vecs.shape[1]
    for r in range(n_rows):
        for j in range(width):
            item = items[r, j]
            acc = user_vecs[r, 0] * 0  # zero of the vectors' dtype
            for k in range(dim):
                acc += user_vecs[r, k] * item_vecs[item, k]
            out[r, j] = acc


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _grads_kernel(user_vecs, item_vecs, items, grad, grad_users, grad_items):  # type: ignore[no-untyped-def]
    n_rows, width = items.shape
    dim = user_vecs.shape[1]
    for r in range(n_rows):
        for j in range(width):
            item = items[r, j]
            g = grad[r, j]
            for k in range(dim):
                grad_users[r, k] += g * item_vecs[item, k]
                grad_items[item, k] += g * user_vecs[r, k]


@numba.njit(cache=True, nogil=True)
def _positions_kernel(values, pool, n_ids, out):  # type: ignore[no-untyped-def]
    n_rows, width = pool.shape
    where = np.full(n_ids, width, dtype=np.int64)  # id → its column in the current row's pool
    for r in range(n_rows):
        for j in range(width - 1, -1, -1):  # backwards: a repeated id keeps its first column
            where[pool[r, j]] = j
        for j in range(values.shape[1]):
            out[r, j] = where[values[r, j]]
        for j in range(width):
            where[pool[r, j]] = width


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
            acc = user_vecs[r, 0] * 0
            for k in range(dim):
                acc += user_vecs[r, k] * item_vecs[item, k]
            scores[j] = acc * scale
        for q in range(bounds.shape[0] - 1):  # one soft cross-entropy a segment of the list
            lo, hi = bounds[q], bounds[q + 1]
            top = scores[lo]  # of the vectors' dtype: float32 exps are ~2× cheaper than float64 ones
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


def check_lists(user_vecs: torch.Tensor, item_vecs: torch.Tensor, items: torch.Tensor) -> None:
    if user_vecs.device.type != "cpu" or item_vecs.device.type != "cpu" or items.device.type != "cpu":
        raise ValueError("list kernels run on CPU tensors")
    if user_vecs.dtype not in FLOATS or item_vecs.dtype != user_vecs.dtype or items.dtype != torch.int64:
        raise TypeError(
            f"need float32 or float64 vectors of one dtype and int64 ids, got {user_vecs.dtype}, "
            f"{item_vecs.dtype}, {items.dtype}"
        )
    if user_vecs.dim() != 2 or item_vecs.dim() != 2 or items.dim() != 2:
        raise ValueError("need user_vecs [b, d], item_vecs [n, d] and items [b, w]")
    if user_vecs.shape[1] == 0:
        raise ValueError("vectors need at least one dimension")
    if user_vecs.shape[1] != item_vecs.shape[1] or items.shape[0] != user_vecs.shape[0]:
        raise ValueError(f"shapes do not fit: {tuple(user_vecs.shape)}, {tuple(item_vecs.shape)}, {tuple(items.shape)}")
    if items.numel() and (int(items.min()) < 0 or int(items.max()) >= item_vecs.shape[0]):
        raise IndexError(f"item ids must lie in [0, {item_vecs.shape[0]})")


def as_numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().contiguous().numpy()


def list_scores(user_vecs: torch.Tensor, item_vecs: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """float[b, w]: ``user_vecs[r] · item_vecs[items[r, j]]`` (no autograd)."""
    check_lists(user_vecs, item_vecs, items)
    out = torch.empty(items.shape, dtype=user_vecs.dtype)
    _scores_kernel(as_numpy(user_vecs), as_numpy(item_vecs), as_numpy(items), out.numpy())
    return out


def list_positions(values: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """int64[b, k]: the column of ``values[r, j]`` in ``pool[r, :]``, or ``pool.shape[1]`` where absent.

    One scratch table of ids → column, filled and cleared per row: O(k + n) a row, where a sort and a
    binary search are O(n log n + k log n) and, in torch, ~100 ns a query."""
    if values.device.type != "cpu" or pool.device.type != "cpu":
        raise ValueError("list kernels run on CPU tensors")
    if values.dtype != torch.int64 or pool.dtype != torch.int64 or values.dim() != 2 or pool.dim() != 2:
        raise TypeError("need int64 values [b, k] and pool [b, n]")
    if values.shape[0] != pool.shape[0]:
        raise ValueError(f"row counts differ: {tuple(values.shape)} vs {tuple(pool.shape)}")
    out = torch.empty(values.shape, dtype=torch.int64)
    if not values.numel():
        return out
    if not pool.numel():
        return out.fill_(0)
    low = min(int(values.min()), int(pool.min()))
    if low < 0:
        raise IndexError("ids must be non-negative")
    n_ids = max(int(values.max()), int(pool.max())) + 1
    _positions_kernel(as_numpy(values), as_numpy(pool), n_ids, out.numpy())
    return out


def list_grads(
    user_vecs: torch.Tensor, item_vecs: torch.Tensor, items: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float[b, d], float[n, d]): the gradients of Σ grad ⊙ :func:`list_scores` in both vector sets."""
    check_lists(user_vecs, item_vecs, items)
    if grad.shape != items.shape:
        raise ValueError(f"grad {tuple(grad.shape)} must match items {tuple(items.shape)}")
    return _grads(user_vecs, item_vecs, items, grad)


def _grads(
    user_vecs: torch.Tensor, item_vecs: torch.Tensor, items: torch.Tensor, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`list_grads` on inputs already checked (by :func:`list_scores` in the forward pass)."""
    grad_users = torch.zeros_like(user_vecs, memory_format=torch.contiguous_format)
    grad_items = torch.zeros_like(item_vecs, memory_format=torch.contiguous_format)
    _grads_kernel(
        as_numpy(user_vecs),
        as_numpy(item_vecs),
        as_numpy(items),
        as_numpy(grad.to(user_vecs.dtype)),
        grad_users.numpy(),
        grad_items.numpy(),
    )
    return grad_users, grad_items


class ListCrossEntropy(torch.autograd.Function):
    """Σ_r Σ_q weights[r, q] · CE(targets[r, segment q], softmax(scale · scores[r, segment q])) over
    the valid entries, with ``scores[r, j] = user_vecs[r] · item_vecs[items[r, j]]``: a KD term of
    soft cross-entropies on each user's list, in one compiled pass.

    The forward pass also computes both gradients, while each item row is in cache for its score
    (the backward pass of :class:`ListScores` gathers every row again); backward only scales them.
    ``targets`` are the fixed teacher side (rows summing to 1 per segment, or 0), ``valid`` a bool
    mask (rows or segments without a valid entry add nothing), ``bounds`` the segments' column
    limits ``[0, ..., width]``, ``weights`` float[b, segments] (each user's γ, λ and row count).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        user_vecs: torch.Tensor,
        item_vecs: torch.Tensor,
        items: torch.Tensor,
        targets: torch.Tensor,
        valid: torch.Tensor,
        bounds: tuple[int, ...],
        weights: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        user_vecs, item_vecs = user_vecs.detach().contiguous(), item_vecs.detach().contiguous()
        check_lists(user_vecs, item_vecs, items)
        width = items.shape[1]
        if targets.shape != items.shape or valid.shape != items.shape or valid.dtype != torch.bool:
            raise ValueError(f"targets and a bool valid mask must match items {tuple(items.shape)}")
        if bounds[0] != 0 or bounds[-1] != width or any(b > c for b, c in pairwise(bounds)):
            raise ValueError(f"segment bounds must rise from 0 to {width}, got {bounds}")
        if weights.shape != (items.shape[0], len(bounds) - 1):
            raise ValueError(f"weights must be [{items.shape[0]}, {len(bounds) - 1}], got {tuple(weights.shape)}")
        grad_users = torch.zeros_like(user_vecs)
        grad_items = torch.zeros_like(item_vecs)
        total = _list_ce_kernel(
            as_numpy(user_vecs),
            as_numpy(item_vecs),
            as_numpy(items),
            as_numpy(targets.to(user_vecs.dtype)),
            as_numpy(valid),
            np.asarray(bounds, dtype=np.int64),
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
        return grad_users * grad, grad_items * grad, None, None, None, None, None, None


class ListScores(torch.autograd.Function):
    """:func:`list_scores`, differentiable in both vector sets: the inputs are checked once, forward;
    backward runs the gradient loop on the same (saved, contiguous) tensors."""

    @staticmethod
    def forward(ctx: Any, user_vecs: torch.Tensor, item_vecs: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        user_vecs, item_vecs = user_vecs.detach().contiguous(), item_vecs.detach().contiguous()
        scores = list_scores(user_vecs, item_vecs, items)
        ctx.save_for_backward(user_vecs, item_vecs, items)
        return scores

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        user_vecs, item_vecs, items = ctx.saved_tensors
        grad_users, grad_items = _grads(user_vecs, item_vecs, items, grad.contiguous())
        return grad_users, grad_items, None
