"""Runs one registry job in a worker process: claim, heartbeat, train, register, finish.

The registry owns a job's fate: a worker claims a job (an atomic conditional update, so two workers
never run it at once), keeps its lease alive while it trains, checks for a cancel between epochs
and records the outcome. Celery only delivers the job id.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from app.config import Settings
from app.registry import Registry
from rcekd.checkpoint import CheckpointError
from rcekd.data import DataError, Dataset, load_dataset
from rcekd.jobs import DistillSpec, TeacherSpec, run_distill_job, run_teacher_job

log = logging.getLogger("rcekd.worker")


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
        latest: dict[str, Any] = {"stage": "starting"}

        def report(progress: dict[str, Any]) -> None:
            latest.clear()
            latest.update(progress)
            if not self.registry.record_progress(
                job_id, dict(progress), lease_s=self.settings.lease_s, worker=self.worker_id
            ):
                raise JobStoppedError("lost")  # the lease expired and the job went to another worker
            if publish is not None:
                publish(dict(progress))

        def should_stop() -> bool:
            """Asked between epochs: a cancel or a spent budget ends the job there, writing nothing."""
            current = self.registry.get_job(job_id)
            if current.cancel_requested:
                raise JobStoppedError("cancelled")
            if _past(current.deadline):
                raise JobStoppedError("time budget exceeded")
            return False

        def beat() -> None:
            self.registry.record_progress(job_id, dict(latest), lease_s=self.settings.lease_s, worker=self.worker_id)

        try:
            with Heartbeat(beat, self.settings.heartbeat_s):
                model_ids = self._execute(job, out_root, report, should_stop)
        except JobStoppedError as exc:
            shutil.rmtree(out_root, ignore_errors=True)
            state = "CANCELLED" if str(exc) == "cancelled" else "FAILED"
            self.registry.set_job_state(job_id, state, error=str(exc))
            log.info("job %s: %s (%s)", job_id, state, exc)
            return {"job": job_id, "state": state}
        except (CheckpointError, DataError, ValueError, KeyError) as exc:
            return self._fail(job_id, out_root, f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            log.exception("job %s failed", job_id)
            return self._fail(job_id, out_root, f"{type(exc).__name__}: {exc}")
        self.registry.set_job_state(job_id, "SUCCESS", result_model_id=model_ids[-1])
        log.info("job %s: SUCCESS (models %s)", job_id, model_ids)
        return {"job": job_id, "state": "SUCCESS", "models": model_ids}

    def _execute(
        self, job: Any, out_root: Path, report: Callable[[dict[str, Any]], None], should_stop: Callable[[], bool]
    ) -> list[str]:
        dataset_row = self.registry.get_dataset(job.spec["dataset"])
        dataset = cached_dataset(str(dataset_row.directory))
        if dataset.fingerprint != dataset_row.fingerprint:
            raise DataError(f"dataset {dataset_row.id} changed on disk since it was registered")
        if job.kind == "teacher":
            manifest = run_teacher_job(
                dataset, TeacherSpec.from_dict(job.spec), out_root / "teacher", report=report, should_stop=should_stop
            )
            return [self._register(job.id, dataset_row.id, manifest, out_root / "teacher", verified=True)]
        spec = DistillSpec.from_dict(job.spec)
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
        verified = bool(teacher.get("verified", True))
        return [
            self._register(job.id, dataset_row.id, teacher, out_root / "teacher", verified=verified),
            self._register(job.id, dataset_row.id, student, out_root / "student", verified=verified),
        ]

    def _register(self, job_id: str, dataset_id: str, manifest: dict[str, Any], directory: Path, verified: bool) -> str:
        kd = manifest.get("kd", {}).get("method")
        name = f"{manifest['role']}-{manifest['arch']}{manifest.get('hyperparameters', {}).get('dim', '')}"
        self.registry.add_model(
            id=manifest["id"],
            job_id=job_id,
            role=manifest["role"],
            name=f"{name}-{kd}" if kd else name,
            directory=str(directory),
            arch=manifest["arch"],
            dataset_id=dataset_id,
            metrics=manifest.get("metrics", {}),
            n_parameters=manifest.get("n_parameters"),
            bytes={name: meta["bytes"] for name, meta in manifest.get("files", {}).items()},
            manifest=manifest,
            verified=verified,
        )
        return manifest["id"]

    def _fail(self, job_id: str, out_root: Path, reason: str) -> dict[str, Any]:
        shutil.rmtree(out_root, ignore_errors=True)
        self.registry.set_job_state(job_id, "FAILED", error=reason[:2000])
        log.warning("job %s: FAILED: %s", job_id, reason)
        return {"job": job_id, "state": "FAILED", "error": reason}


def _past(deadline: Any) -> bool:
    return deadline is not None and deadline.timestamp() < time.time()
