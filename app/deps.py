"""Typed dependencies: what a route needs, taken from the application's state, never from globals."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.config import Settings
from app.queue import JobQueue
from app.registry import Registry
from app.serving import ModelStore


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _registry(request: Request) -> Registry:
    return request.app.state.registry


def _store(request: Request) -> ModelStore:
    return request.app.state.store


def _queue(request: Request) -> JobQueue:
    return request.app.state.queue


SettingsDep = Annotated[Settings, Depends(_settings)]
RegistryDep = Annotated[Registry, Depends(_registry)]
StoreDep = Annotated[ModelStore, Depends(_store)]
QueueDep = Annotated[JobQueue, Depends(_queue)]

_bearer = HTTPBearer(auto_error=False)


def require_token(
    settings: SettingsDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> None:
    """Mutating endpoints: the bearer token must match, compared in constant time."""
    expected = settings.api_token.get_secret_value() if settings.api_token else None
    if expected is None:
        if settings.allow_anonymous:
            return
        raise HTTPException(status.HTTP_403_FORBIDDEN, "no API token is configured; set RCEKD_API_TOKEN")
    given = credentials.credentials if credentials else ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
        )


Authorised = Depends(require_token)
