"""Export: the ONNX user tower reproduces PyTorch, the FAISS adapter checks its inputs, and every
serving file is written into the manifest with its sha256, atomically."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from rcekd import faiss_index
from rcekd.checkpoint import save_artifact, sha256_file
from rcekd.data import Dataset
from rcekd.export import ExportError, export_user_tower, serving_writer, write_serving_files
from rcekd.metrics import mask_matrix
from rcekd.models import Recommender, build_model
from rcekd.pipeline import dataset_record

HPARAMS: dict[str, dict[str, Any]] = {
    "mf": {"dim": 8},
    "lightgcn": {"dim": 8, "n_layers": 2},
    "hstu": {"dim": 16, "n_blocks": 2, "n_heads": 2, "dqk": 4, "dv": 8, "max_len": 12},
}


def make_model(arch: str, dataset: Dataset, seed: int = 0) -> Recommender:
    torch.manual_seed(seed)
    return build_model(arch, dataset, **HPARAMS[arch]).eval()


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("arch", ["mf", "lightgcn", "hstu"])
def test_user_tower_matches_pytorch_for_any_batch(arch: str, tiny_dataset: Dataset, tmp_path: Path) -> None:
    model = make_model(arch, tiny_dataset)
    path = tmp_path / "model.onnx"
    info = export_user_tower(model, path, parity_users=16)
    assert info["parity_users"] == 16 and info["parity_max_abs_diff"] <= 1e-4
    assert info["dim"] == HPARAMS[arch]["dim"] and info["opset"] >= 17
    assert info["tower"] == ("network" if arch == "hstu" else "table")
    assert "dynamo=True" in info["exporter"]
    assert not model.training

    graph = onnx.load(str(path))
    assert [i.name for i in graph.graph.input] == ["user_ids"]
    assert [o.name for o in graph.graph.output] == ["user_vectors"]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a symbolic batch axis
    sess = session(path)
    rng = np.random.default_rng(1)
    for batch in (1, 37):
        users = rng.integers(0, tiny_dataset.n_users, size=batch).astype(np.int64)
        got = sess.run(None, {"user_ids": users})[0]
        with torch.no_grad():
            want = model.user_vectors(torch.from_numpy(users)).numpy()
        assert got.shape == (batch, HPARAMS[arch]["dim"]) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_hstu_tower_runs_the_network_on_histories_inside_the_graph(tiny_dataset: Dataset, tmp_path: Path) -> None:
    model = make_model("hstu", tiny_dataset)
    export_user_tower(model, tmp_path / "model.onnx", parity_users=4)
    graph = onnx.load(str(tmp_path / "model.onnx"))
    ops = {node.op_type for node in graph.graph.node}
    assert {"MatMul", "LayerNormalization"} <= ops  # the transformer blocks, not a lookup table
    histories = model.histories.numpy()
    tables = [onnx.numpy_helper.to_array(t) for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT64]
    assert any(t.shape == histories.shape and (t == histories).all() for t in tables)


def test_legacy_exporter_is_an_option(tiny_dataset: Dataset, tmp_path: Path) -> None:
    model = make_model("hstu", tiny_dataset)
    model.train()
    info = export_user_tower(model, tmp_path / "model.onnx", parity_users=8, dynamo=False)
    assert "dynamo=False" in info["exporter"] and info["parity_max_abs_diff"] <= 1e-4
    assert model.training  # the caller's mode is restored


def test_parity_failure_is_an_export_error(tiny_dataset: Dataset, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="differs from PyTorch"):
        export_user_tower(make_model("mf", tiny_dataset), tmp_path / "model.onnx", atol=-1.0)
    with pytest.raises(ValueError, match="parity_users"):
        export_user_tower(make_model("mf", tiny_dataset), tmp_path / "model.onnx", parity_users=0)


# ---------------------------------------------------------------------------------------------- FAISS


def vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_flat_index_returns_torch_topk_exactly() -> None:
    items, users = vectors(60, 8), vectors(40, 8, seed=1)
    scores, ids = faiss_index.search(faiss_index.build_index(items, "flat"), users, 10)
    want = torch.from_numpy(users @ items.T).topk(10, dim=1)
    np.testing.assert_array_equal(ids, want.indices.numpy())
    np.testing.assert_allclose(scores, want.values.numpy(), atol=1e-5)
    assert ids.dtype == np.int64 and scores.dtype == np.float32


@pytest.mark.parametrize(
    ("kind", "options"),
    [("flat", {}), ("hnsw", {"M": 8, "ef_search": 16}), ("ivf", {"nlist": 4, "nprobe": 1}), ("sq8", {})],
)
def test_recall_against_flat(kind: str, options: dict[str, int], tmp_path: Path) -> None:
    items, users = vectors(300, 8), vectors(50, 8, seed=1)
    index = faiss_index.build_index(items, kind, **options)
    assert index.ntotal == 300
    recall = faiss_index.recall_against_flat(index, items, users, k=20)
    assert 0.0 <= recall <= 1.0
    if kind == "flat":
        assert recall == 1.0
    faiss_index.save_index(index, tmp_path / "items.faiss")
    loaded = faiss_index.load_index(tmp_path / "items.faiss")  # search-time options survive the file
    assert faiss_index.recall_against_flat(loaded, items, users, k=20) == recall


def test_missing_results_are_padded_with_minus_one() -> None:
    scores, ids = faiss_index.search(faiss_index.build_index(vectors(5, 4), "flat"), vectors(2, 4), 8)
    assert (ids[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()


def test_adapter_rejects_what_faiss_would_misread(tmp_path: Path) -> None:
    items = vectors(20, 4)
    index = faiss_index.build_index(items)
    with pytest.raises(ValueError, match="float32"):
        faiss_index.build_index(items.astype(np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        faiss_index.search(index, np.asfortranarray(vectors(3, 4)), 2)
    with pytest.raises(ValueError, match="width"):
        faiss_index.search(index, vectors(3, 5), 2)
    with pytest.raises(ValueError, match="k must"):
        faiss_index.search(index, vectors(3, 4), 0)
    with pytest.raises(ValueError, match="unknown index kind"):
        faiss_index.build_index(items, "lsh")
    with pytest.raises(ValueError, match="unknown"):
        faiss_index.build_index(items, "flat", nprobe=3)
    (tmp_path / "bad.faiss").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="not a readable FAISS index"):
        faiss_index.load_index(tmp_path / "bad.faiss")


# ---------------------------------------------------------------------------------------------- artifact


def test_every_serving_file_is_in_the_manifest(tiny_dataset: Dataset, tmp_path: Path) -> None:
    model = make_model("lightgcn", tiny_dataset)
    out = tmp_path / "artifacts" / "lightgcn"
    writer = serving_writer(model, tiny_dataset, "hnsw", {"M": 8})
    manifest = save_artifact(
        out, model, role="student", dataset=dataset_record(tiny_dataset), metrics={}, serving=writer
    )
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert on_disk == set(manifest["files"])
    assert {"model.onnx", "items.faiss", "seen.npz", "ids.json", "weights.safetensors", "config.json"} <= on_disk
    for name, meta in manifest["files"].items():
        assert meta == {"bytes": (out / name).stat().st_size, "sha256": sha256_file(out / name)}
    serving = json.loads((out / "manifest.json").read_text())["serving"]
    assert serving["mode"] == "vectors" and serving["onnx"]["parity_max_abs_diff"] <= 1e-4
    assert serving["index"]["kind"] == "hnsw" and serving["index"]["ntotal"] == tiny_dataset.n_items
    assert serving["index"]["options"]["M"] == 8 and 0.0 <= serving["index"]["recall@20_vs_flat"] <= 1.0
    assert sorted(p.name for p in out.parent.iterdir()) == ["lightgcn"]  # no staging directory left


def test_serving_files_content(tiny_dataset: Dataset, tmp_path: Path) -> None:
    section = write_serving_files(tmp_path, make_model("mf", tiny_dataset), tiny_dataset)
    assert section["index"]["recall@20_vs_flat"] == 1.0 and section["index"]["options"] == {}
    with np.load(tmp_path / "seen.npz") as seen:
        want = mask_matrix(tiny_dataset, "test", "strict").tocsr()
        want.sort_indices()
        np.testing.assert_array_equal(seen["indptr"], want.indptr)
        np.testing.assert_array_equal(seen["indices"], want.indices)
    ids = json.loads((tmp_path / "ids.json").read_text())
    assert ids["users"] == [str(u) for u in range(tiny_dataset.n_users)]
    assert ids["items"] == [str(i) for i in range(tiny_dataset.n_items)]


def test_a_failing_serving_writer_leaves_nothing(tiny_dataset: Dataset, tmp_path: Path) -> None:
    model = make_model("mf", tiny_dataset)
    out = tmp_path / "artifacts" / "mf"

    def broken(staging: Path) -> dict:
        (staging / "model.onnx").write_bytes(b"half")
        raise RuntimeError("export crashed")

    with pytest.raises(RuntimeError, match="export crashed"):
        save_artifact(out, model, role="student", dataset={}, metrics={}, serving=broken)
    assert list(out.parent.iterdir()) == []


def test_write_serving_files_rejects_another_dataset(tiny_dataset: Dataset, tmp_path: Path) -> None:
    model = build_model("mf", tiny_dataset, dim=4)
    other = type(model)(tiny_dataset.n_users + 1, tiny_dataset.n_items, dim=4)
    with pytest.raises(ValueError, match="users×items"):
        write_serving_files(tmp_path, other, tiny_dataset)
    with pytest.raises(ValueError, match="unknown index kind"):
        write_serving_files(tmp_path, model, tiny_dataset, index="annoy")
