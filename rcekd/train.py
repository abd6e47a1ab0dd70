"""One training loop for teachers and students of every backbone.

Early stopping on validation NDCG@10 (strict protocol) with patience counted in evaluations; the
best weights are restored at the end. A distiller, when given, adds its KD term to the backbone's
own loss; a progress callback receives one :class:`Progress` per epoch (the CLI draws a bar with it,
the worker reports job states with it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from rcekd.data import Dataset
from rcekd.metrics import evaluate_model
from rcekd.models.base import Batch, Recommender
from rcekd.optim import RowSparseAdam


class Distiller(Protocol):
    """What the loop needs of a KD method (implemented in :mod:`rcekd.kd`)."""

    def on_epoch_start(self, student: Recommender, epoch: int) -> None: ...

    def loss(self, batch: Batch, student: Recommender) -> torch.Tensor: ...


@dataclass
class TrainConfig:
    epochs: int = 300
    batch_size: int = 2048
    lr: float = 1e-3
    weight_decay: float = 0.0
    eval_every: int = 2
    patience: int = 10  # evaluations without improvement before stopping
    seed: int = 0
    device: str | None = None  # None: CUDA when available, else CPU
    trajectory_every: int = 0  # keep a copy of the weights every N epochs (HetComp needs them); 0 = off

    def resolved_device(self) -> torch.device:
        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class Progress:
    epoch: int
    max_epochs: int
    loss: float
    valid_ndcg: float | None
    best_ndcg: float
    best_epoch: int
    seconds: float
    eta_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    best_epoch: int
    best_valid_ndcg: float
    epochs_run: int
    seconds: float
    train_seconds: float  # time spent in training steps only (no evaluation)
    history: list[dict[str, Any]] = field(default_factory=list)
    trajectory: list[tuple[int, dict[str, torch.Tensor]]] = field(default_factory=list, repr=False)


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def make_optimizer(model: Recommender, config: TrainConfig) -> torch.optim.Optimizer:
    if model.sparse_embeddings:
        return RowSparseAdam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}


def train(
    model: Recommender,
    dataset: Dataset,
    config: TrainConfig,
    distiller: Distiller | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train ``model`` in place; on return it holds the best-validation weights.

    ``should_stop`` is asked after every epoch: a cancelled job or an interrupted command ends at
    the epoch boundary with the best weights so far (validated first if this epoch was not).
    """
    rng = seed_everything(config.seed)
    device = config.resolved_device()
    model.to(device)
    optimizer = make_optimizer(model, config)
    history: list[dict[str, Any]] = []
    trajectory: list[tuple[int, dict[str, torch.Tensor]]] = []
    best_ndcg, best_epoch, best_state = -1.0, 0, _cpu_state(model)
    stale = 0
    started = time.perf_counter()
    train_seconds = 0.0
    epoch = 0
    for epoch in range(1, config.epochs + 1):
        epoch_start = time.perf_counter()
        model.train()
        if distiller is not None:
            distiller.on_epoch_start(model, epoch)
        total = 0.0
        for batch in model.batches(dataset.train, config.batch_size, rng):
            with model.one_step():
                loss = model.base_loss(batch)
                if distiller is not None:
                    loss = loss + distiller.loss(batch, model)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        train_seconds += time.perf_counter() - epoch_start

        record: dict[str, Any] = {"epoch": epoch, "loss": total, "seconds": time.perf_counter() - epoch_start}
        if distiller is not None and (diagnostics := getattr(distiller, "diagnostics", dict)()):
            record["kd"] = diagnostics
        valid_ndcg = None
        stop_requested = should_stop is not None and should_stop()
        if epoch % config.eval_every == 0 or epoch == config.epochs or stop_requested:
            valid_ndcg = evaluate_model(model, dataset, "valid", ks=(10,))["ndcg@10"]
            record["valid_ndcg@10"] = valid_ndcg
            if valid_ndcg > best_ndcg:
                best_ndcg, best_epoch, best_state, stale = valid_ndcg, epoch, _cpu_state(model), 0
            else:
                stale += 1
        if config.trajectory_every and epoch % config.trajectory_every == 0:
            trajectory.append((epoch, _cpu_state(model)))
        history.append(record)

        if on_progress is not None:
            elapsed = time.perf_counter() - started
            on_progress(
                Progress(
                    epoch=epoch,
                    max_epochs=config.epochs,
                    loss=total,
                    valid_ndcg=valid_ndcg,
                    best_ndcg=max(best_ndcg, 0.0),
                    best_epoch=best_epoch,
                    seconds=elapsed,
                    eta_seconds=elapsed / epoch * (config.epochs - epoch),
                )
            )
        if stale >= config.patience or stop_requested:
            break

    model.load_state_dict(best_state)
    return TrainResult(
        best_epoch=best_epoch,
        best_valid_ndcg=best_ndcg if not math.isinf(best_ndcg) else 0.0,
        epochs_run=epoch,
        seconds=time.perf_counter() - started,
        train_seconds=train_seconds,
        history=history,
        trajectory=trajectory,
    )
