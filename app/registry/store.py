"""The ``Registry``: datasets and models here; jobs in ``jobs`` and ``recovery``; plumbing in ``session``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.registry.recovery import RecoveryStore
from app.registry.schema import Dataset, InvalidTransition, Model


class Registry(RecoveryStore):
    """Datasets, jobs and models behind short transactions; returned rows are detached snapshots."""

    # datasets
    def upsert_dataset(
        self,
        id: str,
        *,
        name: str,
        directory: str | Path,
        fingerprint: str,
        n_users: int,
        n_items: int,
        n_interactions: int,
        source: str = "builtin",
    ) -> Dataset:
        values = dict(
            name=name,
            directory=str(directory),
            fingerprint=fingerprint,
            n_users=n_users,
            n_items=n_items,
            n_interactions=n_interactions,
            source=source,
        )
        return self._upsert(Dataset, id, values)

    def get_dataset(self, dataset_id: str) -> Dataset:
        with self._sessions() as session:
            return self._get(session, Dataset, dataset_id)

    def list_datasets(self) -> list[Dataset]:
        with self._sessions() as session:
            return list(session.scalars(select(Dataset).order_by(Dataset.id)))

    # models
    def register_artifact(
        self,
        manifest: dict[str, Any],
        directory: str | Path,
        dataset_id: str,
        *,
        job_id: str | None = None,
        verified: bool = True,
        name: str | None = None,
    ) -> Model:
        """Register an artifact directory from its manifest (the worker's and the tests' one path)."""
        kd = (manifest.get("kd") or {}).get("method")
        default = f"{manifest['role']}-{manifest['arch']}{(manifest.get('hyperparameters') or {}).get('dim', '')}"
        return self.add_model(
            manifest["id"],
            role=manifest["role"],
            name=name or (f"{default}-{kd}" if kd else default),
            directory=directory,
            arch=manifest["arch"],
            dataset_id=dataset_id,
            metrics=manifest.get("metrics", {}),
            n_parameters=manifest.get("n_parameters"),
            bytes={file: meta["bytes"] for file, meta in manifest.get("files", {}).items()},
            manifest=manifest,
            job_id=job_id,
            verified=verified,
        )

    def add_model(
        self,
        id: str,
        *,
        role: str,
        name: str,
        directory: str | Path,
        arch: str,
        dataset_id: str,
        metrics: dict[str, Any] | None = None,
        n_parameters: int | None = None,
        bytes: dict[str, Any] | None = None,
        manifest: dict[str, Any] | None = None,
        job_id: str | None = None,
        verified: bool = False,
    ) -> Model:
        """Register (or re-register, keeping its active flag) the artifact whose manifest id is ``id``."""
        values = dict(
            role=role,
            name=name,
            directory=str(directory),
            arch=arch,
            dataset_id=dataset_id,
            metrics=metrics or {},
            n_parameters=n_parameters,
            bytes=bytes or {},
            manifest=manifest or {},
            job_id=job_id,
            verified=verified,
        )
        return self._upsert(Model, id, values)

    def get_model(self, model_id: str) -> Model:
        with self._sessions() as session:
            return self._get(session, Model, model_id)

    def list_models(self, dataset: str | None = None, role: str | None = None) -> list[Model]:
        """Newest first."""
        query = select(Model).order_by(Model.created_at.desc(), Model.id)
        if dataset is not None:
            query = query.where(Model.dataset_id == dataset)
        if role is not None:
            query = query.where(Model.role == role)
        with self._sessions() as session:
            return list(session.scalars(query))

    def activate_model(self, model_id: str) -> Model:
        """Make this the dataset's one active model, in one transaction (a unique index backs it up)."""
        for attempt in range(5):
            try:
                with self._transaction() as session:
                    model = self._get(session, Model, model_id)
                    _take_turns(session, f"activate:{model.dataset_id}")
                    others = (Model.dataset_id == model.dataset_id, Model.id != model_id, Model.active.is_(True))
                    session.execute(update(Model).where(*others).values(active=False))
                    session.execute(update(Model).where(Model.id == model_id).values(active=True))
                    session.refresh(model)
                    return model
            except IntegrityError:  # a model added and activated meanwhile won the index: redo on top of it
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def active_model(self, dataset: str) -> Model | None:
        with self._sessions() as session:
            query = select(Model).where(Model.dataset_id == dataset, Model.active.is_(True))
            return session.scalars(query).one_or_none()

    def delete_model(self, model_id: str, *, force: bool = False) -> Model:
        """Remove the row (the caller removes the directory); the active model only with ``force``."""
        with self._transaction() as session:
            model = self._get(session, Model, model_id)
            if model.active and not force:
                raise InvalidTransition(f"model {model_id} is active for {model.dataset_id}; activate another first")
            session.delete(model)
            return model


def _take_turns(session: Session, key: str) -> None:
    """PostgreSQL: one transaction-scoped advisory lock per key, so racing activations of a dataset run
    one after another (SQLite: a write transaction already excludes the others).

    Not ``SELECT … FOR UPDATE`` on the dataset's models: it locks their rows in scan order, which an
    update changes, so two activations could each hold a row the other waits for (a deadlock
    PostgreSQL broke by failing one of them: 3 of 25 runs of the racing-activations test).
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(func.hashtext(key))))
