"""Job operations: each state change is one conditional UPDATE, so the database decides races.

Two identical ``POST /distill`` make one row (UNIQUE on kind, teacher and spec); two workers claiming
one job get one ``True``; a stale worker (lease lost, job re-queued and claimed elsewhere) passing
``worker=`` cannot overwrite the new owner's job.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.registry.schema import ALLOWED_FROM, TERMINAL, InvalidTransition, Job, JobState, utcnow
from app.registry.session import Store

# what set_job_state(**fields) may write; identity columns and the state itself go through methods
JOB_FIELDS = frozenset(Job.__table__.columns.keys()) - {
    "id",
    "kind",
    "state",
    "spec",
    "spec_hash",
    "teacher_sha256",
    "created_at",
    "updated_at",
}
WAITING = (JobState.PENDING, JobState.QUEUED)


class JobStore(Store):
    """The jobs table: idempotent creation, the state machine, leases, cancellation, re-queueing."""

    @staticmethod
    def _update_job(session: Session, job_id: str, where: list[Any], values: dict[str, Any]) -> bool:
        """One conditional UPDATE of one job; True if it matched (the condition held at write time)."""
        statement = update(Job).where(Job.id == job_id, *where).values(**values)
        result = session.execute(statement.execution_options(synchronize_session=False))
        return result.rowcount == 1  # type: ignore[attr-defined]

    def create_or_get_job(
        self,
        kind: str,
        teacher_sha256: str,
        spec: dict[str, Any],
        spec_hash: str,
        teacher_path: str | Path | None,
        time_budget_s: int | None = None,
        *,
        max_attempts: int = 3,
        dataset_id: str | None = None,
    ) -> tuple[Job, bool]:
        """The job for (kind, teacher, spec): created now (True) or the one that already exists (False).

        Insert first and let the UNIQUE constraint pick the winner, so racing callers share one row.
        """
        if time_budget_s is not None and time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be positive, not {time_budget_s}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        job = Job(
            kind=kind,
            teacher_sha256=teacher_sha256,
            spec=spec,
            spec_hash=spec_hash,
            teacher_path=None if teacher_path is None else str(teacher_path),
            time_budget_s=time_budget_s,
            max_attempts=max_attempts,
            dataset_id=dataset_id,
            state=JobState.PENDING.value,
            attempts=0,
            cancel_requested=False,
            progress={},
        )
        try:
            with self._transaction() as session:
                session.add(job)
            return job, True
        except IntegrityError as error:
            conflict = error
        identity = (Job.kind == kind, Job.teacher_sha256 == teacher_sha256, Job.spec_hash == spec_hash)
        with self._sessions() as session:
            existing = session.scalars(select(Job).where(*identity)).one_or_none()
        if existing is None:  # another constraint failed
            raise conflict
        return existing, False

    def get_job(self, job_id: str) -> Job:
        with self._sessions() as session:
            return self._get(session, Job, job_id)

    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[Job]:
        """Newest first."""
        query = select(Job).order_by(Job.created_at.desc(), Job.id).limit(limit)
        if state is not None:
            query = query.where(Job.state == JobState(state).value)
        with self._sessions() as session:
            return list(session.scalars(query))

    def set_job_state(self, job_id: str, state: str, *, worker: str | None = None, **fields: Any) -> Job:
        """Move a job along the state machine (``ALLOWED_FROM``), writing ``fields`` with it.

        Terminal states never change; RUNNING is entered only through ``claim_job``. With ``worker``,
        the change applies only while that worker still owns the job.
        """
        target = JobState(state)
        if unknown := set(fields) - JOB_FIELDS:
            raise TypeError(f"not writable job fields: {sorted(unknown)}")
        now = utcnow()
        values: dict[str, Any] = {"state": target.value, "updated_at": now}
        if target in TERMINAL:
            values |= {"finished_at": now, "lease_expires_at": None}
        if target is JobState.SUCCESS:
            values["error"] = None
        if target in WAITING:
            values |= {"worker": None, "lease_expires_at": None}
        values |= fields
        where = [Job.state.in_([source.value for source in ALLOWED_FROM[target]])]
        if worker is not None:
            where.append(Job.worker == worker)
        with self._transaction() as session:
            if self._update_job(session, job_id, where, values):
                return self._get(session, Job, job_id)
            job = self._get(session, Job, job_id)
        owner = f" (owned by {job.worker!r}, not {worker!r})" if worker is not None and job.worker != worker else ""
        raise InvalidTransition(f"job {job_id}: {job.state} cannot become {target.value}{owner}")

    def record_progress(
        self, job_id: str, progress: dict[str, Any] | None = None, *, lease_s: int = 60, worker: str | None = None
    ) -> bool:
        """Merge ``progress`` into the job's and renew heartbeat and lease.

        False when the job is no longer RUNNING (or, with ``worker``, no longer that worker's): the
        caller lost its lease and must stop. Cancellation is ``get_job(id).cancel_requested``.
        """
        now = utcnow()
        with self._transaction() as session:
            job = self._get(session, Job, job_id)
            values: dict[str, Any] = {"heartbeat_at": now, "lease_expires_at": now + timedelta(seconds=lease_s)}
            if progress:
                values["progress"] = {**(job.progress or {}), **progress}
            where = [Job.state == JobState.RUNNING.value] + ([Job.worker == worker] if worker is not None else [])
            return self._update_job(session, job_id, where, values | {"updated_at": now})

    def request_cancel(self, job_id: str) -> Job:
        """PENDING/QUEUED: CANCELLED now. RUNNING: ``cancel_requested``, honoured by the task between epochs."""
        for _ in range(3):  # the job may move between the two conditional updates (PostgreSQL)
            now = utcnow()
            with self._transaction() as session:
                cancel_now = {
                    "state": JobState.CANCELLED.value,
                    "cancel_requested": True,
                    "finished_at": now,
                    "lease_expires_at": None,
                    "updated_at": now,
                }
                if self._update_job(session, job_id, [Job.state.in_([s.value for s in WAITING])], cancel_now) or (
                    self._update_job(
                        session,
                        job_id,
                        [Job.state == JobState.RUNNING.value],
                        {"cancel_requested": True, "updated_at": now},
                    )
                ):
                    return self._get(session, Job, job_id)
                job = self._get(session, Job, job_id)
                if job.state == JobState.CANCELLED:
                    return job
                if job.state in TERMINAL:
                    raise InvalidTransition(f"job {job_id} is already {job.state}")
        raise InvalidTransition(f"job {job_id} kept changing state; try again")

    def claim_job(self, job_id: str, worker: str, lease_s: int) -> bool:
        """Take the job for ``worker``: True only for one caller at a time.

        Claimable: PENDING/QUEUED, or RUNNING with an expired lease (its worker is gone); never when
        terminal, cancel-requested or out of attempts. Counts an attempt; starts the time budget.
        """
        now = utcnow()
        claimable = or_(
            Job.state.in_([s.value for s in WAITING]),
            and_(Job.state == JobState.RUNNING.value, Job.lease_expires_at < now),
        )
        values = {
            "state": JobState.RUNNING.value,
            "worker": worker,
            "attempts": Job.attempts + 1,
            "heartbeat_at": now,
            "lease_expires_at": now + timedelta(seconds=lease_s),
            "updated_at": now,
        }
        where = [claimable, Job.cancel_requested.is_(False), Job.attempts < Job.max_attempts]
        with self._transaction() as session:
            if not self._update_job(session, job_id, where, values):
                self._get(session, Job, job_id)  # NotFound for an unknown id
                return False
            job = self._get(session, Job, job_id)
            job.started_at = job.started_at or now
            if job.deadline is None and job.time_budget_s:
                job.deadline = now + timedelta(seconds=job.time_budget_s)
            return True

    def expired_jobs(self, now: datetime | None = None) -> list[Job]:
        """RUNNING jobs whose lease ran out: their worker stopped heartbeating."""
        now = now or utcnow()
        query = select(Job).where(Job.state == JobState.RUNNING.value, Job.lease_expires_at < now)
        with self._sessions() as session:
            return list(session.scalars(query.order_by(Job.lease_expires_at)))

    def requeue_or_fail(
        self, job_id: str, reason: str, *, expired_only: bool = False, now: datetime | None = None
    ) -> Job:
        """A RUNNING job lost its worker (or failed retriably): QUEUED while attempts remain, else FAILED.

        Cancel-requested jobs become CANCELLED, jobs past their deadline FAILED. With ``expired_only``
        (the reaper) nothing happens if the worker renewed its lease meanwhile. Other states: unchanged.
        A re-queued job has no ``celery_task_id``: its old message is spent, and the reaper publishes it.
        """
        now = now or utcnow()
        with self._transaction() as session:
            job = self._get(session, Job, job_id)
            if job.state != JobState.RUNNING:
                return job
            if job.cancel_requested:
                target, error = JobState.CANCELLED, job.error
            elif job.attempts >= job.max_attempts:
                target, error = JobState.FAILED, f"{reason} (gave up after {job.attempts} attempts)"
            elif job.deadline is not None and now >= job.deadline:
                target, error = JobState.FAILED, f"{reason} (time budget of {job.time_budget_s} s used up)"
            else:
                target, error = JobState.QUEUED, reason
            values = {
                "state": target.value,
                "error": error,
                "worker": None,
                "lease_expires_at": None,
                "finished_at": now if target in TERMINAL else None,
                "updated_at": now,
            }
            if target is JobState.QUEUED:
                values["celery_task_id"] = None
            where = [Job.state == JobState.RUNNING.value, Job.attempts == job.attempts, Job.worker == job.worker]
            if expired_only:
                where.append(Job.lease_expires_at < now)
            self._update_job(session, job_id, where, values)
            session.refresh(job)
            return job
