"""Fixtures for the service: a ``registry`` on each backend the service supports.

SQLite: a fresh file per test. PostgreSQL: a fresh schema per test on the server at
``RCEKD_TEST_POSTGRES_URL`` (default: the local ``test`` database), reached through
``search_path`` so every table and index lands in that schema, dropped afterwards. The PostgreSQL
variant is skipped only when the server cannot be reached.
"""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from app.registry import Registry, create_schema, make_engine

POSTGRES_URL = os.environ.get("RCEKD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The PostgreSQL server's URL, or skip (only) when it cannot be reached."""
    engine = create_engine(POSTGRES_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as error:
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_URL} (set RCEKD_TEST_POSTGRES_URL): {error.orig}")
    finally:
        engine.dispose()
    return POSTGRES_URL


@pytest.fixture(params=["sqlite", "postgres"])
def registry_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(url, make_engine keyword arguments) of an empty database, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}", {}
        return
    url = request.getfixturevalue("postgres_url")
    schema = f"test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(url)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield url, {"connect_args": {"options": f"-csearch_path={schema}"}}
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def open_registry(registry_target: tuple[str, dict[str, Any]]) -> Iterator[Callable[[], Registry]]:
    """Opens Registries on the test database, each with its own engine (like separate processes)."""
    opened: list[Registry] = []

    def open_one() -> Registry:
        url, engine_kwargs = registry_target
        engine = make_engine(url, **copy.deepcopy(engine_kwargs))
        create_schema(engine)
        opened.append(Registry(engine))
        return opened[-1]

    yield open_one
    for registry in opened:
        registry.close()


@pytest.fixture
def registry(open_registry: Callable[[], Registry]) -> Registry:
    """A Registry with its tables created, on SQLite and on PostgreSQL."""
    return open_registry()
