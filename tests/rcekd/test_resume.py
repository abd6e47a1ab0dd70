"""Epoch checkpoints: a killed run resumed from its last checkpoint ends exactly like an uninterrupted one."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from rcekd import resume
from rcekd.data import Dataset
from rcekd.kd import Teacher, make_distiller
from rcekd.models import Recommender, build_model
from rcekd.resume import CHECKPOINT
from rcekd.train import Progress, TrainConfig, TrainResult, train

#: KD settings scaled to the 60-item tiny dataset
KD_OPTIONS: dict[str, dict[str, Any]] = {
    "rcekd": {"K": 5, "L": 5, "mxK": 20, "weight": 50.0},
    "cd": {"n_samples": 5, "mxK": 20, "weight": 5.0},
    "rrd": {"K": 10, "L": 20, "mxK": 30, "weight": 0.5},
    "dcd": {"mxK": 30, "n_samples": 10, "weight": 0.5},
    "hetcomp": {"p": 2, "top_k": 20, "n_negatives": 30, "max_positives": 10, "weight": 0.5},
}


class KilledError(Exception):
    """Stands in for SIGKILL: the run dies between two epochs without a graceful stop."""


def killed_after(epoch: int) -> Callable[[], bool]:
    """A ``should_stop`` that raises when asked after epoch ``epoch`` (before that epoch's checkpoint)."""
    asked = []

    def check() -> bool:
        asked.append(1)
        if len(asked) >= epoch:
            raise KilledError
        return False

    return check


def config(**overrides: Any) -> TrainConfig:
    fields: dict[str, Any] = {"epochs": 8, "batch_size": 128, "lr": 0.05, "eval_every": 3, "patience": 100}
    return TrainConfig(**{"seed": 0, "device": "cpu", **fields, **overrides})


def mf(dataset: Dataset) -> Recommender:
    torch.manual_seed(0)
    return build_model("mf", dataset, dim=8, init_std=0.1)


def hstu(dataset: Dataset) -> Recommender:
    torch.manual_seed(0)
    params = {"dim": 8, "n_blocks": 1, "n_heads": 2, "dqk": 4, "dv": 4, "max_len": 16, "n_negatives": 20}
    return build_model("hstu", dataset, dropout=0.3, temperature=0.1, **params)


@pytest.fixture(scope="module")
def teachers(tiny_dataset: Dataset) -> tuple[Teacher, list[Teacher]]:
    """A trained MF teacher and its trajectory (two early snapshots + itself), as HetComp needs."""
    torch.manual_seed(0)
    model = build_model("mf", tiny_dataset, dim=16, init_std=0.1)
    result = train(model, tiny_dataset, config(epochs=12, batch_size=64, trajectory_every=4))
    early = []
    for _, state in result.trajectory[:2]:
        snapshot = build_model("mf", tiny_dataset, dim=16)
        snapshot.load_state_dict(state)
        early.append(Teacher(snapshot))
    teacher = Teacher(model)
    return teacher, [*early, teacher]


def assert_same_run(expected: TrainResult, got: TrainResult, expected_model: Recommender, model: Recommender) -> None:
    def strip(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in record.items() if k != "seconds"} for record in history]

    assert strip(got.history) == strip(expected.history)
    assert (got.best_epoch, got.best_valid_ndcg, got.epochs_run) == (
        expected.best_epoch,
        expected.best_valid_ndcg,
        expected.epochs_run,
    )
    for name, tensor in expected_model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert [epoch for epoch, _ in got.trajectory] == [epoch for epoch, _ in expected.trajectory]
    for (_, ours), (_, theirs) in zip(got.trajectory, expected.trajectory, strict=True):
        assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def kill_and_resume(
    make_model: Callable[[Dataset], Recommender],
    dataset: Dataset,
    cfg: TrainConfig,
    directory: Path,
    caplog: pytest.LogCaptureFixture,
    *,
    kill_after: int,
    resume_at: int,
    make_distiller: Callable[[], Any] = lambda: None,
) -> None:
    """Uninterrupted run vs killed run + rerun on the same directory: the same history and weights."""
    expected_model = make_model(dataset)
    expected = train(expected_model, dataset, cfg, distiller=make_distiller())
    checkpointed = replace(cfg, checkpoint_dir=str(directory), checkpoint_every=2)
    with pytest.raises(KilledError):
        train(make_model(dataset), dataset, checkpointed, make_distiller(), should_stop=killed_after(kill_after))
    model, reports = make_model(dataset), []
    with caplog.at_level(logging.INFO, logger="rcekd.train"):
        result = train(model, dataset, checkpointed, distiller=make_distiller(), on_progress=reports.append)
    assert result.resumed_from == resume_at
    assert f"resumed at epoch {resume_at}" in caplog.text
    assert [p.epoch for p in reports] == list(range(resume_at + 1, cfg.epochs + 1)), "epochs were not re-run"
    assert all(p.resumed_from == resume_at and p.as_dict()["resumed_from"] == resume_at for p in reports)
    assert_same_run(expected, result, expected_model, model)


def test_mf_resumes_to_the_uninterrupted_result(tiny_dataset: Dataset, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    kill_and_resume(mf, tiny_dataset, config(), tmp_path / "ckpt", caplog, kill_after=5, resume_at=4)


def test_hstu_with_dropout_resumes_to_the_uninterrupted_result(tiny_dataset: Dataset, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    cfg = config(epochs=6, lr=0.01, eval_every=2)
    kill_and_resume(hstu, tiny_dataset, cfg, tmp_path / "ckpt", caplog, kill_after=5, resume_at=4)


def test_sparse_mf_with_row_sparse_adam_resumes(tiny_dataset: Dataset, tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    def sparse_mf(dataset: Dataset) -> Recommender:
        torch.manual_seed(0)
        return build_model("mf", dataset, dim=8, init_std=0.1, sparse=True)

    kill_and_resume(sparse_mf, tiny_dataset, config(epochs=6), tmp_path / "ckpt", caplog, kill_after=3, resume_at=2)


@pytest.mark.parametrize("method", sorted(KD_OPTIONS))
def test_distilled_mf_resumes_to_the_uninterrupted_result(
    method: str, teachers: tuple[Teacher, list[Teacher]], tiny_dataset: Dataset, tmp_path: Path, caplog
) -> None:  # type: ignore[no-untyped-def]
    teacher, trajectory = teachers
    options = {**KD_OPTIONS[method], **({"trajectory": trajectory} if method == "hetcomp" else {})}

    def distiller() -> Any:
        return make_distiller(method, teacher, tiny_dataset, seed=0, **options)

    cfg = config(trajectory_every=2 if method == "hetcomp" else 0)
    kill_and_resume(
        mf, tiny_dataset, cfg, tmp_path / "ckpt", caplog, kill_after=7, resume_at=6, make_distiller=distiller
    )


def test_hetcomp_curriculum_survives_a_checkpoint(
    teachers: tuple[Teacher, list[Teacher]], tiny_dataset: Dataset
) -> None:
    teacher, trajectory = teachers
    first = make_distiller("hetcomp", teacher, tiny_dataset, trajectory=trajectory, **KD_OPTIONS["hetcomp"])
    first.stage[::2] = 1
    first.reference.fill_(0.25)
    first.checks = 3
    second = make_distiller("hetcomp", teacher, tiny_dataset, trajectory=trajectory, **KD_OPTIONS["hetcomp"])
    second.load_state_dict(first.state_dict())
    assert torch.equal(second.stage, first.stage) and torch.equal(second.reference, first.reference)
    assert second.checks == 3
    assert torch.equal(torch.rand(5, generator=second.generator), torch.rand(5, generator=first.generator))
    with pytest.raises(ValueError, match="stages"):
        second.load_state_dict({**first.state_dict(), "stage": first.stage + 10})


def test_a_graceful_stop_checkpoints_before_its_extra_validation(tiny_dataset: Dataset, tmp_path: Path) -> None:
    cfg = config(epochs=7, eval_every=2)
    expected_model = mf(tiny_dataset)
    expected = train(expected_model, tiny_dataset, cfg)
    checkpointed = replace(cfg, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    asked = []
    stopped = train(
        mf(tiny_dataset), tiny_dataset, checkpointed, should_stop=lambda: len(asked.append(1) or asked) >= 3
    )
    assert stopped.epochs_run == 3 and "valid_ndcg@10" in stopped.history[-1]  # validated on the way out
    model = mf(tiny_dataset)
    result = train(model, tiny_dataset, checkpointed)
    assert result.resumed_from == 3
    assert_same_run(expected, result, expected_model, model)


def test_an_early_stopped_checkpoint_is_not_trained_further(tiny_dataset: Dataset, tmp_path: Path) -> None:
    cfg = config(epochs=50, lr=1e-30, eval_every=2, patience=3, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    first = train(mf(tiny_dataset), tiny_dataset, cfg)
    assert first.epochs_run == 8
    reports: list[Progress] = []
    again = train(mf(tiny_dataset), tiny_dataset, cfg, on_progress=reports.append)
    assert (again.resumed_from, again.epochs_run, again.best_epoch) == (8, 8, first.best_epoch)
    assert reports == [] and again.history == first.history


@pytest.mark.parametrize("change", [{"seed": 1}, {"lr": 0.01}])
def test_a_checkpoint_of_another_run_is_refused(tiny_dataset: Dataset, tmp_path: Path, change: dict[str, Any]) -> None:
    cfg = config(epochs=2, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    train(mf(tiny_dataset), tiny_dataset, cfg)
    (name,) = change
    with pytest.raises(ValueError, match=rf"another run .*training\.{name}"):
        train(mf(tiny_dataset), tiny_dataset, replace(cfg, **change))


def test_another_model_or_method_is_refused_too(tiny_dataset: Dataset, tmp_path: Path) -> None:
    cfg = config(epochs=2, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    train(mf(tiny_dataset), tiny_dataset, cfg)
    with pytest.raises(ValueError, match=r"model\.dim"):
        train(build_model("mf", tiny_dataset, dim=4), tiny_dataset, cfg)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_an_unreadable_checkpoint_means_a_fresh_start(
    tiny_dataset: Dataset, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    cfg = config(epochs=4, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    expected_model = mf(tiny_dataset)
    expected = train(expected_model, tiny_dataset, replace(cfg, checkpoint_dir=None))
    with pytest.raises(KilledError):
        train(mf(tiny_dataset), tiny_dataset, cfg, should_stop=killed_after(3))
    path = tmp_path / CHECKPOINT
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x08\x00" + bytes(range(256)) * 4)
    model = mf(tiny_dataset)
    with caplog.at_level(logging.WARNING, logger="rcekd.train"):
        result = train(model, tiny_dataset, cfg)
    assert result.resumed_from is None
    assert "unreadable checkpoint" in caplog.text and CHECKPOINT in caplog.text
    assert_same_run(expected, result, expected_model, model)


def test_checkpoints_leave_no_temporary_files(tiny_dataset: Dataset, tmp_path: Path) -> None:
    cfg = config(epochs=6, trajectory_every=3, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    train(mf(tiny_dataset), tiny_dataset, cfg)
    files = sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*"))
    assert files == [CHECKPOINT, "trajectory", "trajectory/epoch_0003.safetensors", "trajectory/epoch_0006.safetensors"]


def test_a_failed_write_keeps_the_previous_checkpoint(
    tiny_dataset: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(epochs=4, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    real_save = resume.save_file
    writes = []

    def dies_on_second_write(tensors: dict[str, torch.Tensor], path: str, metadata: Any = None) -> None:
        writes.append(path)
        if len(writes) == 2:
            Path(path).write_bytes(b"half a checkpoint")
            raise KilledError
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(resume, "save_file", dies_on_second_write)
    with pytest.raises(KilledError):
        train(mf(tiny_dataset), tiny_dataset, cfg)
    assert sorted(path.name for path in tmp_path.iterdir()) == [CHECKPOINT]
    (tmp_path / ".rcekd-partial-left-by-a-kill").write_bytes(b"x")  # what SIGKILL mid-write would leave
    monkeypatch.setattr(resume, "save_file", real_save)
    result = train(mf(tiny_dataset), tiny_dataset, cfg)
    assert result.resumed_from == 2
    assert sorted(path.name for path in tmp_path.iterdir()) == [CHECKPOINT]


def test_checkpoint_every_zero_writes_nothing(tiny_dataset: Dataset, tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    result = train(mf(tiny_dataset), tiny_dataset, config(epochs=3, checkpoint_dir=str(directory), checkpoint_every=0))
    assert result.resumed_from is None and not directory.exists()


def test_dcd_remembers_that_sequence_batches_switched_icd_off(
    teachers: tuple[Teacher, list[Teacher]], tiny_dataset: Dataset
) -> None:
    teacher, _ = teachers
    first = make_distiller("dcd", teacher, tiny_dataset, **KD_OPTIONS["dcd"])
    first.icd_active = False  # what the first HSTU batch does
    second = make_distiller("dcd", teacher, tiny_dataset, **KD_OPTIONS["dcd"])
    second.load_state_dict(first.state_dict())
    assert second.icd_active is False
