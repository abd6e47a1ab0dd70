"""Epoch checkpoints that let a killed training job resume where it stopped, with the same result.

One file, ``checkpoint.safetensors``, holds everything :func:`rcekd.train.train` carries from one
epoch to the next: the model, the best-so-far weights, the optimizer's state, every random generator,
the distiller's state, and the loop's counters and history (JSON in the safetensors header). It is
written to a temporary file in the same directory, fsync'd and renamed over the previous one, so a kill
at any moment leaves the old checkpoint or the new one, never half of either. Trajectory snapshots
(HetComp teachers) are written once each as ``trajectory/epoch_NNNN.safetensors``, the same way.

Nothing is pickled: a tampered checkpoint can at worst fail to load. A fingerprint of the run (model
config, dataset, training settings, distiller settings, teacher) is stored with it, and a checkpoint of
another run is refused: a re-queued job must not continue someone else's state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from rcekd.checkpoint import sha256_file

if TYPE_CHECKING:
    from rcekd.data import Dataset
    from rcekd.models.base import Recommender
    from rcekd.train import TrainConfig

FORMAT = "rcekd-resume-v1"
CHECKPOINT = "checkpoint.safetensors"
TRAJECTORY_DIR = "trajectory"
#: TrainConfig fields that say where and how often to checkpoint, not what is trained
CHECKPOINT_FIELDS = ("checkpoint_dir", "checkpoint_every")
_TEMP_PREFIX = ".rcekd-partial-"
_UNREADABLE = (SafetensorError, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError)

log = logging.getLogger("rcekd.train")


@dataclass
class LoopState:
    """What the training loop carries across epochs besides the model, optimizer and generators."""

    epoch: int = 0  # the last epoch completed
    best_ndcg: float = -1.0
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    stale: int = 0  # evaluations without improvement
    history: list[dict[str, Any]] = field(default_factory=list)
    trajectory: list[tuple[int, dict[str, torch.Tensor]]] = field(default_factory=list, repr=False)
    train_seconds: float = 0.0
    seconds: float = 0.0  # wall time of the run so far, earlier sessions included


# ------------------------------------------------------------------------------------ fingerprint
def run_fingerprint(model: Recommender, dataset: Dataset, config: TrainConfig, distiller: Any) -> dict[str, Any]:
    """JSON of what a checkpoint belongs to; resuming needs an equal one."""
    training = {k: v for k, v in asdict(config).items() if k not in CHECKPOINT_FIELDS}
    kd: dict[str, Any] = {"method": "none"}
    if distiller is not None:
        settings = getattr(distiller, "settings", None)
        kd = settings() if callable(settings) else {"class": type(distiller).__qualname__}
        if (teacher := getattr(distiller, "teacher", None)) is not None:
            kd = {**kd, "teacher_sha256": teacher_digest(teacher)}
    fingerprint = {"model": model.config(), "dataset": dataset.fingerprint, "training": training, "kd": kd}
    return json.loads(json.dumps(fingerprint, default=_plain))  # the form it takes once stored


def _plain(value: Any) -> Any:
    """numpy scalars as numbers (history, settings); anything else not JSON by its text."""
    return value.item() if isinstance(value, np.generic) else str(value)


def teacher_digest(teacher: Any) -> str:
    """sha256 of a teacher's vectors (or of its ONNX file): KD settings alone do not say which teacher."""
    digest = hashlib.sha256()
    for name in ("user_vecs", "item_vecs"):
        tensor = getattr(teacher, name, None)
        if isinstance(tensor, torch.Tensor) and tensor.numel():
            digest.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().data)
    if (path := getattr(teacher, "path", None)) is not None:
        digest.update(sha256_file(Path(path)).encode())
    return digest.hexdigest()


def _differences(found: Any, expected: Any, prefix: str = "") -> list[str]:
    if isinstance(found, dict) and isinstance(expected, dict):
        keys = sorted(found.keys() | expected.keys())
        return [line for key in keys for line in _differences(found.get(key), expected.get(key), f"{prefix}{key}.")]
    if found == expected:
        return []
    return [f"{prefix.rstrip('.')}: checkpoint {json.dumps(found)[:80]}, this run {json.dumps(expected)[:80]}"]


# ------------------------------------------------------------------------------------ flattening
def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", copy=True).contiguous()


def _flatten(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A JSON tree of ``value`` with its tensors moved to ``tensors``; every node tagged, so int keys
    and tuples (optimizer states, betas) come back as they were."""
    if isinstance(value, torch.Tensor):
        tensors[path] = _cpu(value)
        return {"tensor": path}
    if isinstance(value, dict):
        return {"dict": [[key, _flatten(item, f"{path}/{key}", tensors)] for key, item in value.items()]}
    if isinstance(value, list | tuple):
        items = [_flatten(item, f"{path}/{i}", tensors) for i, item in enumerate(value)]
        return {"tuple" if isinstance(value, tuple) else "list": items}
    if value is None or isinstance(value, bool | int | float | str | np.generic):
        return {"value": value.item() if isinstance(value, np.generic) else value}
    raise TypeError(f"cannot checkpoint a {type(value).__name__} (at {path})")


def _unflatten(node: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    ((kind, body),) = node.items()
    if kind == "tensor":
        return tensors[body]
    if kind == "dict":
        return {key: _unflatten(item, tensors) for key, item in body}
    if kind in ("list", "tuple"):
        items = [_unflatten(item, tensors) for item in body]
        return tuple(items) if kind == "tuple" else items
    if kind == "value":
        return body
    raise ValueError(f"unknown node kind {kind!r}")


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}/{name}": _cpu(tensor) for name, tensor in state.items()}


def _unprefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix) + 1 :]: tensor for name, tensor in tensors.items() if name.startswith(prefix + "/")}


# ------------------------------------------------------------------------------------ atomic files
def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file that readers see whole or not at all (temp file, fsync, rename)."""
    handle, temp = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temp, metadata=metadata)
        with open(temp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)  # the rename itself must reach the disk too
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class Checkpointer:
    """Writes and restores the epoch checkpoints of one run (identified by ``fingerprint``)."""

    def __init__(self, directory: str | Path, fingerprint: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.path = self.directory / CHECKPOINT
        self._written: set[int] = set()  # trajectory epochs on disk for this run

    def _trajectory_path(self, epoch: int) -> Path:
        return self.directory / TRAJECTORY_DIR / f"epoch_{epoch:04d}.safetensors"

    def save(
        self,
        loop: LoopState,
        model: Recommender,
        optimizer: torch.optim.Optimizer,
        rng: np.random.Generator,
        distiller: Any,
        device: torch.device,
    ) -> None:
        """Checkpoint the state at the end of epoch ``loop.epoch`` (replacing the previous one)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for epoch, state in loop.trajectory:
            if epoch not in self._written:
                self._trajectory_path(epoch).parent.mkdir(exist_ok=True)
                atomic_save({name: _cpu(tensor) for name, tensor in state.items()}, self._trajectory_path(epoch))
                self._written.add(epoch)
        tensors = {**_prefixed(model.state_dict(), "model"), **_prefixed(loop.best_state, "best")}
        carried = {
            "optimizer": optimizer.state_dict(),
            "numpy_rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "distiller": distiller.state_dict() if hasattr(distiller, "state_dict") else None,
        }
        meta = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "loop": {
                "epoch": loop.epoch,
                "best_ndcg": loop.best_ndcg,
                "best_epoch": loop.best_epoch,
                "stale": loop.stale,
                "history": loop.history,
                "trajectory_epochs": [epoch for epoch, _ in loop.trajectory],
                "train_seconds": loop.train_seconds,
                "seconds": loop.seconds,
            },
            "carried": _flatten(carried, "carried", tensors),
        }
        atomic_save(tensors, self.path, {"rcekd": json.dumps(meta, default=_plain)})

    def restore(
        self,
        model: Recommender,
        optimizer: torch.optim.Optimizer,
        rng: np.random.Generator,
        distiller: Any,
        device: torch.device,
    ) -> LoopState | None:
        """Restore model, optimizer, generators and distiller in place; the loop state, or None to start afresh.

        None when there is no checkpoint, or (with a warning) when it cannot be read: atomic writes
        cannot leave a broken file, so that means a disk fault or tampering, and starting afresh is
        safe. A readable checkpoint of another run raises ValueError.
        """
        for leftover in [*self.directory.glob(_TEMP_PREFIX + "*"), *self.directory.glob(f"*/{_TEMP_PREFIX}*")]:
            leftover.unlink(missing_ok=True)  # a write the kill interrupted
        if not self.path.is_file():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {})["rcekd"])
            if meta["format"] != FORMAT:
                raise ValueError(f"format {meta['format']!r}, expected {FORMAT!r}")
        except _UNREADABLE as exc:
            return self._unreadable(self.path, exc)
        if meta.get("fingerprint") != self.fingerprint:
            lines = _differences(meta.get("fingerprint"), self.fingerprint)
            raise ValueError(
                f"{self.path} belongs to another run ({'; '.join(lines[:5]) or 'no fingerprint'}); "
                "refusing to resume from it (use another checkpoint directory, or delete it)"
            )
        path = self.path
        try:
            tensors = load_file(str(path))
            carried, saved = _unflatten(meta["carried"], tensors), meta["loop"]
            weights, best_state = _unprefixed(tensors, "model"), _unprefixed(tensors, "best")
            _check_weights(model, weights)
            _check_weights(model, best_state)
            loop = LoopState(
                epoch=int(saved["epoch"]),
                best_ndcg=float(saved["best_ndcg"]),
                best_epoch=int(saved["best_epoch"]),
                best_state=best_state,
                stale=int(saved["stale"]),
                history=list(saved["history"]),
                train_seconds=float(saved["train_seconds"]),
                seconds=float(saved["seconds"]),
            )
            epochs = [int(epoch) for epoch in saved["trajectory_epochs"]]
            loop.trajectory = [(epoch, load_file(str(path := self._trajectory_path(epoch)))) for epoch in epochs]
        except _UNREADABLE as exc:
            return self._unreadable(path, exc)
        try:  # from here on the run's objects change: a failure can no longer fall back to a fresh start
            model.load_state_dict(weights)
            optimizer.load_state_dict(carried["optimizer"])
            rng.bit_generator.state = carried["numpy_rng"]
            torch.set_rng_state(carried["torch_rng"])
            if carried["cuda_rng"] is not None and device.type == "cuda":
                torch.cuda.set_rng_state(carried["cuda_rng"], device)
            if carried["distiller"] is not None:
                distiller.load_state_dict(carried["distiller"])
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{self.path}: cannot restore this checkpoint ({exc})") from exc
        self._written = {epoch for epoch, _ in loop.trajectory}
        return loop

    def _unreadable(self, path: Path, exc: BaseException) -> None:
        log.warning("ignoring unreadable checkpoint %s (%s: %s); starting from epoch 1", path, type(exc).__name__, exc)
        return None


def _check_weights(model: Recommender, state: dict[str, torch.Tensor]) -> None:
    """Same names and shapes as the model's (checked before anything is loaded into it)."""
    expected = model.state_dict()
    if set(state) != set(expected):
        raise ValueError(f"weights name {sorted(set(state) ^ set(expected))[:5]} unlike the model's")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ValueError(f"weight {name} has shape {tuple(state[name].shape)}, the model {tuple(tensor.shape)}")
