"""End to end: the API in-process, a real Celery worker process, on Redis and in embedded mode.

Upload a teacher archive → the worker distils → poll to SUCCESS → activate → recommend; the served
path's NDCG equals the PyTorch evaluation; hostile and oversized uploads are refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from rcekd.data import load_dataset
from rcekd.retrieval import Retriever
from tests.app.support import (
    AUTH,
    TOKEN,
    archive,
    distill_spec,
    post_teacher,
    settings_for,
    train_tiny_teacher,
    wait_for,
)

REDIS_URL = os.environ.get("RCEKD_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
DATASET = "tiny"
ROOT = Path(__file__).resolve().parents[2]


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "rcekd"]
    command += ["--concurrency=1", "--loglevel=INFO", "-n", f"e2e-{uuid.uuid4().hex[:8]}@%h", "--without-gossip"]
    return subprocess.Popen(command, env=env, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dataset_dir: Path) -> Path:
    return train_tiny_teacher(tiny_dataset_dir, tmp_path_factory.mktemp("teacher") / "mf16")


@pytest.fixture(params=["redis", "embedded"])
def service(request: pytest.FixtureRequest, tmp_path: Path, tiny_dataset_dir: Path) -> Iterator[TestClient]:
    root = tmp_path / "data"
    root.mkdir()
    (root / DATASET).symlink_to(tiny_dataset_dir, target_is_directory=True)
    home = tmp_path / "home"
    if request.param == "redis":
        try:
            redis.Redis.from_url(REDIS_URL, socket_timeout=2).flushdb()
        except redis.RedisError as exc:
            pytest.skip(f"Redis unreachable at {REDIS_URL}: {exc}")
        broker = REDIS_URL
    else:
        broker = f"sqla+sqlite:///{home / 'broker.db'}"
    home.mkdir()
    env = {
        **os.environ,
        "RCEKD_HOME": str(home),
        "RCEKD_DATA_DIR": str(root),
        "RCEKD_BROKER_URL": broker,
        "RCEKD_API_TOKEN": TOKEN,
        "RCEKD_MAX_UPLOAD_BYTES": str(1 << 20),
        "OMP_NUM_THREADS": "1",
    }
    settings = settings_for(home, root, broker_url=broker, max_upload_bytes=1 << 20)
    with TestClient(create_app(settings)) as client:  # registers the dataset before the worker looks
        worker = start_worker(env, tmp_path / "worker.log")
        try:
            yield client
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
    print((tmp_path / "worker.log").read_text()[-3000:])


def test_distil_serve_and_refuse(
    service: TestClient, teacher_dir: Path, tmp_path: Path, tiny_dataset_dir: Path
) -> None:
    teacher = archive(teacher_dir, tmp_path / "teacher.tar.gz")
    posted = post_teacher(service, teacher, distill_spec(DATASET, epochs=6, options={"K": 5, "L": 5, "mxK": 20}))
    assert posted.status_code == 202, posted.text
    job = wait_for(service, posted.json()["id"], timeout_s=240)
    assert job["state"] == "SUCCESS", job
    assert job["attempts"] == 1 and job["progress"]["epoch"] >= 1

    models = service.get("/models", params={"dataset": DATASET}).json()
    assert sorted(m["role"] for m in models) == ["student", "teacher"]
    student = next(m for m in models if m["role"] == "student")
    assert student["id"] == job["result_model_id"]
    assert service.post(f"/models/{student['id']}/activate", headers=AUTH).status_code == 200

    dataset = load_dataset(tiny_dataset_dir)
    seen = dataset.csr("train") + dataset.csr("valid")
    for user in (0, 7, 39):
        body = service.get(f"/recommend/{user}", params={"n": 10}).json()
        items = [int(entry["item"]) for entry in body["items"]]
        assert body["model"] == student["id"] and len(items) == 10
        assert not set(items) & set(seen[user].indices.tolist())

    # the served path (ONNX + FAISS + seen filter) ranks exactly as PyTorch evaluated
    for model in models:
        served = Retriever.load(service.app.state.registry.get_model(model["id"]).directory).evaluate(dataset)
        recorded = model["metrics"]["test"]
        for key in ("recall@20", "ndcg@20", "ndcg@10"):
            assert abs(served[key] - recorded[key]) <= 1e-4, (model["role"], key, served[key], recorded[key])

    report = service.get("/compare", params={"models": ",".join(m["id"] for m in models)}).json()["models"]
    for entry, model in zip(report, models, strict=True):
        directory = Path(service.app.state.registry.get_model(model["id"]).directory)
        assert entry["bytes"] == {name: (directory / name).stat().st_size for name in entry["bytes"]}
        assert entry["metrics"]["ndcg@20"] == model["metrics"]["test"]["ndcg@20"]
        assert entry["model_only_ms"]["p50"] <= entry["model_only_ms"]["p95"] <= entry["model_only_ms"]["p99"]
        assert entry["end_to_end_ms"]["p50"] <= entry["end_to_end_ms"]["p95"] <= entry["end_to_end_ms"]["p99"]

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"w": Exploit()}, tmp_path / "evil.pt")
    evil = post_teacher(service, tmp_path / "evil.pt", distill_spec(DATASET, teacher={"arch": "mf", "dim": 16}))
    assert evil.status_code == 422 and not marker.exists()
    big = tmp_path / "big.bin"
    big.write_bytes(np.random.default_rng(0).bytes(3 << 20))
    assert post_teacher(service, big, distill_spec(DATASET)).status_code == 413
