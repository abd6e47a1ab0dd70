"""The registry's tables, states and engines; `app.registry.store` holds the operations on them.

All times are timezone-aware UTC: SQLite keeps naive UTC text, PostgreSQL ``timestamptz``.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Engine,
    Index,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import StaticPool


class JobState(StrEnum):
    PENDING = "PENDING"  # row written, task not sent yet
    QUEUED = "QUEUED"  # task sent (or re-sent after a lost worker)
    RUNNING = "RUNNING"  # claimed by a worker holding a live lease
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL = frozenset({JobState.SUCCESS, JobState.FAILED, JobState.CANCELLED})
# target → the states it may be entered from; RUNNING is entered only through claim_job (lease)
ALLOWED_FROM: dict[JobState, frozenset[JobState]] = {
    JobState.PENDING: frozenset({JobState.PENDING}),
    JobState.QUEUED: frozenset({JobState.PENDING, JobState.QUEUED, JobState.RUNNING}),
    JobState.RUNNING: frozenset({JobState.RUNNING}),
    JobState.SUCCESS: frozenset({JobState.RUNNING}),
    JobState.FAILED: frozenset({JobState.PENDING, JobState.QUEUED, JobState.RUNNING}),
    JobState.CANCELLED: frozenset({JobState.PENDING, JobState.QUEUED, JobState.RUNNING}),
}
_LOCK_KEY = 0x7263656B64  # "rcekd": serialises create_schema across processes on PostgreSQL


class NotFound(KeyError):  # noqa: N818 (the API's word for it)
    """No dataset, job or model with that id."""


class InvalidTransition(ValueError):  # noqa: N818
    """The job (or model) is not in a state that allows this change."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def spec_hash(spec: dict[str, Any]) -> str:
    """sha256 of canonical JSON (sorted keys, no spaces): equal specs hash equal whatever their key order."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC in and out; SQLite stores naive UTC text (which then sorts and compares correctly)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the registry stores aware UTC times only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, datetime: UTCDateTime, int: BigInteger}


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (CheckConstraint("source IN ('builtin', 'upload')", name="ck_datasets_source"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # slug
    name: Mapped[str] = mapped_column(String(200))
    directory: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(128))
    n_users: Mapped[int]
    n_items: Mapped[int]
    n_interactions: Mapped[int]
    source: Mapped[str] = mapped_column(String(16), default="builtin")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("kind", "teacher_sha256", "spec_hash", name="uq_jobs_identity"),
        CheckConstraint(f"state IN ({', '.join(repr(s.value) for s in JobState)})", name="ck_jobs_state"),
        Index("ix_jobs_state_lease", "state", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=lambda: uuid.uuid4().hex)
    kind: Mapped[str] = mapped_column(String(32))  # "distill", "train", ...
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING.value)
    spec: Mapped[dict[str, Any]]
    spec_hash: Mapped[str] = mapped_column(String(64))
    teacher_path: Mapped[str | None] = mapped_column(Text)
    teacher_sha256: Mapped[str] = mapped_column(String(64))
    dataset_id: Mapped[str | None] = mapped_column(String(64), index=True)
    attempts: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=3)
    worker: Mapped[str | None] = mapped_column(String(200))
    heartbeat_at: Mapped[datetime | None]
    lease_expires_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    time_budget_s: Mapped[int | None]
    deadline: Mapped[datetime | None]  # first claim + time_budget_s
    error: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)  # epoch, max_epochs, loss, valid_ndcg, ...
    result_model_id: Mapped[str | None] = mapped_column(String(128))
    celery_task_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (
        CheckConstraint("role IN ('teacher', 'student')", name="ck_models_role"),
        # at most one active model per dataset, enforced by the database as well as by activate_model
        Index(
            "uq_models_active", "dataset_id", unique=True, sqlite_where=text("active"), postgresql_where=text("active")
        ),
    )

    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # the manifest's id
    job_id: Mapped[str | None] = mapped_column(String(32), index=True)
    role: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200))
    directory: Mapped[str] = mapped_column(Text)
    arch: Mapped[str] = mapped_column(String(64))
    dataset_id: Mapped[str] = mapped_column(String(64), index=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    n_parameters: Mapped[int | None]
    bytes: Mapped[dict[str, Any]] = mapped_column(default=dict)
    manifest: Mapped[dict[str, Any]] = mapped_column(default=dict)
    verified: Mapped[bool] = mapped_column(default=False)  # teacher fingerprint checked against the dataset
    active: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


def make_engine(url: str, **kwargs: Any) -> Engine:
    """SQLite: WAL + busy timeout, shared across threads; PostgreSQL: connections checked before use."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        memory = parsed.database in (None, "", ":memory:")
        if not memory:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {**kwargs.get("connect_args", {}), "check_same_thread": False, "timeout": 30}
        if memory:
            kwargs.setdefault("poolclass", StaticPool)
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            for pragma in ("journal_mode=WAL", "busy_timeout=30000", "synchronous=NORMAL", "foreign_keys=ON"):
                cursor.execute(f"PRAGMA {pragma}")
            cursor.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def create_schema(engine: Engine) -> None:
    """Create missing tables (idempotent; no migrations: a changed table needs a new database).

    An API and a worker starting together take turns on PostgreSQL (advisory lock); on SQLite the
    loser of a race sees "already exists" and finds the tables on its second look.
    """
    for attempt in range(2):
        try:
            with engine.begin() as connection:
                if connection.dialect.name == "postgresql":
                    connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
                Base.metadata.create_all(connection)
            return
        except OperationalError:
            if attempt:
                raise
