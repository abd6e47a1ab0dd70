"""The reaper: jobs outlive their workers.

A worker renews its job's lease while it trains. When a worker dies (killed, out of memory, machine
lost) the lease runs out; the reaper then re-queues the job (or fails it once its attempts are spent,
or cancels it if a cancel was asked) and publishes it again, and the next worker resumes it from its
last epoch checkpoint. It also re-publishes QUEUED jobs whose message is likely lost (see
``app.registry.recovery``). Every step is a conditional update, so several API replicas may each run
a reaper: the database lets one of them win each change, and a duplicate message is never claimed.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path

from fastapi.concurrency import run_in_threadpool

from app.config import Settings
from app.queue import JobQueue, QueueUnavailableError
from app.registry import TERMINAL, JobState, Registry, utcnow

log = logging.getLogger("rcekd.reaper")
LOST = "worker lost (lease expired)"
DEFAULT_REPUBLISH_AFTER_S = 900


def reap_once(
    registry: Registry,
    queue: JobQueue,
    now: datetime | None = None,
    *,
    republish_after_s: float = DEFAULT_REPUBLISH_AFTER_S,
    artifacts_dir: Path | None = None,
) -> list[str]:
    """One pass: settle expired leases, then publish the QUEUED jobs that have no live message.

    Returns the ids of the jobs it changed or published. A broker outage leaves a job QUEUED with
    no task id, to be published on a later pass. A job it ends (FAILED, CANCELLED) has its files
    under ``artifacts_dir`` removed, as its worker would have done.
    """
    now = now or utcnow()
    touched: list[str] = []
    for job in registry.expired_jobs(now):
        after = registry.requeue_or_fail(job.id, LOST, expired_only=True, now=now)
        if after.state == JobState.RUNNING:
            continue  # its worker renewed the lease meanwhile
        log.warning("job %s: %s after attempt %d -> %s", job.id, LOST, job.attempts, after.state)
        touched.append(job.id)
        if after.state in TERMINAL and artifacts_dir is not None:
            shutil.rmtree(artifacts_dir / job.id, ignore_errors=True)
    for job in registry.unpublished_jobs(now - timedelta(seconds=republish_after_s)):
        try:
            task_id = queue.submit(job.id)
        except QueueUnavailableError as exc:
            log.warning("job %s: not published, will retry: %s", job.id, exc)
            continue
        if registry.mark_published(job.id, task_id):  # False: claimed (or cancelled) meanwhile
            log.info("job %s: published again (task %s)", job.id, task_id)
        if job.id not in touched:
            touched.append(job.id)
    return touched


async def reap_forever(registry: Registry, queue: JobQueue, settings: Settings) -> None:
    """The API's background task: ``reap_once`` every ``settings.reap_every_s`` seconds until cancelled.

    Runs in a thread (database and broker calls block); an error (database or broker down) is logged
    and the next pass tries again.
    """
    reap = partial(
        reap_once, registry, queue, republish_after_s=settings.republish_after_s, artifacts_dir=settings.artifacts_dir
    )
    while True:
        await asyncio.sleep(settings.reap_every_s)
        try:
            await run_in_threadpool(reap)
        except Exception as exc:
            log.error("reaper pass failed (%s: %s); retrying in %.1f s", type(exc).__name__, exc, settings.reap_every_s)
