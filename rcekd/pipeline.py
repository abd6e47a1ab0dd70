"""End-to-end jobs shared by the CLI and the worker: load data, train, evaluate, save."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rcekd.checkpoint import CheckpointError, load_model, save_artifact
from rcekd.data import Dataset, load_dataset
from rcekd.kd import Teacher, make_distiller
from rcekd.metrics import full_report
from rcekd.models import Recommender, build_model
from rcekd.platform_record import platform_record
from rcekd.train import Progress, TrainConfig, TrainResult, seed_everything, train

#: Per-backbone defaults: the settings that reach the README's CiteULike teacher figures.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "mf": {"dim": 400, "init_std": 0.01, "sparse": None},  # None: row-sparse updates from 4M weights on
    "lightgcn": {"dim": 64, "n_layers": 3, "init_std": 0.1},
    "hstu": {
        "dim": 64,
        "n_blocks": 8,
        "n_heads": 4,
        "dqk": 8,
        "dv": 16,
        "max_len": 100,
        "dropout": 0.2,
        "temperature": 0.05,
        "n_negatives": 256,
    },
}
TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "mf": {"lr": 1e-3, "batch_size": 2048, "weight_decay": 0.0},
    "lightgcn": {"lr": 5e-3, "batch_size": 8192, "weight_decay": 0.0},  # a full propagation per step
    "hstu": {"lr": 1e-3, "batch_size": 128, "weight_decay": 0.0},
}


def dataset_record(dataset: Dataset) -> dict[str, Any]:
    """How a manifest names its data: enough to refuse a model trained on other splits."""
    return {
        "name": dataset.name,
        "fingerprint": dataset.fingerprint,
        "n_users": dataset.n_users,
        "n_items": dataset.n_items,
        "valid_carved": dataset.valid_carved,
        "valid_seed": dataset.valid_seed,
    }


def train_and_save(
    data: str | Path | Dataset,
    arch: str,
    out_dir: str | Path,
    *,
    model_params: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    role: str = "teacher",
    valid_seed: int = 0,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    serving: Callable[[Recommender], Callable[[Path], dict[str, Any]]] | None = None,
    overwrite: bool = False,
) -> tuple[dict[str, Any], TrainResult]:
    """Train one backbone on a dataset and write its artifact directory; returns (manifest, result)."""
    dataset = data if isinstance(data, Dataset) else load_dataset(data, valid_seed=valid_seed)
    params = {**MODEL_DEFAULTS[arch], **(model_params or {})}
    config = config or TrainConfig(**TRAIN_DEFAULTS[arch])
    seed_everything(config.seed)  # the initialisation is part of "same seed → same model"
    model = build_model(arch, dataset, **params)
    result = train(model, dataset, config, on_progress=on_progress, should_stop=should_stop)
    model.eval()
    manifest = save_artifact(
        out_dir,
        model,
        role=role,
        dataset=dataset_record(dataset),
        metrics=full_report(model, dataset),
        training=training_record(config, result),
        trajectory=result.trajectory,
        serving=serving(model) if serving else None,
        overwrite=overwrite,
    )
    return manifest, result


def training_record(config: TrainConfig, result: TrainResult) -> dict[str, Any]:
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("checkpoint_dir", "checkpoint_every")}
    return {
        **settings,  # where a job kept its epoch checkpoints is not part of the model
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "seconds": round(result.seconds, 2),
        "seconds_per_epoch_train": round(result.train_seconds / max(result.epochs_run, 1), 3),
        "history": result.history,
        # CPU, vector extensions and library versions: what the last bits of the run depend on
        "platform": platform_record(str(config.resolved_device())),
    }


def check_teacher_fits(model: Recommender, fingerprint: str | None, dataset: Dataset, *, required: bool) -> None:
    """Refuse a teacher of other data (other splits leak the test set) or of other sizes.

    ``required``: an artifact must carry the dataset's fingerprint; bare uploads may carry none.
    """
    if (fingerprint is not None or required) and fingerprint != dataset.fingerprint:
        raise CheckpointError(
            f"teacher was trained on dataset {str(fingerprint)[:12]}…, this dataset is "
            f"{dataset.fingerprint[:12]}… (other files, or another validation seed)"
        )
    if model.n_users != dataset.n_users or model.n_items != dataset.n_items:
        raise CheckpointError(
            f"teacher has {model.n_users} users × {model.n_items} items, the dataset "
            f"{dataset.n_users} × {dataset.n_items}"
        )


def load_teacher(teacher_dir: str | Path, dataset: Dataset) -> tuple[Teacher, dict[str, Any]]:
    """Load a teacher artifact and refuse it when it was trained on other data."""
    model, manifest = load_model(teacher_dir)
    check_teacher_fits(model, manifest.get("dataset", {}).get("fingerprint"), dataset, required=True)
    return Teacher(model), manifest


def distill_and_save(
    data: str | Path | Dataset,
    teacher_dir: str | Path,
    method: str,
    out_dir: str | Path,
    *,
    valid_seed: int = 0,
    **kwargs: Any,
) -> tuple[dict[str, Any], TrainResult]:
    """Distil a teacher artifact into a student with ``method`` ('none': the student alone)."""
    dataset = data if isinstance(data, Dataset) else load_dataset(data, valid_seed=valid_seed)
    teacher, teacher_manifest = load_teacher(teacher_dir, dataset)
    return distill_teacher(dataset, teacher, teacher_manifest, method, out_dir, trajectory=Path(teacher_dir), **kwargs)


def distill_teacher(
    dataset: Dataset,
    teacher: Any,
    teacher_manifest: dict[str, Any],
    method: str,
    out_dir: str | Path,
    *,
    student_arch: str = "mf",
    student_params: dict[str, Any] | None = None,
    method_options: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    trajectory: Path | None = None,
    serving: Callable[[Recommender], Callable[[Path], dict[str, Any]]] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    overwrite: bool = False,
) -> tuple[dict[str, Any], TrainResult]:
    """Distil an already loaded teacher (vectors or ONNX scores) into a new student artifact.

    ``trajectory`` is a directory holding the teacher's training checkpoints (HetComp); ``serving``
    builds the writer of the student's serving files (ONNX, FAISS) once the student is trained.
    """
    config = config or TrainConfig(**TRAIN_DEFAULTS[student_arch])
    seed_everything(config.seed)
    params = {**MODEL_DEFAULTS[student_arch], "dim": 20, **(student_params or {})}
    student = build_model(student_arch, dataset, **params)
    teacher.to(config.resolved_device())
    distiller = None
    if method != "none":
        options = dict(method_options or {})
        if method == "hetcomp" and trajectory is not None:
            options.setdefault("trajectory", str(trajectory))  # its training checkpoints
        distiller = make_distiller(method, teacher, dataset, seed=config.seed, **options)
    result = train(student, dataset, config, distiller=distiller, on_progress=on_progress, should_stop=should_stop)
    student.eval()
    manifest = save_artifact(
        out_dir,
        student,
        role="student",
        dataset=dataset_record(dataset),
        metrics=full_report(student, dataset),
        training=training_record(config, result),
        extra={
            "kd": distiller.settings() if distiller else {"method": "none"},
            "teacher": {
                "id": teacher_manifest.get("id"),
                # the id is new at every training; the weights' hash tells whether two runs distilled
                # the very same teacher (a retrain can round differently on another machine)
                "weights_sha256": teacher_manifest.get("files", {}).get("weights.safetensors", {}).get("sha256"),
                "arch": teacher_manifest.get("arch"),
                "hyperparameters": teacher_manifest.get("hyperparameters"),
                "n_parameters": teacher_manifest.get("n_parameters"),
                "metrics": teacher_manifest.get("metrics"),
                "verified": teacher_manifest.get("verified", True),
            },
        },
        serving=serving(student) if serving else None,
        overwrite=overwrite,
    )
    return manifest, result
