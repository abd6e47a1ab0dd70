"""Teacher against student, side by side: quality, size and latency measured on the same users."""

from __future__ import annotations

import io
import time
from typing import Any

import httpx
import numpy as np
from fastapi import APIRouter, HTTPException, Request, Response, status

from app.deps import RegistryDep, SettingsDep, StoreDep
from app.routes.models import find_model
from rcekd.retrieval import Retriever

router = APIRouter(tags=["compare"])


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    values = np.asarray(samples_ms)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(values.mean()), "n": len(values)}


async def end_to_end_ms(request: Request, model_id: str, users: list[str], n: int) -> list[float]:
    """Each user's ``GET /recommend`` through the whole ASGI app (routing, validation, JSON), in ms."""
    transport = httpx.ASGITransport(app=request.app)
    samples = []
    async with httpx.AsyncClient(transport=transport, base_url="http://rcekd") as client:
        for user in users:
            started = time.perf_counter()
            response = await client.get(f"/recommend/{user}", params={"n": n, "model": model_id})
            samples.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
    return samples


def _model_only_ms(retriever: Retriever, rows: np.ndarray, n: int) -> dict[str, float]:
    """Retriever.latency (one user per call, after a warm-up) in the shape of :func:`percentiles`."""
    stats = retriever.latency(rows, repeats=len(rows), n=n)
    return {"p50": stats["p50_ms"], "p95": stats["p95_ms"], "p99": stats["p99_ms"], "mean": stats["mean_ms"],
            "n": stats["calls"]}  # fmt: skip


async def compare_models(
    request: Request, registry: Any, store: Any, model_ids: list[str], sample: int, n: int
) -> list[dict]:
    rows = [find_model(registry, model_id) for model_id in model_ids]
    if len({row.dataset_id for row in rows}) > 1:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "models to compare must share a dataset")
    retrievers = [store.load(row.id, row.directory) for row in rows]
    rng = np.random.default_rng(0)  # the same users for every model
    user_rows = rng.choice(retrievers[0].n_users, size=min(sample, retrievers[0].n_users), replace=False)
    users = [retrievers[0].user_ids[row] for row in user_rows]
    report = []
    for row, retriever in zip(rows, retrievers, strict=True):
        files = retriever.file_sizes()
        metrics = row.manifest.get("metrics", {}).get("test", {})
        report.append(
            {
                "model": row.id,
                "name": row.name,
                "role": row.role,
                "arch": row.arch,
                "method": row.manifest.get("kd", {}).get("method"),
                "verified": row.verified,
                "metrics": {k: metrics.get(k) for k in ("recall@10", "ndcg@10", "recall@20", "ndcg@20")},
                "n_parameters": row.n_parameters,
                "bytes": files,
                "serving_bytes": sum(v for k, v in files.items() if k in ("model.onnx", "items.faiss", "seen.npz")),
                "mode": retriever.mode,  # "scores": a scores-only ONNX teacher, served by full scoring
                "index": (row.manifest.get("serving") or {}).get("index"),  # kind, options, recall@20 vs flat
                "provider": retriever.provider,
                "model_only_ms": _model_only_ms(retriever, user_rows.astype(np.int64), n),
                "end_to_end_ms": percentiles(await end_to_end_ms(request, row.id, users, n)),
            }
        )
    return report


def _default_models(request: Request, registry: Any, store: Any) -> list[str]:
    """The active model of the default dataset and the teacher it was distilled from."""
    dataset = request.app.state.default_dataset
    active = store.active_id(dataset)
    if active is None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "no active model; name models with ?models=a,b")
    job_id = registry.get_model(active).job_id
    siblings = [m for m in registry.list_models(dataset=dataset) if m.job_id == job_id]
    return [m.id for m in sorted(siblings, key=lambda m: m.role != "teacher")]


@router.get("/compare")
async def compare(
    request: Request,
    registry: RegistryDep,
    store: StoreDep,
    settings: SettingsDep,
    models: str | None = None,
    n: int = 20,
) -> dict[str, Any]:
    """Test Recall/NDCG@10/20, parameters, file bytes and latency percentiles for each model."""
    model_ids = [m for m in (models.split(",") if models else []) if m] or _default_models(request, registry, store)
    report = await compare_models(request, registry, store, model_ids, settings.latency_sample_users, n)
    base = report[0]
    for entry in report:
        entry["vs_first"] = {
            "ndcg@20": _ratio(entry["metrics"]["ndcg@20"], base["metrics"]["ndcg@20"]),
            "serving_bytes": _ratio(entry["serving_bytes"], base["serving_bytes"]),
            "model_only_p50": _ratio(entry["model_only_ms"]["p50"], base["model_only_ms"]["p50"]),
        }
    return {"n": n, "sampled_users": settings.latency_sample_users, "models": report}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


@router.get("/compare/plot.png", response_class=Response)
async def compare_plot(
    request: Request, registry: RegistryDep, store: StoreDep, settings: SettingsDep, models: str | None = None
) -> Response:
    """NDCG@20 against model-only p50 latency and against serving size, one point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = await compare(request, registry, store, settings, models)
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for entry in result["models"]:
        ndcg = entry["metrics"]["ndcg@20"] or 0.0
        left.scatter(entry["model_only_ms"]["p50"], ndcg)
        left.annotate(entry["name"], (entry["model_only_ms"]["p50"], ndcg))
        right.scatter(entry["serving_bytes"] / 2**20, ndcg)
        right.annotate(entry["name"], (entry["serving_bytes"] / 2**20, ndcg))
    left.set(xlabel="model-only latency p50 (ms)", ylabel="test NDCG@20", title="quality vs latency")
    right.set(xlabel="serving files (MiB)", ylabel="test NDCG@20", title="quality vs size")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return Response(buffer.getvalue(), media_type="image/png")
