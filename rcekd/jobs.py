"""The bodies of the service's jobs, free of web and queue code: the worker calls these.

A distillation job takes an uploaded teacher (any accepted format), distils a student, evaluates
both with the same protocol and writes two servable artifact directories (ONNX user tower, FAISS
index, seen items, ids), so that teacher and student are served and compared the same way.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from rcekd.checkpoint import MANIFEST, save_artifact, write_artifact_dir
from rcekd.data import Dataset
from rcekd.export import serving_writer
from rcekd.metrics import full_report
from rcekd.models import Recommender
from rcekd.pipeline import MODEL_DEFAULTS, TRAIN_DEFAULTS, dataset_record, distill_teacher, train_and_save
from rcekd.retrieval import Retriever, write_scores_serving_files
from rcekd.teacher_import import ImportedTeacher, import_teacher, require_method
from rcekd.train import Progress, TrainConfig

#: what a job reports as it goes: a stage name and, while training, the epoch's figures
ProgressCallback = Callable[[dict[str, Any]], None]
StopCheck = Callable[[], bool]


@dataclass
class IndexSpec:
    kind: str = "flat"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DistillSpec:
    """What ``POST /distill`` asks for (the API validates it; the CLI's flags map onto it)."""

    method: str = "rcekd"
    student_arch: str = "mf"
    student_params: dict[str, Any] = field(default_factory=lambda: {"dim": 20})
    method_options: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    teacher_arch: str | None = None  # for bare weights: which architecture they are
    teacher_params: dict[str, Any] = field(default_factory=dict)
    index: IndexSpec = field(default_factory=IndexSpec)

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> DistillSpec:
        return _from_dict(cls, spec)


@dataclass
class TeacherSpec:
    """What ``POST /teachers`` asks for: train a teacher on a dataset."""

    arch: str = "mf"
    params: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    index: IndexSpec = field(default_factory=IndexSpec)

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> TeacherSpec:
        return _from_dict(cls, spec)


Spec = TypeVar("Spec", DistillSpec, TeacherSpec)


def _from_dict(cls: type[Spec], spec: dict[str, Any]) -> Spec:
    """A job spec from its stored JSON; keys the class does not know (e.g. ``dataset``) are ignored."""
    values = dict(spec)
    values["index"] = IndexSpec(**values.get("index", {}))
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})


def train_config(arch: str, overrides: dict[str, Any]) -> TrainConfig:
    return TrainConfig(**{**TRAIN_DEFAULTS[arch], **overrides})


def with_checkpoints(spec: dict[str, Any], checkpoint_dir: Path, every: int) -> dict[str, Any]:
    """A copy of a job spec whose training checkpoints every ``every`` epochs into ``checkpoint_dir``
    (and resumes from there: a re-run job continues where its last attempt stopped)."""
    training = {**spec.get("training", {}), "checkpoint_dir": str(checkpoint_dir), "checkpoint_every": every}
    return {**spec, "training": training}


def _epoch_reporter(stage: str, report: ProgressCallback | None) -> Callable[[Progress], None] | None:
    if report is None:
        return None
    return lambda progress: report({"stage": stage, **progress.as_dict()})


def bind_writer(dataset: Dataset, index: IndexSpec) -> Callable[[Recommender], Callable[[Path], dict[str, Any]]]:
    """The pipeline's serving hook: export a trained model's serving files with this index."""
    return lambda model: serving_writer(model, dataset, index=index.kind, index_options=index.options)


def run_teacher_job(
    dataset: Dataset,
    spec: TeacherSpec,
    out_dir: Path,
    *,
    report: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> dict[str, Any]:
    """Train a teacher (``POST /teachers``) into a servable artifact; returns its manifest."""
    if report:
        report({"stage": "training"})
    manifest, _ = train_and_save(
        dataset,
        spec.arch,
        out_dir,
        model_params={**MODEL_DEFAULTS[spec.arch], **spec.params},
        config=train_config(spec.arch, spec.training),
        role="teacher",
        on_progress=_epoch_reporter("training", report),
        should_stop=should_stop,
        serving=bind_writer(dataset, spec.index),
    )
    return manifest


def export_teacher(imported: ImportedTeacher, dataset: Dataset, out_dir: Path, index: IndexSpec) -> dict[str, Any]:
    """Evaluate an imported teacher with the service's protocol and write it as a servable artifact.

    A teacher with vectors gets the same export as a student (ONNX user tower + FAISS index); a
    scores-only ONNX teacher is served by full scoring, evaluated through that served path.
    """
    extra = {"source": {"format": imported.format, "manifest_id": imported.manifest.get("id")}}
    extra["verified"] = imported.verified
    if imported.model is None:
        return save_scores_artifact(out_dir, imported, dataset, extra)
    model = imported.model.eval()
    return save_artifact(
        out_dir,
        model,
        role="teacher",
        dataset=dataset_record(dataset),
        metrics=full_report(model, dataset),
        training=imported.manifest.get("training", {}),
        extra=extra,
        serving=serving_writer(model, dataset, index=index.kind, index_options=index.options),
    )


def save_scores_artifact(
    out_dir: Path, imported: ImportedTeacher, dataset: Dataset, extra: dict[str, Any]
) -> dict[str, Any]:
    """A scores-only ONNX teacher as an artifact: its graph, seen items and ids; metrics from serving it."""
    metrics: dict[str, Any] = {}

    def write(staging: Path) -> dict[str, Any]:
        serving = write_scores_serving_files(staging, imported.teacher.path, dataset)
        (staging / MANIFEST).write_text(json.dumps({"files": {}, "serving": serving}))  # enough to serve it
        served = Retriever.load(staging, verify=False)
        metrics.update({"valid": served.evaluate(dataset, "valid"), "test": served.evaluate(dataset, "test")})
        (staging / MANIFEST).unlink()
        return {"arch": "onnx", "hyperparameters": {}, "n_parameters": imported.manifest.get("n_parameters"),
                "serving": serving}  # fmt: skip

    return write_artifact_dir(
        out_dir, write, role="teacher", dataset=dataset_record(dataset), metrics=metrics, extra=extra
    )


def run_distill_job(
    dataset: Dataset,
    teacher_file: Path,
    spec: DistillSpec,
    work_dir: Path,
    teacher_out: Path,
    student_out: Path,
    *,
    report: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Import the teacher, serve it as an artifact, distil the student; returns (teacher, student) manifests."""
    if report:
        report({"stage": "loading teacher"})
    imported = import_teacher(
        teacher_file, dataset, work_dir / "teacher", arch=spec.teacher_arch, hyperparameters=spec.teacher_params
    )
    require_method(imported, spec.method)
    if report:
        report({"stage": "evaluating teacher"})
    teacher_manifest = export_teacher(imported, dataset, teacher_out, spec.index)
    student_manifest, _ = distill_teacher(
        dataset,
        imported.teacher,
        {**teacher_manifest, "verified": imported.verified},
        spec.method,
        student_out,
        student_arch=spec.student_arch,
        student_params=spec.student_params,
        method_options=spec.method_options,
        config=train_config(spec.student_arch, spec.training),
        trajectory=imported.trajectory_dir,
        serving=bind_writer(dataset, spec.index),
        on_progress=_epoch_reporter("distilling", report),
        should_stop=should_stop,
    )
    return teacher_manifest, student_manifest
