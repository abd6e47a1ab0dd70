"""Sampling and listwise helpers shared by the KD methods, all vectorised over rows (users or items)."""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp
import torch


def gumbel_topk(log_weights: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of k draws without replacement per row with p ∝ exp(log_weights)."""
    uniform = torch.rand(log_weights.shape, generator=generator, device=log_weights.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20)))
    return (log_weights + gumbel).topk(k, dim=1).indices


#: stands in for −∞ on masked entries: exp() of it is 0, yet differences of two of them stay finite,
#: so masked rows never produce NaN gradients (−∞ − −∞ would)
MASKED = -1e9


def listwise_loss(
    ranked_logits: torch.Tensor,
    below_logits: torch.Tensor,
    ranked_valid: torch.Tensor | None = None,
    below_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """float[b]: −log Plackett–Luce likelihood of the ranked list (best first), all above ``below``.

    −Σ_k [ s_k − log( Σ_{j≥k} e^{s_j} + Σ_l e^{b_l} ) ] over the valid ranked entries; computed with a
    reversed logcumsumexp and one logsumexp so large logits cannot overflow. Rows without a valid
    ranked entry give 0. Invalid ranked entries are skipped (they join neither a numerator nor a tail).
    """
    s = ranked_logits if ranked_valid is None else ranked_logits.masked_fill(~ranked_valid, MASKED)
    b = below_logits if below_valid is None else below_logits.masked_fill(~below_valid, MASKED)
    tail = torch.logcumsumexp(s.flip(1), dim=1).flip(1)  # log Σ_{j ≥ k} e^{s_j}
    below = torch.logsumexp(b, dim=1, keepdim=True) if b.shape[1] else torch.full_like(s[:, :1], MASKED)
    terms = s - torch.logaddexp(tail, below)
    if ranked_valid is not None:
        terms = terms * ranked_valid
    return -terms.sum(1)


def allowed_counts(exclude: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    """int64[rows]: how many columns each row may rank (all minus the excluded ones).

    ``topk_items`` puts excluded columns last (score −∞), so position j of a row's list is a real
    candidate iff j < allowed[row]; only matters when a list is longer than that (tiny catalogues).
    """
    counts = exclude.shape[1] - np.diff(exclude.indptr)
    return torch.from_numpy(counts.astype(np.int64)).to(device)


def pair_keys(exclude: sp.csr_matrix, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """int64[nnz]: row * n_cols + col of the excluded pairs of rows start..stop-1 (global row ids)."""
    block = exclude[start:stop]
    rows = np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(block.indptr))
    keys = rows * exclude.shape[1] + block.indices.astype(np.int64)
    return torch.from_numpy(keys).to(device)


def sample_excluding(
    exclude: sp.csr_matrix,
    start: int,
    stop: int,
    also: torch.Tensor,
    n_samples: int,
    generator: torch.Generator,
    rounds: int = 30,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cols int64[b, n], valid bool[b, n]) for rows start..stop-1 of ``exclude``: uniform draws
    without repeats among the columns that are neither excluded in the row nor in ``also[r]`` (int64
    [b, m], e.g. the teacher's top list), in draw order.

    Each draw is a uniform column, rejected if forbidden or already drawn: uniform sampling without
    replacement over the allowed columns. Draws come in rounds (the generator's stream, so a seed gives
    the same sets); a row still short after ``rounds`` rounds (fewer than n allowed columns, or a
    catalogue nearly all forbidden) has its missing entries marked invalid. On CPU a compiled loop
    marks each row's forbidden columns in a scratch table (O(forbidden + draws) a row); elsewhere
    sorted keys and a binary search.
    """
    n_rows, n_cols = stop - start, exclude.shape[1]
    if also.dim() != 2 or also.shape[0] != n_rows or also.dtype != torch.int64:
        raise ValueError(f"also must be int64 [{n_rows}, m], got {also.dtype} {tuple(also.shape)}")
    if also.numel() and (int(also.min()) < 0 or int(also.max()) >= n_cols):
        raise IndexError(f"also must hold columns in [0, {n_cols})")
    if also.device.type != "cpu":
        rows = torch.arange(start, stop, device=also.device)
        forbidden = torch.cat(
            [pair_keys(exclude, start, stop, also.device), (rows.unsqueeze(1) * n_cols + also).flatten()]
        )
        return _sample_with_keys(rows, n_samples, n_cols, forbidden, generator, rounds)
    block = exclude[start:stop]
    indptr, indices = block.indptr.astype(np.int64), block.indices.astype(np.int64)
    cols = np.zeros((n_rows, n_samples), dtype=np.int64)
    filled = np.zeros(n_rows, dtype=np.int64)
    mark = np.zeros(n_cols, dtype=np.int64)
    pool_width = n_samples + max(8, n_samples // 4)  # a few spares: most rows fill in one round
    also_np = also.contiguous().numpy()
    for round_no in range(rounds):
        pool = torch.randint(0, n_cols, (n_rows, pool_width), generator=generator).numpy()
        _draw_kernel(indptr, indices, also_np, pool, cols, filled, mark, round_no * n_rows)
        if filled.min(initial=n_samples) >= n_samples:
            break
    valid = np.arange(n_samples) < filled[:, None]
    return torch.from_numpy(cols), torch.from_numpy(valid)


@numba.njit(cache=True, nogil=True)
def _draw_kernel(indptr, indices, also, pool, cols, filled, mark, stamp_base):  # type: ignore[no-untyped-def]
    """One round of draws for every row not yet full; ``mark[c] == stamp`` means c is forbidden or
    taken in the row being drawn (a fresh stamp a row and round, so the table is never cleared)."""
    n_rows, n_samples = cols.shape
    for r in range(n_rows):
        count = filled[r]
        if count >= n_samples:
            continue
        stamp = stamp_base + r + 1
        for p in range(indptr[r], indptr[r + 1]):
            mark[indices[p]] = stamp
        for j in range(also.shape[1]):
            mark[also[r, j]] = stamp
        for j in range(count):
            mark[cols[r, j]] = stamp
        for p in range(pool.shape[1]):
            if count >= n_samples:
                break
            col = pool[r, p]
            if mark[col] != stamp:
                mark[col] = stamp
                cols[r, count] = col
                count += 1
        filled[r] = count


def _sample_with_keys(
    rows: torch.Tensor,
    n_samples: int,
    n_cols: int,
    forbidden: torch.Tensor,
    generator: torch.Generator,
    rounds: int = 30,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample_excluding` off the CPU: ``forbidden`` holds the keys row * n_cols + col that may
    not be drawn (any order). Draws that hit one, or repeat an earlier draw of the row, are redrawn
    (all at once) for up to ``rounds`` rounds; what still collides is marked invalid."""
    device = rows.device
    forbidden = forbidden.sort().values
    cols = torch.randint(0, n_cols, (rows.shape[0], n_samples), generator=generator, device=device)
    bad = torch.ones_like(cols, dtype=torch.bool)
    for _ in range(rounds):
        fresh = torch.randint(0, n_cols, cols.shape, generator=generator, device=device)
        cols = torch.where(bad, fresh, cols)
        bad = _collisions(rows, cols, n_cols, forbidden)
        if not bad.any():
            break
    return cols, ~bad


def _collisions(rows: torch.Tensor, cols: torch.Tensor, n_cols: int, forbidden: torch.Tensor) -> torch.Tensor:
    """bool[b, n]: the draw is forbidden, or an earlier-sorted duplicate of the same row exists."""
    keys = rows.unsqueeze(1) * n_cols + cols
    if forbidden.numel():
        at = torch.searchsorted(forbidden, keys).clamp(max=forbidden.numel() - 1)
        hit = forbidden[at] == keys
    else:
        hit = torch.zeros_like(cols, dtype=torch.bool)
    ordered, order = cols.sort(1)
    repeat_sorted = torch.zeros_like(ordered, dtype=torch.bool)
    repeat_sorted[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    repeat = torch.zeros_like(repeat_sorted).scatter(1, order, repeat_sorted)
    return hit | repeat
