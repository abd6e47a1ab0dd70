"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.deps import QueueDep, RegistryDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers (load balancers restart it when this fails)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(registry: RegistryDep, queue: QueueDep, response: Response) -> dict[str, bool]:
    """The registry and the broker are reachable: new jobs can be accepted."""
    checks = {
        "registry": await run_in_threadpool(_reachable, registry.ping),
        "queue": await run_in_threadpool(queue.ping),
    }
    if not all(checks.values()):
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return checks


def _reachable(ping: Callable[[], None]) -> bool:
    try:
        ping()
        return True
    except Exception:
        return False


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
