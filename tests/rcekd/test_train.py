"""The training loop (early stopping, best weights, callbacks, trajectory) and RowSparseAdam."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from rcekd.data import Dataset
from rcekd.metrics import evaluate_model
from rcekd.models import Recommender, build_model
from rcekd.models.base import Batch
from rcekd.optim import RowSparseAdam
from rcekd.train import Progress, TrainConfig, make_optimizer, train


def mf(dataset: Dataset, seed: int = 0) -> Recommender:
    torch.manual_seed(seed)
    return build_model("mf", dataset, dim=8, init_std=0.1)


def config(**overrides: Any) -> TrainConfig:
    fields: dict[str, Any] = {
        "epochs": 10,
        "batch_size": 128,
        "lr": 0.05,
        "eval_every": 1,
        "patience": 100,
        "seed": 0,
        "device": "cpu",
    }
    return TrainConfig(**{**fields, **overrides})


class Scrambler:
    """A distiller whose 'KD term' is zero but which wrecks the student from ``from_epoch`` on."""

    def __init__(self, from_epoch: int) -> None:
        self.from_epoch = from_epoch
        self.epochs: list[int] = []

    def on_epoch_start(self, student: Recommender, epoch: int) -> None:
        self.epochs.append(epoch)
        if epoch >= self.from_epoch:
            with torch.no_grad():
                for param in student.parameters():
                    param.normal_(std=0.1)

    def loss(self, batch: Batch, student: Recommender) -> torch.Tensor:
        return torch.zeros(())


class ConstantLoss:
    def __init__(self, value: float) -> None:
        self.value = value

    def on_epoch_start(self, student: Recommender, epoch: int) -> None:
        pass

    def loss(self, batch: Batch, student: Recommender) -> torch.Tensor:
        return torch.tensor(self.value)


def test_early_stopping_stops_when_patience_runs_out(tiny_dataset: Dataset) -> None:
    # lr so small that no weight changes: every evaluation after the first is "no improvement"
    result = train(mf(tiny_dataset), tiny_dataset, config(epochs=50, lr=1e-30, eval_every=2, patience=3))
    assert result.epochs_run == 8  # evaluations at 2 (best), 4, 6, 8 (third without improvement)
    assert len(result.history) == 8
    assert result.best_epoch == 2


def test_no_early_stop_while_validation_improves(tiny_dataset: Dataset) -> None:
    result = train(mf(tiny_dataset), tiny_dataset, config(epochs=6, patience=100))
    assert result.epochs_run == 6
    assert [record["epoch"] for record in result.history] == [1, 2, 3, 4, 5, 6]


def test_returned_model_holds_the_best_validation_weights(tiny_dataset: Dataset) -> None:
    model = mf(tiny_dataset)
    scrambler = Scrambler(from_epoch=6)
    result = train(model, tiny_dataset, config(epochs=9, trajectory_every=1), distiller=scrambler)
    assert scrambler.epochs == list(range(1, 10))
    valid = [record["valid_ndcg@10"] for record in result.history]
    assert result.best_epoch <= 5 and result.epochs_run == 9
    assert result.best_valid_ndcg == max(valid) > max(valid[5:])  # later epochs really were worse
    assert evaluate_model(model, tiny_dataset, "valid", ks=(10,))["ndcg@10"] == result.best_valid_ndcg
    best_state = dict(result.trajectory)[result.best_epoch]
    assert all(torch.equal(model.state_dict()[name], best_state[name]) for name in best_state)


def test_progress_callback_fires_once_per_epoch_in_order(tiny_dataset: Dataset) -> None:
    reports: list[Progress] = []
    result = train(mf(tiny_dataset), tiny_dataset, config(epochs=7, eval_every=3), on_progress=reports.append)
    assert [p.epoch for p in reports] == list(range(1, 8))
    assert all(p.max_epochs == 7 for p in reports)
    assert [p.valid_ndcg is not None for p in reports] == [False, False, True, False, False, True, True]
    best = [p.best_ndcg for p in reports]
    assert best == sorted(best)
    assert reports[-1].best_ndcg == result.best_valid_ndcg
    assert reports[-1].eta_seconds == 0
    assert [p.loss for p in reports] == [record["loss"] for record in result.history]


@pytest.mark.parametrize(("epochs", "every", "expected"), [(7, 3, [3, 6]), (4, 1, [1, 2, 3, 4]), (5, 0, [])])
def test_trajectory_every_keeps_the_expected_epochs(
    tiny_dataset: Dataset, epochs: int, every: int, expected: list[int]
) -> None:
    result = train(mf(tiny_dataset), tiny_dataset, config(epochs=epochs, eval_every=2, trajectory_every=every))
    assert [epoch for epoch, _ in result.trajectory] == expected
    if len(result.trajectory) >= 2:
        first, second = result.trajectory[0][1], result.trajectory[1][1]
        assert not torch.equal(first["user_emb.weight"], second["user_emb.weight"]), "copies, not views"


def test_distiller_loss_is_added_to_the_base_loss(tiny_dataset: Dataset) -> None:
    plain = train(mf(tiny_dataset), tiny_dataset, config(epochs=2))
    kd = train(mf(tiny_dataset), tiny_dataset, config(epochs=2), distiller=ConstantLoss(10.0))
    n_batches = math.ceil(tiny_dataset.train.nnz / 128)
    for a, b in zip(plain.history, kd.history, strict=True):
        assert b["loss"] == pytest.approx(a["loss"] + 10.0 * n_batches, rel=1e-6)


def test_non_finite_loss_stops_training(tiny_dataset: Dataset) -> None:
    with pytest.raises(FloatingPointError, match="epoch 1"):
        train(mf(tiny_dataset), tiny_dataset, config(epochs=2), distiller=ConstantLoss(float("nan")))


def test_sparse_backbones_get_row_sparse_adam(tiny_dataset: Dataset) -> None:
    sparse_mf = build_model("mf", tiny_dataset, dim=8, sparse=True)
    assert isinstance(make_optimizer(sparse_mf, config()), RowSparseAdam)
    assert type(make_optimizer(mf(tiny_dataset), config())) is torch.optim.Adam  # small tables: dense
    lightgcn = build_model("lightgcn", tiny_dataset, dim=8)
    assert type(make_optimizer(lightgcn, config())) is torch.optim.Adam


# ------------------------------------------------------------------------------ RowSparseAdam


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_row_sparse_adam_matches_torch_adam_on_a_dense_parameter(weight_decay: float) -> None:
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    inputs = torch.randn(4, 3, generator=generator, dtype=torch.float64)
    target = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt_ours = RowSparseAdam([ours], lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    opt_theirs = torch.optim.Adam([theirs], lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    for _ in range(8):
        for param, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            ((param @ inputs - target) ** 2).sum().backward()
            opt.step()
    assert not torch.equal(ours.detach(), start)
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-12, atol=1e-14)


def test_row_sparse_adam_touches_only_the_rows_with_gradients() -> None:
    torch.manual_seed(0)
    sparse = torch.nn.Embedding(10, 4, sparse=True).double()
    dense = torch.nn.Embedding(10, 4).double()
    dense.weight.data.copy_(sparse.weight.data)
    start = sparse.weight.detach().clone()
    opt_sparse = RowSparseAdam(sparse.parameters(), lr=0.05, weight_decay=0.1)
    opt_dense = torch.optim.Adam(dense.parameters(), lr=0.05, weight_decay=0.1)
    rows = torch.tensor([1, 3, 3, 7])  # a repeated row: its gradients must be summed
    weights = torch.tensor([[1.0], [2.0], [-0.5], [3.0]], dtype=torch.float64)
    for _ in range(5):
        for embedding, opt in ((sparse, opt_sparse), (dense, opt_dense)):
            opt.zero_grad()
            (embedding(rows) * weights).sum().backward()
            opt.step()
    touched = torch.tensor([1, 3, 7])
    untouched = torch.tensor([0, 2, 4, 5, 6, 8, 9])
    assert sparse.weight.grad is not None and sparse.weight.grad.is_sparse
    assert torch.equal(sparse.weight.detach()[untouched], start[untouched]), "weight decay must stay lazy"
    assert not torch.equal(sparse.weight.detach()[touched], start[touched])
    torch.testing.assert_close(sparse.weight.detach()[touched], dense.weight.detach()[touched], rtol=1e-12, atol=1e-14)
    state = opt_sparse.state[sparse.weight]
    assert torch.count_nonzero(state["exp_avg"][untouched]) == 0
    assert torch.count_nonzero(state["exp_avg_sq"][untouched]) == 0


@pytest.mark.parametrize(("lr", "weight_decay"), [(0.0, 0.0), (-1.0, 0.0), (0.1, -0.5)])
def test_row_sparse_adam_refuses_bad_settings(lr: float, weight_decay: float) -> None:
    with pytest.raises(ValueError):
        RowSparseAdam([torch.nn.Parameter(torch.zeros(2))], lr=lr, weight_decay=weight_decay)


def test_same_config_seed_gives_the_same_history(tiny_dataset: Dataset) -> None:
    first = train(mf(tiny_dataset), tiny_dataset, config(epochs=4, seed=3))
    second = train(mf(tiny_dataset), tiny_dataset, config(epochs=4, seed=3))
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in first.history]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in second.history]
    assert np.isfinite([r["loss"] for r in first.history]).all()


def test_a_stop_request_ends_at_the_epoch_boundary_with_the_best_weights(tiny_dataset: Dataset) -> None:
    calls = []

    def stop_after_three() -> bool:
        calls.append(1)
        return len(calls) >= 3

    model = mf(tiny_dataset)
    result = train(model, tiny_dataset, config(epochs=50, eval_every=10), should_stop=stop_after_three)
    assert result.epochs_run == 3
    assert result.best_epoch == 3  # validated on the way out although 3 is no multiple of eval_every
    assert evaluate_model(model, tiny_dataset, "valid", ks=(10,))["ndcg@10"] == result.best_valid_ndcg
