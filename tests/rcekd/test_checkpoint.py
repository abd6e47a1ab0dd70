"""Artifact directories refuse anything that is not exactly what was saved, and never unpickle."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import rcekd.checkpoint
from rcekd.checkpoint import CheckpointError, load_model, save_artifact, sha256_file
from rcekd.data import Dataset
from rcekd.models import MF, Recommender, build_model
from rcekd.pipeline import dataset_record

MAIN = Path(__file__).resolve().parents[2]


@pytest.fixture
def small_model(tiny_dataset: Dataset) -> MF:
    torch.manual_seed(0)
    model = build_model("mf", tiny_dataset, dim=8)
    assert isinstance(model, MF)
    return model


def save(directory: Path, model: MF, dataset: Dataset, **kwargs: Any) -> dict[str, Any]:
    return save_artifact(directory, model, role="student", dataset=dataset_record(dataset), metrics={}, **kwargs)


@pytest.fixture
def artifact(tmp_path: Path, small_model: MF, tiny_dataset: Dataset) -> Path:
    directory = tmp_path / "artifacts" / "mf"
    save(directory, small_model, tiny_dataset)
    return directory


def rehash(directory: Path, name: str) -> None:
    """Update the manifest for a replaced file, as someone crafting a bad artifact would."""
    manifest = json.loads((directory / "manifest.json").read_text())
    path = directory / name
    manifest["files"][name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    (directory / "manifest.json").write_text(json.dumps(manifest))


class MakesMarker:
    """Unpickling this creates ``marker``: proof that a loader executed pickle code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_clean_artifact_loads(artifact: Path, small_model: MF) -> None:
    loaded, manifest = load_model(artifact)
    assert torch.equal(loaded.user_emb.weight, small_model.user_emb.weight)
    assert manifest["role"] == "student"


def test_tampered_weights_fail_the_sha256_check(artifact: Path) -> None:
    weights = artifact / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one float: same size, still a valid safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"weights\.safetensors does not match its sha256"):
        load_model(artifact)


def test_tampered_config_fails_the_sha256_check(artifact: Path) -> None:
    config = json.loads((artifact / "config.json").read_text())
    config["dim"] = 9
    (artifact / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json does not match"):
        load_model(artifact)


def test_missing_weights_file_is_reported(artifact: Path) -> None:
    (artifact / "weights.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"weights\.safetensors is missing"):
        load_model(artifact)


def test_directory_without_manifest_is_not_an_artifact(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no manifest\.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("verify", [True, False])
def test_weight_with_the_wrong_shape_is_named(artifact: Path, small_model: MF, verify: bool) -> None:
    state = {name: tensor.clone() for name, tensor in small_model.state_dict().items()}
    state["item_emb.weight"] = torch.zeros(small_model.n_items, 9)  # config says dim 8
    save_file(state, str(artifact / "weights.safetensors"))
    rehash(artifact, "weights.safetensors")
    with pytest.raises(CheckpointError, match=r"item_emb\.weight has shape \(60, 9\)"):
        load_model(artifact, verify=verify)


def test_missing_and_unexpected_tensors_are_named(artifact: Path, small_model: MF) -> None:
    state = {"user_emb.weight": small_model.user_emb.weight.detach().clone(), "extra": torch.zeros(2)}
    save_file(state, str(artifact / "weights.safetensors"))
    rehash(artifact, "weights.safetensors")
    with pytest.raises(CheckpointError, match=r"missing \['item_emb.weight'\], unexpected \['extra'\]"):
        load_model(artifact)


def test_unknown_arch_in_config_is_a_checkpoint_error(artifact: Path) -> None:
    config = json.loads((artifact / "config.json").read_text())
    config["arch"] = "transformer-xxl"
    (artifact / "config.json").write_text(json.dumps(config))
    rehash(artifact, "config.json")
    with pytest.raises(CheckpointError, match="transformer-xxl"):
        load_model(artifact)


def test_marker_payload_really_runs_when_unpickled(tmp_path: Path) -> None:
    """Guards the next test: the payload is live, so a loader that unpickled it would leave a marker."""
    marker = tmp_path / "proof"
    pickle.loads(pickle.dumps(MakesMarker(marker)))
    assert marker.exists()


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
@pytest.mark.parametrize("verify", [True, False])
def test_pickle_disguised_as_safetensors_is_refused_unexecuted(
    artifact: Path, tmp_path: Path, writer: str, verify: bool
) -> None:
    marker = tmp_path / "pwned"
    weights = artifact / "weights.safetensors"
    payload = {"user_emb.weight": MakesMarker(marker)}
    if writer == "pickle":
        weights.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, weights)
    rehash(artifact, "weights.safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(artifact, verify=verify)
    assert not marker.exists()


def test_save_refuses_a_non_empty_directory_without_overwrite(
    artifact: Path, small_model: MF, tiny_dataset: Dataset
) -> None:
    before = (artifact / "manifest.json").read_text()
    with pytest.raises(FileExistsError, match="not empty"):
        save(artifact, small_model, tiny_dataset)
    assert (artifact / "manifest.json").read_text() == before


def test_save_with_overwrite_replaces_the_old_artifact(artifact: Path, small_model: MF, tiny_dataset: Dataset) -> None:
    (artifact / "stale.txt").write_text("from the previous run")
    old_id = json.loads((artifact / "manifest.json").read_text())["id"]
    manifest = save(artifact, small_model, tiny_dataset, overwrite=True)
    assert manifest["id"] != old_id
    assert not (artifact / "stale.txt").exists()
    assert sorted(p.name for p in artifact.parent.iterdir()) == ["mf"], "staging or old copies were left behind"
    load_model(artifact)


def test_save_into_an_existing_empty_directory_is_allowed(
    tmp_path: Path, small_model: MF, tiny_dataset: Dataset
) -> None:
    directory = tmp_path / "empty"
    directory.mkdir()
    save(directory, small_model, tiny_dataset)
    load_model(directory)


def test_trajectory_checkpoints_are_saved_and_hashed(tmp_path: Path, small_model: MF, tiny_dataset: Dataset) -> None:
    states = [(epoch, {k: v * epoch for k, v in small_model.state_dict().items()}) for epoch in (2, 4)]
    manifest = save(tmp_path / "t", small_model, tiny_dataset, trajectory=states)
    paths = rcekd.checkpoint.trajectory_paths(tmp_path / "t")
    assert [p.name for p in paths] == ["epoch_0002.safetensors", "epoch_0004.safetensors"]
    assert {f"trajectory/{p.name}" for p in paths} <= set(manifest["files"])


def test_interrupted_save_leaves_no_target_and_no_staging(
    tmp_path: Path, small_model: MF, tiny_dataset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(path: Path) -> str:
        raise RuntimeError("disk full")

    monkeypatch.setattr(rcekd.checkpoint, "sha256_file", crash)  # after the weights are written
    parent = tmp_path / "artifacts"
    with pytest.raises(RuntimeError, match="disk full"):
        save(parent / "mf", small_model, tiny_dataset)
    assert not (parent / "mf").exists()
    assert list(parent.iterdir()) == []


def test_interrupted_overwrite_keeps_the_old_artifact(
    artifact: Path, small_model: MF, tiny_dataset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_id = json.loads((artifact / "manifest.json").read_text())["id"]

    def crash(path: Path) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(rcekd.checkpoint, "sha256_file", crash)  # after the new weights are staged
    with pytest.raises(KeyboardInterrupt):
        save(artifact, small_model, tiny_dataset, overwrite=True)
    monkeypatch.undo()
    assert load_model(artifact)[1]["id"] == old_id
    assert sorted(p.name for p in artifact.parent.iterdir()) == ["mf"]


def test_failed_final_rename_restores_the_old_artifact(
    artifact: Path, small_model: MF, tiny_dataset: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_id = json.loads((artifact / "manifest.json").read_text())["id"]
    real_replace = os.replace
    calls: list[tuple[Any, Any]] = []

    def replace(src: Any, dst: Any) -> None:
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("interrupted")
        real_replace(src, dst)

    monkeypatch.setattr(rcekd.checkpoint.os, "replace", replace)
    with pytest.raises(OSError, match="interrupted"):
        save(artifact, small_model, tiny_dataset, overwrite=True)
    monkeypatch.undo()
    assert (artifact / "manifest.json").is_file(), f"{artifact} is gone; leftovers: {calls}"
    assert load_model(artifact)[1]["id"] == old_id


def test_checkpoint_module_imports_in_a_clean_interpreter() -> None:
    """Regression: the module once imported safetensors.SafetensorsError, a name that does not exist."""
    done = subprocess.run(
        [sys.executable, "-c", "import rcekd.checkpoint"],
        cwd=MAIN,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------ data-sized buffers
# LightGCN's edges and HSTU's histories are exempt from the shape check (their size comes from the
# data), so nothing checks them at all: a crafted artifact loads and fails later, or worse.


def crafted_artifact(directory: Path, dataset: Dataset, arch: str, buffer: str, change: Any) -> Path:
    torch.manual_seed(0)
    params = {"dim": 8, "n_blocks": 1, "max_len": 8} if arch == "hstu" else {"dim": 8}
    model = build_model(arch, dataset, **params)
    save_artifact(directory, model, role="teacher", dataset=dataset_record(dataset), metrics={})
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state[buffer] = change(state[buffer])
    save_file(state, str(directory / "weights.safetensors"))
    rehash(directory, "weights.safetensors")
    return directory


def usable(model: Recommender) -> None:
    with torch.no_grad():
        model.all_vectors()


@pytest.mark.parametrize(
    "change",
    [
        lambda h: torch.ones(h.shape[0], h.shape[1] + 3, dtype=h.dtype),  # max_len 11, config says 8
        lambda h: h + 1000,  # tokens beyond n_items + 1
    ],
    ids=["wrong-width", "token-out-of-range"],
)
def test_hstu_histories_that_do_not_fit_the_config_are_refused(
    tmp_path: Path, tiny_dataset: Dataset, change: Any
) -> None:
    directory = crafted_artifact(tmp_path / "hstu", tiny_dataset, "hstu", "histories", change)
    try:
        model, _ = load_model(directory)
    except CheckpointError as exc:
        assert "histories" in str(exc)
        return
    usable(model)  # raises here today: the artifact was accepted
    pytest.fail("a histories buffer that does not fit the model was accepted and works?")


SUBPROCESS_LOAD = """
import sys
from rcekd.checkpoint import CheckpointError, load_model
try:
    model, _ = load_model(sys.argv[1])
except CheckpointError as exc:
    print("refused:", exc)
    sys.exit(0)
model.all_vectors()
sys.exit(1)
"""


def test_lightgcn_edges_beyond_the_catalogue_are_refused_at_load(tmp_path: Path, tiny_dataset: Dataset) -> None:
    shift = torch.tensor([[0], [500]])
    directory = crafted_artifact(tmp_path / "lgcn", tiny_dataset, "lightgcn", "edges", lambda e: e + shift)
    # in a child process: today this crashes the interpreter (malloc_consolidate: invalid chunk size)
    done = subprocess.run(
        [sys.executable, "-c", SUBPROCESS_LOAD, str(directory)],
        cwd=MAIN,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-500:]}"
    assert "edges" in done.stdout
