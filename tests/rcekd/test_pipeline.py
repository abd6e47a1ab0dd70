"""train_and_save: one call from data to a verified artifact directory."""

from __future__ import annotations

from pathlib import Path

import torch

from rcekd.checkpoint import load_model, trajectory_paths
from rcekd.data import Dataset, load_dataset
from rcekd.pipeline import MODEL_DEFAULTS, dataset_record, train_and_save
from rcekd.train import TrainConfig


def small_config(**overrides: object) -> TrainConfig:
    fields: dict[str, object] = {"epochs": 4, "eval_every": 2, "batch_size": 128, "lr": 0.05, "device": "cpu"}
    return TrainConfig(**{**fields, **overrides})  # type: ignore[arg-type]


def test_train_and_save_writes_a_loadable_artifact_with_its_training_record(
    tmp_path: Path, tiny_dataset: Dataset
) -> None:
    manifest, result = train_and_save(
        tiny_dataset, "mf", tmp_path / "mf", model_params={"dim": 8}, config=small_config(trajectory_every=2)
    )
    assert manifest["hyperparameters"]["dim"] == 8
    assert manifest["hyperparameters"]["init_std"] == MODEL_DEFAULTS["mf"]["init_std"]
    assert manifest["dataset"] == dataset_record(tiny_dataset)
    training = manifest["training"]
    assert (training["epochs_run"], training["best_epoch"]) == (result.epochs_run, result.best_epoch)
    assert [record["epoch"] for record in training["history"]] == [1, 2, 3, 4]
    assert training["seed"] == 0 and training["lr"] == 0.05
    assert [p.name for p in trajectory_paths(tmp_path / "mf")] == [
        "epoch_0002.safetensors",
        "epoch_0004.safetensors",
    ]
    model, _ = load_model(tmp_path / "mf")
    assert manifest["metrics"]["valid"]["ndcg@10"] == result.best_valid_ndcg
    assert model.config()["dim"] == 8


def test_train_and_save_from_a_path_records_the_carve_seed(tmp_path: Path, tiny_dataset_dir_no_valid: Path) -> None:
    manifest, _ = train_and_save(
        tiny_dataset_dir_no_valid,
        "mf",
        tmp_path / "mf",
        model_params={"dim": 8},
        config=small_config(epochs=2),
        valid_seed=3,
    )
    expected = load_dataset(tiny_dataset_dir_no_valid, valid_seed=3)
    assert manifest["dataset"]["fingerprint"] == expected.fingerprint
    assert manifest["dataset"]["valid_carved"] is True
    assert manifest["dataset"]["valid_seed"] == 3


def test_train_and_save_is_reproducible_for_the_same_seed(tmp_path: Path, tiny_dataset: Dataset) -> None:
    """The initial weights too come from the config's seed, whatever ran before in this process."""
    weights = []
    for run, seed in (("a", 1), ("b", 1), ("c", 2)):
        torch.rand(7)  # disturb the global RNG between runs, as other jobs in a worker would
        train_and_save(tiny_dataset, "mf", tmp_path / run, model_params={"dim": 8}, config=small_config(seed=seed))
        weights.append(load_model(tmp_path / run)[0].state_dict())
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert not all(torch.equal(weights[0][name], weights[2][name]) for name in weights[0])
