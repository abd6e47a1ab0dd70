"""Jobs: distil an uploaded teacher, train a teacher, follow and cancel jobs."""

from __future__ import annotations

import json
import tempfile
from functools import partial
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, HTTPException, Request, Response, UploadFile, status
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from app.deps import Authorised, QueueDep, RegistryDep, SettingsDep
from app.queue import QueueUnavailableError
from app.registry import REVIVABLE, NotFound, spec_hash
from app.schemas import DistillRequest, JobOut, TeacherRequest
from app.uploads import save_upload
from rcekd.checkpoint import CheckpointError
from rcekd.teacher_import import MethodUnsupported, import_teacher, require_method

router = APIRouter(tags=["jobs"])


def job_out(job: Any) -> JobOut:
    return JobOut.model_validate(job, from_attributes=True)


def _parse(model: type[DistillRequest] | type[TeacherRequest], text: str) -> Any:
    try:
        return model.model_validate(json.loads(text))
    except json.JSONDecodeError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"spec is not valid JSON: {exc}") from exc
    except ValidationError as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, exc.errors(include_url=False, include_context=False)
        ) from exc


def _known_dataset(registry: Any, dataset_id: str) -> None:
    try:
        registry.get_dataset(dataset_id)
    except NotFound as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"unknown dataset {dataset_id!r}") from exc


def _enqueue(registry: Any, queue: Any, job: Any, response: Response) -> JobOut:
    """Queue a job that is not queued yet; a broker outage is a 503 and the job waits, recorded.

    The same request for a FAILED or CANCELLED job starts it afresh (a new round of attempts).
    """
    if job.state in REVIVABLE:
        job = registry.revive_job(job.id)
    if job.state == "PENDING":
        try:
            task_id = queue.submit(job.id)
        except QueueUnavailableError as exc:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"{exc}; job {job.id} is recorded, retry") from exc
        registry.mark_published(job.id, task_id)  # False: a worker already claimed it
    else:
        response.status_code = status.HTTP_200_OK  # the same request again: the job that exists
    return job_out(registry.get_job(job.id))


@router.post("/distill", status_code=status.HTTP_202_ACCEPTED, dependencies=[Authorised])
async def distill(
    request: Request,
    response: Response,
    registry: RegistryDep,
    queue: QueueDep,
    settings: SettingsDep,
    spec: Annotated[str, Form(description="JSON: DistillRequest")],
    teacher: Annotated[
        UploadFile | None, File(description="teacher: artifact archive, safetensors, state_dict or ONNX")
    ] = None,
) -> JobOut:
    """Distil an uploaded teacher (or ``teacher_model``, one the service holds) into a student.

    The same teacher and spec again give the same job.
    """
    body: DistillRequest = _parse(DistillRequest, spec)
    _known_dataset(registry, body.dataset)
    job_spec = body.job_spec()
    if teacher is None:
        return await _distill_held_teacher(response, registry, queue, settings, body, job_spec)
    path, sha256, _ = await save_upload(teacher, settings.uploads_dir, settings.max_upload_bytes)
    try:
        dataset = await run_in_threadpool(request.app.state.datasets.get, registry, body.dataset)
        with tempfile.TemporaryDirectory(dir=settings.uploads_dir) as scratch:
            imported = await run_in_threadpool(
                partial(import_teacher, arch=job_spec["teacher_arch"], hyperparameters=job_spec["teacher_params"]),
                path, dataset, Path(scratch),
            )  # fmt: skip
            require_method(imported, body.method)
        job, created = registry.create_or_get_job(
            "distill",
            sha256,
            job_spec,
            spec_hash(job_spec),
            str(path),
            body.time_budget_s,
            max_attempts=settings.max_attempts,
        )
    except (CheckpointError, MethodUnsupported) as exc:
        path.unlink(missing_ok=True)
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if not created and job.state in REVIVABLE and not Path(job.teacher_path or "").is_file():
        job = registry.revive_job(job.id, teacher_path=path)  # its own copy is gone: it takes this upload
    elif not created:
        path.unlink(missing_ok=True)  # the existing job keeps its own copy
    return _enqueue(registry, queue, job, response)


async def _distill_held_teacher(
    response: Response, registry: Any, queue: Any, settings: Any, body: DistillRequest, job_spec: dict
) -> JobOut:
    if body.teacher_model is None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "upload a teacher file or name a teacher_model")
    try:
        row = registry.get_model(body.teacher_model)
    except NotFound as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"no model {body.teacher_model!r}") from exc
    if row.dataset_id != body.dataset:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"{row.id} was trained on {row.dataset_id}")
    if body.method == "hetcomp" and not (Path(row.directory) / "trajectory").is_dir():
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "hetcomp needs the teacher's trajectory checkpoints")
    weights_sha = row.manifest["files"]["weights.safetensors"]["sha256"]
    job, _ = registry.create_or_get_job(
        "distill",
        weights_sha,
        job_spec,
        spec_hash(job_spec),
        row.directory,
        body.time_budget_s,
        max_attempts=settings.max_attempts,
    )
    return _enqueue(registry, queue, job, response)


@router.post("/teachers", status_code=status.HTTP_202_ACCEPTED, dependencies=[Authorised])
def train_teacher(
    body: TeacherRequest, response: Response, registry: RegistryDep, queue: QueueDep, settings: SettingsDep
) -> JobOut:
    """Train a teacher on a registered dataset, as a job (for users who have none yet)."""
    _known_dataset(registry, body.dataset)
    job_spec = body.job_spec()
    job, _ = registry.create_or_get_job(
        "teacher", "", job_spec, spec_hash(job_spec), None, body.time_budget_s, max_attempts=settings.max_attempts
    )
    return _enqueue(registry, queue, job, response)


@router.get("/jobs")
def list_jobs(registry: RegistryDep, state: str | None = None, limit: int = 100) -> list[JobOut]:
    return [job_out(job) for job in registry.list_jobs(state=state, limit=min(max(limit, 1), 1000))]


@router.get("/jobs/{job_id}")
def get_job(job_id: str, registry: RegistryDep) -> JobOut:
    try:
        return job_out(registry.get_job(job_id))
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}") from exc


@router.delete("/jobs/{job_id}", dependencies=[Authorised])
def cancel_job(job_id: str, registry: RegistryDep) -> JobOut:
    """Cancel: a queued job ends at once, a running one at its next epoch; never re-run."""
    try:
        registry.request_cancel(job_id)
        return job_out(registry.get_job(job_id))
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id!r}") from exc
