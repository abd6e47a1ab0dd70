"""The served path of an artifact directory: ONNX user tower + FAISS index + seen-item filter.

Computes with numpy, onnxruntime and FAISS only (torch is imported, via rcekd.checkpoint, never run).
Modes: ``vectors`` (user tower → FAISS) and ``scores`` (a scores-only ONNX teacher: user_ids → scores
over all items, then a partial sort). Either way the top ``n + max excluded`` candidates are fetched
and excluded items dropped with one sorted-key search: one ONNX call and one search per batch.
"""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnx
import onnxruntime as ort
import scipy.sparse as sp

from rcekd import faiss_index
from rcekd.checkpoint import CheckpointError, read_manifest, verify_files
from rcekd.data import Dataset
from rcekd.metrics import mask_matrix

ONNX_FILE, INDEX_FILE, SEEN_FILE, IDS_FILE = "model.onnx", "items.faiss", "seen.npz", "ids.json"
PROVIDER_HINT = ("CUDAExecutionProvider", "CPUExecutionProvider")
#: scores (or candidates) held per chunk: 2**25 float32 → 128 MiB, as in rcekd.metrics
CHUNK_SCORES = 2**25


class UnknownUser(KeyError):  # noqa: N818 (the name the API documents)
    """An external user id that the artifact's ids.json does not hold."""


def write_seen(path: Path, dataset: Dataset) -> None:
    """Each user's known items as CSR: what the strict protocol masks for test (train + valid)."""
    seen: sp.csr_matrix = mask_matrix(dataset, "test", "strict").astype(bool).tocsr()
    seen.sort_indices()
    np.savez_compressed(path, indptr=seen.indptr.astype(np.int64), indices=seen.indices.astype(np.int64))


def write_ids(path: Path, dataset: Dataset) -> None:
    users = dataset.user_ids or [str(u) for u in range(dataset.n_users)]
    items = dataset.item_ids or [str(i) for i in range(dataset.n_items)]
    path.write_text(json.dumps({"users": list(users), "items": list(items)}))


def onnx_opset(path: Path) -> int | None:
    """The default-domain opset of an ONNX file (its weights are not read)."""
    model = onnx.load(str(path), load_external_data=False)
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), None)


def _session(path: Path, hint: Sequence[str], threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    available = ort.get_available_providers()
    providers = [p for p in hint if p in available] or ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...)
        raise CheckpointError(f"{path}: not a loadable ONNX model ({str(exc).strip()[:300]})") from exc


def write_scores_serving_files(directory: str | Path, onnx_model_path: str | Path, dataset: Dataset) -> dict:
    """Serve a scores-only ONNX model (user_ids → scores[batch, n_items]): copy it in, add seen/ids."""
    directory = Path(directory)
    shutil.copyfile(onnx_model_path, directory / ONNX_FILE)
    session = _session(directory / ONNX_FILE, ["CPUExecutionProvider"])
    source, output = session.get_inputs(), session.get_outputs()[0].name
    if len(source) != 1 or source[0].type != "tensor(int64)":
        raise ValueError(f"{onnx_model_path}: a scores model takes one int64 input (user_ids)")
    probe = session.run(None, {source[0].name: np.zeros(2, dtype=np.int64)})[0]
    if probe.shape != (2, dataset.n_items):
        raise ValueError(f"{onnx_model_path}: returned {probe.shape} for 2 users, expected (2, {dataset.n_items})")
    write_seen(directory / SEEN_FILE, dataset)
    write_ids(directory / IDS_FILE, dataset)
    onnx_info = {"opset": onnx_opset(directory / ONNX_FILE), "input": source[0].name, "output": output}
    return {"mode": "scores", "onnx": onnx_info, "index": None, "provider_hint": list(PROVIDER_HINT)}


def _csr_keys(indptr: np.ndarray, indices: np.ndarray, n_items: int) -> np.ndarray:
    """Sorted int64 keys row * n_items + item of a CSR matrix, for one searchsorted per batch; the
    last key is a sentinel beyond every real key, so the array is never empty."""
    rows = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
    return np.append(np.sort(rows * n_items + indices.astype(np.int64)), np.iinfo(np.int64).max)


def _member(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    return sorted_keys[np.searchsorted(sorted_keys, keys).clip(max=len(sorted_keys) - 1)] == keys


def _load_seen(path: Path, n_users: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            indptr, indices = archive["indptr"].astype(np.int64), archive["indices"].astype(np.int64)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from exc
    bad_rows = indptr.shape != (n_users + 1,) or indptr[0] != 0 or indptr[-1] != len(indices)
    if bad_rows or (np.diff(indptr) < 0).any() or (len(indices) and not 0 <= indices.min() <= indices.max() < n_items):
        raise CheckpointError(f"{path}: not a CSR of {n_users} users × {n_items} items")
    return indptr, indices


def _load_ids(path: Path) -> tuple[list[str], list[str]]:
    try:
        ids = json.loads(path.read_text())
        users, items = [str(u) for u in ids["users"]], [str(i) for i in ids["items"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from exc
    if len(set(users)) != len(users) or len(set(items)) != len(items) or not items:
        raise CheckpointError(f"{path}: user and item ids must be unique (and items non-empty)")
    return users, items


class Retriever:
    """Top-n recommendations from an artifact directory, batched and vectorised."""

    def __init__(
        self,
        directory: Path,
        manifest: dict[str, Any],
        session: ort.InferenceSession,
        index: faiss.Index | None,
        seen: tuple[np.ndarray, np.ndarray],
        ids: tuple[list[str], list[str]],
    ) -> None:
        self.directory, self.manifest, self.session, self.index = directory, manifest, session, index
        self.mode: str = manifest["serving"]["mode"]
        self.provider: str = session.get_providers()[0]
        self.user_ids, self.item_ids = ids
        self.n_users, self.n_items = len(self.user_ids), len(self.item_ids)
        self._rows = {user: row for row, user in enumerate(self.user_ids)}
        self._input = session.get_inputs()[0].name
        self._seen_keys = _csr_keys(seen[0], seen[1], self.n_items)

    @classmethod
    def load(cls, directory: str | Path, verify: bool = True, threads: int | None = None) -> Retriever:
        """Open an artifact's serving files; anything missing, corrupt or inconsistent → CheckpointError."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        section = manifest.get("serving")
        if not isinstance(section, dict) or section.get("mode") not in ("vectors", "scores"):
            raise CheckpointError(f"{directory}: the manifest has no serving section (exported without serving?)")
        needed = [ONNX_FILE, SEEN_FILE, IDS_FILE] + ([INDEX_FILE] if section["mode"] == "vectors" else [])
        for name in needed:
            if not (directory / name).is_file():
                raise CheckpointError(f"{directory}: {name} is missing")
            if verify and name not in manifest.get("files", {}):
                raise CheckpointError(f"{directory}: {name} is not listed (with its sha256) in the manifest")
        if verify:
            verify_files(directory, manifest)
        ids = _load_ids(directory / IDS_FILE)
        seen = _load_seen(directory / SEEN_FILE, len(ids[0]), len(ids[1]))
        session = _session(directory / ONNX_FILE, section.get("provider_hint") or PROVIDER_HINT, threads)
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or inputs[0].type != "tensor(int64)" or len(outputs[0].shape) != 2:
            raise CheckpointError(f"{directory}: {ONNX_FILE} must map int64 user_ids[batch] to a [batch, d] output")
        index = None
        if section["mode"] == "vectors":
            try:
                index = faiss_index.load_index(directory / INDEX_FILE)
            except ValueError as exc:
                raise CheckpointError(str(exc)) from exc
            width = outputs[0].shape[1]
            if index.ntotal != len(ids[1]) or (isinstance(width, int) and width != index.d):
                raise CheckpointError(f"{directory}: {INDEX_FILE} does not fit {ONNX_FILE} and {IDS_FILE}")
        return cls(directory, manifest, session, index, seen, ids)

    # ------------------------------------------------------------------------------------ lookups
    def user_row(self, external_id: str) -> int:
        try:
            return self._rows[str(external_id)]
        except KeyError:
            raise UnknownUser(external_id) from None

    def _check_rows(self, user_rows: np.ndarray | Sequence[int]) -> np.ndarray:
        rows = np.asarray(user_rows)
        if rows.ndim != 1 or not (np.issubdtype(rows.dtype, np.integer) or rows.size == 0):
            raise ValueError(f"user_rows must be a 1-D integer array, got {rows.dtype} of shape {rows.shape}")
        rows = rows.astype(np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_users):
            raise ValueError(f"user rows must lie in 0..{self.n_users - 1}")
        return rows

    def _run(self, rows: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(self.session.run(None, {self._input: rows})[0], dtype=np.float32)

    def user_vectors(self, user_rows: np.ndarray) -> np.ndarray:
        """float32[b, d] from the ONNX user tower (vectors mode only)."""
        if self.mode != "vectors":
            raise ValueError("a scores-mode artifact has no user vectors")
        rows = self._check_rows(user_rows)
        parts = [self._run(rows[start : start + 4096]) for start in range(0, len(rows), 4096)]
        return np.concatenate(parts) if parts else np.zeros((0, self.index.d), dtype=np.float32)

    # ------------------------------------------------------------------------------------ ranking
    def _candidates(self, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The best k (ids, scores) of each row, best first, nothing excluded yet."""
        if self.mode == "vectors":
            scores, ids = faiss_index.search(self.index, self._run(rows), k)
            return ids, scores
        scores = self._run(rows)
        if scores.shape != (len(rows), self.n_items):
            raise ValueError(f"the scores model returned {scores.shape}, expected ({len(rows)}, {self.n_items})")
        if k < self.n_items:
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        else:
            top = np.broadcast_to(np.arange(self.n_items), scores.shape)
        top_scores = np.take_along_axis(scores, top, 1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        return np.take_along_axis(top, order, 1).astype(np.int64), np.take_along_axis(top_scores, order, 1)

    def _top(self, rows: np.ndarray, n: int, excluded: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Top n per row minus the items in ``excluded`` (sorted keys row*n_items+item); -1/-inf pads."""
        out_ids = np.full((len(rows), n), -1, dtype=np.int64)
        out_scores = np.full((len(rows), n), -np.inf, dtype=np.float32)
        if len(rows) == 0:
            return out_ids, out_scores
        counts = np.searchsorted(excluded, (rows + 1) * self.n_items) - np.searchsorted(excluded, rows * self.n_items)
        k = min(n + int(counts.max(initial=0)), self.n_items)
        per_chunk = max(1, CHUNK_SCORES // (self.n_items if self.mode == "scores" else k))
        for start in range(0, len(rows), per_chunk):
            part = rows[start : start + per_chunk]
            ids, scores = self._candidates(part, k)
            keep = (ids >= 0) & ~_member(part[:, None] * self.n_items + ids, excluded)
            rank = np.cumsum(keep, axis=1) - 1
            r, c = np.nonzero(keep & (rank < n))
            out_ids[start + r, rank[r, c]] = ids[r, c]
            out_scores[start + r, rank[r, c]] = scores[r, c]
        return out_ids, out_scores

    def recommend(self, user_rows: np.ndarray, n: int, exclude_seen: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(items int64[b, n], scores float32[b, n]) best first; -1/-inf where fewer than n remain."""
        rows = self._check_rows(user_rows)
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 1 <= n <= self.n_items:
            raise ValueError(f"n must be an integer in 1..{self.n_items}, got {n!r}")
        excluded = self._seen_keys if exclude_seen else _csr_keys(np.zeros(1, dtype=np.int64), np.zeros(0), 1)
        return self._top(rows, int(n), excluded)

    def evaluate(
        self, dataset: Dataset, split: str = "test", ks: Sequence[int] = (10, 20), batch: int = 1024
    ) -> dict[str, float]:
        """Recall/NDCG@K through the served path, strict protocol, same definitions as rcekd.metrics."""
        if (dataset.n_users, dataset.n_items) != (self.n_users, self.n_items):
            shapes = f"{dataset.n_users}×{dataset.n_items}, the artifact {self.n_users}×{self.n_items}"
            raise ValueError(f"dataset has {shapes} users×items")
        max_k = max(ks)
        if min(ks) < 1 or max_k > self.n_items:
            raise ValueError(f"every K must lie in 1..{self.n_items}, got {list(ks)}")
        mask = mask_matrix(dataset, split, "strict").tocsr()
        excluded = _csr_keys(mask.indptr, mask.indices, self.n_items)
        truth = dataset.csr(split)
        truth_keys = _csr_keys(truth.indptr, truth.indices, self.n_items)
        n_relevant = np.diff(truth.indptr)
        evaluated = np.flatnonzero(n_relevant > 0)
        discounts = 1.0 / np.log2(np.arange(2, max_k + 2, dtype=np.float64))
        ideal = np.concatenate([[0.0], discounts.cumsum()])
        results: dict[str, list[np.ndarray]] = {f"{m}@{k}": [] for k in ks for m in ("recall", "ndcg")}
        for start in range(0, len(evaluated), batch):
            rows = evaluated[start : start + batch]
            ids, _ = self._top(rows, max_k, excluded)
            hits = ((ids >= 0) & _member(rows[:, None] * self.n_items + ids, truth_keys)).astype(np.float64)
            rel = n_relevant[rows].astype(np.float64)
            for k in ks:
                results[f"recall@{k}"].append(hits[:, :k].sum(1) / rel)
                dcg = (hits[:, :k] * discounts[:k]).sum(1)
                results[f"ndcg@{k}"].append(dcg / ideal[np.minimum(n_relevant[rows], k)])
        return {name: float(np.concatenate(v).mean()) if v else 0.0 for name, v in results.items()}

    # ------------------------------------------------------------------------------------ reports
    def latency(
        self, user_rows: np.ndarray, repeats: int = 200, batch_size: int = 1, n: int = 20, warmup: int = 5
    ) -> dict[str, float]:
        """Per-call model latency (ONNX + search + filter) in ms; no HTTP, no JSON."""
        rows = self._check_rows(user_rows)
        if len(rows) == 0 or repeats < 1 or batch_size < 1:
            raise ValueError("latency needs at least one user, repeats >= 1 and batch_size >= 1")
        n = min(n, self.n_items)
        offsets = np.arange(batch_size)
        times = np.empty(repeats)
        for call in range(-warmup, repeats):
            batch = rows[(call * batch_size + offsets) % len(rows)]
            start = time.perf_counter()
            self.recommend(batch, n)
            if call >= 0:
                times[call] = (time.perf_counter() - start) * 1e3
        stats = dict(zip(("p50_ms", "p95_ms", "p99_ms"), np.percentile(times, [50, 95, 99]).tolist(), strict=True))
        return {**stats, "mean_ms": float(times.mean()), "calls": repeats, "batch_size": batch_size, "n": n}

    def file_sizes(self) -> dict[str, int]:
        files = sorted(path for path in self.directory.rglob("*") if path.is_file())
        return {str(path.relative_to(self.directory)): path.stat().st_size for path in files}
