"""The registry's plumbing: an engine, short transactions, lookups that raise ``NotFound``, upserts."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Self, TypeVar

from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app.registry.schema import Base, NotFound, create_schema, make_engine

RowT = TypeVar("RowT", bound=Base)


class Store:
    """Short transactions on one engine; returned rows are detached snapshots (expire_on_commit off)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def from_url(cls, url: str, *, create: bool = True, **engine_kwargs: Any) -> Self:
        """An engine for ``url`` (see ``make_engine``), with the tables created unless ``create=False``."""
        engine = make_engine(url, **engine_kwargs)
        if create:
            create_schema(engine)
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        """Raise if the database cannot be reached (for /healthz)."""
        with self.engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    @staticmethod
    def _get(session: Session, kind: type[RowT], row_id: str) -> RowT:
        row = session.get(kind, row_id)
        if row is None:
            raise NotFound(f"no {kind.__name__.lower()} {row_id!r}")
        return row

    def _upsert(self, kind: type[RowT], row_id: str, values: dict[str, Any]) -> RowT:
        """Insert or update by primary key; a concurrent insert of the same id is retried as an update."""
        for attempt in range(2):
            try:
                with self._transaction() as session:
                    row = session.get(kind, row_id)
                    if row is None:
                        row = kind(id=row_id, **values)
                        session.add(row)
                    else:
                        for key, value in values.items():
                            setattr(row, key, value)
                return row
            except IntegrityError:
                if attempt:
                    raise
        raise AssertionError("unreachable")
