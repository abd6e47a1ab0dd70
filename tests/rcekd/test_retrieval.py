"""The served path (ONNX + FAISS + seen filter) recommends and evaluates exactly as PyTorch does,
and refuses artifacts whose serving files are missing or corrupt."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rcekd.checkpoint import CheckpointError, save_artifact
from rcekd.data import Dataset, load_dataset
from rcekd.export import serving_writer
from rcekd.metrics import evaluate_model, mask_matrix
from rcekd.models import MF, Recommender, build_model
from rcekd.retrieval import Retriever, UnknownUser, write_scores_serving_files
from rcekd.train import TrainConfig, train

HPARAMS = {
    "mf": {"dim": 8},
    "lightgcn": {"dim": 8, "n_layers": 2},
    "hstu": {"dim": 16, "n_blocks": 2, "n_heads": 2, "dqk": 4, "dv": 8, "max_len": 12, "dropout": 0.0},
}


def trained(arch: str, dataset: Dataset, epochs: int = 3) -> Recommender:
    torch.manual_seed(0)
    model = build_model(arch, dataset, **HPARAMS[arch])
    train(model, dataset, TrainConfig(epochs=epochs, batch_size=256, lr=1e-2, eval_every=epochs, device="cpu"))
    return model.eval()


def save(directory: Path, model: Recommender, dataset: Dataset, index: str = "flat", options: dict | None = None):
    writer = serving_writer(model, dataset, index, options)
    return save_artifact(directory, model, role="student", dataset={}, metrics={}, serving=writer)


@pytest.fixture(scope="module")
def served(tiny_dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Recommender, Path]]:
    """arch → (trained model, artifact directory with flat-index serving files)."""
    out = {}
    for arch in HPARAMS:
        model = trained(arch, tiny_dataset)
        directory = tmp_path_factory.mktemp("served") / arch
        save(directory, model, tiny_dataset)
        out[arch] = (model, directory)
    return out


def torch_top(model: Recommender, dataset: Dataset, users: np.ndarray, n: int, exclude_seen: bool = True):
    with torch.no_grad():
        user_vecs, item_vecs = model.all_vectors()
        scores = (user_vecs[torch.from_numpy(users)] @ item_vecs.T).numpy()
    if exclude_seen:
        seen = mask_matrix(dataset, "test", "strict")[users].toarray() > 0
        scores = np.where(seen, -np.inf, scores)
    top = torch.from_numpy(scores).topk(n, dim=1)
    return top.indices.numpy(), top.values.numpy()


@pytest.mark.parametrize("arch", ["mf", "lightgcn", "hstu"])
def test_served_evaluation_equals_pytorch(arch: str, served: dict, tiny_dataset: Dataset) -> None:
    model, directory = served[arch]
    retriever = Retriever.load(directory, threads=1)
    assert retriever.mode == "vectors" and retriever.provider == "CPUExecutionProvider"
    for split in ("test", "valid"):
        got = retriever.evaluate(tiny_dataset, split, batch=7)  # several chunks
        want = evaluate_model(model, tiny_dataset, split)
        assert got.keys() == want.keys()
        for name in want:
            assert got[name] == pytest.approx(want[name], abs=1e-4), (split, name)
    assert evaluate_model(model, tiny_dataset)["ndcg@20"] > 0.0


@pytest.mark.parametrize("arch", ["mf", "hstu"])
def test_recommend_is_torch_topn_without_seen_items(arch: str, served: dict, tiny_dataset: Dataset) -> None:
    model, directory = served[arch]
    retriever = Retriever.load(directory, threads=1)
    users = np.arange(tiny_dataset.n_users, dtype=np.int64)
    items, scores = retriever.recommend(users, 10)
    assert items.shape == scores.shape == (tiny_dataset.n_users, 10)
    assert items.dtype == np.int64 and scores.dtype == np.float32
    assert (np.diff(scores, axis=1) <= 1e-6).all()
    seen = mask_matrix(tiny_dataset, "test", "strict").toarray() > 0
    assert not np.take_along_axis(seen, items, 1).any()
    want_items, want_scores = torch_top(model, tiny_dataset, users, 10)
    np.testing.assert_array_equal(items, want_items)
    np.testing.assert_allclose(scores, want_scores, atol=1e-4)
    plain, _ = retriever.recommend(users, 5, exclude_seen=False)
    np.testing.assert_array_equal(plain, torch_top(model, tiny_dataset, users, 5, exclude_seen=False)[0])
    np.testing.assert_allclose(
        retriever.user_vectors(users), model.user_vectors(torch.from_numpy(users)).detach().numpy(), atol=1e-4
    )


def test_short_lists_are_padded(served: dict, tiny_dataset: Dataset) -> None:
    retriever = Retriever.load(served["mf"][1], threads=1)
    users = np.array([0, 5, 5], dtype=np.int64)
    items, scores = retriever.recommend(users, tiny_dataset.n_items)
    n_seen = np.diff(mask_matrix(tiny_dataset, "test", "strict").indptr)[users]
    assert ((items >= 0).sum(1) == tiny_dataset.n_items - n_seen).all()
    assert np.isneginf(scores[items < 0]).all() and np.isfinite(scores[items >= 0]).all()
    assert retriever.recommend(np.zeros(0, dtype=np.int64), 3)[0].shape == (0, 3)


def test_lookups_and_validation(served: dict, tiny_dataset: Dataset) -> None:
    retriever = Retriever.load(served["mf"][1], threads=1)
    assert (retriever.n_users, retriever.n_items) == (tiny_dataset.n_users, tiny_dataset.n_items)
    assert retriever.user_row("7") == 7 and retriever.item_ids[3] == "3"
    with pytest.raises(UnknownUser):
        retriever.user_row("nobody")
    assert issubclass(UnknownUser, KeyError)
    for bad_n in (0, tiny_dataset.n_items + 1, 2.5, True):
        with pytest.raises(ValueError, match="n must be"):
            retriever.recommend(np.array([0]), bad_n)
    for bad_rows in (np.array([-1]), np.array([tiny_dataset.n_users]), np.zeros((2, 2), dtype=np.int64), [0.5]):
        with pytest.raises(ValueError, match="user"):
            retriever.recommend(bad_rows, 3)
    with pytest.raises(ValueError, match="every K"):
        retriever.evaluate(tiny_dataset, ks=(0,))


def test_latency_and_file_sizes(served: dict) -> None:
    retriever = Retriever.load(served["mf"][1], threads=1)
    report = retriever.latency(np.arange(10), repeats=20, batch_size=4)
    assert report["calls"] == 20 and report["batch_size"] == 4
    assert 0 < report["p50_ms"] <= report["p95_ms"] <= report["p99_ms"]
    sizes = retriever.file_sizes()
    assert {name: meta["bytes"] for name, meta in retriever.manifest["files"].items()} == {
        name: size for name, size in sizes.items() if name != "manifest.json"
    }


@pytest.mark.parametrize(("kind", "options"), [("ivf", {"nlist": 2, "nprobe": 1}), ("hnsw", {"M": 4})])
def test_ann_index_is_served_and_reported(kind: str, options: dict, tiny_dataset: Dataset, tmp_path: Path) -> None:
    model = build_model("mf", tiny_dataset, dim=8)
    manifest = save(tmp_path / kind, model, tiny_dataset, kind, options)
    assert 0.0 <= manifest["serving"]["index"]["recall@20_vs_flat"] <= 1.0
    metrics = Retriever.load(tmp_path / kind, threads=1).evaluate(tiny_dataset)
    assert all(0.0 <= value <= 1.0 for value in metrics.values())


# ---------------------------------------------------------------------------------------------- refusals


def copy_of(served: dict, tmp_path: Path) -> Path:
    return Path(shutil.copytree(served["mf"][1], tmp_path / "copy"))


@pytest.mark.parametrize("name", ["items.faiss", "model.onnx", "seen.npz", "ids.json"])
def test_corrupt_serving_file_is_refused(name: str, served: dict, tmp_path: Path) -> None:
    directory = copy_of(served, tmp_path)
    (directory / name).write_bytes(b"\x00garbage\x00")
    with pytest.raises(CheckpointError, match=re.escape(f"{name} does not match its sha256")):
        Retriever.load(directory)
    with pytest.raises(CheckpointError, match=re.escape(name)):  # unverified: the loader itself refuses it
        Retriever.load(directory, verify=False)


def test_missing_serving_file_or_section_is_refused(served: dict, tmp_path: Path, tiny_dataset: Dataset) -> None:
    directory = copy_of(served, tmp_path)
    (directory / "items.faiss").unlink()
    with pytest.raises(CheckpointError, match=r"items\.faiss is missing"):
        Retriever.load(directory)
    plain = tmp_path / "plain"
    save_artifact(plain, build_model("mf", tiny_dataset, dim=4), role="student", dataset={}, metrics={})
    with pytest.raises(CheckpointError, match="no serving section"):
        Retriever.load(plain)


# ---------------------------------------------------------------------------------------------- modes and ids


class FullScores(nn.Module):
    """A scores-only model, as an ONNX teacher would be: user_ids → scores over every item."""

    def __init__(self, model: MF) -> None:
        super().__init__()
        self.register_buffer("users", model.user_emb.weight.detach().clone())
        self.register_buffer("items", model.item_emb.weight.detach().clone())

    def forward(self, user_ids: torch.Tensor) -> torch.Tensor:
        return self.users.index_select(0, user_ids) @ self.items.T


@pytest.mark.filterwarnings("ignore::FutureWarning")  # from inside torch.export
def test_scores_mode_gives_the_vectors_mode_topn(served: dict, tiny_dataset: Dataset, tmp_path: Path) -> None:
    model, vectors_dir = served["mf"]
    onnx_path = tmp_path / "teacher.onnx"
    batch = {"user_ids": {0: torch.export.Dim("batch")}}
    example = (torch.zeros(2, dtype=torch.int64),)
    names = {"input_names": ["user_ids"], "output_names": ["scores"], "external_data": False, "verbose": False}
    torch.onnx.export(FullScores(model).eval(), example, str(onnx_path), dynamo=True, dynamic_shapes=batch, **names)
    directory = tmp_path / "teacher"

    def writer(staging: Path) -> dict:
        return write_scores_serving_files(staging, onnx_path, tiny_dataset)

    manifest = save_artifact(directory, model, role="teacher", dataset={}, metrics={}, serving=writer)
    assert manifest["serving"]["mode"] == "scores" and "items.faiss" not in manifest["files"]
    scores_mode = Retriever.load(directory, threads=1)
    vectors_mode = Retriever.load(vectors_dir, threads=1)
    assert scores_mode.mode == "scores"
    users = np.arange(tiny_dataset.n_users, dtype=np.int64)
    for exclude in (True, False):
        got_items, got_scores = scores_mode.recommend(users, 10, exclude_seen=exclude)
        want_items, want_scores = vectors_mode.recommend(users, 10, exclude_seen=exclude)
        np.testing.assert_array_equal(got_items, want_items)
        np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    want = evaluate_model(model, tiny_dataset)
    got = scores_mode.evaluate(tiny_dataset)
    assert all(got[name] == pytest.approx(want[name], abs=1e-4) for name in want)
    with pytest.raises(ValueError, match="no user vectors"):
        scores_mode.user_vectors(users)


def test_external_ids_map_to_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pairs = zip(rng.integers(0, 12, 300), rng.integers(0, 20, 300), strict=True)
    lines = [f"user_{u},item_{i},{t}" for t, (u, i) in enumerate(pairs)]
    (tmp_path / "events.csv").write_text("user,item,timestamp\n" + "\n".join(lines) + "\n")
    dataset = load_dataset(tmp_path / "events.csv")
    torch.manual_seed(0)
    model = build_model("mf", dataset, dim=4)
    save(tmp_path / "artifact", model, dataset)
    retriever = Retriever.load(tmp_path / "artifact", threads=1)
    assert retriever.item_ids == dataset.item_ids
    assert dataset.user_ids is not None
    for row, external in enumerate(dataset.user_ids):
        assert retriever.user_row(external) == row
    with pytest.raises(UnknownUser):
        retriever.user_row("0")
