"""Serving survives the parts around it: hot swaps under load, Redis down, the database down, a restart.

No worker here: the served models are trained in-process once per module and registered as the
worker would. Load comes from real HTTP clients in threads against a real uvicorn server.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.registry import Registry, make_engine
from rcekd.data import load_dataset
from rcekd.jobs import TeacherSpec, run_teacher_job
from tests.app.support import AUTH, settings_for
from tests.e2e.faults_support import RedisServer, ServerThread, free_port

DATASET = "tiny"
REQUESTS, CLIENTS = 5000, 16


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, tiny_dataset_dir: Path) -> list[dict[str, Any]]:
    """Two servable teachers (manifest + directory), and a copy of the first with a corrupted index."""
    dataset = load_dataset(tiny_dataset_dir)
    root = tmp_path_factory.mktemp("served")
    made = []
    for seed, dim in ((0, 16), (1, 8)):
        spec = TeacherSpec.from_dict({"arch": "mf", "params": {"dim": dim}, "training": {"epochs": 4, "seed": seed}})
        out = root / f"mf{dim}"
        made.append({"manifest": run_teacher_job(dataset, spec, out), "directory": out})
    corrupt = root / "corrupt"
    shutil.copytree(made[0]["directory"], corrupt)
    with open(corrupt / "items.faiss", "r+b") as handle:
        handle.seek(64)
        handle.write(b"\x00" * 16)
    made.append({"manifest": {**made[0]["manifest"], "id": "corrupt-copy"}, "directory": corrupt})
    return made


def register(registry: Registry, artifact: dict[str, Any]) -> str:
    manifest = artifact["manifest"]
    registry.register_artifact(manifest, artifact["directory"], DATASET, name=f"teacher-{manifest['id'][:6]}")
    return manifest["id"]


@pytest.fixture
def settings(tmp_path: Path, tiny_dataset_dir: Path) -> Settings:
    root = tmp_path / "data"
    root.mkdir()
    (root / DATASET).symlink_to(tiny_dataset_dir, target_is_directory=True)
    return settings_for(tmp_path / "home", root)


def test_hot_swaps_under_load_fail_no_request(settings: Settings, artifacts: list[dict[str, Any]]) -> None:
    app = create_app(settings)
    with ServerThread(app) as server:
        first, second, corrupt = (register(app.state.registry, artifact) for artifact in artifacts)
        admin = httpx.Client(base_url=server.url, headers=AUTH, timeout=60)
        assert admin.post(f"/models/{first}/activate").status_code == 200
        lock, issued, done = threading.Lock(), [0], [0]
        served: Counter[str] = Counter()
        failures: list[str] = []

        def client_loop() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                while True:
                    with lock:
                        if issued[0] >= REQUESTS:
                            return
                        issued[0] += 1
                        user = issued[0] % 40
                    try:
                        response = client.get(f"/recommend/{user}", params={"n": 10})
                        ok = response.status_code == 200 and len(response.json()["items"]) == 10
                        outcome = response.json()["model"] if ok else f"{response.status_code}: {response.text[:200]}"
                    except httpx.HTTPError as exc:
                        ok, outcome = False, repr(exc)
                    with lock:
                        done[0] += 1
                        (served.update if ok else failures.append)([outcome] if ok else outcome)

        threads = [threading.Thread(target=client_loop) for _ in range(CLIENTS)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        swaps = [(1000, second, 200), (2500, corrupt, 422), (3500, first, 200)]
        for threshold, model, expected in swaps:
            while done[0] < threshold:
                time.sleep(0.005)
            response = admin.post(f"/models/{model}/activate")
            assert response.status_code == expected, response.text
            assert done[0] < REQUESTS, "the load ended before the swap"
        for thread in threads:
            thread.join(timeout=300)
        seconds = time.monotonic() - started
        assert failures == [] and done[0] == REQUESTS
        assert set(served) == {first, second} and served[second] >= 500  # the corrupt copy never served
        assert app.state.registry.active_model(DATASET).id == first
        print(f"{REQUESTS} requests, {CLIENTS} clients, {seconds:.1f} s, 0 failed; served {dict(served)}")


def test_redis_down_keeps_serving_and_answers_503(settings: Settings, artifacts: list[dict[str, Any]]) -> None:
    redis_server = RedisServer().start()
    settings = Settings(**{**settings.model_dump(), "broker_url": redis_server.url, "result_backend": None})
    try:
        with TestClient(create_app(settings)) as client:
            model = register(client.app.state.registry, artifacts[0])
            assert client.post(f"/models/{model}/activate", headers=AUTH).status_code == 200
            spec = {"dataset": DATASET, "teacher_model": model, "student": {"dim": 4}, "training": {"epochs": 2}}
            redis_server.stop()

            for user in range(20):
                assert client.get(f"/recommend/{user}").status_code == 200
                assert client.get(f"/recommend/{user}", params={"model": model}).status_code == 200
            asked = time.monotonic()
            refused = client.post("/distill", data={"spec": json.dumps(spec)}, headers=AUTH)
            took = time.monotonic() - asked
            assert refused.status_code == 503 and "recorded" in refused.json()["detail"], refused.text
            assert took < 10
            (job,) = client.app.state.registry.list_jobs()
            assert job.state == "PENDING"
            assert client.get("/readyz").status_code == 503

            redis_server.start()  # back, on the same port
            again = client.post("/distill", data={"spec": json.dumps(spec)}, headers=AUTH)
            assert again.status_code == 202, again.text  # accepted now: the recorded job, queued at last
            assert again.json()["id"] == job.id and again.json()["state"] == "QUEUED"
            assert redis_server.client().llen("rcekd") == 1  # the recorded job's message is in the queue now
            other = client.post("/distill", data={"spec": json.dumps({**spec, "student": {"dim": 6}})}, headers=AUTH)
            assert other.status_code == 202
            print(f"POST /distill with Redis down: 503 in {took * 1000:.0f} ms; /recommend kept answering 200")
    finally:
        redis_server.stop()


@pytest.fixture
def dead_registry() -> Iterator[Registry]:
    """A registry on a PostgreSQL port nobody listens on."""
    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/test"
    registry = Registry(make_engine(url, connect_args={"connect_timeout": 2}))
    yield registry
    registry.close()


def test_database_down_is_503_and_serving_goes_on(
    settings: Settings, artifacts: list[dict[str, Any]], dead_registry: Registry
) -> None:
    with TestClient(create_app(settings)) as client:
        model = register(client.app.state.registry, artifacts[0])
        assert client.post(f"/models/{model}/activate", headers=AUTH).status_code == 200
        healthy, client.app.state.registry = client.app.state.registry, dead_registry
        try:
            spec = json.dumps({"dataset": DATASET, "teacher_model": model})
            calls = [
                ("GET", "/jobs", {}),
                ("GET", "/jobs/abc", {}),
                ("DELETE", "/jobs/abc", {"headers": AUTH}),
                ("GET", "/models", {}),
                ("GET", f"/models/{model}", {}),
                ("POST", f"/models/{model}/activate", {"headers": AUTH}),
                ("GET", "/datasets", {}),
                ("POST", "/teachers", {"json": {"dataset": DATASET}, "headers": AUTH}),
                ("POST", "/distill", {"data": {"spec": spec}, "headers": AUTH}),
                ("GET", "/recommend/3", {"params": {"model": "not-loaded"}}),
            ]
            for method, path, kwargs in calls:
                response = client.request(method, path, **kwargs)
                assert response.status_code == 503, (method, path, response.status_code, response.text)
                assert "registry database is unavailable" in response.json()["detail"]
                assert response.headers["retry-after"]
            assert client.get("/readyz").status_code == 503
            for params in ({}, {"model": model}):  # the active model, and a loaded one named: no registry needed
                response = client.get("/recommend/3", params=params)
                assert response.status_code == 200 and response.json()["model"] == model
        finally:
            client.app.state.registry = healthy
        assert client.get("/jobs").status_code == 200  # the database is back


def test_a_restarted_api_serves_the_last_active_model(settings: Settings, artifacts: list[dict[str, Any]]) -> None:
    with TestClient(create_app(settings)) as client:
        first, second = (register(client.app.state.registry, artifact) for artifact in artifacts[:2])
        for model in (first, second):
            assert client.post(f"/models/{model}/activate", headers=AUTH).status_code == 200
    with TestClient(create_app(settings)) as client:  # a new process's state: nothing loaded until start-up
        assert client.get("/recommend/3").json()["model"] == second
