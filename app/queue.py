"""Sending jobs to the workers. The API never imports the task code: it sends the task by name."""

from __future__ import annotations

from celery import Celery

from app.config import Settings
from worker.celery_app import QUEUE, TASK_RUN_JOB, make_celery


class QueueUnavailableError(RuntimeError):
    """The broker cannot be reached: the job stays in the registry, the client gets a 503."""


class JobQueue:
    def __init__(self, settings: Settings) -> None:
        self.celery: Celery = make_celery(settings)

    def submit(self, job_id: str) -> str:
        """Publish the job; fail fast (no retries) when the broker is down, so the caller can say so."""
        try:
            result = self.celery.send_task(
                TASK_RUN_JOB, args=[job_id], queue=QUEUE, retry=False, task_id=f"{job_id}-{_nonce()}"
            )
        except Exception as exc:  # kombu raises transport-specific errors (redis, sqlalchemy, socket)
            raise QueueUnavailableError(f"the job queue is unreachable: {type(exc).__name__}: {exc}") from exc
        return result.id

    def ping(self) -> bool:
        try:
            with self.celery.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=2)
            return True
        except Exception:
            return False


def _nonce() -> str:
    import secrets

    return secrets.token_hex(4)
