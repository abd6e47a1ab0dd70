"""Recovery operations: find queued jobs whose message may be lost, and give dead jobs a fresh start.

Brokers lose messages in ways the registry can see: the SQLite transport never redelivers a message
whose worker died before claiming it, Redis only after its (hours-long) visibility timeout, and a
re-queue while the broker is down publishes nothing. A QUEUED job with no task id, or one unclaimed
for long, is therefore published again; a duplicate costs nothing because ``claim_job`` is atomic.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlalchemy import or_, select

from app.registry.jobs import JobStore
from app.registry.schema import Job, JobState, utcnow

#: a user may start these again (``revive_job``); SUCCESS stays SUCCESS
REVIVABLE = (JobState.FAILED, JobState.CANCELLED)


class RecoveryStore(JobStore):
    """What the reaper and a re-posted job need beyond the state machine."""

    def unpublished_jobs(self, queued_before: datetime) -> list[Job]:
        """QUEUED jobs never published (no task id) or left unclaimed since before ``queued_before``."""
        query = select(Job).where(
            Job.state == JobState.QUEUED.value,
            or_(Job.celery_task_id.is_(None), Job.updated_at < queued_before),
        )
        with self._sessions() as session:
            return list(session.scalars(query.order_by(Job.updated_at, Job.id)))

    def mark_published(self, job_id: str, task_id: str) -> bool:
        """A PENDING or QUEUED job's message was just sent: QUEUED with that task id, its unclaimed clock reset.

        False (and nothing written) if a worker claimed it or a user cancelled it meanwhile: a fast
        worker may start a job before the publisher records it, and must not be set back to QUEUED.
        """
        values = {"state": JobState.QUEUED.value, "celery_task_id": task_id, "updated_at": utcnow()}
        waiting = Job.state.in_([JobState.PENDING.value, JobState.QUEUED.value])
        with self._transaction() as session:
            return self._update_job(session, job_id, [waiting], values)

    def revive_job(self, job_id: str, *, teacher_path: str | Path | None = None) -> Job:
        """A FAILED or CANCELLED job back to PENDING as if new: attempts, error, lease and budget reset.

        For a user who posts the same teacher and spec again: the unique identity would otherwise hand
        back the dead job. ``teacher_path`` replaces the job's teacher file (the old one may be gone).
        Other states are returned unchanged.
        """
        values: dict[str, object] = {
            "state": JobState.PENDING.value,
            "attempts": 0,
            "error": None,
            "cancel_requested": False,
            "worker": None,
            "heartbeat_at": None,
            "lease_expires_at": None,
            "deadline": None,
            "started_at": None,
            "finished_at": None,
            "progress": {},
            "result_model_id": None,
            "celery_task_id": None,
            "updated_at": utcnow(),
        }
        if teacher_path is not None:
            values["teacher_path"] = str(teacher_path)
        with self._transaction() as session:
            self._update_job(session, job_id, [Job.state.in_([s.value for s in REVIVABLE])], values)
            return self._get(session, Job, job_id)
