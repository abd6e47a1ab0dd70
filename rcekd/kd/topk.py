"""Exact top-k of score rows, compiled: every epoch each KD method ranks all items for every user.

torch's CPU top-k copies each row into (value, index) pairs; :func:`row_topk` sorts only the few
hundred scores above a proven threshold. :func:`row_topk` checks devices, dtypes, shapes and column
ranges (numba does not bounds-check) and calls the kernel on NumPy views; :func:`topk_items` ranks
all items for every user by dot product, in user chunks, never holding users × items scores.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp
import torch

from rcekd.kd.kernels import FLOATS
from rcekd.kd.threads import block_bounds, kernel_threads, run_blocks, single_torch_thread

#: :func:`row_topk` reduces each row to the maxima of groups of this many scores
TOPK_GROUP = 16
#: scores held per chunk when ranking all items with torch (CUDA)
CHUNK_SCORES = 2**25
#: :func:`topk_items` on CPU: users per chunk (16 × 41k scores, 2.6 MiB, stay near the cache)
TOPK_USERS = 16


@numba.njit(cache=True, nogil=True)
def _kth_largest(values, k, scratch):  # type: ignore[no-untyped-def]
    """The k-th largest of ``values`` (k ≥ 1), by quickselect on ``scratch`` (np.partition allocates,
    and is ~8× slower on a row's 2.6k group maxima)."""
    n = values.shape[0]
    scratch[:n] = values
    lo, hi, want = 0, n - 1, k - 1  # want: the index in descending order
    while lo < hi:
        a, b, c = scratch[lo], scratch[(lo + hi) // 2], scratch[hi]
        pivot = max(min(a, b), min(max(a, b), c))  # median of three
        i, j = lo, hi
        while i <= j:
            while scratch[i] > pivot:
                i += 1
            while scratch[j] < pivot:
                j -= 1
            if i <= j:
                scratch[i], scratch[j] = scratch[j], scratch[i]
                i += 1
                j -= 1
        if want <= j:
            hi = j
        elif want >= i:
            lo = i
        else:
            return scratch[want]
    return scratch[want]


#: :func:`row_topk` bins each row's group maxima into this many bins to bound their k-th largest
THRESHOLD_BINS = 256


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "nsz"})
def _group_threshold(maxima, k, counts, lowest, scratch):  # type: ignore[no-untyped-def]
    """A θ with at least k of ``maxima`` at or above it, near their k-th largest: one pass bins them,
    a walk down from the top bin stops once k are counted (cheaper than a quickselect of them)."""
    lo, hi, finite = np.inf, -np.inf, 0
    for v in maxima:
        if -np.inf < v < np.inf:
            lo, hi = min(lo, v), max(hi, v)
            finite += 1
    scale = THRESHOLD_BINS / (hi - lo) if finite >= k and hi > lo else 0.0
    if not 0.0 < scale < np.inf:  # too few finite maxima, all equal, or a range that overflows
        return _kth_largest(maxima, k, scratch)
    counts[:] = 0
    lowest[:] = np.inf
    for v in maxima:
        if -np.inf < v < np.inf:
            b = min(int((v - lo) * scale), THRESHOLD_BINS - 1)
            counts[b] += 1
            lowest[b] = min(lowest[b], v)
    theta, seen = np.inf, 0
    for b in range(THRESHOLD_BINS - 1, -1, -1):
        if counts[b]:
            seen += counts[b]
            theta = min(theta, lowest[b])
            if seen >= k:
                break
    return theta


@numba.njit(cache=True, nogil=True)
def group_maxima(row, n_groups, maxima):  # type: ignore[no-untyped-def]
    """maxima[g] = the largest of group g's scores, row[g], row[g + n_groups], row[g + 2 · n_groups], …

    Each maximum is kept in a register over its group's members and stored once, so the loop over g
    is a vector max per member. Two things keep it a vector loop: unsigned indices (numba wraps a
    negative signed index around, and that check in every access kept LLVM from vectorising: 27 µs
    a Gowalla row against 3 µs, one thread, on an Intel Xeon), and a running maximum in the row's
    own dtype (a float64 −∞ made every float32 compare a float64 one). The former in-place running
    max, ``maxima[g] = max(maxima[g], row[…])`` a member at a time, compiled to masked stores. Each
    group's members are compared in the same order in every form, so the maxima are the same bits.
    NaN members are passed over (a group of NaN only: −∞)."""
    n = row.shape[0]
    if n_groups == 0:
        return
    full = max(0, min(n_groups, n - (TOPK_GROUP - 1) * n_groups))  # groups with all TOPK_GROUP members
    maxima[0] = -np.inf  # (overwritten below) −∞ in the row's dtype
    lowest = maxima[0]
    stride = np.uint64(n_groups)
    for g in range(np.uint64(full)):
        best = lowest
        for t in range(np.uint64(TOPK_GROUP)):
            value = row[t * stride + g]
            best = value if value > best else best
        maxima[g] = best
    for g in range(full, n_groups):  # the last groups of a row that is not a multiple of TOPK_GROUP
        best = lowest
        for i in range(g, n, n_groups):
            value = row[i]
            best = value if value > best else best
        maxima[g] = best


@numba.njit(cache=True, nogil=True)
def _collect_by_member(row, maxima, theta, groups, ids, negated):  # type: ignore[no-untyped-def]
    """The columns of ``row`` scoring ≥ θ, member by member (all groups' first members, then their
    second, …): the groups with a maximum ≥ θ are listed first, so each pass reads ascending
    addresses, often in a cache line the pass has just read. Returns their count."""
    n, n_groups = row.shape[0], maxima.shape[0]
    n_listed = 0
    for g in range(n_groups):
        groups[n_listed] = g
        n_listed += maxima[g] >= theta
    count = 0
    for lo in range(0, n, n_groups):
        for e in range(n_listed):
            i = lo + groups[e]
            if i < n and row[i] >= theta:
                ids[count] = i
                negated[count] = -row[i]
                count += 1
    return count


@numba.njit(cache=True, nogil=True)
def _sort_distinct(negated, count, k, keys):  # type: ignore[no-untyped-def]
    """Sort candidates 0..count-1 by ``negated`` (float32) into ``keys`` (the candidate in the low 32
    bits), one integer sort of (value bits, index) pairs. True if no two of the first k values, nor
    the k-th and the next, are equal: then that order is the only sorted one, the one any exact top-k
    gives. False (``keys`` unusable) otherwise, or with NaN among them."""
    bits = negated.view(np.int32)
    for j in range(count):
        value = np.int64(bits[j])
        keys[j] = ((value ^ ((value >> 31) & 0x7FFFFFFF)) << 32) | j  # signed ints in the floats' order
    keys[:count].sort()
    for j in range(min(k, count)):
        here = negated[keys[j] & 0xFFFFFFFF]
        if here != here or (j + 1 < count and here == negated[keys[j + 1] & 0xFFFFFFFF]):
            return False
    return True


@numba.njit(cache=True, nogil=True, fastmath={"reassoc", "nsz"})
def _rows_topk(scores, hint, k, out, first, stop, packed):  # type: ignore[no-untyped-def]
    n = scores.shape[1]
    n_groups = (n + TOPK_GROUP - 1) // TOPK_GROUP  # group g: columns g, g + n_groups, g + 2 · n_groups, …
    maxima = np.empty(n_groups, dtype=scores.dtype)
    groups = np.empty(n_groups, dtype=np.int64)  # the groups with a maximum ≥ θ, listed first
    ids = np.empty(n, dtype=np.int64)  # usually < k · TOPK_GROUP are kept; ties or −∞ rows keep more
    negated = np.empty(n, dtype=scores.dtype)
    keys = np.empty(n, dtype=np.int64)
    counts = np.empty(THRESHOLD_BINS, dtype=np.int64)
    lowest = np.empty(THRESHOLD_BINS, dtype=scores.dtype)
    for r in range(first, stop):
        row = scores[r]
        group_maxima(row, n_groups, maxima)
        # θ with k scores at or above it bounds the k-th best score from below, so every top-k item
        # scores ≥ θ: a θ with k group maxima at or above it, or the hint's lowest score (its ≥ k items
        # reach it), whichever is higher
        # (with fewer groups than k, a short row or a deep list, the k-th score itself)
        theta = _group_threshold(maxima, k, counts, lowest, negated) if k <= n_groups else _kth_largest(row, k, negated)
        if hint.shape[1] >= k:
            hinted = np.inf
            for j in range(hint.shape[1]):
                hinted = min(hinted, row[hint[r, j]])
            theta = max(theta, hinted)
        # distinct top scores (float32): one order is right, found by an integer sort
        if packed:
            count = _collect_by_member(row, maxima, theta, groups, ids, negated)
            if count >= k and _sort_distinct(negated, count, k, keys):
                for j in range(k):
                    out[r, j] = ids[keys[j] & 0xFFFFFFFF]
                continue
        # ties (or float64): the candidates in group order and an argsort, whose order among ties
        # is the one this project's results were made with
        count = 0
        for g in range(n_groups):
            if maxima[g] >= theta:
                for i in range(g, n, n_groups):
                    if row[i] >= theta:
                        ids[count] = i
                        negated[count] = -row[i]
                        count += 1
        if count < k:  # fewer than k scores are not NaN: rank the whole row, NaN last
            for i in range(n):
                ids[i] = i
                negated[i] = -row[i]
            count = n
        order = np.argsort(negated[:count])  # deterministic: ties in a fixed order
        for j in range(k):
            out[r, j] = ids[order[j]]


def row_topk(scores: torch.Tensor, k: int, out: torch.Tensor, hint: torch.Tensor | None = None) -> None:
    """Fill ``out[r]`` (int64[b, k]) with the k best columns of ``scores[r]``, best first (ties in a
    fixed order): exact, like ``scores.topk(k)``, without ranking the whole row.

    One vectorised pass takes the maxima of groups of :data:`TOPK_GROUP` scores; a θ with k maxima
    at or above it (found by binning them, :func:`_group_threshold`) has k scores at or above it, so
    only the scores ≥ θ (in about k groups) are sorted. ``hint[r]`` (optional, ≥ k columns, e.g. last
    epoch's top list) raises θ to its own lowest score where that is higher: on Gowalla's students
    it rarely is (a few of last epoch's items fall far), so it is an option, not the method. NaN
    scores (a diverged model) rank last, after −∞.

    Float32 rows whose top k scores are distinct (200 of 200 sampled rows of a Gowalla student) are
    sorted as integers (:func:`_sort_distinct`): there is one right order. Rows with ties, and
    float64 rows, take an argsort of the candidates in group order, which fixes the order among ties
    as the kernel that made this project's results did. On a Gowalla student (29,858 users, k=200,
    ad hoc): 2.51 s on one thread and 1.09 s on two before these two changes and the group maxima
    of :func:`group_maxima`, 1.93 s and 0.97 s after, the same lists."""
    if scores.device.type != "cpu" or out.device.type != "cpu" or (hint is not None and hint.device.type != "cpu"):
        raise ValueError("row_topk runs on CPU tensors")
    hint = torch.zeros(scores.shape[0], 0, dtype=torch.int64) if hint is None else hint
    if scores.dtype not in FLOATS or hint.dtype != torch.int64 or out.dtype != torch.int64:
        raise TypeError("need float scores, int64 hint and int64 out")
    if scores.dim() != 2 or hint.dim() != 2 or hint.shape[0] != scores.shape[0] or out.shape != (scores.shape[0], k):
        raise ValueError(f"shapes do not fit: {tuple(scores.shape)}, {tuple(hint.shape)}, {tuple(out.shape)}, k={k}")
    if not 0 < k <= scores.shape[1]:
        raise ValueError(f"need 0 < k ≤ columns (k={k})")
    if hint.numel() and (int(hint.min()) < 0 or int(hint.max()) >= scores.shape[1]):
        raise IndexError(f"hint columns must lie in [0, {scores.shape[1]})")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if scores.shape[0]:
        values = scores.detach().contiguous().numpy()
        packed = values.dtype == np.float32
        _rows_topk(values, hint.contiguous().numpy(), k, out.numpy(), 0, scores.shape[0], packed)


def topk_items(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    k: int,
    exclude: sp.csr_matrix | None = None,
    hint: torch.Tensor | None = None,
) -> torch.Tensor:
    """int64[n_users, k]: each user's k best items by dot product, in user chunks, best first.

    ``exclude`` (users × items) removes items from a user's ranking (e.g. training items): they score
    −∞, so they only appear, last, when a user has fewer than k other items. On CPU the chunks are
    ranked by :func:`row_topk` (exact, and faster than torch's top-k; ``hint``:
    int64[n_users, ≥ k], e.g. last epoch's result, may tighten its threshold), in blocks of users on
    torch's thread count; elsewhere by torch. Both give the same lists up to the order of scores
    tied within float rounding.
    """
    n_users, n_items = user_vecs.shape[0], item_vecs.shape[0]
    k = min(k, n_items)
    if exclude is not None:
        if exclude.shape != (n_users, n_items):
            raise ValueError(f"exclude must be users × items {(n_users, n_items)}, got {exclude.shape}")
        exclude = exclude if exclude.format == "csr" else exclude.tocsr()
    user_vecs, item_vecs = user_vecs.detach(), item_vecs.detach()  # a ranking needs no gradient
    compiled = user_vecs.device.type == "cpu" and user_vecs.dtype in FLOATS
    compiled = compiled and item_vecs.dtype == user_vecs.dtype
    if hint is not None and (not compiled or hint.shape[0] != n_users or hint.shape[1] < k):
        hint = None
    out = torch.empty(n_users, k, dtype=torch.int64, device=user_vecs.device)
    if not compiled:
        _rank_rows(user_vecs, item_vecs, k, exclude, hint, out, 0, n_users, compiled=False)
        return out
    # CPU: each thread ranks its own block of users, product and top-k, on one torch thread (torch's
    # own threads would spin between products while the top-k kernels want the cores)
    bounds = block_bounds(n_users, kernel_threads())
    with single_torch_thread(len(bounds) > 1):
        run_blocks(_rank_rows, lambda b, _: (user_vecs, item_vecs, k, exclude, hint, out, *bounds[b]), len(bounds))
    return out


def _rank_rows(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    k: int,
    exclude: sp.csr_matrix | None,
    hint: torch.Tensor | None,
    out: torch.Tensor,
    first: int,
    stop: int,
    compiled: bool = True,
) -> None:
    """:func:`topk_items` for users first..stop-1, in chunks, into ``out``."""
    chunk = TOPK_USERS if compiled else max(1, CHUNK_SCORES // max(item_vecs.shape[0], 1))
    bounds = product_chunks(first, stop, chunk)
    buffer = user_vecs.new_empty(max([2, *(end - start for start, end in bounds)]), item_vecs.shape[0])
    for start, end in bounds:
        vecs = user_vecs[start:end] if end - start > 1 else user_vecs[start:end].repeat(2, 1)  # see product_chunks
        scores = torch.mm(vecs, item_vecs.T, out=buffer[: vecs.shape[0]])[: end - start]
        if exclude is not None:
            rows, cols = _excluded(exclude, start, end, scores.device)
            scores[rows, cols] = -torch.inf
        if compiled:
            row_topk(scores, k, out[start:end], None if hint is None else hint[start:end])
        else:
            out[start:end] = scores.topk(k, dim=1).indices


def product_chunks(first: int, stop: int, size: int) -> list[tuple[int, int]]:
    """(start, end) chunks of ``size`` users covering first..stop-1; a last chunk of one user joins the
    one before it (a range of one user is scored as two copies of it). A one-row product takes MKL's
    matrix-vector path, which on Intel CPUs rounds differently from its matrix-matrix path (whose rows
    do not depend on the other rows): which user ended up alone depends on the thread count (the row
    blocks), so that user's scores did too, and a near-tie could rank differently on two threads."""
    starts = list(range(first, stop, size))
    if len(starts) > 1 and stop - starts[-1] == 1:
        starts.pop()
    return [(start, min(start + size, stop) if i + 1 < len(starts) else stop) for i, start in enumerate(starts)]


def _excluded(exclude: sp.csr_matrix, start: int, stop: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows within the chunk, columns) of the excluded pairs of users start..stop-1, read off the CSR
    arrays: scipy's row slice and COO conversion cost 8× more (0.11 s against 0.013 s a ranking of
    Gowalla's users in 16-user chunks, the same pairs)."""
    indptr = exclude.indptr
    counts = np.diff(indptr[start : stop + 1])
    rows = torch.from_numpy(np.repeat(np.arange(stop - start, dtype=np.int64), counts)).to(device)
    cols = torch.from_numpy(exclude.indices[indptr[start] : indptr[stop]].astype(np.int64)).to(device)
    return rows, cols
