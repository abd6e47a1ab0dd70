"""The fused soft cross-entropy of each user's list (RCE-KD's and vanilla CE's KD term), compiled.

Per batch row the pass computes the student's scores on the row's list, a softmax cross-entropy a
segment (RCE-KD: Q_S, then A_u), the loss and both gradients, while each item row is in cache. The
lists are a per-epoch :class:`ListTable`, checked once (ids in range, shapes, dtypes), not in each of
the ~23 batches a Gowalla user's term is computed in an epoch; a batch passes the indices of the table
rows it needs, and only those are checked.

Within each segment the entries that count come first (:meth:`ListTable.of` moves them there once an
epoch), so the pass runs over them with no mask to test and no work on the others: on Gowalla's
RCE-KD lists that made it ~25% faster than a masked pass over every column.

Scoring each distinct item of a row once (RCE-KD's sample repeats Q_S: 33 of its 50 items on a
Gowalla epoch) was tried twice and not kept: on a Gowalla epoch it was no faster, as the pass's time is
spread over its per-entry work (scores, exps, scatters), not concentrated in the dot products. The
second try marked the repeats once an epoch in the table (a negative id naming the Q_S column, the
repeats first in their segment so the test for them predicts well): the pass alone took 7% less
time on one thread in a micro-benchmark, but a training epoch's KD term did not move beyond noise
(alternating ``benchmarks.epoch_profile`` runs on a Zen 5 machine: 1.21 and 1.35 s against 1.23 and
1.36 s), and an alias check each epoch is not worth that.

Rows go in blocks on torch's thread count (:mod:`rcekd.kd.threads`); the item gradient then goes in
blocks of item ids, each block adding its items' terms in row order into the one output, so the
gradients are the same numbers on any thread count (a CiteULike run gave the same figures on one
thread and on two). The blocks gain only when torch's OpenMP workers are not busy-waiting on the
core a block needs after torch's own parallel ops: see ``GOMP_SPINCOUNT`` in :mod:`rcekd`.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any, NamedTuple

import numba
import numpy as np
import torch

from rcekd.kd.kernels import FASTMATH, FLOATS, as_numpy
from rcekd.kd.threads import block_bounds, kernel_threads, run_blocks

#: batches with fewer distinct users run in one block
BLOCK_ROWS = 256


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _list_ce_kernel(  # type: ignore[no-untyped-def]
    user_vecs, item_vecs, items, targets, ends, starts, weights, scale, grad_users, grad_scores
):
    """The loss of rows' lists, each user's gradient, and each entry's d loss / d score (into
    ``grad_scores``, for :func:`_scatter_items_kernel`): one pass while a row's item rows are in cache."""
    n_rows, width = items.shape
    dim = user_vecs.shape[1]
    n_segments = starts.shape[0]
    scores = np.empty(width, dtype=user_vecs.dtype)
    coef = np.empty(width, dtype=user_vecs.dtype)
    total = 0.0
    for r in range(n_rows):
        for q in range(n_segments):  # a segment's entries that count come first: no mask to test
            for j in range(starts[q], ends[r, q]):
                item = items[r, j]
                acc = user_vecs[r, 0] * 0  # float64 zero (numba: float32 × int is float64): sums in double
                for k in range(dim):
                    acc += user_vecs[r, k] * item_vecs[item, k]
                scores[j] = acc * scale
        for q in range(n_segments):  # one soft cross-entropy a segment
            lo, hi = starts[q], ends[r, q]
            if hi <= lo:  # no entry: no term
                continue
            top = scores[lo]
            for j in range(lo + 1, hi):
                top = max(top, scores[j])
            sum_exp = top * 0  # float64, like mass and dot; the exps themselves are float32 (~2× cheaper)
            mass = 0.0
            dot = 0.0
            for j in range(lo, hi):
                coef[j] = np.exp(scores[j] - top)  # kept: the softmax below reuses it
                sum_exp += coef[j]
                mass += targets[r, j]
                dot += targets[r, j] * scores[j]
            weight = weights[r, q]
            total += weight * (mass * (top + np.log(sum_exp)) - dot)  # −Σ t_j log softmax(s)_j
            factor = weight * scale * mass / sum_exp
            for j in range(lo, hi):  # d/ds_j = mass · softmax_j − t_j, times the chain's scale
                coef[j] = factor * coef[j] - weight * scale * targets[r, j]
        for q in range(n_segments):
            for j in range(starts[q], ends[r, q]):
                g = coef[j]
                grad_scores[r, j] = g
                item = items[r, j]
                for k in range(dim):
                    grad_users[r, k] += g * item_vecs[item, k]
    return total


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH)
def _scatter_items_kernel(user_vecs, items, ends, starts, grad_scores, grad_items, lo, hi):  # type: ignore[no-untyped-def]
    """grad_items[i] = Σ grad_scores[r, j] · user_vecs[r] over the entries with items[r, j] = i, for
    the items lo..hi-1 only (zeroed first): blocks own disjoint item ranges, so they share one output
    and each item's sum runs in row order whatever the block count (the same rounding on any threads)."""
    dim = user_vecs.shape[1]
    for i in range(lo, hi):
        for k in range(dim):
            grad_items[i, k] = 0
    for r in range(items.shape[0]):
        for q in range(starts.shape[0]):
            for j in range(starts[q], ends[r, q]):
                item = items[r, j]
                if lo <= item < hi:
                    g = grad_scores[r, j]
                    for k in range(dim):
                        grad_items[item, k] += g * user_vecs[r, k]


@numba.njit(cache=True, nogil=True)
def _compact_kernel(items, targets, valid, bounds, out_items, out_targets, ends):  # type: ignore[no-untyped-def]
    """Each segment's valid entries first, in their order; the rest of it id 0 and target 0."""
    for r in range(items.shape[0]):
        for q in range(bounds.shape[0] - 1):
            end = bounds[q]
            for j in range(bounds[q], bounds[q + 1]):
                if valid[r, j]:
                    out_items[r, end] = items[r, j]
                    out_targets[r, end] = targets[r, j]
                    end += 1
            ends[r, q] = end
            for j in range(end, bounds[q + 1]):
                out_items[r, j] = 0
                out_targets[r, j] = 0


class ListTable(NamedTuple):
    """Each user's list of item ids, the fixed teacher side on it (rows summing to 1 a segment, or 0)
    and the segments' column limits ``bounds = (0, ..., w)``, built once an epoch by :meth:`of`, which
    checks it. Within a segment the entries that count come first, up to ``ends[r, q]``: the kernel
    runs over them with no mask to test (about a quarter of RCE-KD's A_u entries do not count)."""

    items: torch.Tensor  # int32[n, w]: half the bytes of int64 to copy a batch
    targets: torch.Tensor  # float[n, w], 0 past each segment's end
    ends: torch.Tensor  # int32[n, segments]
    bounds: tuple[int, ...]
    n_items: int

    @classmethod
    def of(
        cls, items: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, bounds: tuple[int, ...], n_items: int
    ) -> ListTable:
        """The table of ``items`` (int64[n, w]) with ``targets`` on the entries where ``valid``."""
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
        if not 0 < n_items < 2**31:
            raise ValueError(f"need 0 < n_items < 2**31, got {n_items}")
        if items.numel() and (int(items.min()) < 0 or int(items.max()) >= n_items):
            raise IndexError(f"item ids must lie in [0, {n_items})")
        table = cls(
            torch.empty(items.shape, dtype=torch.int32),
            torch.empty_like(targets, memory_format=torch.contiguous_format),
            torch.empty(items.shape[0], len(bounds) - 1, dtype=torch.int32),
            tuple(bounds),
            n_items,
        )
        if items.numel():
            _compact_kernel(
                as_numpy(items),
                as_numpy(targets),
                as_numpy(valid),
                np.asarray(bounds, dtype=np.int64),
                table.items.numpy(),
                table.targets.numpy(),
                table.ends.numpy(),
            )
        else:
            table.ends.copy_(torch.tensor(bounds[:-1], dtype=torch.int32).expand_as(table.ends))
        return table

    @property
    def valid(self) -> torch.Tensor:
        """bool[n, w]: the entries that count (each segment's first ``ends - start`` columns)."""
        columns = torch.arange(self.items.shape[1])
        segment = torch.bucketize(columns, torch.tensor(self.bounds[1:-1]), right=True)
        return columns < self.ends.long()[:, segment]


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
        grad_users, grad_items, total = _run_kernel(user_vecs, item_vecs, table, rows, weights, scale)
        ctx.save_for_backward(grad_users, grad_items)
        return torch.tensor(total, dtype=user_vecs.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_users, grad_items = ctx.saved_tensors
        if float(grad) == 1.0:  # the usual case, a loss added as is: no pass over the item table
            return grad_users, grad_items, None, None, None, None
        return grad_users * grad, grad_items * grad, None, None, None, None


def _run_kernel(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    table: ListTable,
    rows: torch.Tensor,
    weights: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(grad_users, grad_items, loss) of :class:`ListCrossEntropy` on checked inputs: rows in blocks
    on torch's thread count, then the item gradient in blocks of item ids, all writing one output.

    The former layout, one item-gradient buffer a row block summed after, rounded differently on each
    thread count; this one gives the same numbers on any. On Gowalla epochs the two took the same
    time within this machine's noise (alternating runs of ``benchmarks.epoch_profile``, the KD term:
    2.3–2.8 s for the former, 2.4–2.9 s for this one)."""
    users_np, items_np = user_vecs.numpy(), item_vecs.numpy()
    lists = table.items.index_select(0, rows).numpy()  # the batch's rows: a whole-row copy streams
    targets = table.targets.index_select(0, rows).to(user_vecs.dtype).numpy()
    ends = table.ends.index_select(0, rows).numpy()
    starts = np.asarray(table.bounds[:-1], dtype=np.int64)
    weights_np = as_numpy(weights.to(user_vecs.dtype))
    grad_users = torch.zeros_like(user_vecs)
    grad_scores = np.empty(lists.shape, dtype=users_np.dtype)  # written where an entry counts, read only there
    n_blocks = kernel_threads() if rows.shape[0] >= BLOCK_ROWS else 1
    blocks = block_bounds(rows.shape[0], n_blocks)

    def block_args(b: int, _: int) -> tuple[Any, ...]:
        part = slice(*blocks[b])
        args = (users_np[part], items_np, lists[part], targets[part], ends[part], starts, weights_np[part])
        return (*args, float(scale), grad_users.numpy()[part], grad_scores[part])

    total = sum(run_blocks(_list_ce_kernel, block_args, len(blocks)))
    grad_items = torch.empty_like(item_vecs)
    item_blocks = block_bounds(item_vecs.shape[0], n_blocks)
    grad_items_np = grad_items.numpy()

    def scatter_args(b: int, _: int) -> tuple[Any, ...]:
        return (users_np, lists, ends, starts, grad_scores, grad_items_np, *item_blocks[b])

    run_blocks(_scatter_items_kernel, scatter_args, len(item_blocks))
    return grad_users, grad_items, float(total)
