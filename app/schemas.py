"""Request and response bodies of the API, validated before anything is queued."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rcekd.kd import METHODS, method_options
from rcekd.models import MODELS
from rcekd.train import TrainConfig

INDEX_KINDS = ("flat", "hnsw", "ivf", "sq8")
#: what a spec's ``training`` may set; the device, and where and how often to checkpoint (the worker's
#: business: it does not change the model), are the service's
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"device", "checkpoint_dir", "checkpoint_every"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IndexSpec(Strict):
    kind: Literal["flat", "hnsw", "ivf", "sq8"] = "flat"
    options: dict[str, int | float] = Field(default_factory=dict)


class ArchSpec(Strict):
    arch: str = "mf"
    dim: int = Field(20, ge=1, le=4096)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str) -> str:
        if arch not in MODELS:
            raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(MODELS)}")
        return arch


def _check_training(training: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(training) - TRAIN_FIELDS)
    if unknown:
        raise ValueError(f"unknown training fields {unknown}; expected some of {sorted(TRAIN_FIELDS)}")
    epochs = training.get("epochs", 1)
    if not isinstance(epochs, int) or not 1 <= epochs <= 10_000:
        raise ValueError("training.epochs must be an integer in 1..10000")
    return training


class DistillRequest(Strict):
    """The JSON ``spec`` part of ``POST /distill``."""

    dataset: str
    method: str = "rcekd"
    student: ArchSpec = Field(default_factory=ArchSpec)
    options: dict[str, Any] = Field(default_factory=dict, description="KD method options (METHOD.md §5)")
    training: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields: epochs, seed, ...")
    teacher: ArchSpec | None = Field(None, description="architecture of bare weights (state_dict, safetensors)")
    teacher_model: str | None = Field(None, description="a teacher the service holds (POST /teachers), no upload")
    index: IndexSpec = Field(default_factory=IndexSpec)
    time_budget_s: int | None = Field(None, ge=1)

    @field_validator("method")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {sorted(METHODS)}")
        return method

    @field_validator("training")
    @classmethod
    def _training(cls, training: dict[str, Any]) -> dict[str, Any]:
        return _check_training(training)

    @model_validator(mode="after")
    def _options_fit_method(self) -> DistillRequest:
        known = {name for name, (_, defaults) in method_options().items() if self.method in defaults}
        unknown = sorted(set(self.options) - known)
        if unknown:
            raise ValueError(f"options {unknown} do not apply to {self.method}; it takes {sorted(known)}")
        return self

    def job_spec(self) -> dict[str, Any]:
        """The spec as the worker's :class:`rcekd.jobs.DistillSpec` reads it."""
        teacher = self.teacher
        return {
            "dataset": self.dataset,
            "method": self.method,
            "student_arch": self.student.arch,
            "student_params": {**self.student.params, "dim": self.student.dim},
            "method_options": self.options,
            "training": self.training,
            "teacher_arch": teacher.arch if teacher else None,
            "teacher_params": {**teacher.params, "dim": teacher.dim} if teacher else {},
            "index": self.index.model_dump(),
        }


class TeacherRequest(Strict):
    """``POST /teachers``: train a teacher on a registered dataset."""

    dataset: str
    model: ArchSpec = Field(default_factory=lambda: ArchSpec(arch="mf", dim=400))
    training: dict[str, Any] = Field(default_factory=dict)
    index: IndexSpec = Field(default_factory=IndexSpec)
    time_budget_s: int | None = Field(None, ge=1)

    @field_validator("training")
    @classmethod
    def _training(cls, training: dict[str, Any]) -> dict[str, Any]:
        return _check_training(training)

    def job_spec(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "arch": self.model.arch,
            "params": {**self.model.params, "dim": self.model.dim},
            "training": self.training,
            "index": self.index.model_dump(),
        }


class JobOut(BaseModel):
    id: str
    kind: str
    state: str
    attempts: int
    progress: dict[str, Any] | None = None
    error: str | None = None
    result_model_id: str | None = None
    spec: dict[str, Any]
    created_at: Any = None
    started_at: Any = None
    finished_at: Any = None


class ModelOut(BaseModel):
    id: str
    job_id: str | None = None
    role: str
    name: str
    arch: str
    dataset_id: str
    metrics: dict[str, Any]
    n_parameters: int | None = None
    bytes: dict[str, int]
    verified: bool
    active: bool


class DatasetOut(BaseModel):
    id: str
    name: str
    fingerprint: str
    n_users: int
    n_items: int
    n_interactions: int
    source: str


class RecommendedItem(BaseModel):
    item: str
    score: float


class Recommendation(BaseModel):
    user: str
    model: str
    items: list[RecommendedItem]


class BatchRecommendRequest(Strict):
    users: list[str] = Field(min_length=1, max_length=10_000)
    n: int = Field(20, ge=1, le=1000)
    model: str | None = None
    dataset: str | None = None
    exclude_seen: bool = True
