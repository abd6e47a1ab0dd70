"""Compiled CPU kernels for the KD hot paths: each user's list scores and their gradients (the fused
soft cross-entropy of a list is in :mod:`rcekd.kd.list_ce`, exact top-k of score rows in
:mod:`rcekd.kd.topk`).

Every KD method scores a few hundred items per batch user, for every row of every batch. Through
torch ops this either gathers b × w × d item rows (memory-bound) or goes through sparse kernels whose
item gradient needs a sort of the b · w item ids each batch; both spent ~10 ms a Gowalla batch on
what is ~6 M multiply-adds. These loops do it in one pass each, in cache, with no sort: the item
gradient is a scatter-add, which a serial loop does without atomics.

:func:`list_scores` (and :class:`ListScores`, its autograd form), :func:`list_grads` and
:func:`list_positions` are the only entry points: they
check devices, dtypes, shapes and id ranges (numba does not bounds-check, so an id out of range would
read or write outside the tables), make the inputs contiguous, and call the kernels on NumPy views of
the tensors' memory.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
import torch

from rcekd.kd.threads import block_bounds, kernel_threads, run_blocks

# reassoc/contract let LLVM vectorise the d-long dot products; the order of the sums is fixed for a
# given machine, so results are deterministic, and equal to torch's up to float rounding
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
#: the vector dtypes the kernels are compiled for
FLOATS = (torch.float32, torch.float64)
#: multiply-adds below which :func:`list_scores` runs in one block (a thread hand-off costs ~50 µs)
BLOCK_WORK = 2**20


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _scores_kernel(user_vecs, item_vecs, items, out):  # type: ignore[no-untyped-def]
    n_rows, width = items.shape
    dim = user_vecs.shape[1]
    for r in range(n_rows):
        for j in range(width):
            item = items[r, j]
            acc = user_vecs[r, 0] * 0  # float64 zero (numba: float32 × int is float64): sums in double
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
    users_np, items_np, lists, out_np = as_numpy(user_vecs), as_numpy(item_vecs), as_numpy(items), out.numpy()
    # rows in blocks on torch's thread count (a teacher's d=300 rows are read from memory, not cache)
    blocks = block_bounds(items.shape[0], kernel_threads() if items.numel() * user_vecs.shape[1] >= BLOCK_WORK else 1)
    run_blocks(
        _scores_kernel,
        lambda b, _: (users_np[slice(*blocks[b])], items_np, lists[slice(*blocks[b])], out_np[slice(*blocks[b])]),
        len(blocks),
    )
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
