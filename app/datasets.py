"""Datasets the service knows: the builtin ones (RCEKD_DATA_DIR, or a generated demo) and uploads.

Datasets are loaded once per process and kept; a registered fingerprint guards against files that
changed on disk since registration.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from app.config import Settings
from app.registry import Registry
from rcekd.data import Dataset, load_dataset
from rcekd.synthetic import write_synthetic

DEMO_ID = "demo"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "dataset"


class DatasetCache:
    """Loaded datasets by registry id (loading CiteULike takes seconds; requests must not)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: dict[str, Dataset] = {}

    def get(self, registry: Registry, dataset_id: str) -> Dataset:
        with self._lock:
            if dataset_id in self._loaded:
                return self._loaded[dataset_id]
        row = registry.get_dataset(dataset_id)
        dataset = load_dataset(row.directory)
        if dataset.fingerprint != row.fingerprint:
            raise ValueError(f"dataset {dataset_id} changed on disk since it was registered")
        with self._lock:
            return self._loaded.setdefault(dataset_id, dataset)

    def put(self, dataset_id: str, dataset: Dataset) -> None:
        with self._lock:
            self._loaded[dataset_id] = dataset


def register(registry: Registry, cache: DatasetCache, dataset_id: str, path: Path, source: str) -> Dataset:
    dataset = load_dataset(path)
    registry.upsert_dataset(
        id=dataset_id,
        name=dataset.name,
        directory=str(path),
        fingerprint=dataset.fingerprint,
        n_users=dataset.n_users,
        n_items=dataset.n_items,
        n_interactions=int(dataset.train.nnz + dataset.split("valid").nnz + dataset.split("test").nnz),
        source=source,
    )
    cache.put(dataset_id, dataset)
    return dataset


def register_builtin(settings: Settings, registry: Registry, cache: DatasetCache) -> list[str]:
    """Register RCEKD_DATA_DIR's datasets, or generate the synthetic demo when none is given."""
    directories = settings.dataset_dirs
    if not directories:
        demo = settings.home / "datasets" / DEMO_ID
        if not (demo / "train.txt").is_file():
            write_synthetic(demo)
        register(registry, cache, DEMO_ID, demo, "builtin")
        return [DEMO_ID]
    ids = []
    for directory in directories:
        dataset_id = slug(directory.name)
        register(registry, cache, dataset_id, directory, "builtin")
        ids.append(dataset_id)
    return ids
