"""One training loop for teachers and students of every backbone.

Early stopping on validation NDCG@10 (strict protocol) with patience counted in evaluations; the
best weights are restored at the end. A distiller, when given, adds its KD term to the backbone's
own loss; a progress callback receives one :class:`Progress` per epoch (the CLI draws a bar with it,
the worker reports job states with it).
"""

from __future__ import annotations

import logging
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
from rcekd.resume import Checkpointer, LoopState, run_fingerprint

log = logging.getLogger("rcekd.train")


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
    # an epoch checkpoint every N epochs into checkpoint_dir (both needed; 0 = off): a killed job
    # rerun with the same settings and directory resumes from it (rcekd.resume)
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0

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
    resumed_from: int | None = None  # the checkpointed epoch this run continued from

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
    resumed_from: int | None = None  # the checkpointed epoch this run continued from, if any


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def make_optimizer(model: Recommender, config: TrainConfig) -> torch.optim.Optimizer:
    if model.sparse_embeddings:
        return RowSparseAdam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}


def _validate(model: Recommender, dataset: Dataset, loop: LoopState, epoch: int, record: dict[str, Any]) -> float:
    """Validation NDCG@10 of this epoch; updates the best weights and the patience counter."""
    ndcg = evaluate_model(model, dataset, "valid", ks=(10,))["ndcg@10"]
    record["valid_ndcg@10"] = ndcg
    if ndcg > loop.best_ndcg:
        loop.best_ndcg, loop.best_epoch, loop.best_state, loop.stale = ndcg, epoch, _cpu_state(model), 0
    else:
        loop.stale += 1
    return ndcg


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
    With ``checkpoint_dir`` and ``checkpoint_every`` set, a checkpoint of this run found there is
    resumed from (same result as an uninterrupted run), and one is written every ``checkpoint_every``
    epochs and at a stop request (before that epoch's extra validation, so resuming matches the
    uninterrupted run).
    """
    rng = seed_everything(config.seed)
    device = config.resolved_device()
    model.to(device)
    optimizer = make_optimizer(model, config)
    loop = LoopState(best_state=_cpu_state(model))
    checkpointer = None
    if config.checkpoint_dir and config.checkpoint_every > 0:
        checkpointer = Checkpointer(config.checkpoint_dir, run_fingerprint(model, dataset, config, distiller))
    resumed_from = None
    if checkpointer is not None and (restored := checkpointer.restore(model, optimizer, rng, distiller, device)):
        loop, resumed_from = restored, restored.epoch
        log.info("resumed at epoch %d from %s", resumed_from, checkpointer.path)
    started = time.perf_counter() - loop.seconds
    epoch = loop.epoch
    stopped_early = resumed_from is not None and loop.stale >= config.patience  # the checkpoint was the last epoch
    for epoch in range(config.epochs + 1 if stopped_early else loop.epoch + 1, config.epochs + 1):
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
        loop.train_seconds += time.perf_counter() - epoch_start

        record: dict[str, Any] = {"epoch": epoch, "loss": total, "seconds": time.perf_counter() - epoch_start}
        if distiller is not None and (diagnostics := getattr(distiller, "diagnostics", dict)()):
            record["kd"] = diagnostics
        valid_ndcg = None
        stop_requested = should_stop is not None and should_stop()
        scheduled = epoch % config.eval_every == 0 or epoch == config.epochs
        if scheduled:
            valid_ndcg = _validate(model, dataset, loop, epoch, record)
        if config.trajectory_every and epoch % config.trajectory_every == 0:
            loop.trajectory.append((epoch, _cpu_state(model)))
        loop.history.append(record)
        loop.epoch, loop.seconds = epoch, time.perf_counter() - started
        if checkpointer is not None and (epoch % config.checkpoint_every == 0 or stop_requested):
            checkpointer.save(loop, model, optimizer, rng, distiller, device)
        if stop_requested and not scheduled:  # the best weights so far include this epoch's
            valid_ndcg = _validate(model, dataset, loop, epoch, record)

        if on_progress is not None:
            elapsed = time.perf_counter() - started
            on_progress(
                Progress(
                    epoch=epoch,
                    max_epochs=config.epochs,
                    loss=total,
                    valid_ndcg=valid_ndcg,
                    best_ndcg=max(loop.best_ndcg, 0.0),
                    best_epoch=loop.best_epoch,
                    seconds=elapsed,
                    eta_seconds=elapsed / epoch * (config.epochs - epoch),
                    resumed_from=resumed_from,
                )
            )
        if loop.stale >= config.patience or stop_requested:
            break

    model.load_state_dict(loop.best_state)
    return TrainResult(
        best_epoch=loop.best_epoch,
        best_valid_ndcg=loop.best_ndcg if not math.isinf(loop.best_ndcg) else 0.0,
        epochs_run=epoch,
        seconds=time.perf_counter() - started,
        train_seconds=loop.train_seconds,
        history=loop.history,
        trajectory=loop.trajectory,
        resumed_from=resumed_from,
    )
