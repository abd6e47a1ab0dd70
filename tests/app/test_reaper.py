"""The reaper and the worker's side of recovery, without a worker process.

``reap_once`` against the registry on SQLite and PostgreSQL with a recording queue; the API's
background reaper; a re-posted dead job starting afresh; a worker that lost its lease stepping
aside; a retry keeping its checkpoints.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from app.main import create_app
from app.queue import QueueUnavailableError
from app.reaper import LOST, reap_once
from app.registry import JobState, Registry, spec_hash, utcnow
from app.schemas import TRAIN_FIELDS
from tests.app.support import AUTH, settings_for
from worker.runner import CHECKPOINTS, JobRunner, clear_attempt

SPEC = {"dataset": "tiny", "arch": "mf", "params": {"dim": 8}, "training": {"epochs": 2}}


class RecordingQueue:
    """Stands in for ``JobQueue``: records what is published, or fails like a broker that is down."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.down = False

    def submit(self, job_id: str) -> str:
        if self.down:
            raise QueueUnavailableError("broker down")
        self.sent.append(job_id)
        return f"{job_id}-{len(self.sent)}"


def new_job(registry: Registry, seed: int = 0, **kwargs: object) -> str:
    spec = {**SPEC, "seed": seed}
    job, _ = registry.create_or_get_job("teacher", "", spec, spec_hash(spec), None, **kwargs)
    registry.mark_published(job.id, "first")
    return job.id


def running(registry: Registry, seed: int = 0, worker: str = "w1", **kwargs: object) -> str:
    job_id = new_job(registry, seed, **kwargs)
    assert registry.claim_job(job_id, worker, lease_s=30)
    return job_id


def after_lease() -> object:
    return utcnow() + timedelta(seconds=31)


def test_an_expired_job_is_requeued_and_published(registry: Registry) -> None:
    queue = RecordingQueue()
    job_id = running(registry)
    assert reap_once(registry, queue) == [] and queue.sent == []  # the lease is live
    assert reap_once(registry, queue, after_lease()) == [job_id]
    job = registry.get_job(job_id)
    assert (job.state, job.error, job.attempts, queue.sent) == ("QUEUED", LOST, 1, [job_id])
    assert job.celery_task_id == f"{job_id}-1"
    assert reap_once(registry, queue, after_lease()) == [] and queue.sent == [job_id]  # published once


def test_attempts_run_out_then_failed_with_the_reason(registry: Registry, tmp_path: Path) -> None:
    queue = RecordingQueue()
    job_id = new_job(registry, max_attempts=3)
    (tmp_path / job_id / CHECKPOINTS).mkdir(parents=True)
    for attempt in range(1, 4):
        assert registry.claim_job(job_id, f"w{attempt}", lease_s=30)
        reap_once(registry, queue, after_lease(), artifacts_dir=tmp_path)
        assert (tmp_path / job_id).is_dir() == (attempt < 3)  # a retry resumes from its checkpoints
    job = registry.get_job(job_id)
    assert (job.state, job.attempts) == ("FAILED", 3)
    assert job.error == f"{LOST} (gave up after 3 attempts)"
    assert queue.sent == [job_id, job_id]  # re-published after attempts 1 and 2 only
    assert not registry.claim_job(job_id, "w4", lease_s=30)


def test_cancelled_and_waiting_jobs_are_left_alone(registry: Registry) -> None:
    queue = RecordingQueue()
    cancelled = running(registry)
    registry.request_cancel(cancelled)
    pending, _ = registry.create_or_get_job("teacher", "", {"x": 1}, spec_hash({"x": 1}), None)
    queued = new_job(registry, seed=1)
    reap_once(registry, queue, after_lease())
    assert registry.get_job(cancelled).state == "CANCELLED" and registry.get_job(cancelled).attempts == 1
    assert registry.get_job(pending.id).state == "PENDING" and registry.get_job(queued).state == "QUEUED"
    assert queue.sent == []
    assert reap_once(registry, queue, after_lease()) == []  # a cancelled job is never re-queued


def test_a_broker_outage_is_retried_on_the_next_pass(registry: Registry) -> None:
    queue = RecordingQueue()
    job_id = running(registry)
    queue.down = True
    assert reap_once(registry, queue, after_lease()) == [job_id]
    job = registry.get_job(job_id)
    assert (job.state, job.celery_task_id, queue.sent) == ("QUEUED", None, [])
    queue.down = False
    assert reap_once(registry, queue) == [job_id] and queue.sent == [job_id]


def test_a_job_unclaimed_for_long_is_published_again(registry: Registry) -> None:
    queue = RecordingQueue()
    job_id = new_job(registry)
    assert reap_once(registry, queue, republish_after_s=60) == []
    later = utcnow() + timedelta(seconds=61)
    assert reap_once(registry, queue, later, republish_after_s=60) == [job_id]
    assert reap_once(registry, queue, republish_after_s=60) == []  # its clock restarted
    assert queue.sent == [job_id]


def test_the_api_runs_the_reaper(tmp_path: Path, tiny_dataset_dir: Path) -> None:
    settings = settings_for(tmp_path / "home", tiny_dataset_dir, heartbeat_s=1, lease_s=2)
    with TestClient(create_app(settings)) as client:
        registry = client.app.state.registry
        job_id = new_job(registry)
        assert registry.claim_job(job_id, "w1", lease_s=1)
        started = time.monotonic()
        # re-queued (task id cleared), then published (a new task id): both in one pass
        while registry.get_job(job_id).celery_task_id in ("first", None) and time.monotonic() - started < 10:
            time.sleep(0.1)
        job = registry.get_job(job_id)
        assert job.state == "QUEUED" and job.celery_task_id is not None  # published on the memory broker
        assert time.monotonic() - started < 1 + settings.reap_every_s + 2


def test_a_dead_job_posted_again_starts_afresh(tmp_path: Path, tiny_dataset_dir: Path) -> None:
    settings = settings_for(tmp_path / "home", tiny_dataset_dir)
    body = {"dataset": tiny_dataset_dir.name, "model": {"arch": "mf", "dim": 8}, "training": {"epochs": 2}}
    with TestClient(create_app(settings)) as client:
        first = client.post("/teachers", json=body, headers=AUTH).json()
        assert client.delete(f"/jobs/{first['id']}", headers=AUTH).json()["state"] == "CANCELLED"
        again = client.post("/teachers", json=body, headers=AUTH)
        assert again.status_code == 202 and again.json()["id"] == first["id"]
        assert (again.json()["state"], again.json()["attempts"]) == ("QUEUED", 0)
        registry = client.app.state.registry
        assert registry.claim_job(first["id"], "w1", lease_s=30)
        registry.set_job_state(first["id"], "FAILED", worker="w1", error="boom")
        revived = client.post("/teachers", json=body, headers=AUTH).json()
        assert (revived["state"], revived["error"], revived["attempts"]) == ("QUEUED", None, 0)
        assert client.post("/teachers", json=body, headers=AUTH).status_code == 200  # queued: the same job


def test_checkpoint_fields_are_the_service_s() -> None:
    assert not {"device", "checkpoint_dir", "checkpoint_every"} & TRAIN_FIELDS and "epochs" in TRAIN_FIELDS


def test_a_worker_that_lost_its_lease_steps_aside(tmp_path: Path, tiny_dataset_dir: Path) -> None:
    settings = settings_for(tmp_path / "home", tiny_dataset_dir)
    registry = Registry.from_url(settings.database_url)
    try:
        job_id = running(registry, worker="old")
        registry.requeue_or_fail(job_id, LOST, now=after_lease())
        assert registry.claim_job(job_id, "new", lease_s=30)
        out_root = settings.artifacts_dir / job_id
        (out_root / CHECKPOINTS).mkdir(parents=True)
        stale = JobRunner(settings, registry, "old")
        assert stale._finish(job_id, out_root, JobState.FAILED, error="late")["state"] == "LOST"
        job = registry.get_job(job_id)
        assert (job.state, job.worker, job.error) == ("RUNNING", "new", LOST) and out_root.is_dir()
        owner = JobRunner(settings, registry, "new")
        assert owner._finish(job_id, out_root, JobState.FAILED, error="boom")["state"] == "FAILED"
        assert not out_root.exists()  # a final failure leaves nothing behind
    finally:
        registry.close()


def test_a_retry_keeps_only_the_checkpoints(tmp_path: Path) -> None:
    out_root = tmp_path / "job"
    (out_root / CHECKPOINTS).mkdir(parents=True)
    (out_root / CHECKPOINTS / "last.pt").write_bytes(b"x")
    for leftover in ("teacher", "work", ".student.abc"):
        (out_root / leftover).mkdir()
    (out_root / "stray.json").write_text(json.dumps({}))
    clear_attempt(out_root)
    assert [p.name for p in out_root.iterdir()] == [CHECKPOINTS]
    assert (out_root / CHECKPOINTS / "last.pt").read_bytes() == b"x"
    clear_attempt(tmp_path / "absent")  # a first attempt has no directory yet


@pytest.mark.parametrize("marker", [None, "no-such-text"])
def test_the_crash_hook_is_off_unless_the_spec_matches(tmp_path: Path, tiny_dataset_dir: Path, marker: str) -> None:
    settings = settings_for(tmp_path / "home", tiny_dataset_dir, test_crash_on_job=marker)
    runner = JobRunner(settings, Registry.from_url("sqlite://"), "w")
    runner._crash_hook(SPEC, {"epoch": 1})  # returns: this process is still alive


def test_recovery_settings_are_checked(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, tmp_path, lease_s=9, heartbeat_s=3)
    assert (settings.reap_every_s, settings.checkpoint_every, settings.test_crash_on_job) == (3.0, 5, None)
    for bad in ({"checkpoint_every": 0}, {"republish_after_s": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            settings_for(tmp_path, tmp_path, **bad)


def test_a_registry_outage_mid_job_is_left_to_the_reaper(
    tmp_path: Path, tiny_dataset_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(tmp_path / "home", tiny_dataset_dir)
    registry = Registry.from_url(settings.database_url)
    try:
        job_id = new_job(registry)
        (settings.artifacts_dir / job_id / CHECKPOINTS).mkdir(parents=True)

        def unreachable(*_: object) -> None:
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("database down"))

        monkeypatch.setattr(registry, "get_dataset", unreachable)
        assert JobRunner(settings, registry, "w1").run(job_id)["state"] == "INTERRUPTED"
        job = registry.get_job(job_id)
        assert (job.state, job.worker, job.attempts) == ("RUNNING", "w1", 1)  # not FAILED: a retry will come
        assert (settings.artifacts_dir / job_id / CHECKPOINTS).is_dir()
        reap_once(registry, RecordingQueue(), utcnow() + timedelta(seconds=settings.lease_s + 1))
        assert registry.get_job(job_id).state == "QUEUED"
    finally:
        registry.close()
