"""``python -m rcekd.report``: the side-by-side table of artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rcekd.checkpoint import save_artifact
from rcekd.data import Dataset
from rcekd.models import MF
from rcekd.report import main, table


def _artifact(directory: Path, dataset: Dataset, dim: int, ndcg: float, trajectory: bool = False) -> Path:
    model = MF(dataset.n_users, dataset.n_items, dim=dim)
    metrics = {"test": {"recall@20": 2 * ndcg, "ndcg@20": ndcg}}
    states = [(1, {k: torch.zeros_like(v) for k, v in model.state_dict().items()})] if trajectory else None
    save_artifact(directory, model, role="teacher", dataset={}, metrics=metrics, trajectory=states)
    return directory


def test_table_lists_sizes_without_trajectory_and_ratios(tmp_path: Path, tiny_dataset: Dataset) -> None:
    big = _artifact(tmp_path / "big", tiny_dataset, 32, 0.02, trajectory=True)
    small = _artifact(tmp_path / "small", tiny_dataset, 4, 0.015)
    text = table([big, small])
    weights = (big / "weights.safetensors").stat().st_size + (big / "config.json").stat().st_size
    assert f"| {weights / 2**20:.1f} |" in text.splitlines()[2]  # the trajectory file is not counted
    assert "75.0%" in text.splitlines()[3]


def test_no_arguments_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err
