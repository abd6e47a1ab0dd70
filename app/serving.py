"""Models loaded for serving, and the hot swap of the active one.

A request takes a reference to a loaded :class:`Retriever` once and uses it to the end, so swapping
the active model is one assignment under a lock: requests in flight finish on the old model, new
ones get the new model, none fails. A model is loaded (and its files checked) *before* the swap, so
one that fails to load leaves the old one serving.
"""

from __future__ import annotations

import threading
from pathlib import Path

from rcekd.checkpoint import CheckpointError
from rcekd.retrieval import Retriever


class ModelNotLoaded(LookupError):  # noqa: N818 - reads as a state, not an error class
    """No model is active for the dataset, or the model id is not loaded."""


class ModelStore:
    def __init__(self, max_loaded: int = 8) -> None:
        self._lock = threading.Lock()
        self._loaded: dict[str, Retriever] = {}
        self._active: dict[str, str] = {}  # dataset id → model id
        self._directories: dict[str, str] = {}  # model id → directory, for reloading without the registry
        self._max_loaded = max_loaded

    def load(self, model_id: str, directory: str | Path) -> Retriever:
        """The loaded model, loading (and verifying) it first when needed; outside the lock."""
        with self._lock:
            retriever = self._loaded.get(model_id)
        if retriever is not None:
            return retriever
        retriever = Retriever.load(directory, verify=True)
        with self._lock:
            self._loaded.setdefault(model_id, retriever)
            self._directories[model_id] = str(directory)
            self._evict()
            return self._loaded[model_id]

    def activate(self, dataset_id: str, model_id: str, directory: str | Path) -> Retriever:
        """Load, verify, then swap in; raises (and changes nothing) when the model cannot load."""
        with self._lock:
            self._loaded.pop(model_id, None)  # re-verify its files: they may have changed on disk
        retriever = self.load(model_id, directory)
        with self._lock:
            self._active[dataset_id] = model_id
        return retriever

    def active(self, dataset_id: str) -> tuple[str, Retriever]:
        with self._lock:
            model_id = self._active.get(dataset_id)
            retriever = self._loaded.get(model_id) if model_id else None
        if model_id is None or retriever is None:
            raise ModelNotLoaded(
                f"no active model for dataset {dataset_id!r}; activate one with POST /models/{{id}}/activate"
            )
        return model_id, retriever

    def known(self, model_id: str) -> Retriever | None:
        """A model this process has loaded before, without asking the registry (it may be down).

        Reloaded from its remembered directory if it was evicted; None if never loaded or no longer
        loadable. A model deleted through this process is forgotten; through another replica it is
        served here until that replica's delete removes its files.
        """
        with self._lock:
            retriever = self._loaded.get(model_id)
            directory = self._directories.get(model_id)
        if retriever is not None or directory is None:
            return retriever
        try:
            return self.load(model_id, directory)
        except (CheckpointError, OSError):
            return None

    def active_id(self, dataset_id: str) -> str | None:
        with self._lock:
            return self._active.get(dataset_id)

    def forget(self, model_id: str) -> None:
        """Drop a deleted model; an active one stops being served."""
        with self._lock:
            self._loaded.pop(model_id, None)
            self._directories.pop(model_id, None)
            for dataset_id in [d for d, m in self._active.items() if m == model_id]:
                del self._active[dataset_id]

    def _evict(self) -> None:
        active = set(self._active.values())
        for model_id in list(self._loaded):
            if len(self._loaded) <= self._max_loaded:
                break
            if model_id not in active:
                del self._loaded[model_id]
