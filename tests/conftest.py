"""Shared fixtures: a tiny, learnable dataset written in the ``u i1 i2 ...`` format.

40 users in 4 clusters, 60 items in 4 clusters of 15; each user holds 6–15 items, 90 % of them from
their own cluster's items, in a random (per-user) order. The last ~15 % of each user's items are the
test split, the ~15 % before them the validation split. A backbone that learns the clusters beats
random scores by a wide margin on such data, and every epoch takes milliseconds.

(``tests/__init__.py`` exists so that the test package is ``tests.rcekd``, not a second ``rcekd``.)
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from rcekd.data import Dataset, load_dataset

N_USERS = 40
N_ITEMS = 60
N_CLUSTERS = 4

Rows = dict[int, list[int]]


@dataclass(frozen=True)
class TinyData:
    """What the generator wrote, to compare the loader's output against."""

    directory: Path  # train.txt, valid.txt, test.txt.gz
    directory_no_valid: Path  # train.txt (train + valid items) and test.txt: the loader carves valid
    rows: dict[str, Rows]  # split → user → items in file order
    n_users: int = N_USERS
    n_items: int = N_ITEMS


def cluster_rows(seed: int, n_users: int = N_USERS, n_items: int = N_ITEMS) -> dict[str, Rows]:
    """Per-user item lists split into train / valid / test (the test items come last)."""
    rng = np.random.default_rng(seed)
    cluster_items = np.array_split(np.arange(n_items), N_CLUSTERS)
    rows: dict[str, Rows] = {"train": {}, "valid": {}, "test": {}}
    for user in range(n_users):
        own = cluster_items[user % N_CLUSTERS]
        others = np.setdiff1d(np.arange(n_items), own)
        length = int(rng.integers(6, 16))
        n_own = min(len(own), round(0.9 * length))
        items = np.concatenate(
            [rng.choice(own, n_own, replace=False), rng.choice(others, length - n_own, replace=False)]
        )
        items = [int(i) for i in rng.permutation(items)]
        n_held = max(1, round(0.15 * length))
        rows["train"][user] = items[: length - 2 * n_held]
        rows["valid"][user] = items[length - 2 * n_held : length - n_held]
        rows["test"][user] = items[length - n_held :]
    return rows


def format_rows(rows: Rows) -> str:
    return "".join(f"{user} {' '.join(map(str, items))}\n" for user, items in sorted(rows.items()))


def write_rows(path: Path, rows: Rows) -> Path:
    """Write ``u i1 i2 ...`` lines, gzip'd when the name ends in ``.gz``."""
    text = format_rows(rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def pytest_configure(config: pytest.Config) -> None:
    # LightGCN's CSR graph triggers torch's "beta" notices on every build; they say nothing about rcekd
    for text in ("Sparse CSR tensor support is in beta", "Sparse invariant checks are implicitly disabled"):
        config.addinivalue_line("filterwarnings", f"ignore:{text}:UserWarning")


@pytest.fixture(autouse=True, scope="session")
def _single_thread() -> Iterator[None]:
    """Tiny tensors: one thread is faster, deterministic, and polite to a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> TinyData:
    rows = cluster_rows(seed=2024)
    directory = tmp_path_factory.mktemp("tiny")
    write_rows(directory / "train.txt", rows["train"])
    write_rows(directory / "valid.txt", rows["valid"])
    write_rows(directory / "test.txt.gz", rows["test"])

    no_valid = tmp_path_factory.mktemp("tiny_no_valid")
    merged = {user: rows["train"][user] + rows["valid"][user] for user in rows["train"]}
    write_rows(no_valid / "train.txt", merged)
    write_rows(no_valid / "test.txt", rows["test"])
    return TinyData(directory=directory, directory_no_valid=no_valid, rows=rows)


@pytest.fixture(scope="session")
def tiny_dataset_dir(tiny_data: TinyData) -> Path:
    return tiny_data.directory


@pytest.fixture(scope="session")
def tiny_dataset_dir_no_valid(tiny_data: TinyData) -> Path:
    return tiny_data.directory_no_valid


@pytest.fixture(scope="session")
def tiny_dataset(tiny_data: TinyData) -> Dataset:
    """The tiny dataset with its given validation file (treat as read-only: it is shared)."""
    return load_dataset(tiny_data.directory)


@pytest.fixture(scope="session")
def tiny_dataset_carved(tiny_data: TinyData) -> Dataset:
    """The variant without valid.txt: validation carved out of train with seed 0."""
    return load_dataset(tiny_data.directory_no_valid, valid_seed=0)
