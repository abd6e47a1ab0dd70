"""Jobs survive faults: killed workers, a job that kills its worker, cancel, time budget.

The API runs in-process (its lifespan runs the reaper: lease 4 s, heartbeat 1 s, so a pass every
1.3 s); workers are real Celery processes in their own process groups, killed with SIGKILL. Redis is
a server this module starts on a free port. The parts around the jobs (serving under hot swaps, Redis
or the database down, a restart) are in ``test_outages.py``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.reaper import LOST, reap_once
from app.registry import utcnow
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
from tests.e2e.faults_support import RedisServer, WorkerProcess, wait_until

DATASET = "tiny"
CRASH_SEED = 987654  # RCEKD_TEST_CRASH_ON_JOB matches this job's spec
LEASE = {"heartbeat_s": 1, "lease_s": 4}


def long_spec(seed: int, epochs: int = 40, **extra: Any) -> str:
    """A distillation of ~0.25 s per epoch on the tiny data (batch 4, validated every epoch, no early stop)."""
    spec = json.loads(distill_spec(DATASET, options={"K": 5, "L": 5, "mxK": 20}, **extra))
    training = {"epochs": epochs, "batch_size": 4, "lr": 1e-2, "eval_every": 1, "patience": 10_000, "seed": seed}
    return json.dumps({**spec, "training": training})


@dataclass
class Stack:
    client: TestClient
    env: dict[str, str]
    logs: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def start_worker(self, **env: str) -> WorkerProcess:
        log = self.logs / f"worker{len(self.workers) + 1}.log"
        self.workers.append(WorkerProcess({**self.env, **env}, log))
        return self.workers[-1]

    def job(self, job_id: str) -> dict[str, Any]:
        return self.client.get(f"/jobs/{job_id}").json()

    def epoch(self, job_id: str) -> int:
        return self.job(job_id)["progress"].get("epoch", 0) if self.job(job_id)["state"] == "RUNNING" else 0


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def teacher_archive(tmp_path_factory: pytest.TempPathFactory, tiny_dataset_dir: Path) -> Path:
    teacher = train_tiny_teacher(tiny_dataset_dir, tmp_path_factory.mktemp("teacher") / "mf16")
    return archive(teacher, tmp_path_factory.mktemp("archive") / "teacher.tar.gz")


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path: Path, tiny_dataset_dir: Path) -> Iterator[Stack]:
    """The API in-process on the Redis or the SQLite broker; workers started by the test."""
    root = tmp_path / "data"
    root.mkdir()
    (root / DATASET).symlink_to(tiny_dataset_dir, target_is_directory=True)
    home = tmp_path / "home"
    home.mkdir()
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        server.client().flushall()
        broker = server.url
    else:
        broker = f"sqla+sqlite:///{home / 'broker.db'}"
    env = {
        **os.environ,
        "RCEKD_HOME": str(home),
        "RCEKD_DATA_DIR": str(root),
        "RCEKD_BROKER_URL": broker,
        "RCEKD_API_TOKEN": TOKEN,
        "RCEKD_HEARTBEAT_S": str(LEASE["heartbeat_s"]),
        "RCEKD_LEASE_S": str(LEASE["lease_s"]),
        "RCEKD_CHECKPOINT_EVERY": "2",
        "OMP_NUM_THREADS": "1",
    }
    settings = settings_for(home, root, broker_url=broker, **LEASE)
    with TestClient(create_app(settings)) as client:  # registers the dataset before a worker looks
        stack = Stack(client, env, tmp_path)
        try:
            yield stack
        finally:
            for worker in stack.workers:
                worker.stop()
    for worker in stack.workers:
        print(f"--- {worker.log.name}\n{worker.text()[-2500:]}")


@pytest.mark.parametrize("stack", ["redis", "embedded"], indirect=True)
def test_a_killed_worker_s_job_resumes_on_the_next_and_succeeds(stack: Stack, teacher_archive: Path) -> None:
    first = stack.start_worker()
    posted = post_teacher(stack.client, teacher_archive, long_spec(seed=1))
    assert posted.status_code == 202, posted.text
    job_id = posted.json()["id"]
    wait_until(lambda: stack.epoch(job_id) >= 4, 90, "4 epochs on the first worker")
    killed_at = first.kill()  # main process and pool child, mid-distillation
    epoch_at_kill = stack.job(job_id)["progress"]["epoch"]
    second = stack.start_worker()

    job = wait_for(stack.client, job_id, timeout_s=150)
    assert job["state"] == "SUCCESS", job
    assert job["attempts"] == 2 and job["error"] is None
    # one claim each, the second only after the first worker was dead: never two owners at once
    (first_claim,) = first.lines(f"job {job_id}: claimed by")
    (second_claim,) = second.lines(f"job {job_id}: claimed by")
    assert "(attempt 1)" in first_claim[1] and "(attempt 2)" in second_claim[1]
    assert second_claim[0] > killed_at
    recovered_s = second_claim[0] - killed_at
    assert recovered_s < LEASE["lease_s"] + 15
    # the second attempt continued from the last checkpoint (every 2 epochs), not from scratch
    (resumed,) = second.lines("resumed at epoch")
    resumed_from = int(re.search(r"resumed at epoch (\d+)", resumed[1]).group(1))
    # an epoch's checkpoint is written just before its progress is reported, so a kill between the two
    # leaves a checkpoint one epoch past the last reported one
    assert 2 <= resumed_from <= epoch_at_kill + 1 and resumed_from % 2 == 0
    assert job["progress"]["resumed_from"] == resumed_from
    print(f"killed at epoch {epoch_at_kill}, resumed at epoch {resumed_from}, claimed {recovered_s:.1f} s later")
    roles = sorted(m["role"] for m in stack.client.get("/models").json() if m["job_id"] == job_id)
    assert roles == ["student", "teacher"]  # registered once
    files = stack.client.app.state.settings.artifacts_dir / job_id
    assert sorted(p.name for p in files.iterdir()) == ["student", "teacher"]  # checkpoints dropped


def post_teacher_job(stack: Stack, seed: int) -> dict[str, Any]:
    """A small teacher-training job (no teacher to import first: its first epoch comes quickly)."""
    body = {"dataset": DATASET, "model": {"arch": "mf", "dim": 8}, "training": {"epochs": 3, "seed": seed}}
    response = stack.client.post("/teachers", json=body, headers=AUTH)
    assert response.status_code == 202, response.text
    return response.json()


@pytest.mark.parametrize("stack", ["embedded"], indirect=True)
def test_a_job_that_kills_its_worker_fails_after_three_attempts(stack: Stack) -> None:
    worker = stack.start_worker(RCEKD_TEST_CRASH_ON_JOB=f'"seed": {CRASH_SEED}')
    started = time.monotonic()
    crash, behind = post_teacher_job(stack, CRASH_SEED), post_teacher_job(stack, 2)

    crashed = wait_for(stack.client, crash["id"], timeout_s=120)
    failed_after_s = time.monotonic() - started
    assert crashed["state"] == "FAILED" and crashed["attempts"] == 3, crashed
    assert crashed["error"] == f"{LOST} (gave up after 3 attempts)"
    assert len(worker.lines("test hook")) == 3 and worker.process.poll() is None  # Celery replaced the child
    assert wait_for(stack.client, behind["id"], timeout_s=60)["state"] == "SUCCESS"
    assert not (stack.client.app.state.settings.artifacts_dir / crash["id"]).exists()

    job = wait_for(stack.client, post_teacher_job(stack, 3)["id"], timeout_s=60)
    assert (job["state"], job["attempts"]) == ("SUCCESS", 1)
    print(f"crashing job FAILED after 3 attempts in {failed_after_s:.1f} s; the queue drained")


@pytest.mark.parametrize("stack", ["embedded"], indirect=True)
def test_cancel_is_final_and_the_time_budget_is_enforced(stack: Stack, teacher_archive: Path) -> None:
    stack.start_worker()
    job_id = post_teacher(stack.client, teacher_archive, long_spec(seed=4, epochs=200)).json()["id"]
    wait_until(lambda: stack.epoch(job_id) >= 3, 90, "3 epochs")
    asked = time.monotonic()
    cancelling = stack.client.delete(f"/jobs/{job_id}", headers=AUTH).json()
    epoch_asked = cancelling["progress"]["epoch"]
    job = wait_for(stack.client, job_id, timeout_s=30)
    took = time.monotonic() - asked
    assert job["state"] == "CANCELLED" and job["attempts"] == 1
    assert job["progress"]["epoch"] <= epoch_asked + 2  # the epoch under way (and one reported late) at most
    registry, queue = stack.client.app.state.registry, stack.client.app.state.queue
    reap_once(registry, queue, utcnow(), republish_after_s=0)  # even a reaper that republishes everything
    time.sleep(2 * LEASE["lease_s"])
    assert (stack.job(job_id)["state"], stack.job(job_id)["attempts"]) == ("CANCELLED", 1)
    assert not (stack.client.app.state.settings.artifacts_dir / job_id).exists()
    print(f"cancelled at epoch {epoch_asked}, stopped at {job['progress']['epoch']}, {took:.1f} s")

    posted = post_teacher(stack.client, teacher_archive, long_spec(seed=5, epochs=500, time_budget_s=6)).json()
    job = wait_for(stack.client, posted["id"], timeout_s=60)
    assert job["state"] == "FAILED" and "time budget" in job["error"], job
    assert 0 < job["progress"]["epoch"] < 500
    print(f"time budget 6 s: FAILED at epoch {job['progress']['epoch']}: {job['error']}")
