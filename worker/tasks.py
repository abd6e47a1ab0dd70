"""The one task: run a registry job by id. Thin on purpose; the work is in :mod:`worker.runner`."""

from __future__ import annotations

from typing import Any

from celery import Task

from app.config import get_settings
from worker.celery_app import TASK_RUN_JOB, app
from worker.runner import JobRunner


@app.task(name=TASK_RUN_JOB, bind=True)
def run_job(self: Task, job_id: str) -> dict[str, Any]:
    def publish(progress: dict[str, Any]) -> None:
        self.update_state(state="PROGRESS", meta=progress)

    return JobRunner.for_settings(get_settings()).run(job_id, publish=publish)
