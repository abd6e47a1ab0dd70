"""Celery configuration: JSON only, late acknowledgement, one job at a time per process.

``celery -A worker.celery_app worker`` finds ``app`` here. The broker and result backend come from the
settings: SQLite files in the embedded default (no server needed), Redis in a deployment.
"""

from __future__ import annotations

from celery import Celery

from app.config import Settings, get_settings

QUEUE = "rcekd"
TASK_RUN_JOB = "rcekd.run_job"


def transport_options(settings: Settings) -> dict:
    """Redis redelivers an unacknowledged task after the visibility timeout: it must exceed the time
    limit, or a long job would run twice. The SQLite transport takes no such option."""
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return {"visibility_timeout": settings.visibility_timeout_s}
    return {}


def make_celery(settings: Settings) -> Celery:
    celery = Celery("rcekd", broker=settings.broker_url, backend=settings.result_backend, include=["worker.tasks"])
    celery.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],  # never unpickle what arrives over the broker
        task_default_queue=QUEUE,
        task_acks_late=True,  # a job whose worker dies is not acknowledged as done...
        task_reject_on_worker_lost=False,  # ...but the registry, not the broker, decides on retries
        worker_lost_wait=1.0,  # a killed pool child's job is the reaper's now: take the next message soon
        worker_prefetch_multiplier=1,  # a worker holds only the job it runs
        task_time_limit=settings.task_time_limit_s,
        task_track_started=True,
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        result_extended=True,
        worker_hijack_root_logger=False,
    )
    return celery


app = make_celery(get_settings())
