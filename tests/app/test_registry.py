"""The registry on SQLite and PostgreSQL: idempotent jobs under races, the job state machine, leases,
re-queueing, cancellation and the one-active-model rule."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.registry import TERMINAL, InvalidTransition, Job, JobState, Model, NotFound, Registry, spec_hash, utcnow

SPEC = {"dataset": "tiny", "method": "rcekd", "student": {"arch": "mf", "dim": 20}, "seed": 0}
TEACHER = "ab" * 32


def new_job(registry: Registry, spec: dict[str, Any] | None = None, **kwargs: Any) -> Job:
    spec = spec or SPEC
    job, created = registry.create_or_get_job(
        "distill", TEACHER, spec, spec_hash(spec), "/uploads/t.safetensors", **kwargs
    )
    assert created
    return job


def running_job(registry: Registry, worker: str = "w1", **kwargs: Any) -> Job:
    job = new_job(registry, **kwargs)
    assert registry.claim_job(job.id, worker, lease_s=60)
    return registry.get_job(job.id)


def expire_lease(registry: Registry, job_id: str) -> None:
    registry.set_job_state(job_id, "RUNNING", lease_expires_at=utcnow() - timedelta(seconds=1))


def race(n: int, action: Callable[[int], Any]) -> list[Any]:
    """Run ``action(i)`` in ``n`` threads released together; re-raise the first error."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = action(i)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]
    return results


def count_jobs(registry: Registry) -> int:
    with Session(registry.engine) as session:
        return session.scalar(select(func.count()).select_from(Job)) or 0


# spec hashing
def test_spec_hash_ignores_key_order_and_sees_values() -> None:
    reordered = {"seed": 0, "student": {"dim": 20, "arch": "mf"}, "method": "rcekd", "dataset": "tiny"}
    assert spec_hash(SPEC) == spec_hash(reordered)
    assert spec_hash(SPEC) != spec_hash({**SPEC, "seed": 1})
    assert len(spec_hash(SPEC)) == 64 and int(spec_hash(SPEC), 16) >= 0


def test_spec_hash_refuses_what_json_cannot_say() -> None:
    with pytest.raises(ValueError):
        spec_hash({"lr": float("nan")})


# datasets
def test_datasets_upsert_get_list(registry: Registry) -> None:
    values = dict(
        name="CiteULike", directory="/data/citeulike", fingerprint="f1", n_users=5, n_items=7, n_interactions=30
    )
    created = registry.upsert_dataset(id="citeulike", **values)
    assert created.source == "builtin" and created.created_at.tzinfo is UTC
    registry.upsert_dataset(id="citeulike", **{**values, "fingerprint": "f2", "n_users": 6})
    registry.upsert_dataset(id="a-upload", **values, source="upload")
    row = registry.get_dataset("citeulike")
    assert (row.fingerprint, row.n_users, row.directory) == ("f2", 6, "/data/citeulike")
    assert [d.id for d in registry.list_datasets()] == ["a-upload", "citeulike"]
    with pytest.raises(NotFound):
        registry.get_dataset("missing")
    with pytest.raises(IntegrityError):
        registry.upsert_dataset(id="bad", **values, source="somewhere")


# jobs: idempotent creation
def test_same_teacher_and_spec_give_the_same_job(registry: Registry) -> None:
    job = new_job(registry, time_budget_s=600)
    assert (job.state, job.attempts, job.max_attempts, job.progress) == ("PENDING", 0, 3, {})
    assert not job.cancel_requested
    assert job.created_at.tzinfo is UTC and job.deadline is None and job.time_budget_s == 600
    reordered = dict(reversed(SPEC.items()))
    again, created = registry.create_or_get_job("distill", TEACHER, reordered, spec_hash(reordered), "/other", 5)
    assert not created and again.id == job.id and again.teacher_path == "/uploads/t.safetensors"
    other_spec = new_job(registry, {**SPEC, "seed": 1})
    other_kind, created = registry.create_or_get_job("teacher", TEACHER, SPEC, spec_hash(SPEC), None)
    assert created and len({job.id, other_spec.id, other_kind.id}) == 3
    assert count_jobs(registry) == 3


def test_job_arguments_are_checked(registry: Registry) -> None:
    with pytest.raises(ValueError, match="time_budget_s"):
        registry.create_or_get_job("distill", TEACHER, SPEC, spec_hash(SPEC), None, 0)
    with pytest.raises(ValueError, match="max_attempts"):
        registry.create_or_get_job("distill", TEACHER, SPEC, spec_hash(SPEC), None, max_attempts=0)


def test_concurrent_identical_posts_make_one_job(open_registry: Callable[[], Registry]) -> None:
    """Two processes (own engines), four threads each, the same job at the same instant: one row."""
    registries = [open_registry(), open_registry()]

    def post(i: int) -> tuple[str, bool]:
        job, created = registries[i % 2].create_or_get_job("distill", TEACHER, SPEC, spec_hash(SPEC), "/t")
        return job.id, created

    results = race(8, post)
    assert len({job_id for job_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert count_jobs(registries[0]) == 1


def test_get_and_list_jobs(registry: Registry) -> None:
    first, second = new_job(registry), new_job(registry, {**SPEC, "seed": 1})
    registry.set_job_state(second.id, "QUEUED", celery_task_id="task-1")
    assert [j.id for j in registry.list_jobs()] == [second.id, first.id]
    assert [j.id for j in registry.list_jobs(state="QUEUED")] == [second.id]
    assert [j.id for j in registry.list_jobs(limit=1)] == [second.id]
    assert registry.get_job(second.id).celery_task_id == "task-1"
    with pytest.raises(ValueError):
        registry.list_jobs(state="SLEEPING")
    with pytest.raises(NotFound):
        registry.get_job("nope")


# jobs: the state machine
def test_happy_path_sets_timestamps(registry: Registry) -> None:
    job = new_job(registry, time_budget_s=3600)
    queued = registry.set_job_state(job.id, JobState.QUEUED, celery_task_id="t")
    assert queued.state == "QUEUED" and queued.updated_at >= job.updated_at
    assert registry.claim_job(job.id, "w1", lease_s=60)
    running = registry.get_job(job.id)
    assert (running.state, running.worker, running.attempts) == ("RUNNING", "w1", 1)
    assert running.started_at is not None and running.heartbeat_at is not None
    assert running.deadline == running.started_at + timedelta(seconds=3600)
    assert running.lease_expires_at == running.heartbeat_at + timedelta(seconds=60)
    done = registry.set_job_state(job.id, "SUCCESS", worker="w1", result_model_id="m-1")
    assert (done.state, done.result_model_id, done.lease_expires_at) == ("SUCCESS", "m-1", None)
    assert done.finished_at is not None and done.finished_at >= running.started_at


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_terminal_states_never_change(registry: Registry, terminal: JobState) -> None:
    job = running_job(registry)
    registry.set_job_state(job.id, terminal)
    for target in JobState:
        with pytest.raises(InvalidTransition):
            registry.set_job_state(job.id, target)
    assert not registry.claim_job(job.id, "w2", lease_s=60)
    assert registry.requeue_or_fail(job.id, "lost").state == terminal
    assert registry.get_job(job.id).state == terminal


def test_running_is_entered_only_by_claiming(registry: Registry) -> None:
    job = new_job(registry)
    with pytest.raises(InvalidTransition, match="PENDING cannot become RUNNING"):
        registry.set_job_state(job.id, "RUNNING")
    with pytest.raises(InvalidTransition):
        registry.set_job_state(job.id, "SUCCESS")  # never ran


def test_set_job_state_checks_its_arguments(registry: Registry) -> None:
    job = new_job(registry)
    with pytest.raises(TypeError, match="spec_hash"):
        registry.set_job_state(job.id, "QUEUED", spec_hash="x")
    with pytest.raises(ValueError):
        registry.set_job_state(job.id, "DONE")
    with pytest.raises(NotFound):
        registry.set_job_state("nope", "QUEUED")


def test_failed_keeps_its_error(registry: Registry) -> None:
    job = running_job(registry)
    failed = registry.set_job_state(job.id, "FAILED", error="CheckpointError: bad shapes")
    assert (failed.state, failed.error) == ("FAILED", "CheckpointError: bad shapes")


# cancellation
@pytest.mark.parametrize("state", ["PENDING", "QUEUED"])
def test_cancel_before_running_is_immediate(registry: Registry, state: str) -> None:
    job = new_job(registry)
    if state == "QUEUED":
        registry.set_job_state(job.id, "QUEUED")
    cancelled = registry.request_cancel(job.id)
    assert cancelled.state == "CANCELLED" and cancelled.finished_at is not None
    assert registry.request_cancel(job.id).state == "CANCELLED"  # idempotent
    assert not registry.claim_job(job.id, "w1", lease_s=60)


def test_cancel_while_running_asks_the_worker(registry: Registry) -> None:
    job = running_job(registry)
    asked = registry.request_cancel(job.id)
    assert (asked.state, asked.cancel_requested) == ("RUNNING", True)
    assert registry.set_job_state(job.id, "CANCELLED", worker="w1").state == "CANCELLED"
    with pytest.raises(InvalidTransition):
        registry.set_job_state(job.id, "SUCCESS")


def test_cancel_after_the_end_is_refused(registry: Registry) -> None:
    job = running_job(registry)
    registry.set_job_state(job.id, "SUCCESS")
    with pytest.raises(InvalidTransition, match="already SUCCESS"):
        registry.request_cancel(job.id)
    with pytest.raises(NotFound):
        registry.request_cancel("nope")


# leases: claiming, heartbeats, the reaper
def test_a_live_lease_cannot_be_claimed_twice(registry: Registry) -> None:
    job = running_job(registry, "w1")
    assert not registry.claim_job(job.id, "w2", lease_s=60)
    assert not registry.claim_job(job.id, "w1", lease_s=60)
    assert registry.get_job(job.id).attempts == 1
    with pytest.raises(NotFound):
        registry.claim_job("nope", "w1", lease_s=60)


def test_racing_claims_give_one_winner(open_registry: Callable[[], Registry]) -> None:
    registries = [open_registry(), open_registry()]
    job = new_job(registries[0])
    registries[0].set_job_state(job.id, "QUEUED")
    wins = race(6, lambda i: registries[i % 2].claim_job(job.id, f"w{i}", lease_s=60))
    assert sum(wins) == 1
    job = registries[1].get_job(job.id)
    assert (job.state, job.attempts, job.worker) == ("RUNNING", 1, f"w{wins.index(True)}")


def test_an_expired_lease_is_taken_over_and_the_old_worker_is_fenced(registry: Registry) -> None:
    job = running_job(registry, "w1", time_budget_s=3600)
    first = registry.get_job(job.id)
    expire_lease(registry, job.id)
    assert registry.claim_job(job.id, "w2", lease_s=60)
    taken = registry.get_job(job.id)
    assert (taken.worker, taken.attempts) == ("w2", 2)
    assert (taken.started_at, taken.deadline) == (first.started_at, first.deadline)  # budget runs from the first start
    assert not registry.record_progress(job.id, {"epoch": 9}, worker="w1")
    with pytest.raises(InvalidTransition, match="owned by 'w2'"):
        registry.set_job_state(job.id, "SUCCESS", worker="w1")
    assert registry.set_job_state(job.id, "SUCCESS", worker="w2").state == "SUCCESS"


def test_progress_merges_and_renews_the_lease(registry: Registry) -> None:
    job = running_job(registry, "w1")
    before = registry.get_job(job.id)
    assert registry.record_progress(
        job.id, {"epoch": 1, "max_epochs": 50, "loss": 0.7, "stage": "train"}, lease_s=120, worker="w1"
    )
    assert registry.record_progress(job.id, {"epoch": 2, "valid_ndcg": 0.1, "eta_seconds": 30.5})
    assert registry.record_progress(job.id)  # a bare heartbeat
    after = registry.get_job(job.id)
    assert after.progress == {
        "epoch": 2,
        "max_epochs": 50,
        "loss": 0.7,
        "stage": "train",
        "valid_ndcg": 0.1,
        "eta_seconds": 30.5,
    }
    assert after.heartbeat_at >= before.heartbeat_at
    assert after.lease_expires_at == after.heartbeat_at + timedelta(seconds=60)
    registry.set_job_state(job.id, "SUCCESS")
    assert not registry.record_progress(job.id, {"epoch": 3})
    with pytest.raises(NotFound):
        registry.record_progress("nope", {})


def test_expired_jobs_are_the_running_ones_past_their_lease(registry: Registry) -> None:
    live = running_job(registry, "w1")
    dead = running_job(registry, "w2", spec={**SPEC, "seed": 1})
    new_job(registry, {**SPEC, "seed": 2})  # never claimed: no lease
    expire_lease(registry, dead.id)
    assert [j.id for j in registry.expired_jobs()] == [dead.id]
    later = utcnow() + timedelta(seconds=3600)
    assert {j.id for j in registry.expired_jobs(later)} == {live.id, dead.id}


def test_requeue_until_attempts_run_out(registry: Registry) -> None:
    job = new_job(registry, max_attempts=2)
    assert registry.claim_job(job.id, "w1", lease_s=60)
    requeued = registry.requeue_or_fail(job.id, "worker lost")
    assert (requeued.state, requeued.error, requeued.worker, requeued.lease_expires_at) == (
        "QUEUED",
        "worker lost",
        None,
        None,
    )
    assert requeued.finished_at is None
    assert registry.claim_job(job.id, "w2", lease_s=60)
    failed = registry.requeue_or_fail(job.id, "worker lost")
    assert failed.state == "FAILED" and failed.attempts == 2 and failed.finished_at is not None
    assert failed.error.startswith("worker lost") and "2 attempts" in failed.error


def test_expired_lease_at_the_attempt_limit_cannot_be_claimed(registry: Registry) -> None:
    job = new_job(registry, max_attempts=1)
    assert registry.claim_job(job.id, "w1", lease_s=60)
    expire_lease(registry, job.id)
    assert not registry.claim_job(job.id, "w2", lease_s=60)
    assert registry.requeue_or_fail(job.id, "lost", expired_only=True).state == "FAILED"


def test_requeue_respects_cancel_deadline_and_live_leases(registry: Registry) -> None:
    cancelled = running_job(registry)
    registry.request_cancel(cancelled.id)
    assert registry.requeue_or_fail(cancelled.id, "lost").state == "CANCELLED"

    late = running_job(registry, spec={**SPEC, "seed": 1}, time_budget_s=60)
    registry.set_job_state(late.id, "RUNNING", deadline=utcnow() - timedelta(seconds=1))
    failed = registry.requeue_or_fail(late.id, "lost")
    assert failed.state == "FAILED" and "time budget" in failed.error

    live = running_job(registry, spec={**SPEC, "seed": 2})
    assert registry.requeue_or_fail(live.id, "lost", expired_only=True).state == "RUNNING"  # it renewed in time
    expire_lease(registry, live.id)
    assert registry.requeue_or_fail(live.id, "lost", expired_only=True).state == "QUEUED"
    assert registry.requeue_or_fail(live.id, "lost").state == "QUEUED"  # not running: unchanged


# recovery: lost messages, revived jobs
def test_requeue_forgets_the_spent_message_and_honours_now(registry: Registry) -> None:
    job = new_job(registry)
    registry.mark_published(job.id, "task-1")
    assert registry.claim_job(job.id, "w1", lease_s=60)
    now = utcnow()
    assert registry.requeue_or_fail(job.id, "lost", expired_only=True, now=now).state == "RUNNING"
    later = now + timedelta(seconds=61)
    requeued = registry.requeue_or_fail(job.id, "lost", expired_only=True, now=later)
    assert (requeued.state, requeued.celery_task_id) == ("QUEUED", None)


def test_unpublished_jobs_are_queued_without_a_message_or_unclaimed_for_long(registry: Registry) -> None:
    pending = new_job(registry)
    fresh = new_job(registry, {**SPEC, "seed": 1})
    lost = new_job(registry, {**SPEC, "seed": 2})
    assert registry.mark_published(fresh.id, "t-fresh") and registry.get_job(fresh.id).state == "QUEUED"
    registry.set_job_state(lost.id, "QUEUED")  # re-queued while the broker was down: no task id
    now = utcnow()
    assert [j.id for j in registry.unpublished_jobs(now - timedelta(seconds=60))] == [lost.id]
    assert {j.id for j in registry.unpublished_jobs(now + timedelta(seconds=1))} == {fresh.id, lost.id}
    assert pending.id not in {j.id for j in registry.unpublished_jobs(now + timedelta(seconds=1))}


def test_mark_published_never_sets_a_claimed_job_back(registry: Registry) -> None:
    job = new_job(registry)
    assert registry.claim_job(job.id, "w1", lease_s=60)  # a fast worker, before the API recorded the send
    assert not registry.mark_published(job.id, "task-1")
    assert (registry.get_job(job.id).state, registry.get_job(job.id).worker) == ("RUNNING", "w1")
    cancelled = new_job(registry, {**SPEC, "seed": 1})
    registry.request_cancel(cancelled.id)
    assert not registry.mark_published(cancelled.id, "task-2")
    assert registry.get_job(cancelled.id).state == "CANCELLED"


@pytest.mark.parametrize("end", ["FAILED", "CANCELLED"])
def test_a_dead_job_is_revived_as_new(registry: Registry, end: str) -> None:
    job = running_job(registry, time_budget_s=60)
    registry.record_progress(job.id, {"epoch": 3}, worker="w1")
    if end == "CANCELLED":
        registry.request_cancel(job.id)
    registry.set_job_state(job.id, end, worker="w1", error="boom")
    revived = registry.revive_job(job.id, teacher_path="/uploads/new.safetensors")
    assert (revived.id, revived.state, revived.attempts, revived.error, revived.progress) == (
        job.id, "PENDING", 0, None, {}
    )  # fmt: skip
    assert not revived.cancel_requested and revived.worker is None and revived.lease_expires_at is None
    assert revived.deadline is None and revived.finished_at is None and revived.started_at is None
    assert revived.teacher_path == "/uploads/new.safetensors"
    assert registry.claim_job(job.id, "w2", lease_s=60)
    again = registry.get_job(job.id)
    assert again.attempts == 1 and again.deadline is not None and again.deadline > job.deadline


def test_only_failed_and_cancelled_jobs_are_revived(registry: Registry) -> None:
    done = running_job(registry)
    registry.set_job_state(done.id, "SUCCESS", worker="w1", result_model_id="m")
    assert registry.revive_job(done.id).state == "SUCCESS"
    live = running_job(registry, spec={**SPEC, "seed": 1})
    assert registry.revive_job(live.id).state == "RUNNING" and registry.get_job(live.id).attempts == 1
    with pytest.raises(NotFound):
        registry.revive_job("nope")


# times
def test_times_are_aware_utc(registry: Registry) -> None:
    job = running_job(registry)
    job = registry.get_job(job.id)
    for value in (job.created_at, job.updated_at, job.started_at, job.heartbeat_at, job.lease_expires_at):
        assert value is not None and value.utcoffset() == timedelta(0)
    assert abs(job.created_at - datetime.now(UTC)) < timedelta(minutes=5)
    noon = datetime(2030, 1, 1, 12, tzinfo=UTC)
    assert registry.set_job_state(job.id, "RUNNING", deadline=noon.astimezone(ZoneInfo("Asia/Tokyo"))).deadline == noon
    with pytest.raises(Exception, match="naive"):
        registry.set_job_state(job.id, "RUNNING", deadline=datetime(2030, 1, 1))


# models
def add_model(registry: Registry, model_id: str, dataset: str = "tiny", role: str = "student") -> Model:
    return registry.add_model(
        id=model_id,
        role=role,
        name=f"{role}-mf20",
        directory=f"/a/{model_id}",
        arch="mf",
        dataset_id=dataset,
        metrics={"test": {"ndcg@10": 0.1}},
        n_parameters=1200,
        bytes={"model.onnx": 10},
        manifest={"id": model_id},
        job_id="j1",
        verified=True,
    )


def test_models_add_get_list(registry: Registry) -> None:
    add_model(registry, "t1", role="teacher")
    add_model(registry, "s1")
    add_model(registry, "s2", dataset="other")
    row = registry.get_model("s1")
    assert (row.n_parameters, row.bytes, row.metrics["test"]["ndcg@10"], row.verified, row.active) == (
        1200,
        {"model.onnx": 10},
        0.1,
        True,
        False,
    )
    assert row.created_at.tzinfo is UTC
    assert {m.id for m in registry.list_models()} == {"t1", "s1", "s2"}
    assert {m.id for m in registry.list_models(dataset="tiny")} == {"t1", "s1"}
    assert [m.id for m in registry.list_models(dataset="tiny", role="teacher")] == ["t1"]
    with pytest.raises(NotFound):
        registry.get_model("nope")
    with pytest.raises(IntegrityError):
        add_model(registry, "x", role="oracle")


def test_one_active_model_per_dataset(registry: Registry) -> None:
    for model_id in ("a", "b"):
        add_model(registry, model_id)
    add_model(registry, "c", dataset="other")
    assert registry.active_model("tiny") is None
    assert registry.activate_model("a").active
    registry.activate_model("c")
    assert registry.activate_model("b").active
    assert registry.active_model("tiny").id == "b" and registry.active_model("other").id == "c"
    assert not registry.get_model("a").active
    add_model(registry, "b")  # re-registering keeps the flag
    assert registry.active_model("tiny").id == "b"
    with pytest.raises(NotFound):
        registry.activate_model("nope")


def test_the_database_refuses_two_active_models(registry: Registry) -> None:
    add_model(registry, "a")
    add_model(registry, "b")
    registry.activate_model("a")
    with pytest.raises(IntegrityError), Session(registry.engine) as session, session.begin():
        session.execute(update(Model).where(Model.id == "b").values(active=True))


def test_racing_activations_leave_one_active(open_registry: Callable[[], Registry]) -> None:
    registries = [open_registry(), open_registry()]
    ids = [f"m{i}" for i in range(6)]
    for model_id in ids:
        add_model(registries[0], model_id)
    for _ in range(5):  # row locks taken in scan order once deadlocked here (3 of 25 runs on PostgreSQL)
        race(6, lambda i: registries[i % 2].activate_model(ids[i]))
        assert sum(m.active for m in registries[1].list_models(dataset="tiny")) == 1


def test_delete_model(registry: Registry) -> None:
    add_model(registry, "a")
    add_model(registry, "b")
    registry.activate_model("a")
    with pytest.raises(InvalidTransition, match="active"):
        registry.delete_model("a")
    assert registry.delete_model("b").id == "b"
    assert registry.delete_model("a", force=True).id == "a"
    assert registry.list_models() == [] and registry.active_model("tiny") is None
    with pytest.raises(NotFound):
        registry.delete_model("a")
