"""Row blocks on several threads give exactly the one-thread result; the top-k threshold holds on odd rows."""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from itertools import pairwise

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from rcekd.kd.kernels import list_scores
from rcekd.kd.list_ce import ListCrossEntropy, ListTable
from rcekd.kd.threads import block_bounds, run_blocks, single_torch_thread
from rcekd.kd.topk import product_chunks, row_topk, topk_items


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """Three torch threads for one test (the suite runs on one), then back."""
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("with_exclude", [False, True])
def test_topk_items_on_threads_equals_one_thread(with_exclude: bool) -> None:
    torch.manual_seed(0)
    user_vecs, item_vecs = torch.randn(101, 8), torch.randn(3000, 8)
    exclude = sp.random(101, 3000, density=0.05, format="csr", random_state=1) if with_exclude else None
    hint = topk_items(user_vecs + 0.1 * torch.randn(101, 8), item_vecs, 40, exclude)
    single = topk_items(user_vecs, item_vecs, 40, exclude, hint=hint)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        threaded = topk_items(user_vecs, item_vecs, 40, exclude, hint=hint)
        assert torch.get_num_threads() == 3  # the ranking's one-thread blocks leave the count as it was
    finally:
        torch.set_num_threads(before)
    assert torch.equal(threaded, single)


def test_list_kernels_on_threads_equal_one_thread(torch_threads: None) -> None:
    """Teacher scores and the fused list CE's gradients are the same numbers on any thread count: rows
    go in blocks, the item gradient in blocks of item ids, each item's sum in row order (a training
    run reproduces on another thread count); only the loss value is summed from the blocks."""
    generator = torch.Generator().manual_seed(2)
    user_vecs, item_vecs = torch.randn(900, 300, generator=generator), torch.randn(500, 300, generator=generator)
    items = torch.randint(0, 500, (900, 40), generator=generator)
    valid = torch.rand(items.shape, generator=generator) > 0.2
    table = ListTable.of(items, torch.rand(items.shape, generator=generator), valid, (0, 10, 40), 500)
    weights = torch.rand(900, 2, generator=generator)
    rows = torch.randperm(900, generator=generator)
    outputs = []
    for count in (3, 1):
        torch.set_num_threads(count)
        inputs = [user_vecs.clone().requires_grad_(), item_vecs.clone().requires_grad_()]
        loss = ListCrossEntropy.apply(inputs[0], inputs[1], table, rows, weights, 0.1)
        loss.backward()
        outputs.append((list_scores(user_vecs, item_vecs, items), loss.detach(), inputs[0].grad, inputs[1].grad))
    (scores, loss, grad_users, grad_items), single = outputs
    assert torch.equal(scores, single[0])  # the fixture puts the count back afterwards
    torch.testing.assert_close(loss, single[1])
    assert torch.equal(grad_users, single[2])  # each user row is one block's
    assert torch.equal(grad_items, single[3])  # each item is one block's too


def odd_rows() -> torch.Tensor:
    """Rows where binning the group maxima needs its fallbacks, and ordinary rows between them."""
    n = 16 * 40  # 40 groups of 16
    rows = torch.randn(8, n)
    rows[1] = 0.5  # every score equal: the maxima span no range
    rows[2, : n - 20] = -torch.inf  # most of the row excluded: fewer finite maxima than k
    rows[3, 7] = torch.inf  # one infinite score
    rows[4] = (torch.rand(n) * 2 - 1) * 3e38  # a range (max − min) that overflows float32
    rows[5] = torch.randn(n) * 1e-30  # a tiny range
    rows[6] = torch.randint(0, 3, (n,)).float()  # heavy ties
    return rows


@pytest.mark.parametrize("k", [1, 10, 39, 40, 41, 300])  # around and beyond the 40 groups
def test_row_topk_equals_torch_on_odd_rows(k: int) -> None:
    scores = odd_rows()
    out = torch.empty(scores.shape[0], k, dtype=torch.int64)
    row_topk(scores, k, out)
    assert torch.equal(scores.gather(1, out), scores.topk(k, dim=1).values)
    assert all(len(set(row.tolist())) == k for row in out)  # no column twice


def test_block_bounds_cover_the_rows_once() -> None:
    for n_rows, blocks in [(10, 3), (2, 5), (7, 1), (0, 2)]:
        bounds = block_bounds(n_rows, blocks)
        covered = [r for first, stop in bounds for r in range(first, stop)]
        assert covered == list(range(n_rows))
        assert len(bounds) == max(1, min(blocks, n_rows))


def test_run_blocks_keeps_block_order_and_nests_without_deadlock() -> None:
    def inner(block: int, n_blocks: int) -> tuple[int, int]:
        return block, n_blocks

    def outer(block: int, n_blocks: int) -> list[tuple[int, int]]:  # a block that itself asks for blocks
        return run_blocks(inner, lambda b, n: (b, n), 2)

    results = run_blocks(outer, lambda b, n: (b, n), 2)
    assert results[0] == [(0, 2), (1, 2)]  # the caller's block may use the pool
    assert results[1] == [(0, 1)]  # a pool block runs its blocks itself


def test_single_torch_thread_restores_the_count(torch_threads: None) -> None:
    with single_torch_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 3
    with pytest.raises(RuntimeError), single_torch_thread():
        raise RuntimeError("a failing block")
    assert torch.get_num_threads() == 3


def _rank_in_child(queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    torch.set_num_threads(2)
    torch.manual_seed(0)
    queue.put(topk_items(torch.randn(30, 4), torch.randn(500, 4), 10).numpy())


def test_a_forked_child_ranks_on_threads(torch_threads: None) -> None:
    """A Celery prefork worker is a fork: the parent's pool threads are not there, the child makes its own."""
    torch.manual_seed(0)
    user_vecs, item_vecs = torch.randn(30, 4), torch.randn(500, 4)
    expected = topk_items(user_vecs, item_vecs, 10).numpy()  # the parent's pool now exists
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_rank_in_child, args=(queue,))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("n_users", [1, 2, 17, 33, 34, 5219])
def test_product_chunks_cover_the_range_without_a_lone_user(n_users: int) -> None:
    for first, stop in [(0, n_users), *block_bounds(n_users, 2)]:
        chunks = product_chunks(first, stop, 16)
        assert [start for start, _ in chunks] == sorted({start for start, _ in chunks})
        assert chunks[0][0] == first and chunks[-1][1] == stop
        assert all(end == start for (_, end), (start, _) in pairwise(chunks))
        assert all(2 <= end - start <= 17 for start, end in chunks) or chunks == [(first, stop)]


@pytest.mark.parametrize("n_users", [1, 3, 33])
def test_rankings_never_take_a_one_row_product(n_users: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """MKL's one-row (matrix-vector) product rounds differently from its matrix-matrix one on Intel
    CPUs, and the row blocks of two threads left one of CiteULike's 5,219 users alone in a chunk."""
    torch.manual_seed(n_users)
    user_vecs, item_vecs = torch.randn(n_users, 8), torch.randn(300, 8)
    expected = topk_items(user_vecs, item_vecs, 20)
    product_rows: list[int] = []
    plain_mm = torch.mm

    def spy(left: torch.Tensor, right: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        product_rows.append(left.shape[0])
        return plain_mm(left, right, **kwargs)

    monkeypatch.setattr(torch, "mm", spy)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            assert torch.equal(topk_items(user_vecs, item_vecs, 20), expected)
    finally:
        torch.set_num_threads(threads)
    assert product_rows and min(product_rows) >= 2
