"""Artifact directories (DESIGN.md contract): safetensors weights + JSON, written atomically.

Nothing here unpickles: weights are safetensors, everything else is JSON, so a checkpoint sent by a
stranger can at worst fail to load. Files are hashed into the manifest and checked on load.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rcekd.models import Recommender, model_from_config

MANIFEST = "manifest.json"
CONFIG = "config.json"
WEIGHTS = "weights.safetensors"
TRAJECTORY_DIR = "trajectory"


class CheckpointError(ValueError):
    """An artifact directory is missing files, fails its checksums, or does not fit its config."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state.items()}


def save_artifact(
    out_dir: str | Path,
    model: Recommender,
    *,
    role: str,
    dataset: dict[str, Any],
    metrics: dict[str, Any],
    training: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    trajectory: list[tuple[int, dict[str, torch.Tensor]]] | None = None,
    overwrite: bool = False,
    serving: Callable[[Path], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write a model's artifact (weights, config, trajectory, serving files) atomically.

    ``serving(staging)`` (e.g. :func:`rcekd.export.serving_writer`) writes the serving files into the
    staging directory before anything is hashed, so they are checksummed like the weights and arrive
    with the same atomic rename; what it returns is the manifest's ``serving`` section.
    """

    def write(staging: Path) -> dict[str, Any]:
        save_file(_tensors(model.state_dict()), str(staging / WEIGHTS))
        (staging / CONFIG).write_text(json.dumps(model.config(), indent=2))
        if trajectory:
            (staging / TRAJECTORY_DIR).mkdir()
            for epoch, state in trajectory:
                save_file(_tensors(state), str(staging / TRAJECTORY_DIR / f"epoch_{epoch:04d}.safetensors"))
        fields = {
            "arch": model.arch,
            "hyperparameters": {k: v for k, v in model.config().items() if k != "arch"},
            "n_parameters": model.num_parameters(),
        }
        if serving is not None:
            fields["serving"] = serving(staging)
        return fields

    return write_artifact_dir(
        out_dir, write, role=role, dataset=dataset, metrics=metrics, training=training, extra=extra, overwrite=overwrite
    )


def write_artifact_dir(
    out_dir: str | Path,
    write: Callable[[Path], dict[str, Any]],
    *,
    role: str,
    dataset: dict[str, Any],
    metrics: dict[str, Any],
    training: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Stage an artifact in a temporary sibling directory, hash its files, then rename it into place.

    ``write(staging)`` writes the files and returns manifest fields (arch, serving, ...). A reader
    sees the old artifact or the new one, never half of either.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        fields = write(staging)
        files = {
            str(path.relative_to(staging)): {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
            for path in sorted(staging.rglob("*"))
            if path.is_file()
        }
        manifest = {
            "id": uuid.uuid4().hex,
            "role": role,
            "dataset": dataset,
            "metrics": metrics,
            "training": training or {},
            "files": files,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **fields,
            **(extra or {}),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        os.chmod(staging, 0o755)
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _move_into_place(staging: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    graveyard = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
    os.replace(out_dir, graveyard / "old")
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(graveyard / "old", out_dir)  # never lose the artifact being replaced
        raise
    finally:
        shutil.rmtree(graveyard, ignore_errors=True)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST}; not an rcekd artifact directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc


def verify_files(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists with its recorded size and sha256.

    The training trajectory is the one optional part: an artifact sent without its ``trajectory/``
    folder (it can be ten times the model's size) is whole for every use but HetComp.
    """
    directory = Path(directory)
    has_trajectory = (directory / TRAJECTORY_DIR).is_dir()
    for name, meta in manifest.get("files", {}).items():
        path = directory / name
        if not has_trajectory and name.startswith(f"{TRAJECTORY_DIR}/"):
            continue
        if not path.is_file():
            raise CheckpointError(f"{directory}: {name} is missing")
        if path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
            raise CheckpointError(f"{directory}: {name} does not match its sha256 in {MANIFEST}")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def model_from_weights(config: dict[str, Any], state: dict[str, torch.Tensor]) -> Recommender:
    """Build the model a config describes and load ``state`` into it, checking every shape."""
    try:
        model = model_from_config(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"config does not describe a known model: {exc}") from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"weights do not fit {config.get('arch')}: missing {missing}, unexpected {unexpected}")
    for name, tensor in expected.items():
        resizable = tensor.numel() == 0  # buffers left empty until the data arrives (graph edges, histories)
        if not resizable and tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"weight {name} has shape {tuple(state[name].shape)}, config expects {tuple(tensor.shape)}"
            )
    model.load_state_dict(state, strict=True)
    try:
        model.check_buffers()
    except ValueError as exc:
        raise CheckpointError(f"weights do not fit {config.get('arch')}: {exc}") from exc
    return model


def load_model(directory: str | Path, *, verify: bool = True) -> tuple[Recommender, dict[str, Any]]:
    """(model, manifest) from an artifact directory; checksums are verified unless told not to."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if verify:
        verify_files(directory, manifest)
    config_path = directory / CONFIG
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: unreadable ({exc})") from exc
    model = model_from_weights(config, load_weights(directory / WEIGHTS))
    model.eval()
    return model, manifest


def trajectory_paths(directory: str | Path) -> list[Path]:
    """The saved training-trajectory checkpoints, oldest first (HetComp distils from them)."""
    folder = Path(directory) / TRAJECTORY_DIR
    return sorted(folder.glob("epoch_*.safetensors")) if folder.is_dir() else []
