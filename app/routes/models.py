"""Models: list, inspect, activate (hot swap) and delete."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, status
from fastapi.concurrency import run_in_threadpool

from app.deps import Authorised, RegistryDep, StoreDep
from app.registry import InvalidTransition, NotFound
from app.schemas import ModelOut
from rcekd.checkpoint import CheckpointError

router = APIRouter(tags=["models"])


def model_out(row: Any) -> ModelOut:
    return ModelOut.model_validate(row, from_attributes=True)


def find_model(registry: Any, model_id: str) -> Any:
    try:
        return registry.get_model(model_id)
    except NotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no model {model_id!r}") from exc


@router.get("/models")
def list_models(registry: RegistryDep, dataset: str | None = None) -> list[ModelOut]:
    return [model_out(row) for row in registry.list_models(dataset=dataset)]


@router.get("/models/{model_id}")
def get_model(model_id: str, registry: RegistryDep) -> dict[str, Any]:
    """The model with its full manifest (hyper-parameters, KD settings, files and their sha256)."""
    row = find_model(registry, model_id)
    return {**model_out(row).model_dump(), "manifest": row.manifest}


@router.post("/models/{model_id}/activate", dependencies=[Authorised])
async def activate(model_id: str, registry: RegistryDep, store: StoreDep) -> ModelOut:
    """Serve this model for its dataset. It is loaded and verified first; on failure the old one keeps serving."""
    row = find_model(registry, model_id)
    try:
        await run_in_threadpool(store.activate, row.dataset_id, row.id, row.directory)
    except CheckpointError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"model {model_id} cannot be served: {exc}") from exc
    registry.activate_model(model_id)
    return model_out(registry.get_model(model_id))


@router.delete("/models/{model_id}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[Authorised])
def delete_model(model_id: str, registry: RegistryDep, store: StoreDep, force: bool = False) -> None:
    """Delete a model and its files; the active model only with ``force`` (it stops being served)."""
    row = find_model(registry, model_id)
    try:
        registry.delete_model(model_id, force=force)
    except InvalidTransition as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, f"{exc}; pass force=true to delete it anyway") from exc
    store.forget(model_id)
    shutil.rmtree(Path(row.directory), ignore_errors=True)
