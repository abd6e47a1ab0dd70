"""Runs one registry job in a worker process: claim, heartbeat, train, register, finish.

The registry owns a job's fate: a worker claims a job (an atomic conditional update, so two workers
never run it at once), keeps its lease alive while it trains, checks for a cancel between epochs
and records the outcome. Celery only delivers the job id.

A job's files live in ``<artifacts>/<job id>``. Training writes epoch checkpoints to its
``checkpoints`` directory, so a job re-queued after its worker died resumes where it was; every
other file of an unfinished attempt is cleared when the next attempt starts. Only a final outcome
(cancelled, failed) removes the whole directory, and only a worker that still owns the job writes
one: a worker that lost its lease (the reaper re-queued the job) steps aside without touching it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy.exc import InterfaceError, OperationalError

from app.config import Settings
from app.registry import InvalidTransition, JobState, Registry
from rcekd.checkpoint import CheckpointError
from rcekd.data import DataError, Dataset, load_dataset
from rcekd.jobs import DistillSpec, TeacherSpec, run_distill_job, run_teacher_job, with_checkpoints

log = logging.getLogger("rcekd.worker")
CHECKPOINTS = "checkpoints"  # under the job's directory: kept across attempts
LOST, CANCELLED, OVER_BUDGET = "lost", "cancelled", "time budget exceeded"


class JobStoppedError(Exception):
    """The registry says stop: cancelled by a user, or past the job's time budget."""


@lru_cache(maxsize=4)
def cached_dataset(directory: str) -> Dataset:
    """Datasets are read-only once registered; a worker loads each once."""
    return load_dataset(directory)


@lru_cache(maxsize=4)
def cached_registry(database_url: str) -> Registry:
    return Registry.from_url(database_url, create=True)


class Heartbeat:
    """Renews a job's lease every few seconds from a daemon thread while the job trains."""

    def __init__(self, beat: Callable[[], None], every_s: float) -> None:
        self._beat = beat
        self._every = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rcekd-heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._beat()
            except Exception:  # a missed beat is retried; the lease tolerates several
                log.exception("heartbeat failed")

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class JobRunner:
    settings: Settings
    registry: Registry
    worker_id: str

    @classmethod
    def for_settings(cls, settings: Settings) -> JobRunner:
        worker_id = f"{socket.gethostname()}:{os.getpid()}"
        return cls(settings, cached_registry(settings.database_url), worker_id)

    def run(self, job_id: str, publish: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        if not self.registry.claim_job(job_id, self.worker_id, self.settings.lease_s):
            log.info("job %s: not claimed (terminal, or another worker holds its lease)", job_id)
            return {"job": job_id, "claimed": False}
        job = self.registry.get_job(job_id)
        log.info("job %s: claimed by %s (attempt %d)", job_id, self.worker_id, job.attempts)
        out_root = self.settings.artifacts_dir / job_id
        clear_attempt(out_root)
        latest: dict[str, Any] = {"stage": "starting", "attempt": job.attempts}

        def report(progress: dict[str, Any]) -> None:
            latest.update(progress)
            self._crash_hook(job.spec, progress)
            if not self.registry.record_progress(
                job_id, dict(latest), lease_s=self.settings.lease_s, worker=self.worker_id
            ):
                raise JobStoppedError(LOST)  # the lease expired and the job went back to the queue
            if publish is not None:
                try:
                    publish(dict(latest))
                except Exception as exc:  # Celery's result backend is a convenience; the registry has it
                    log.warning("job %s: progress not published to Celery: %s", job_id, exc)

        def beat() -> None:
            self.registry.record_progress(job_id, dict(latest), lease_s=self.settings.lease_s, worker=self.worker_id)

        try:
            with Heartbeat(beat, self.settings.heartbeat_s):
                model_ids = self._execute(job, out_root, report, lambda: self._should_stop(job_id))
        except JobStoppedError as exc:
            if str(exc) == LOST:
                log.warning("job %s: lease lost to the reaper; leaving it to the next attempt", job_id)
                return {"job": job_id, "state": "LOST"}
            if str(exc) == CANCELLED:
                return self._finish(job_id, out_root, JobState.CANCELLED, error="cancelled")
            return self._finish(job_id, out_root, JobState.FAILED, error=f"{OVER_BUDGET} ({job.time_budget_s} s)")
        except (OperationalError, InterfaceError) as exc:  # the registry is unreachable: a retry, not a failure
            log.error("job %s: registry unreachable (%s); re-queued once its lease lapses", job_id, exc)
            return {"job": job_id, "state": "INTERRUPTED"}
        except (CheckpointError, DataError, ValueError, KeyError) as exc:
            return self._finish(job_id, out_root, JobState.FAILED, error=f"{type(exc).__name__}: {exc}"[:2000])
        except Exception as exc:
            log.exception("job %s failed", job_id)
            return self._finish(job_id, out_root, JobState.FAILED, error=f"{type(exc).__name__}: {exc}"[:2000])
        return self._finish(job_id, out_root, JobState.SUCCESS, result_model_id=model_ids[-1], models=model_ids)

    def _check_owner(self, job_id: str) -> Any:
        """The job, if this worker still holds it; else stop (the reaper gave it to another attempt)."""
        current = self.registry.get_job(job_id)
        if current.state != JobState.RUNNING or current.worker != self.worker_id:
            raise JobStoppedError(LOST)
        return current

    def _should_stop(self, job_id: str) -> bool:
        """Asked between epochs: a lost lease, a cancel or a spent budget ends the job there."""
        current = self._check_owner(job_id)
        if current.cancel_requested:
            raise JobStoppedError(CANCELLED)
        if _past(current.deadline):
            raise JobStoppedError(OVER_BUDGET)
        return False

    def _crash_hook(self, spec: dict[str, Any], progress: dict[str, Any]) -> None:
        """TEST HOOK (``RCEKD_TEST_CRASH_ON_JOB``): die at the first epoch, as an out-of-memory kill would."""
        marker = self.settings.test_crash_on_job
        if marker and "epoch" in progress and marker in json.dumps(spec, sort_keys=True):
            log.error("test hook: job spec matches RCEKD_TEST_CRASH_ON_JOB; killing this worker process")
            os.kill(os.getpid(), signal.SIGKILL)

    def _execute(
        self, job: Any, out_root: Path, report: Callable[[dict[str, Any]], None], should_stop: Callable[[], bool]
    ) -> list[str]:
        dataset_row = self.registry.get_dataset(job.spec["dataset"])
        dataset = cached_dataset(str(dataset_row.directory))
        if dataset.fingerprint != dataset_row.fingerprint:
            raise DataError(f"dataset {dataset_row.id} changed on disk since it was registered")
        job_spec = with_checkpoints(job.spec, out_root / CHECKPOINTS, self.settings.checkpoint_every)
        if job.kind == "teacher":
            manifest = run_teacher_job(
                dataset, TeacherSpec.from_dict(job_spec), out_root / "teacher", report=report, should_stop=should_stop
            )
            self._check_owner(job.id)  # a worker that lost the job registers nothing
            return [self._register(job.id, dataset_row.id, manifest, out_root / "teacher", verified=True)]
        spec = DistillSpec.from_dict(job_spec)
        teacher, student = run_distill_job(
            dataset,
            Path(job.teacher_path),
            spec,
            out_root / "work",
            out_root / "teacher",
            out_root / "student",
            report=report,
            should_stop=should_stop,
        )
        shutil.rmtree(out_root / "work", ignore_errors=True)
        self._check_owner(job.id)
        verified = bool(teacher.get("verified", True))
        return [
            self._register(job.id, dataset_row.id, teacher, out_root / "teacher", verified=verified),
            self._register(job.id, dataset_row.id, student, out_root / "student", verified=verified),
        ]

    def _register(self, job_id: str, dataset_id: str, manifest: dict[str, Any], directory: Path, verified: bool) -> str:
        self.registry.register_artifact(manifest, directory, dataset_id, job_id=job_id, verified=verified)
        return manifest["id"]

    def _finish(self, job_id: str, out_root: Path, state: JobState, **fields: Any) -> dict[str, Any]:
        """Record the outcome if this worker still owns the job, then tidy its files.

        SUCCESS keeps the artifacts and drops the checkpoints; FAILED and CANCELLED remove everything.
        """
        models = fields.pop("models", None)
        try:
            self.registry.set_job_state(job_id, state.value, worker=self.worker_id, **fields)
        except InvalidTransition as exc:
            log.warning("job %s: outcome %s not recorded: %s", job_id, state.value, exc)
            return {"job": job_id, "state": "LOST"}
        if state is JobState.SUCCESS:
            shutil.rmtree(out_root / CHECKPOINTS, ignore_errors=True)
            log.info("job %s: SUCCESS (models %s)", job_id, models)
            return {"job": job_id, "state": state.value, "models": models}
        shutil.rmtree(out_root, ignore_errors=True)
        log.warning("job %s: %s: %s", job_id, state.value, fields.get("error"))
        return {"job": job_id, "state": state.value, "error": fields.get("error")}


def clear_attempt(out_root: Path) -> None:
    """Start an attempt on a clean job directory, keeping the checkpoints a retry resumes from."""
    if not out_root.is_dir():
        return
    for child in out_root.iterdir():
        if child.name == CHECKPOINTS:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _past(deadline: Any) -> bool:
    return deadline is not None and deadline.timestamp() < time.time()
