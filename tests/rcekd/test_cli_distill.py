"""``rcekd distill``: a student artifact with its method, settings and teacher recorded."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from rcekd.cli import main
from tests.rcekd.test_cli import train_args


def _run(argv: list[str]) -> tuple[int, str]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    return code, stdout.getvalue()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dataset_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("distill") / "teacher"
    code, _ = _run(train_args(tiny_dataset_dir, out, "--trajectory-every", "1"))
    assert code == 0
    return out


def distill_args(data: Path, teacher: Path, out: Path, method: str, *extra: str) -> list[str]:
    return [
        "distill", "--data", str(data), "--teacher", str(teacher), "--method", method, "--dim", "4",
        "--epochs", "3", "--eval-every", "3", "--device", "cpu", "--quiet", "--out", str(out), *extra,
    ]  # fmt: skip


def test_distill_writes_a_student_that_records_method_options_and_teacher(
    tmp_path: Path, tiny_dataset_dir: Path, teacher_dir: Path
) -> None:
    out = tmp_path / "student"
    code, printed = _run(
        distill_args(tiny_dataset_dir, teacher_dir, out, "rcekd", "--K", "5", "--L", "5", "--mxK", "10", "--beta", "2")
    )
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    teacher_manifest = json.loads((teacher_dir / "manifest.json").read_text())
    assert manifest["role"] == "student"
    assert manifest["hyperparameters"]["dim"] == 4
    assert manifest["kd"]["method"] == "rcekd"
    assert {k: manifest["kd"][k] for k in ("K", "L", "mxK", "beta")} == {"K": 5, "L": 5, "mxK": 10, "beta": 2.0}
    assert manifest["kd"]["gamma_mode"] == "paper"  # defaults are recorded too
    assert manifest["teacher"]["id"] == teacher_manifest["id"]
    assert manifest["teacher"]["weights_sha256"] == teacher_manifest["files"]["weights.safetensors"]["sha256"]
    assert manifest["teacher"]["metrics"] == teacher_manifest["metrics"]
    platform = manifest["training"]["platform"]  # what the run's last bits depend on
    assert platform["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert platform["cpu"] and platform["numba_target"] and platform["torch"] == torch.__version__
    assert json.loads(printed)["kd"]["method"] == "rcekd"


@pytest.mark.parametrize("method", ["none", "ce", "cd", "rrd", "dcd", "hetcomp"])
def test_every_method_distils_from_the_command_line(
    tmp_path: Path, tiny_dataset_dir: Path, teacher_dir: Path, method: str
) -> None:
    small = {
        "ce": ["--K", "5"], "cd": ["--mxK", "10", "--n-samples", "3"], "rrd": ["--K", "5", "--L", "5", "--mxK", "10"],
        "dcd": ["--mxK", "10", "--n-samples", "5"], "hetcomp": ["--top-k", "5", "--p", "1", "--n-negatives", "5"],
    }  # fmt: skip
    code, _ = _run(distill_args(tiny_dataset_dir, teacher_dir, tmp_path / method, method, *small.get(method, [])))
    assert code == 0
    assert json.loads((tmp_path / method / "manifest.json").read_text())["kd"]["method"] == method


def test_distill_refuses_a_teacher_trained_on_other_data(
    tmp_path: Path, tiny_dataset_dir_no_valid: Path, teacher_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = _run(distill_args(tiny_dataset_dir_no_valid, teacher_dir, tmp_path / "s", "rcekd"))
    assert code == 2
    assert "trained on dataset" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_an_option_of_another_method_is_refused(tmp_path: Path, tiny_dataset_dir: Path, teacher_dir: Path) -> None:
    with pytest.raises(SystemExit, match="does not apply"):
        main(distill_args(tiny_dataset_dir, teacher_dir, tmp_path / "s", "cd", "--beta", "2"))


def test_hetcomp_needs_the_teachers_trajectory(
    tmp_path: Path, tiny_dataset_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / "bare-teacher"
    assert _run(train_args(tiny_dataset_dir, bare))[0] == 0
    code, _ = _run(distill_args(tiny_dataset_dir, bare, tmp_path / "s", "hetcomp"))
    assert code == 2
    assert "trajectory" in capsys.readouterr().err
