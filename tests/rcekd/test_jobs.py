"""The worker's job bodies on each teacher format: both artifacts written, served and evaluated alike."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rcekd.checkpoint import read_manifest, verify_files
from rcekd.data import Dataset
from rcekd.jobs import DistillSpec, TeacherSpec, run_distill_job, run_teacher_job
from rcekd.metrics import evaluate_model
from rcekd.models import MF
from rcekd.retrieval import Retriever
from tests.rcekd.test_teacher_import import ScoresModule, mf, onnx_path  # noqa: F401  (fixtures)

SMALL = {"epochs": 4, "batch_size": 64, "lr": 1e-2, "eval_every": 2}
OPTIONS = {"K": 5, "L": 5, "mxK": 20}


def spec(**extra: object) -> DistillSpec:
    return DistillSpec.from_dict(
        {"method": "rcekd", "student_params": {"dim": 8}, "method_options": OPTIONS, "training": SMALL, **extra}
    )


def check_served(directory: Path, dataset: Dataset) -> dict:
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    served = Retriever.load(directory).evaluate(dataset)
    for key in ("ndcg@20", "recall@20"):
        assert served[key] == pytest.approx(manifest["metrics"]["test"][key], abs=1e-4)
    return manifest


def test_teacher_job_writes_a_servable_artifact(tiny_dataset: Dataset, tmp_path: Path) -> None:
    progress: list[dict] = []
    teacher_spec = TeacherSpec.from_dict({"arch": "mf", "params": {"dim": 8}, "training": SMALL})
    manifest = run_teacher_job(tiny_dataset, teacher_spec, tmp_path / "t", report=progress.append)
    assert manifest["role"] == "teacher" and manifest["serving"]["mode"] == "vectors"
    assert [p["epoch"] for p in progress if "epoch" in p] == [1, 2, 3, 4]
    check_served(tmp_path / "t", tiny_dataset)


def test_distill_from_a_state_dict_teacher(mf: MF, tiny_dataset: Dataset, tmp_path: Path) -> None:  # noqa: F811
    torch.save(mf.state_dict(), tmp_path / "teacher.pt")
    teacher, student = run_distill_job(
        tiny_dataset,
        tmp_path / "teacher.pt",
        spec(teacher_arch="mf", teacher_params={"dim": 8}),
        tmp_path / "work",
        tmp_path / "teacher",
        tmp_path / "student",
    )
    assert teacher["verified"] is False and teacher["source"]["format"] == "state_dict"
    assert student["teacher"]["verified"] is False and student["kd"]["method"] == "rcekd"
    reference = evaluate_model(mf, tiny_dataset, "test")
    assert teacher["metrics"]["test"]["ndcg@20"] == pytest.approx(reference["ndcg@20"], abs=1e-6)
    check_served(tmp_path / "teacher", tiny_dataset)
    check_served(tmp_path / "student", tiny_dataset)


def test_distill_from_an_onnx_scores_teacher(
    onnx_path: Path,  # noqa: F811
    mf: MF,  # noqa: F811
    tiny_dataset: Dataset,
    tmp_path: Path,
) -> None:
    teacher, _ = run_distill_job(
        tiny_dataset, onnx_path, spec(), tmp_path / "work", tmp_path / "teacher", tmp_path / "student"
    )
    assert teacher["serving"]["mode"] == "scores" and teacher["arch"] == "onnx"
    assert "items.faiss" not in teacher["files"]  # served by full scoring, and reported so
    reference = evaluate_model(mf, tiny_dataset, "test")
    assert teacher["metrics"]["test"]["ndcg@20"] == pytest.approx(reference["ndcg@20"], abs=1e-5)
    check_served(tmp_path / "teacher", tiny_dataset)
    assert check_served(tmp_path / "student", tiny_dataset)["serving"]["mode"] == "vectors"


def test_an_onnx_teacher_cannot_drive_dcd(onnx_path: Path, tiny_dataset: Dataset, tmp_path: Path) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="vectors"):
        run_distill_job(
            tiny_dataset,
            onnx_path,
            DistillSpec.from_dict({"method": "dcd", "training": SMALL}),
            tmp_path / "work",
            tmp_path / "teacher",
            tmp_path / "student",
        )
    assert not (tmp_path / "student").exists()
