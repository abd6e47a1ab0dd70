"""Sending jobs to the workers. The API never imports the task code: it sends the task by name.

The API publishes and never waits for a result (the registry holds each job's outcome), so a
broker outage must cost a request seconds, not minutes: one connection attempt, short socket
timeouts, no publish retries and no result-backend subscription. Then ``POST /distill`` answers
503 quickly and the job waits in the registry for a retry.
"""

from __future__ import annotations

import secrets

from celery import Celery

from app.config import Settings
from worker.celery_app import QUEUE, TASK_RUN_JOB, make_celery, transport_options

CONNECT_TIMEOUT_S = 2.0  # one TCP connect to the broker
SOCKET_TIMEOUT_S = 5.0  # one command on an open connection


class QueueUnavailableError(RuntimeError):
    """The broker cannot be reached: the job stays in the registry, the client gets a 503."""


def publisher_options(settings: Settings) -> dict:
    """Broker transport options for a process that only publishes: fail fast instead of retrying.

    (The SQLAlchemy transport hands unknown options to ``create_engine``: only the retry keys it
    strips are given to it.)
    """
    options = {**transport_options(settings), "max_retries": 1, "interval_start": 0, "interval_step": 0.2}
    if settings.broker_url.startswith(("redis://", "rediss://")):
        options |= {"socket_connect_timeout": CONNECT_TIMEOUT_S, "socket_timeout": SOCKET_TIMEOUT_S}
        options["connect_retries_timeout"] = CONNECT_TIMEOUT_S * 2
    return options


class JobQueue:
    def __init__(self, settings: Settings) -> None:
        self.celery: Celery = make_celery(settings)
        self.celery.conf.update(
            broker_transport_options=publisher_options(settings),
            broker_connection_timeout=CONNECT_TIMEOUT_S,
            broker_connection_retry=False,
            broker_connection_max_retries=1,
        )

    def submit(self, job_id: str) -> str:
        """Publish the job; fail fast (no retries) when the broker is down, so the caller can say so."""
        task_id = f"{job_id}-{secrets.token_hex(4)}"
        try:
            # ignore_result: otherwise a Redis result backend is subscribed to first, with its own retries
            result = self.celery.send_task(
                TASK_RUN_JOB, args=[job_id], queue=QUEUE, retry=False, ignore_result=True, task_id=task_id
            )
        except Exception as exc:  # kombu raises transport-specific errors (redis, sqlalchemy, socket)
            raise QueueUnavailableError(f"the job queue is unreachable: {type(exc).__name__}: {exc}") from exc
        return result.id

    def ping(self) -> bool:
        try:
            with self.celery.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=CONNECT_TIMEOUT_S)
            return True
        except Exception:
            return False
