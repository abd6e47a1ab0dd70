"""The API in-process with an in-memory broker (no worker): validation, auth, uploads, serving.

Jobs here are only queued; the end-to-end tests (tests/e2e) run them on real Celery workers.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from rcekd.data import load_dataset
from rcekd.jobs import TeacherSpec, run_teacher_job
from tests.app.support import AUTH, archive, distill_spec, post_teacher, settings_for, train_tiny_teacher

DATASET = "tiny"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dataset_dir: Path) -> Path:
    return train_tiny_teacher(tiny_dataset_dir, tmp_path_factory.mktemp("teacher") / "mf16")


@pytest.fixture(scope="module")
def teacher_archive(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path) -> Path:
    return archive(teacher_dir, tmp_path_factory.mktemp("archive") / "teacher.tar.gz")


@pytest.fixture
def data_root(tmp_path: Path, tiny_dataset_dir: Path) -> Path:
    """A data dir holding the tiny dataset under the name ``tiny`` (its registry id)."""
    root = tmp_path / "data"
    root.mkdir()
    (root / DATASET).symlink_to(tiny_dataset_dir, target_is_directory=True)
    return root


@pytest.fixture
def client(tmp_path: Path, data_root: Path) -> TestClient:
    settings = settings_for(tmp_path / "home", data_root, max_upload_bytes=512 * 1024)
    with TestClient(create_app(settings)) as client:
        yield client


def uploads(client: TestClient) -> list[Path]:
    return [p for p in client.app.state.settings.uploads_dir.rglob("*") if p.is_file()]


def test_health_and_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/distill", "/teachers", "/jobs/{job_id}", "/recommend/{user}", "/compare"} <= set(paths)
    assert "rcekd_http_requests" in client.get("/metrics").text


def test_builtin_dataset_is_registered(client: TestClient, tiny_dataset_dir: Path) -> None:
    (row,) = client.get("/datasets").json()
    dataset = load_dataset(tiny_dataset_dir)
    assert (row["id"], row["n_users"], row["n_items"], row["fingerprint"]) == (
        DATASET,
        dataset.n_users,
        dataset.n_items,
        dataset.fingerprint,
    )


def test_mutating_endpoints_need_the_token(client: TestClient, teacher_archive: Path) -> None:
    assert post_teacher(client, teacher_archive, distill_spec(DATASET), headers={}).status_code == 401
    wrong = {"Authorization": "Bearer " + "y" * 43}
    assert post_teacher(client, teacher_archive, distill_spec(DATASET), headers=wrong).status_code == 401
    assert client.delete("/jobs/nope").status_code == 401
    assert uploads(client) == []


def test_distill_is_queued_once_for_the_same_teacher_and_spec(client: TestClient, teacher_archive: Path) -> None:
    first = post_teacher(client, teacher_archive, distill_spec(DATASET))
    assert first.status_code == 202, first.text
    again = post_teacher(client, teacher_archive, distill_spec(DATASET))
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    other = post_teacher(client, teacher_archive, distill_spec(DATASET, method="cd"))
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    assert first.json()["state"] == "QUEUED"
    assert len(uploads(client)) == 2  # one copy per job, none for the repeat


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"dataset": DATASET, "method": "magic"}, "unknown method"),
        ({"dataset": "nope"}, "unknown dataset"),
        ({"dataset": DATASET, "student": {"arch": "gpt"}}, "unknown architecture"),
        ({"dataset": DATASET, "training": {"epochs": 0}}, "epochs"),
        ({"dataset": DATASET, "training": {"learning_rate": 1}}, "unknown training fields"),
        ({"dataset": DATASET, "method": "cd", "options": {"tau_s": 1}}, "do not apply to cd"),
    ],
)
def test_bad_specs_are_422_and_keep_nothing(client: TestClient, teacher_archive: Path, spec: dict, needle: str) -> None:
    response = post_teacher(client, teacher_archive, json.dumps(spec))
    assert response.status_code == 422 and needle in response.text
    assert uploads(client) == []


def test_a_pickle_that_would_run_code_is_refused(client: TestClient, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    import torch

    torch.save({"weights": Exploit()}, evil)
    response = post_teacher(client, evil, distill_spec(DATASET, teacher={"arch": "mf", "dim": 16}))
    assert response.status_code == 422, response.text
    assert not marker.exists()
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(Exploit()))
    assert post_teacher(client, raw, distill_spec(DATASET)).status_code == 422
    assert not marker.exists() and uploads(client) == []


def test_oversized_upload_is_413_and_leaves_nothing(client: TestClient, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(np.random.default_rng(0).bytes(2 * 1024 * 1024))
    response = post_teacher(client, big, distill_spec(DATASET))
    assert response.status_code == 413
    assert uploads(client) == []


def test_teacher_from_other_data_is_refused(
    client: TestClient, tmp_path: Path, tiny_dataset_dir_no_valid: Path
) -> None:
    other = train_tiny_teacher(tiny_dataset_dir_no_valid, tmp_path / "other", epochs=2)
    response = post_teacher(client, archive(other, tmp_path / "other.tar.gz"), distill_spec(DATASET))
    assert response.status_code == 422 and "dataset" in response.text


def test_hetcomp_without_trajectory_is_422(client: TestClient, teacher_dir: Path, tmp_path: Path) -> None:
    bare = archive(teacher_dir, tmp_path / "bare.tar.gz", include_trajectory=False)
    response = post_teacher(client, bare, distill_spec(DATASET, method="hetcomp"))
    assert response.status_code == 422 and "trajectory" in response.text


def test_cancel_a_queued_job(client: TestClient, teacher_archive: Path) -> None:
    job = post_teacher(client, teacher_archive, distill_spec(DATASET)).json()
    cancelled = client.delete(f"/jobs/{job['id']}", headers=AUTH)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "CANCELLED"
    assert client.get("/jobs", params={"state": "CANCELLED"}).json()[0]["id"] == job["id"]
    assert client.get("/jobs/unknown").status_code == 404


@pytest.fixture
def served(client: TestClient, tmp_path: Path) -> dict:
    """A servable teacher trained in-process and registered as the worker would."""
    registry = client.app.state.registry
    dataset = client.app.state.datasets.get(registry, DATASET)
    spec = TeacherSpec.from_dict({"arch": "mf", "params": {"dim": 16}, "training": {"epochs": 6, "lr": 1e-2}})
    out = client.app.state.settings.artifacts_dir / "manual" / "teacher"
    manifest = run_teacher_job(dataset, spec, out)
    registry.register_artifact(manifest, out, DATASET, name="teacher-mf16")
    assert client.post(f"/models/{manifest['id']}/activate", headers=AUTH).status_code == 200
    return {"manifest": manifest, "dataset": dataset}


def test_recommend_returns_n_unseen_items(client: TestClient, served: dict) -> None:
    dataset = served["dataset"]
    seen = dataset.csr("train") + dataset.csr("valid")
    body = client.get("/recommend/3", params={"n": 7}).json()
    items = [int(entry["item"]) for entry in body["items"]]
    assert len(items) == 7 and len(set(items)) == 7
    assert not set(items) & set(seen[3].indices.tolist())
    scores = [entry["score"] for entry in body["items"]]
    assert scores == sorted(scores, reverse=True)
    with_seen = client.get("/recommend/3", params={"n": 7, "exclude_seen": False}).json()
    assert with_seen["items"][0]["score"] >= body["items"][0]["score"]


def test_recommend_errors(client: TestClient, served: dict) -> None:
    assert client.get("/recommend/99999").status_code == 404
    assert client.get("/recommend/3", params={"n": 0}).status_code == 422
    assert client.get("/recommend/3", params={"n": "many"}).status_code == 422
    assert client.get("/recommend/3", params={"model": "nope"}).status_code == 404


def test_batch_recommend_matches_single(client: TestClient, served: dict) -> None:
    batch = client.post("/recommend", json={"users": ["1", "2"], "n": 5}).json()
    assert [r["user"] for r in batch] == ["1", "2"]
    assert batch[1]["items"] == client.get("/recommend/2", params={"n": 5}).json()["items"]
    assert client.post("/recommend", json={"users": ["1", "zzz"], "n": 5}).status_code == 404


def test_compare_values_are_checked(client: TestClient, served: dict) -> None:
    manifest = served["manifest"]
    report = client.get("/compare", params={"models": manifest["id"]}).json()["models"][0]
    directory = Path(client.app.state.registry.get_model(manifest["id"]).directory)
    for name, size in report["bytes"].items():
        assert (directory / name).stat().st_size == size
    assert report["metrics"]["ndcg@20"] == manifest["metrics"]["test"]["ndcg@20"]
    for timing in ("model_only_ms", "end_to_end_ms"):
        t = report[timing]
        assert 0 < t["p50"] <= t["p95"] <= t["p99"]
    assert report["provider"].endswith("ExecutionProvider")
    png = client.get("/compare/plot.png", params={"models": manifest["id"]})
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")


def test_a_corrupted_model_is_refused_and_the_old_one_keeps_serving(client: TestClient, served: dict) -> None:
    registry = client.app.state.registry
    old = served["manifest"]["id"]
    row = registry.get_model(old)
    copy_dir = Path(row.directory).parent / "corrupt"
    import shutil

    shutil.copytree(row.directory, copy_dir)
    with open(copy_dir / "items.faiss", "r+b") as handle:
        handle.seek(64)
        handle.write(b"\x00" * 16)
    registry.register_artifact({**row.manifest, "id": "corrupt-copy"}, copy_dir, DATASET, name="corrupt")
    response = client.post("/models/corrupt-copy/activate", headers=AUTH)
    assert response.status_code == 422 and "sha256" in response.text
    assert client.get("/recommend/3").json()["model"] == old
    assert registry.active_model(DATASET).id == old


def test_upload_csv_dataset(client: TestClient) -> None:
    rows = "\n".join(f"u{u},i{(u * 7 + k) % 30},{k}" for u in range(20) for k in range(10))
    files = {"file": ("x.csv", io.BytesIO(f"user,item,timestamp\n{rows}\n".encode()))}
    response = client.post("/datasets", data={"name": "My Shop"}, files=files, headers=AUTH)
    assert response.status_code == 201, response.text
    assert response.json()["id"] == "my-shop" and response.json()["n_users"] == 20
    bad = {"file": ("x.csv", io.BytesIO(b"user,item\nonly-one-column\n"))}
    response = client.post("/datasets", data={"name": "broken"}, files=bad, headers=AUTH)
    assert response.status_code == 422
    assert "broken" not in [d["id"] for d in client.get("/datasets").json()]
