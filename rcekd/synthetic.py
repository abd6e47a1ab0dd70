"""A synthetic dataset for the embedded demo, written in the ``u i1 i2 ...`` format.

Users and items fall into latent clusters, each user's history mostly from their own cluster with a
popularity skew, so a teacher learns something real and a student can be seen to lose or keep it.
Generated vectorised; the same seed writes the same files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_synthetic(
    directory: str | Path,
    n_users: int = 3000,
    n_items: int = 1500,
    n_clusters: int = 12,
    mean_length: int = 30,
    own_share: float = 0.85,
    seed: int = 0,
) -> Path:
    """Write train/valid/test splits (8:1:1 per user, last items held out) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    item_cluster = rng.integers(0, n_clusters, n_items)
    popularity = rng.pareto(1.5, n_items) + 1.0
    user_cluster = rng.integers(0, n_clusters, n_users)
    lengths = np.clip(rng.poisson(mean_length, n_users), 10, n_items // 2)
    # Gumbel top-k per user: sampling without replacement, weighted by popularity × cluster affinity
    affinity = np.where(item_cluster[None, :] == user_cluster[:, None], own_share, 1 - own_share)
    keys = np.log(affinity * popularity[None, :]) - np.log(-np.log(rng.random((n_users, n_items))))
    order = np.argsort(-keys, axis=1)
    lines: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    n_held = np.maximum(1, np.round(0.1 * lengths)).astype(int)
    for split in lines:  # three splits, each a handful of array slices per user row
        start = {"train": 0, "valid": lengths - 2 * n_held, "test": lengths - n_held}[split]
        stop = {"train": lengths - 2 * n_held, "valid": lengths - n_held, "test": lengths}[split]
        start = np.broadcast_to(start, lengths.shape)
        lines[split] = [
            f"{user} {' '.join(map(str, order[user, a:b]))}\n"
            for user, (a, b) in enumerate(zip(start, stop, strict=True))
        ]
    for split, rows in lines.items():
        (directory / f"{split}.txt").write_text("".join(rows))
    return directory
