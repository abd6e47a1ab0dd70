"""The compiled Plackett–Luce loss of RRD and DCD: the same value and gradients as the torch form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import rcekd.kd.dcd as dcd_module
import rcekd.kd.rrd as rrd_module
from rcekd.data import Dataset
from rcekd.kd import Teacher
from rcekd.kd.dcd import DCD
from rcekd.kd.listwise import ListwiseLoss
from rcekd.kd.rrd import RRD
from rcekd.kd.sampling import listwise_loss
from rcekd.models import MF


def _plain(query, targets, lists, valid, n_ranked, weights):  # type: ignore[no-untyped-def]
    scores = torch.einsum("bd,bwd->bw", query, targets[lists])
    per_row = listwise_loss(scores[:, :n_ranked], scores[:, n_ranked:], valid[:, :n_ranked], valid[:, n_ranked:])
    return (per_row * weights).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_ranked", [0, 1, 6, 14])
@pytest.mark.parametrize("spread", [1.0, 30.0])  # 30: logits far apart, where unshifted exps would overflow
def test_listwise_loss_equals_the_torch_form(dtype: torch.dtype, n_ranked: int, spread: float) -> None:
    generator = torch.Generator().manual_seed(5)
    n_rows, n_targets, width, dim = 19, 57, 14, 8
    query = torch.randn(n_rows, dim, generator=generator, dtype=dtype) * spread**0.5
    targets = torch.randn(n_targets, dim, generator=generator, dtype=dtype) * spread**0.5
    lists = torch.randint(0, n_targets, (n_rows, width), generator=generator)
    lists[0] = 4  # a repeated target: each entry counts on its own
    valid = torch.rand(lists.shape, generator=generator) > 0.3
    valid[1, :n_ranked] = False  # no ranked entry: no term
    valid[2, n_ranked:] = False  # nothing below
    weights = torch.rand(n_rows, generator=generator, dtype=dtype) * 4
    fused_inputs = [query.clone().requires_grad_(), targets.clone().requires_grad_()]
    plain_inputs = [query.clone().requires_grad_(), targets.clone().requires_grad_()]
    fused = ListwiseLoss.apply(*fused_inputs, lists, valid, n_ranked, weights)
    plain = _plain(*plain_inputs, lists, valid, n_ranked, weights)
    (1.5 * fused).backward()
    (1.5 * plain).backward()
    # float32: torch rounds its logcumsumexp in float32, the kernel sums in float64
    tolerance = {"rtol": 2e-4, "atol": 1e-3} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-9}
    assert torch.isfinite(fused)
    torch.testing.assert_close(fused.detach(), plain.detach(), **tolerance)
    for got, expected in zip(fused_inputs, plain_inputs, strict=True):
        torch.testing.assert_close(got.grad, expected.grad, **tolerance)
    if n_ranked == 0:
        assert fused.item() == 0.0


def test_listwise_loss_refuses_what_does_not_fit() -> None:
    query, targets = torch.randn(3, 4), torch.randn(10, 4)
    lists, valid, weights = torch.zeros(3, 5, dtype=torch.int64), torch.ones(3, 5, dtype=torch.bool), torch.ones(3)
    with pytest.raises(ValueError, match="bool"):
        ListwiseLoss.apply(query, targets, lists, valid.float(), 2, weights)
    with pytest.raises(ValueError, match="n_ranked"):
        ListwiseLoss.apply(query, targets, lists, valid, 6, weights)
    with pytest.raises(ValueError, match="weights"):
        ListwiseLoss.apply(query, targets, lists, valid, 2, torch.ones(3, 1))
    with pytest.raises(IndexError):
        ListwiseLoss.apply(query, targets, lists + 10, valid, 2, weights)


@pytest.mark.parametrize("method", ["rrd", "dcd", "dcd_ucd_only"])
def test_rrd_and_dcd_fused_terms_equal_their_torch_terms(
    tiny_dataset: Dataset, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """``loss`` through the kernel and through the torch ops (the path of students that cannot use
    it): same value, same gradients of every student parameter, UCD and ICD."""
    torch.manual_seed(2)
    teacher = Teacher(MF(tiny_dataset.n_users, tiny_dataset.n_items, dim=16, init_std=0.5))
    student = MF(tiny_dataset.n_users, tiny_dataset.n_items, dim=8, init_std=0.3)
    if method == "rrd":
        distiller: RRD | DCD = RRD(teacher, tiny_dataset, weight=3.0, K=6, L=9, mxK=20)
        module = rrd_module
    else:
        distiller = DCD(teacher, tiny_dataset, weight=3.0, mxK=20, n_samples=7, T=2.0, icd=method == "dcd")
        module = dcd_module
    distiller.on_epoch_start(student, 1)
    batch = next(student.batches(tiny_dataset.train, 64, np.random.default_rng(1)))
    results = []
    for fused in (True, False):
        monkeypatch.setattr(module, "fused_list_loss_available", lambda _student, fused=fused: fused)
        student.zero_grad(set_to_none=True)
        loss = distiller.loss(batch, student)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in student.parameters()]))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    assert plain_loss > 0
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-5, atol=1e-5)
    for got, expected in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
