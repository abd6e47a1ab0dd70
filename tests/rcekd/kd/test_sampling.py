"""Draws that avoid forbidden items (RRD's uninteresting items, HetComp's negatives): never a forbidden
or repeated column, uniform over the allowed ones, short rows marked, one seed one draw."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from scipy.stats import chisquare

from rcekd.kd.sampling import _sample_with_keys, pair_keys, sample_excluding


def _exclude(n_rows: int, n_cols: int, per_row: int, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    cols = np.stack([rng.choice(n_cols, per_row, replace=False) for _ in range(n_rows)])
    rows = np.repeat(np.arange(n_rows), per_row)
    return sp.csr_matrix((np.ones(rows.size), (rows, cols.ravel())), shape=(n_rows, n_cols))


def _draw(path: str, exclude: sp.csr_matrix, start: int, stop: int, also: torch.Tensor, n: int, seed: int):  # type: ignore[no-untyped-def]
    generator = torch.Generator().manual_seed(seed)
    if path == "compiled":
        return sample_excluding(exclude, start, stop, also, n, generator)
    rows = torch.arange(start, stop)
    keys = torch.cat(
        [pair_keys(exclude, start, stop, rows.device), (rows.unsqueeze(1) * exclude.shape[1] + also).flatten()]
    )
    return _sample_with_keys(rows, n, exclude.shape[1], keys, generator)


@pytest.mark.parametrize("path", ["compiled", "keys"])
def test_draws_avoid_forbidden_and_repeated_columns(path: str) -> None:
    exclude = _exclude(60, 80, per_row=20)
    also = torch.randint(0, 80, (40, 15), generator=torch.Generator().manual_seed(1))  # repeats allowed
    cols, valid = _draw(path, exclude, 10, 50, also, 30, seed=3)
    assert cols.shape == valid.shape == (40, 30) and bool(valid.all())
    dense = exclude.toarray()
    for r in range(40):
        drawn = cols[r].tolist()
        assert len(set(drawn)) == 30
        assert not dense[10 + r, drawn].any()
        assert not set(drawn) & set(also[r].tolist())


@pytest.mark.parametrize("path", ["compiled", "keys"])
def test_rows_with_too_few_allowed_columns_are_marked(path: str) -> None:
    exclude = _exclude(3, 12, per_row=7)  # 5 allowed columns a row
    cols, valid = _draw(path, exclude, 0, 3, torch.zeros(3, 0, dtype=torch.int64), 8, seed=0)
    assert valid.sum(1).tolist() == [5, 5, 5]
    dense = exclude.toarray()
    for r in range(3):
        assert sorted(cols[r][valid[r]].tolist()) == np.flatnonzero(dense[r] == 0).tolist()


def test_draws_are_uniform_over_the_allowed_columns() -> None:
    n_cols, n_rows = 50, 4000
    exclude = sp.csr_matrix(
        (np.ones(n_rows * 10), (np.repeat(np.arange(n_rows), 10), np.tile(np.arange(10), n_rows))),
        shape=(n_rows, n_cols),
    )
    also = torch.full((n_rows, 1), 49, dtype=torch.int64)
    cols, valid = sample_excluding(exclude, 0, n_rows, also, 5, torch.Generator().manual_seed(4))
    assert bool(valid.all())
    counts = np.bincount(cols.flatten().numpy(), minlength=n_cols)
    assert counts[:10].sum() == 0 and counts[49] == 0
    assert chisquare(counts[10:49]).pvalue > 1e-3  # 39 allowed columns, 20,000 draws


def test_one_seed_gives_one_draw_and_ids_are_checked() -> None:
    exclude = _exclude(20, 40, per_row=5)
    also = torch.randint(0, 40, (20, 4), generator=torch.Generator().manual_seed(0))
    first = sample_excluding(exclude, 0, 20, also, 10, torch.Generator().manual_seed(7))
    again = sample_excluding(exclude, 0, 20, also, 10, torch.Generator().manual_seed(7))
    other = sample_excluding(exclude, 0, 20, also, 10, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other[0])
    with pytest.raises(IndexError):
        sample_excluding(exclude, 0, 20, also + 40, 10, torch.Generator())
    with pytest.raises(ValueError):
        sample_excluding(exclude, 0, 20, also[:5], 10, torch.Generator())
