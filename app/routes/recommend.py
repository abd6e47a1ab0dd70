"""Top-n recommendations through the served path: ONNX user tower → FAISS → seen-item filter."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.concurrency import run_in_threadpool

from app.deps import RegistryDep, StoreDep
from app.schemas import BatchRecommendRequest, Recommendation, RecommendedItem
from app.serving import ModelNotLoaded
from rcekd.checkpoint import CheckpointError
from rcekd.retrieval import Retriever, UnknownUser

router = APIRouter(tags=["recommend"])


def resolve(
    request: Request, registry: Any, store: Any, model: str | None, dataset: str | None
) -> tuple[str, Retriever]:
    """The model to serve from: the one named, else the active model of the dataset (default: the first).

    A loaded model is served without a registry query: the hot path keeps answering when the
    database or the broker is down.
    """
    try:
        if model is not None:
            if (retriever := store.known(model)) is not None:
                return model, retriever
            row = registry.get_model(model)
            return row.id, store.load(row.id, row.directory)
        return store.active(dataset or request.app.state.default_dataset)
    except ModelNotLoaded as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from exc
    except (KeyError, CheckpointError) as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model {model!r} is not available: {exc}") from exc


def _recommend(
    retriever: Retriever, model_id: str, users: list[str], n: int, exclude_seen: bool
) -> list[Recommendation]:
    try:
        rows = np.array([retriever.user_row(user) for user in users], dtype=np.int64)
    except UnknownUser as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown user {exc.args[0]!r}") from exc
    if n > retriever.n_items:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"n must be at most {retriever.n_items}")
    items, scores = retriever.recommend(rows, n, exclude_seen=exclude_seen)
    names = retriever.item_ids
    return [
        Recommendation(
            user=user,
            model=model_id,
            items=[
                RecommendedItem(item=names[i], score=float(s))
                for i, s in zip(row_items, row_scores, strict=True)
                if i >= 0
            ],
        )
        for user, row_items, row_scores in zip(users, items, scores, strict=True)
    ]


@router.get("/recommend/{user}")
async def recommend(
    request: Request,
    user: str,
    registry: RegistryDep,
    store: StoreDep,
    n: Annotated[int, Query(ge=1, le=1000)] = 20,
    model: str | None = None,
    dataset: str | None = None,
    exclude_seen: bool = True,
) -> Recommendation:
    """The user's top-n items (the dataset's own ids), items they have seen left out by default."""
    model_id, retriever = resolve(request, registry, store, model, dataset)
    return (await run_in_threadpool(_recommend, retriever, model_id, [user], n, exclude_seen))[0]


@router.post("/recommend")
async def recommend_batch(
    request: Request, body: BatchRecommendRequest, registry: RegistryDep, store: StoreDep
) -> list[Recommendation]:
    """Top-n for many users in one ONNX call and one FAISS search."""
    model_id, retriever = resolve(request, registry, store, body.model, body.dataset)
    return await run_in_threadpool(_recommend, retriever, model_id, body.users, body.n, body.exclude_seen)
