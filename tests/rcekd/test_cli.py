"""The ``rcekd`` command, end to end on the tiny dataset."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from rcekd.cli import main

MAIN = Path(__file__).resolve().parents[2]
CONSOLE_SCRIPT = MAIN / ".venv" / "bin" / "rcekd"


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--model",
        "mf",
        "--dim",
        "8",
        "--epochs",
        "4",
        "--eval-every",
        "2",
        "--lr",
        "0.05",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def trained_cli(tmp_path_factory: pytest.TempPathFactory, tiny_dataset_dir_no_valid: Path) -> dict[str, Any]:
    """One ``rcekd train`` run on the dataset without valid.txt (so --valid-seed matters)."""
    out = tmp_path_factory.mktemp("cli") / "runs" / "mf"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(train_args(tiny_dataset_dir_no_valid, out))
    return {
        "code": code,
        "out": out,
        "printed": stdout.getvalue(),
        "manifest": json.loads((out / "manifest.json").read_text()) if code == 0 else None,
    }


def test_train_returns_zero_and_writes_the_artifact(trained_cli: dict[str, Any]) -> None:
    assert trained_cli["code"] == 0
    out: Path = trained_cli["out"]
    assert {"manifest.json", "config.json", "weights.safetensors"} <= {p.name for p in out.iterdir()}
    printed = json.loads(trained_cli["printed"])
    manifest = trained_cli["manifest"]
    assert printed["id"] == manifest["id"]
    assert printed["metrics"] == manifest["metrics"]
    assert printed["training"]["epochs_run"] == 4
    assert manifest["arch"] == "mf" and manifest["hyperparameters"]["dim"] == 8
    assert manifest["training"]["eval_every"] == 2


@pytest.mark.parametrize(
    ("split", "protocol", "block"),
    [("test", "strict", "test"), ("valid", "strict", "valid"), ("test", "paper", "test_paper")],
)
def test_evaluate_prints_the_metrics_recorded_at_training(
    trained_cli: dict[str, Any],
    tiny_dataset_dir_no_valid: Path,
    capsys: pytest.CaptureFixture[str],
    split: str,
    protocol: str,
    block: str,
) -> None:
    code = main(
        [
            "evaluate",
            "--data",
            str(tiny_dataset_dir_no_valid),
            "--model",
            str(trained_cli["out"]),
            "--split",
            split,
            "--protocol",
            protocol,
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["split"], printed["protocol"]) == (split, protocol)
    recorded = trained_cli["manifest"]["metrics"][block]
    for name in ("recall@10", "ndcg@10", "recall@20", "ndcg@20"):
        assert printed[name] == pytest.approx(recorded[name], abs=1e-12)


def test_evaluate_refuses_another_valid_seed(
    trained_cli: dict[str, Any], tiny_dataset_dir_no_valid: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "evaluate",
            "--data",
            str(tiny_dataset_dir_no_valid),
            "--model",
            str(trained_cli["out"]),
            "--valid-seed",
            "1",
        ]
    )
    assert code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "was trained on dataset" in captured.err
    assert "--valid-seed" in captured.err


def test_evaluate_refuses_other_dataset_files(
    trained_cli: dict[str, Any], tiny_dataset_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["evaluate", "--data", str(tiny_dataset_dir), "--model", str(trained_cli["out"])])
    assert code == 2
    assert "was trained on dataset" in capsys.readouterr().err


def test_evaluate_reports_a_missing_artifact(
    tmp_path: Path, tiny_dataset_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["evaluate", "--data", str(tiny_dataset_dir), "--model", str(tmp_path / "nothing")])
    assert code == 2
    assert "not an rcekd artifact directory" in capsys.readouterr().err


def test_train_reports_a_bad_dataset_with_its_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-data"
    assert main(train_args(missing, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith("rcekd: error:") and str(missing) in err
    assert not (tmp_path / "out").exists()


def test_train_refuses_to_overwrite_without_the_flag(
    trained_cli: dict[str, Any], tiny_dataset_dir_no_valid: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (trained_cli["out"] / "manifest.json").read_text()
    assert main(train_args(tiny_dataset_dir_no_valid, trained_cli["out"])) == 2
    assert "not empty" in capsys.readouterr().err
    assert (trained_cli["out"] / "manifest.json").read_text() == before


def test_flag_of_another_backbone_exits_nonzero(tmp_path: Path, tiny_dataset_dir: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        main(train_args(tiny_dataset_dir, tmp_path / "out", "--layers", "2"))
    assert caught.value.code not in (0, None)
    message = str(caught.value.code)
    assert "--layers" in message and "does not apply" in message and "mf" in message
    assert not (tmp_path / "out").exists()


def test_unknown_model_is_a_usage_error(tmp_path: Path, tiny_dataset_dir: Path) -> None:
    args = train_args(tiny_dataset_dir, tmp_path / "out")
    args[args.index("mf")] = "gpt"
    with pytest.raises(SystemExit) as caught:
        main(args)
    assert caught.value.code == 2


def test_installed_console_script_prints_help() -> None:
    done = subprocess.run([str(CONSOLE_SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and "evaluate" in done.stdout
