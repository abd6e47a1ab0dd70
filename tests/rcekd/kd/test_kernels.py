"""The compiled list kernels: same values and gradients as plain torch, and a checked boundary."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from rcekd.kd.kernels import ListCrossEntropy, list_grads, list_scores


def _inputs(dtype: torch.dtype, n_rows: int = 33, n_items: int = 211, width: int = 17, dim: int = 20):
    generator = torch.Generator().manual_seed(7)
    user_vecs = torch.randn(n_rows, dim, generator=generator, dtype=dtype)
    item_vecs = torch.randn(n_items, dim, generator=generator, dtype=dtype)
    items = torch.randint(0, n_items, (n_rows, width), generator=generator)
    items[0] = 3  # one row repeats an item: each entry is scored, and contributes, on its own
    return user_vecs, item_vecs, items


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scores_and_gradients_equal_plain_torch(dtype: torch.dtype) -> None:
    user_vecs, item_vecs, items = _inputs(dtype)
    grad = torch.randn(items.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    users_ref, items_ref = user_vecs.clone().requires_grad_(), item_vecs.clone().requires_grad_()
    expected = torch.einsum("bd,bwd->bw", users_ref, items_ref[items])
    expected.backward(grad)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(list_scores(user_vecs, item_vecs, items), expected.detach(), **tolerance)
    grad_users, grad_items = list_grads(user_vecs, item_vecs, items, grad)
    torch.testing.assert_close(grad_users, users_ref.grad, **tolerance)
    torch.testing.assert_close(grad_items, items_ref.grad, **tolerance)
    assert grad_items[items.unique()].abs().sum() > 0 and grad_items.dtype == dtype


def test_non_contiguous_inputs_are_read_correctly() -> None:
    user_vecs, item_vecs, items = _inputs(torch.float32)
    wide = torch.randn(item_vecs.shape[1], item_vecs.shape[0])  # a transposed view: strides (1, n)
    torch.testing.assert_close(
        list_scores(user_vecs, wide.t(), items), list_scores(user_vecs, wide.t().contiguous(), items)
    )


@pytest.mark.parametrize("bad_id", [-1, 211])
def test_out_of_range_ids_are_refused_before_the_kernel_runs(bad_id: int) -> None:
    user_vecs, item_vecs, items = _inputs(torch.float32)
    items[5, 2] = bad_id
    with pytest.raises(IndexError, match=r"\[0, 211\)"):
        list_scores(user_vecs, item_vecs, items)
    with pytest.raises(IndexError):
        list_grads(user_vecs, item_vecs, items, torch.zeros(items.shape))


def test_wrong_dtypes_and_shapes_are_refused() -> None:
    user_vecs, item_vecs, items = _inputs(torch.float32)
    with pytest.raises(TypeError):
        list_scores(user_vecs.double(), item_vecs, items)
    with pytest.raises(TypeError):
        list_scores(user_vecs, item_vecs, items.int())
    with pytest.raises(ValueError, match="do not fit"):
        list_scores(user_vecs[:, :5], item_vecs, items)
    with pytest.raises(ValueError, match="do not fit"):
        list_scores(user_vecs[:4], item_vecs, items)
    with pytest.raises(ValueError, match="at least one dimension"):
        list_scores(user_vecs[:, :0], item_vecs[:, :0], items)
    with pytest.raises(ValueError, match="must match"):
        list_grads(user_vecs, item_vecs, items, torch.zeros(3, 3))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_list_cross_entropy_equals_plain_torch(dtype: torch.dtype) -> None:
    user_vecs, item_vecs, items = _inputs(dtype, width=12)
    generator = torch.Generator().manual_seed(3)
    valid = torch.rand(items.shape, generator=generator) > 0.3
    valid[1, 5:] = False  # row 1: its second segment has no valid entry
    targets = torch.softmax(torch.randn(items.shape, generator=generator, dtype=dtype), 1) * valid
    bounds = (0, 5, 12)
    weights = torch.rand(items.shape[0], 2, generator=generator, dtype=dtype) * 3
    fused_inputs = [user_vecs.clone().requires_grad_(), item_vecs.clone().requires_grad_()]
    plain_inputs = [user_vecs.clone().requires_grad_(), item_vecs.clone().requires_grad_()]
    fused = ListCrossEntropy.apply(*fused_inputs, items, targets, valid, bounds, weights, 0.7)
    plain = _plain_list_ce(*plain_inputs, items, targets, valid, bounds, weights, 0.7)
    (2.5 * fused).backward()
    (2.5 * plain).backward()
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(fused.detach(), plain.detach(), **tolerance)
    for got, expected in zip(fused_inputs, plain_inputs, strict=True):
        torch.testing.assert_close(got.grad, expected.grad, **tolerance)


def test_list_cross_entropy_refuses_what_does_not_fit() -> None:
    user_vecs, item_vecs, items = _inputs(torch.float32, width=6)
    targets, valid, weights = torch.zeros(items.shape), torch.ones(items.shape, dtype=torch.bool), torch.ones(33, 1)
    with pytest.raises(ValueError, match="bounds"):
        ListCrossEntropy.apply(user_vecs, item_vecs, items, targets, valid, (0, 5), weights, 1.0)
    with pytest.raises(ValueError, match="bool"):
        ListCrossEntropy.apply(user_vecs, item_vecs, items, targets, valid.float(), (0, 6), weights, 1.0)
    with pytest.raises(ValueError, match="weights"):
        ListCrossEntropy.apply(user_vecs, item_vecs, items, targets, valid, (0, 6), torch.ones(33, 2), 1.0)
    with pytest.raises(IndexError):
        ListCrossEntropy.apply(user_vecs, item_vecs, items + 1000, targets, valid, (0, 6), weights, 1.0)
