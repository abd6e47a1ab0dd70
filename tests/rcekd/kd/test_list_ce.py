"""The fused list cross-entropy: the same loss and gradients as plain torch on the table rows a batch
names, and a checked boundary."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from rcekd.kd.list_ce import ListCrossEntropy, ListTable

N_ITEMS = 211


def _plain_list_ce(user_vecs, item_vecs, items, targets, valid, bounds, weights, scale):  # type: ignore[no-untyped-def]
    """The same sum in torch ops: masked log-softmax per segment, rows without valid entries add 0."""
    scores = torch.einsum("bd,bwd->bw", user_vecs, item_vecs[items]) * scale
    total = scores.new_zeros(())
    for q, (lo, hi) in enumerate(pairwise(bounds)):
        seg_valid = valid[:, lo:hi]
        logits = scores[:, lo:hi].masked_fill(~seg_valid, -1e30)
        log_q = torch.log_softmax(logits, 1)
        per_row = -(targets[:, lo:hi] * torch.where(seg_valid, log_q, 0)).sum(1)
        total = total + (weights[:, q] * per_row * seg_valid.any(1)).sum()
    return total


def _lists(dtype: torch.dtype, n_users: int = 40, width: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(items, targets, valid) as a distiller hands them over, invalid entries scattered among the valid."""
    generator = torch.Generator().manual_seed(3)
    items = torch.randint(0, N_ITEMS, (n_users, width), generator=generator)
    items[0] = 3  # one row repeats an item everywhere: each entry still contributes on its own
    items[2, 5:9] = items[2, :4]  # a row whose second segment repeats its first (RCE-KD's sample in Q_S)
    valid = torch.rand(items.shape, generator=generator) > 0.3
    valid[1, 5:] = False  # row 1: its second segment has no valid entry
    valid[4] = False  # row 4: nothing valid at all
    targets = torch.softmax(torch.randn(items.shape, generator=generator, dtype=dtype), 1) * valid
    return items, targets, valid


def _table(dtype: torch.dtype, bounds: tuple[int, ...] = (0, 5, 12)) -> ListTable:
    return ListTable.of(*_lists(dtype), bounds, N_ITEMS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_list_cross_entropy_equals_plain_torch_on_the_rows_it_is_given(dtype: torch.dtype) -> None:
    items, targets, valid = _lists(dtype)
    table = ListTable.of(items, targets, valid, (0, 5, 12), N_ITEMS)
    generator = torch.Generator().manual_seed(5)
    rows = torch.tensor([2, 0, 1, 4, 7, 39, 12, 3, 30])  # a batch's users, in no particular order
    user_vecs = torch.randn(rows.shape[0], 20, generator=generator, dtype=dtype)
    item_vecs = torch.randn(N_ITEMS, 20, generator=generator, dtype=dtype)
    weights = torch.rand(rows.shape[0], 2, generator=generator, dtype=dtype) * 3
    fused_inputs = [user_vecs.clone().requires_grad_(), item_vecs.clone().requires_grad_()]
    plain_inputs = [user_vecs.clone().requires_grad_(), item_vecs.clone().requires_grad_()]
    fused = ListCrossEntropy.apply(*fused_inputs, table, rows, weights, 0.7)
    plain = _plain_list_ce(*plain_inputs, items[rows], targets[rows], valid[rows], table.bounds, weights, 0.7)
    (2.5 * fused).backward()
    (2.5 * plain).backward()
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(fused.detach(), plain.detach(), **tolerance)
    for got, expected in zip(fused_inputs, plain_inputs, strict=True):
        torch.testing.assert_close(got.grad, expected.grad, **tolerance)
    assert fused_inputs[1].grad[items[rows[0]]].abs().sum() > 0  # the repeated item's gradient arrived
    assert fused_inputs[0].grad[3].abs().sum() == 0  # row 4 (nothing valid) gets no gradient


def test_row_blocks_on_several_threads_give_the_one_thread_sums() -> None:
    items, targets, valid = _lists(torch.float64, n_users=700, width=12)
    table = ListTable.of(items, targets, valid, (0, 5, 12), N_ITEMS)
    generator = torch.Generator().manual_seed(8)
    rows = torch.randperm(700, generator=generator)[:600]  # above BLOCK_ROWS: split when threads allow
    user_vecs = torch.randn(600, 8, generator=generator, dtype=torch.float64)
    item_vecs = torch.randn(N_ITEMS, 8, generator=generator, dtype=torch.float64)
    weights = torch.rand(600, 2, generator=generator, dtype=torch.float64)
    results = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            inputs = [user_vecs.clone().requires_grad_(), item_vecs.clone().requires_grad_()]
            ListCrossEntropy.apply(*inputs, table, rows, weights, 1.0).backward()
            results.append([inputs[0].grad, inputs[1].grad])
    finally:
        torch.set_num_threads(threads)
    plain_inputs = [user_vecs.clone().requires_grad_(), item_vecs.clone().requires_grad_()]
    _plain_list_ce(*plain_inputs, items[rows], targets[rows], valid[rows], (0, 5, 12), weights, 1.0).backward()
    for got in results:
        for grad, expected in zip(got, plain_inputs, strict=True):
            torch.testing.assert_close(grad, expected.grad, rtol=1e-10, atol=1e-10)


def test_a_table_puts_the_entries_that_count_first_in_each_segment_in_their_order() -> None:
    items, targets, valid = _lists(torch.float64)
    table = ListTable.of(items, targets, valid, (0, 5, 12), N_ITEMS)
    assert table.items.dtype == torch.int32 and table.ends.dtype == torch.int32
    counts = torch.stack([valid[:, :5].sum(1), valid[:, 5:].sum(1)], 1)
    assert torch.equal(table.ends.long() - torch.tensor([0, 5]), counts)
    assert torch.equal(table.valid.sum(1), valid.sum(1))
    for row in (0, 1, 2, 4, 17):
        for lo, hi in ((0, 5), (5, 12)):
            kept = valid[row, lo:hi]
            assert torch.equal(table.items[row, lo:hi][table.valid[row, lo:hi]].long(), items[row, lo:hi][kept])
            assert torch.equal(table.targets[row, lo:hi][table.valid[row, lo:hi]], targets[row, lo:hi][kept])
    assert not table.targets[~table.valid].any()  # past a segment's end nothing counts
    assert not table.valid[4].any() and not table.valid[1, 5:].any()


def test_a_table_is_checked_once_when_built() -> None:
    items = torch.randint(0, N_ITEMS, (6, 4))
    targets, valid = torch.zeros(6, 4), torch.ones(6, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="bounds"):
        ListTable.of(items, targets, valid, (0, 3), N_ITEMS)
    with pytest.raises(ValueError, match="bounds"):
        ListTable.of(items, targets, valid, (0, 3, 2, 4), N_ITEMS)
    with pytest.raises(ValueError, match="bool"):
        ListTable.of(items, targets, valid.float(), (0, 4), N_ITEMS)
    with pytest.raises(ValueError, match="match"):
        ListTable.of(items, targets[:, :3], valid, (0, 4), N_ITEMS)
    with pytest.raises(TypeError):
        ListTable.of(items.int(), targets, valid, (0, 4), N_ITEMS)
    with pytest.raises(TypeError):
        ListTable.of(items, targets.half(), valid, (0, 4), N_ITEMS)
    with pytest.raises(IndexError):
        ListTable.of(items + N_ITEMS, targets, valid, (0, 4), N_ITEMS)
    with pytest.raises(IndexError):
        ListTable.of(items - N_ITEMS, targets, valid, (0, 4), N_ITEMS)


def test_a_batch_that_does_not_fit_its_table_is_refused() -> None:
    table = _table(torch.float32)
    user_vecs, item_vecs = torch.randn(3, 20), torch.randn(N_ITEMS, 20)
    rows, weights = torch.tensor([0, 1, 2]), torch.ones(3, 2)
    with pytest.raises(IndexError, match="rows"):
        ListCrossEntropy.apply(user_vecs, item_vecs, table, torch.tensor([0, 1, 40]), weights, 1.0)
    with pytest.raises(IndexError, match="rows"):
        ListCrossEntropy.apply(user_vecs, item_vecs, table, torch.tensor([0, -1, 2]), weights, 1.0)
    with pytest.raises(ValueError, match="rows"):
        ListCrossEntropy.apply(user_vecs, item_vecs, table, rows[:2], weights, 1.0)
    with pytest.raises(ValueError, match="weights"):
        ListCrossEntropy.apply(user_vecs, item_vecs, table, rows, torch.ones(3, 1), 1.0)
    with pytest.raises(ValueError, match="items"):
        ListCrossEntropy.apply(user_vecs, item_vecs[:100], table, rows, weights, 1.0)
    with pytest.raises(TypeError):
        ListCrossEntropy.apply(user_vecs.double(), item_vecs, table, rows, weights, 1.0)
    with pytest.raises(ValueError, match=r"\[b, d\]"):
        ListCrossEntropy.apply(user_vecs[:, :5], item_vecs, table, rows, weights, 1.0)
