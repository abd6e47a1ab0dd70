"""The compiled list kernels: same values and gradients as plain torch, and a checked boundary."""

from __future__ import annotations

import pytest
import torch

from rcekd.kd.kernels import list_grads, list_scores


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
