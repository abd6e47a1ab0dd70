"""Merging committed quality results: seed batches of one setting become one table, nothing else."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import common, merge_quality
from benchmarks.quality import SAME_BUDGET
from tests.benchmarks.fake_runs import quality_run


def _run(variant: str, seed: int, ndcg: float, **extra: object) -> dict:
    return quality_run(variant, seed, ndcg, valid_curve=[[2, ndcg / 2], [4, ndcg / 2]], code=f"code{seed}", **extra)


def _write(results: Path, name: str, runs: list[dict], **budget: object) -> None:
    settings = {key: 1 for key in SAME_BUDGET} | budget
    payload = {"machine": {"code": "x"}, "settings": settings, "runs": runs}
    (results / f"quality_{name}.json").write_text(json.dumps(payload))


@pytest.fixture
def results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    return tmp_path


def test_two_seed_batches_make_one_table_with_one_paired_test(results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = [_run("rcekd", s, 0.0190 + 0.0001 * s) for s in range(3)] + [_run("cd", s, 0.0188) for s in range(3)]
    later = [_run("rcekd", s, 0.0192 + 0.0001 * s) for s in range(3, 6)] + [_run("cd", s, 0.0189) for s in range(3, 6)]
    later.append(_run("none", 3, 0.011))  # not asked for: left out
    _write(results, "a", first)
    _write(results, "b", later)
    argv = ["merge", "--name", "ab", "--sources", "a", "b", "--variants", "rcekd", "cd", "--target", "rcekd"]
    monkeypatch.setattr(sys, "argv", argv)
    merge_quality.main()
    merged = json.loads((results / "quality_ab.json").read_text())
    assert merged["table"]["rcekd"]["seeds"] == [0, 1, 2, 3, 4, 5]
    assert set(merged["table"]) == {"rcekd", "cd"}
    assert merged["significance"]["against"] == "cd" and merged["significance"]["seeds"] == [0, 1, 2, 3, 4, 5]
    assert {r["source"] for r in merged["runs"] if r["seed"] >= 3} == {"b"}
    text = (results / "quality_ab.md").read_text()
    assert "quality_a.json (seeds [0, 1, 2])" in text and "quality_b.json (seeds [3, 4, 5])" in text
    assert (results / "quality_ab.png").is_file()


def test_a_run_in_two_sources_is_refused(results: Path) -> None:
    _write(results, "a", [_run("rcekd", 0, 0.019)])
    _write(results, "b", [_run("rcekd", 0, 0.020)])
    with pytest.raises(SystemExit, match="both"):
        merge_quality.merged_runs(["a", "b"], ["rcekd"])


def test_another_budget_is_refused(results: Path) -> None:
    _write(results, "a", [_run("rcekd", 0, 0.019)])
    _write(results, "b", [_run("rcekd", 1, 0.020)], patience=30)
    with pytest.raises(SystemExit, match="another budget"):
        merge_quality.merged_runs(["a", "b"], ["rcekd"])
    with pytest.raises(SystemExit, match="no committed results"):
        merge_quality.merged_runs(["a", "missing"], ["rcekd"])


def test_runs_from_two_teacher_files_are_refused(results: Path) -> None:
    _write(results, "a", [_run("rcekd", 0, 0.019, teacher_weights_sha256="aa" * 32)])
    _write(results, "b", [_run("cd", 0, 0.020, teacher_weights_sha256="bb" * 32)])
    with pytest.raises(SystemExit, match="different teacher files"):
        merge_quality.merged_runs(["a", "b"], ["rcekd", "cd"])


def test_one_teacher_file_is_named_and_unrecorded_runs_counted(results: Path) -> None:
    _write(results, "a", [_run("rcekd", 0, 0.019), _run("none", 0, 0.011, teacher_weights_sha256="cc" * 32)])
    _write(results, "b", [_run("rcekd", 1, 0.020, teacher_weights_sha256="aa" * 32)])
    runs, _ = merge_quality.merged_runs(["a", "b"], ["rcekd", "none"])  # the student alone has no teacher
    assert merge_quality.teacher_files(runs) == ("aa" * 32, 1)
