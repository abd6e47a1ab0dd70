"""Datasets: loading, validation carve-out, CSR views and the fingerprint that ties models to data.

Two input shapes are accepted:

* a directory with ``train``, optional ``valid`` and ``test`` files in the ``u i1 i2 ...`` format
  (plain or ``.gz``; optional ``meta.json`` with ``n_users`` / ``n_items``), ids 0-based;
* a CSV/TSV file of ``user,item[,timestamp]`` with the caller's own ids, which are remapped to
  0-based rows; each user's items are split 8:1:1 in time (or file) order.

Every error names the file and the line, because a user debugging a 1 GB upload needs both.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import scipy.sparse as sp

SPLITS = ("train", "valid", "test")
READ_ERRORS = (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile)


class DataError(ValueError):
    """A dataset file is malformed; the message names the file and, where it applies, the line."""


@dataclass(frozen=True)
class Interactions:
    """A ragged user → items table in CSR layout; items keep their given (time) order per user."""

    indptr: np.ndarray  # int64[n_users + 1]
    items: np.ndarray  # int64[nnz]

    @property
    def n_users(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return len(self.items)

    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def users(self) -> np.ndarray:
        """The user of each stored interaction (COO row index)."""
        return np.repeat(np.arange(self.n_users, dtype=np.int64), self.lengths())

    def to_csr(self, n_items: int) -> sp.csr_matrix:
        matrix = sp.csr_matrix(
            (np.ones(self.nnz, dtype=np.float32), self.items.copy(), self.indptr.copy()),
            shape=(self.n_users, n_items),
        )
        matrix.sort_indices()
        return matrix

    @staticmethod
    def from_rows(rows: dict[int, np.ndarray], n_users: int) -> Interactions:
        lengths = np.zeros(n_users, dtype=np.int64)
        for user, items in rows.items():
            lengths[user] = len(items)
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ordered = [rows[u] for u in sorted(rows)]
        items = np.concatenate(ordered).astype(np.int64) if ordered else np.zeros(0, dtype=np.int64)
        return Interactions(indptr, items)

    @staticmethod
    def from_pairs(users: np.ndarray, items: np.ndarray, n_users: int) -> Interactions:
        """Pairs must already be grouped in the wanted per-user order (a stable sort by user keeps it)."""
        order = np.argsort(users, kind="stable")
        counts = np.bincount(users, minlength=n_users)
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return Interactions(indptr, items[order].astype(np.int64))


@dataclass(frozen=True)
class Dataset:
    name: str
    n_users: int
    n_items: int
    train: Interactions
    valid: Interactions
    test: Interactions
    valid_carved: bool = False
    valid_seed: int | None = None
    user_ids: list[str] | None = field(default=None, repr=False)  # external id of each row
    item_ids: list[str] | None = field(default=None, repr=False)

    def split(self, name: str) -> Interactions:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def csr(self, name: str) -> sp.csr_matrix:
        return self._csr[name]

    @cached_property
    def _csr(self) -> dict[str, sp.csr_matrix]:
        return {name: self.split(name).to_csr(self.n_items) for name in SPLITS}

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of everything that defines the splits (and the carve-out seed, if one was used)."""
        digest = hashlib.sha256()
        digest.update(f"rcekd-dataset-v1 {self.n_users} {self.n_items}".encode())
        for name in SPLITS:
            part = self.split(name)
            digest.update(name.encode())
            digest.update(part.indptr.astype("<i8").tobytes())
            digest.update(part.items.astype("<i8").tobytes())
        digest.update(f"valid-carve:{self.valid_seed if self.valid_carved else 'none'}".encode())
        return digest.hexdigest()

    def summary(self) -> dict:
        return {
            "name": self.name,
            "n_users": self.n_users,
            "n_items": self.n_items,
            **{f"{name}_interactions": self.split(name).nnz for name in SPLITS},
            "valid_carved": self.valid_carved,
            "valid_seed": self.valid_seed,
            "fingerprint": self.fingerprint,
        }


# ---------------------------------------------------------------------------------------------- reading


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _find_split_file(directory: Path, split: str) -> Path | None:
    for candidate in (f"{split}.txt", f"{split}.txt.gz", split, f"{split}.gz"):
        path = directory / candidate
        if path.is_file():
            return path
    return None


def _bad_token(tokens: list[str]) -> str:
    """The first token that is not an int64 (numpy does not say which one failed)."""
    for token in tokens:
        try:
            if -(2**63) <= int(token) < 2**63:
                continue
        except ValueError:
            pass
        return token
    return " ".join(tokens)


@dataclass
class UserLines:
    """Parsed ``u i1 i2 ...`` lines: items per user, and each user's line number for error messages."""

    path: Path
    rows: dict[int, np.ndarray]
    line_of: dict[int, int]


def read_user_lines(path: Path) -> UserLines:
    """Parse ``u i1 i2 ...`` lines; the error names the file, the line and the offending token."""
    rows: dict[int, np.ndarray] = {}
    line_of: dict[int, int] = {}
    try:
        with _open_text(path) as handle:
            for line_no, line in enumerate(handle, start=1):
                tokens = line.split()
                if not tokens:
                    continue
                try:
                    values = np.array(tokens, dtype=np.int64)
                except (ValueError, OverflowError):
                    raise DataError(f"{path}:{line_no}: {_bad_token(tokens)!r} is not an integer id") from None
                if (values < 0).any():
                    raise DataError(f"{path}:{line_no}: negative id {int(values[values < 0][0])}")
                user, items = int(values[0]), values[1:]
                if user in rows:
                    raise DataError(f"{path}:{line_no}: user {user} appears on more than one line")
                if len(np.unique(items)) != len(items):
                    raise DataError(f"{path}:{line_no}: user {user} lists an item twice")
                rows[user] = items
                line_of[user] = line_no
    except READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    return UserLines(path, rows, line_of)


def _check_bounds(lines: UserLines, n_users: int, n_items: int) -> None:
    for user, items in lines.rows.items():
        where = f"{lines.path}:{lines.line_of[user]}"
        if user >= n_users:
            raise DataError(f"{where}: user id {user} is beyond the declared n_users={n_users}")
        if len(items) and items.max() >= n_items:
            raise DataError(f"{where}: user {user} has item id {int(items.max())} >= n_items={n_items}")


def carve_validation(train: Interactions, seed: int, fraction: float = 0.1) -> tuple[Interactions, Interactions]:
    """Move ~``fraction`` of each user's training items (at random, seeded) into a validation split.

    Every user keeps at least one training item. Vectorised: one random key per interaction, ranked
    within its user by a lexsort.
    """
    rng = np.random.default_rng(seed)
    users = train.users()
    lengths = train.lengths()
    n_valid = np.minimum(np.floor(fraction * lengths + 0.5).astype(np.int64), np.maximum(lengths - 1, 0))
    keys = rng.random(train.nnz)
    order = np.lexsort((keys, users))  # grouped by user, random within user
    rank_in_user = np.empty(train.nnz, dtype=np.int64)
    rank_in_user[order] = np.arange(train.nnz) - np.repeat(train.indptr[:-1], lengths)
    to_valid = rank_in_user < n_valid[users]
    keep = ~to_valid  # boolean masks keep the original per-user order
    return (
        Interactions.from_pairs(users[keep], train.items[keep], train.n_users),
        Interactions.from_pairs(users[to_valid], train.items[to_valid], train.n_users),
    )


def _load_directory(directory: Path, name: str, valid_seed: int, valid_fraction: float) -> Dataset:
    paths = {split: _find_split_file(directory, split) for split in SPLITS}
    for required in ("train", "test"):
        if paths[required] is None:
            raise DataError(f"{directory}: no {required} file (looked for {required}.txt[.gz])")
    parsed = {split: read_user_lines(path) for split, path in paths.items() if path is not None}
    rows = {split: lines.rows for split, lines in parsed.items()}
    for split in ("train", "test"):
        if not any(len(items) for items in rows[split].values()):
            raise DataError(f"{paths[split]}: the file holds no interactions")

    meta_path = directory / "meta.json"
    meta: dict = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{meta_path}: invalid JSON ({exc})") from exc
    observed_users = 1 + max(max(r, default=-1) for r in rows.values())
    observed_items = 1 + max(
        (int(items.max()) for r in rows.values() for items in r.values() if len(items)), default=-1
    )
    n_users = int(meta.get("n_users", observed_users))
    n_items = int(meta.get("n_items", observed_items))
    for lines in parsed.values():
        _check_bounds(lines, n_users, n_items)

    parts = {split: Interactions.from_rows(r, n_users) for split, r in rows.items()}
    carved = "valid" not in parts
    if carved:
        parts["train"], parts["valid"] = carve_validation(parts["train"], valid_seed, valid_fraction)
    return Dataset(
        name=name,
        n_users=n_users,
        n_items=n_items,
        train=parts["train"],
        valid=parts["valid"],
        test=parts["test"],
        valid_carved=carved,
        valid_seed=valid_seed if carved else None,
    )


def _load_table(path: Path, name: str) -> Dataset:
    """CSV/TSV of ``user,item[,timestamp]`` with a header or without; ids are the caller's strings."""
    delimiter = "\t" if path.name.endswith((".tsv", ".tsv.gz")) else ","
    users_raw: list[str] = []
    items_raw: list[str] = []
    stamps: list[float] = []
    try:
        _read_table_rows(path, delimiter, users_raw, items_raw, stamps)
    except READ_ERRORS as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    if not users_raw:
        raise DataError(f"{path}: the file holds no interactions")
    return _split_table(path, name, users_raw, items_raw, stamps)


def _read_table_rows(
    path: Path, delimiter: str, users_raw: list[str], items_raw: list[str], stamps: list[float]
) -> None:
    with _open_text(path) as handle:
        for line_no, record in enumerate(csv.reader(handle, delimiter=delimiter), start=1):
            if not record or all(not cell.strip() for cell in record):
                continue
            if line_no == 1 and record[0].strip().lower() in ("user", "user_id", "userid", "u"):
                continue
            if len(record) not in (2, 3):
                raise DataError(f"{path}:{line_no}: expected user,item[,timestamp], got {len(record)} fields")
            user, item = record[0].strip(), record[1].strip()
            if not user or not item:
                raise DataError(f"{path}:{line_no}: empty user or item id")
            stamp = 0.0
            if len(record) == 3:
                try:
                    stamp = float(record[2])
                except ValueError:
                    raise DataError(f"{path}:{line_no}: timestamp {record[2]!r} is not a number") from None
            users_raw.append(user)
            items_raw.append(item)
            stamps.append(stamp)


def _split_table(path: Path, name: str, users_raw: list[str], items_raw: list[str], stamps: list[float]) -> Dataset:
    """Remap ids, order each user's items in time, drop repeats, split 8:1:1 per user."""
    user_ids, users = np.unique(np.array(users_raw), return_inverse=True)
    item_ids, items = np.unique(np.array(items_raw), return_inverse=True)
    n_users, n_items = len(user_ids), len(item_ids)
    # time order within user (file order breaks ties); drop repeats of a (user, item) pair
    order = np.lexsort((np.arange(len(users)), np.array(stamps), users))
    users, items = users[order], items[order]
    _, first = np.unique(users.astype(np.int64) * n_items + items, return_index=True)
    keep = np.sort(first)
    users, items = users[keep].astype(np.int64), items[keep].astype(np.int64)

    counts = np.bincount(users, minlength=n_users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    position = np.arange(len(users)) - starts[users]
    n_train = np.maximum(np.floor(0.8 * counts), 1).astype(np.int64)
    n_train_valid = np.maximum(np.floor(0.9 * counts), n_train).astype(np.int64)
    split_of = np.where(position < n_train[users], 0, np.where(position < n_train_valid[users], 1, 2))
    parts = [Interactions.from_pairs(users[split_of == s], items[split_of == s], n_users) for s in range(3)]
    return Dataset(
        name=name,
        n_users=n_users,
        n_items=n_items,
        train=parts[0],
        valid=parts[1],
        test=parts[2],
        user_ids=[str(u) for u in user_ids],
        item_ids=[str(i) for i in item_ids],
    )


def load_dataset(
    path: str | Path, *, valid_seed: int = 0, valid_fraction: float = 0.1, name: str | None = None
) -> Dataset:
    """Load a dataset directory (``u i1 i2 ...`` files) or a CSV/TSV interaction table."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    dataset_name = name or path.name.split(".")[0]
    if path.is_dir():
        return _load_directory(path, dataset_name, valid_seed, valid_fraction)
    if path.name.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz")):
        return _load_table(path, dataset_name)
    raise DataError(f"{path}: expected a dataset directory or a .csv/.tsv file")
