"""Datasets: list the registered ones, upload a CSV of interactions."""

from __future__ import annotations

import shutil
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile, status
from fastapi.concurrency import run_in_threadpool

from app.datasets import register, slug
from app.deps import Authorised, RegistryDep, SettingsDep
from app.schemas import DatasetOut
from app.uploads import save_upload
from rcekd.data import DataError

router = APIRouter(tags=["datasets"])


def _out(row: object) -> DatasetOut:
    return DatasetOut.model_validate(row, from_attributes=True)


@router.get("/datasets")
def list_datasets(registry: RegistryDep) -> list[DatasetOut]:
    return [_out(row) for row in registry.list_datasets()]


@router.post("/datasets", status_code=status.HTTP_201_CREATED, dependencies=[Authorised])
async def upload_dataset(
    request: Request,
    registry: RegistryDep,
    settings: SettingsDep,
    name: Annotated[str, Form(min_length=1, max_length=64)],
    file: Annotated[UploadFile, File(description="CSV/TSV of user,item[,timestamp]")],
) -> DatasetOut:
    """Register a CSV of interactions; it is split 8:1:1 per user in time order."""
    dataset_id = slug(name)
    directory = settings.home / "datasets" / dataset_id
    if directory.exists():
        raise HTTPException(status.HTTP_409_CONFLICT, f"dataset {dataset_id!r} exists")
    path, _, _ = await save_upload(file, settings.uploads_dir, settings.max_upload_bytes)
    try:
        directory.mkdir(parents=True)
        target = directory / "interactions.csv"
        shutil.move(path, target)
        await run_in_threadpool(register, registry, request.app.state.datasets, dataset_id, target, "upload")
    except DataError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    finally:
        path.unlink(missing_ok=True)
    return _out(registry.get_dataset(dataset_id))
