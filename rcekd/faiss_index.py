"""The one adapter at the FAISS boundary: every array is checked here, before it reaches native code.

FAISS takes raw pointers: a float64 or non-contiguous array, a wrong width or an int32 id array is
either rejected with an opaque SWIG error or silently misread. So every call into FAISS in rcekd goes
through these functions, which check dtype, layout and shape and say what was wrong.

Every index is inner product (score = user · item) and its ids are the item rows 0..n_items-1:
flat/hnsw/sq8 are wrapped in ``IndexIDMap2`` and IVF carries ids itself.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import faiss
import numpy as np

KINDS = ("flat", "hnsw", "ivf", "sq8")
_OPTIONS = {"flat": (), "hnsw": ("M", "ef_search", "ef_construction"), "ivf": ("nlist", "nprobe"), "sq8": ()}


def _matrix(array: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    """float32, C-contiguous, 2-D, finite (FAISS would read anything else wrongly or crash)."""
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n, d], got shape {array.shape}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (use np.ascontiguousarray)")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{name} has width {array.shape[1]}, the index holds vectors of width {dim}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


def index_options(kind: str, n_items: int, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options an index of ``kind`` over ``n_items`` vectors is built with, defaults filled in."""
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}; expected one of {KINDS}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(_OPTIONS[kind]))
    if unknown:
        raise ValueError(f"index kind {kind!r} takes options {list(_OPTIONS[kind])}, got unknown {unknown}")
    if kind == "hnsw":
        resolved = {"M": 32, "ef_search": 64, "ef_construction": 64, **options}
    elif kind == "ivf":
        # k-means wants ≥ 39 training points per centroid; √n lists is FAISS's rule of thumb
        nlist = options.get("nlist", max(1, min(int(4 * math.sqrt(n_items)), n_items // 39)))
        resolved = {"nlist": nlist, "nprobe": options.get("nprobe", min(nlist, 8))}
    else:
        resolved = {}
    for name, value in resolved.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"index option {name} must be a positive integer, got {value!r}")
    if kind == "ivf" and resolved["nlist"] > n_items:
        raise ValueError(f"ivf needs nlist <= n_items ({n_items}), got {resolved['nlist']}")
    return resolved


def build_index(item_vectors: np.ndarray, kind: str = "flat", **options: Any) -> faiss.Index:
    """An inner-product index over the item vectors whose ids are their row numbers."""
    vectors = _matrix(item_vectors, "item_vectors")
    n, dim = vectors.shape
    if n == 0:
        raise ValueError("item_vectors is empty")
    opts = index_options(kind, n, options)
    metric = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        index = faiss.index_factory(dim, "IDMap2,Flat", metric)
    elif kind == "hnsw":
        index = faiss.index_factory(dim, f"IDMap2,HNSW{opts['M']}", metric)
        faiss.downcast_index(index.index).hnsw.efConstruction = opts["ef_construction"]
    elif kind == "ivf":
        index = faiss.index_factory(dim, f"IVF{opts['nlist']},Flat", metric)
    else:
        index = faiss.index_factory(dim, "IDMap2,SQ8", metric)
    if not index.is_trained:
        index.train(vectors)
    index.add_with_ids(vectors, np.arange(n, dtype=np.int64))
    if kind == "hnsw":
        faiss.downcast_index(index.index).hnsw.efSearch = opts["ef_search"]
    elif kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = opts["nprobe"]
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores float32[b, k], ids int64[b, k]) best first; missing results are id -1, score -inf."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    queries = _matrix(queries, "queries", index.d)
    if len(queries) == 0:
        return np.zeros((0, int(k)), dtype=np.float32), np.zeros((0, int(k)), dtype=np.int64)
    scores, ids = index.search(queries, int(k))
    scores = np.where(ids < 0, np.float32(-np.inf), scores).astype(np.float32, copy=False)
    return scores, ids.astype(np.int64, copy=False)


def save_index(index: faiss.Index, path: str | Path) -> None:
    try:
        faiss.write_index(index, str(path))
    except RuntimeError as exc:
        raise ValueError(f"{path}: cannot write the FAISS index ({exc})") from exc


def load_index(path: str | Path) -> faiss.Index:
    """Read an index file; FAISS's own RuntimeError (with C++ source lines) becomes one clear line."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such FAISS index file")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a readable FAISS index ({reason})") from exc
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError(f"{path}: the index is not inner-product (metric {index.metric_type})")
    return index


def recall_against_flat(index: faiss.Index, item_vectors: np.ndarray, queries: np.ndarray, k: int = 20) -> float:
    """Fraction of the exact top-k (a flat index over the same vectors) that ``index`` also returns."""
    vectors = _matrix(item_vectors, "item_vectors", index.d)
    k = min(int(k), len(vectors))
    _, exact = search(build_index(vectors, "flat"), queries, k)
    _, approx = search(index, queries, k)
    if exact.size == 0:
        return 1.0
    rows = np.arange(len(exact), dtype=np.int64)[:, None]
    exact_keys = np.sort((rows * len(vectors) + exact).ravel())
    found = approx >= 0
    hits = np.isin((rows * len(vectors) + approx)[found], exact_keys, assume_unique=True)
    return float(hits.sum() / exact.size)
