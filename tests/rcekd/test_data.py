"""The dataset loader: formats, the validation carve-out, the fingerprint and every error message."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from rcekd.data import SPLITS, DataError, Dataset, Interactions, carve_validation, load_dataset
from tests.conftest import TinyData, write_rows


def rows_of(part: Interactions) -> dict[int, list[int]]:
    """user → items (in stored order) for every user with at least one item."""
    return {
        user: part.items[part.indptr[user] : part.indptr[user + 1]].tolist()
        for user in range(part.n_users)
        if part.indptr[user + 1] > part.indptr[user]
    }


def write_dir(directory: Path, **files: str) -> Path:
    """A dataset directory from raw file contents (``train_txt="0 1 2\\n"`` → ``train.txt``)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".")).write_text(text)
    return directory


# ------------------------------------------------------------------------------ the u i1 i2 ... format


def test_directory_counts_match_the_generated_files(tiny_dataset: Dataset, tiny_data: TinyData) -> None:
    assert tiny_dataset.n_users == tiny_data.n_users
    assert tiny_dataset.n_items == 1 + max(i for rows in tiny_data.rows.values() for r in rows.values() for i in r)
    for split in SPLITS:
        expected = sum(len(items) for items in tiny_data.rows[split].values())
        assert tiny_dataset.split(split).nnz == expected
    assert not tiny_dataset.valid_carved
    assert tiny_dataset.valid_seed is None


def test_every_split_keeps_each_users_items_in_file_order(tiny_dataset: Dataset, tiny_data: TinyData) -> None:
    for split in SPLITS:  # test.txt is gzip'd, so this also covers the .gz reader
        assert rows_of(tiny_dataset.split(split)) == tiny_data.rows[split]


def test_csr_views_have_the_dataset_shape_and_the_same_pairs(tiny_dataset: Dataset) -> None:
    for split in SPLITS:
        matrix = tiny_dataset.csr(split)
        part = tiny_dataset.split(split)
        assert matrix.shape == (tiny_dataset.n_users, tiny_dataset.n_items)
        assert matrix.nnz == part.nnz
        assert set(zip(*matrix.nonzero(), strict=True)) == set(zip(part.users(), part.items, strict=True))
        assert np.all(matrix.data == 1)


def test_meta_json_overrides_the_observed_counts(tmp_path: Path) -> None:
    directory = write_dir(tmp_path / "d", train_txt="0 1 2\n1 3\n", test_txt="0 4\n1 0\n")
    (directory / "meta.json").write_text(json.dumps({"n_users": 7, "n_items": 12}))
    dataset = load_dataset(directory)
    assert (dataset.n_users, dataset.n_items) == (7, 12)
    assert dataset.csr("train").shape == (7, 12)
    assert dataset.train.n_users == 7
    assert dataset.train.lengths().tolist() == [2, 1, 0, 0, 0, 0, 0]


def test_unknown_split_name_is_refused(tiny_dataset: Dataset) -> None:
    with pytest.raises(ValueError, match="bogus"):
        tiny_dataset.split("bogus")


def test_gzip_and_plain_files_give_the_same_fingerprint(tmp_path: Path, tiny_data: TinyData) -> None:
    directory = tmp_path / "plain"
    directory.mkdir()
    for split in SPLITS:
        write_rows(directory / f"{split}.txt", tiny_data.rows[split])
    assert load_dataset(directory).fingerprint == load_dataset(tiny_data.directory).fingerprint


def test_fingerprint_changes_when_any_interaction_changes(tmp_path: Path, tiny_data: TinyData) -> None:
    reference = load_dataset(tiny_data.directory).fingerprint
    for split in SPLITS:
        rows = {user: list(items) for user, items in tiny_data.rows[split].items()}
        user = 17
        rows[user][-1] = next(i for i in range(tiny_data.n_items) if i not in rows[user])
        directory = tmp_path / split
        directory.mkdir()
        for other in SPLITS:
            write_rows(directory / f"{other}.txt", rows if other == split else tiny_data.rows[other])
        assert load_dataset(directory).fingerprint != reference, f"a changed {split} item kept the fingerprint"


def test_fingerprint_changes_when_an_item_moves_between_splits(tiny_dataset: Dataset) -> None:
    train, test = rows_of(tiny_dataset.train), rows_of(tiny_dataset.test)
    moved = test[0].pop()
    train[0].append(moved)
    changed = dataclasses.replace(
        tiny_dataset,
        train=Interactions.from_rows({u: np.array(v) for u, v in train.items()}, tiny_dataset.n_users),
        test=Interactions.from_rows({u: np.array(v) for u, v in test.items()}, tiny_dataset.n_users),
    )
    assert changed.train.nnz + changed.test.nnz == tiny_dataset.train.nnz + tiny_dataset.test.nnz
    assert changed.fingerprint != tiny_dataset.fingerprint


# ------------------------------------------------------------------------------ validation carve-out


def ragged(lengths: list[int], seed: int = 0, n_items: int = 100) -> Interactions:
    rng = np.random.default_rng(seed)
    rows = {user: rng.choice(n_items, size=length, replace=False) for user, length in enumerate(lengths)}
    return Interactions.from_rows(rows, len(lengths))


def test_carve_out_moves_about_ten_percent_of_each_users_items() -> None:
    lengths = [*range(0, 41), 100]
    train, valid = carve_validation(ragged(lengths), seed=3)
    expected = [min(int(np.floor(0.1 * n + 0.5)), max(n - 1, 0)) for n in lengths]
    assert valid.lengths().tolist() == expected
    assert (train.lengths() + valid.lengths()).tolist() == lengths
    assert valid.nnz / sum(lengths) == pytest.approx(0.1, abs=0.02)


def test_carve_out_leaves_every_user_at_least_one_training_item() -> None:
    lengths = [1, 1, 2, 3, 5, 9, 10, 11, 20]
    train, _ = carve_validation(ragged(lengths), seed=0, fraction=0.9)
    assert np.all(train.lengths() >= 1)


def test_carve_out_partitions_each_users_training_items() -> None:
    original = ragged([3, 8, 12, 15, 27, 1, 0, 40], seed=5)
    train, valid = carve_validation(original, seed=11)
    before, after, carved = rows_of(original), rows_of(train), rows_of(valid)
    for user, items in before.items():
        kept, moved = after.get(user, []), carved.get(user, [])
        assert not set(kept) & set(moved)
        assert sorted(kept + moved) == sorted(items)
        assert kept == [i for i in items if i in set(kept)], "the kept items lost their order"


def test_carved_dataset_covers_the_original_training_file(tiny_dataset_carved: Dataset, tiny_data: TinyData) -> None:
    assert tiny_dataset_carved.valid_carved
    assert tiny_dataset_carved.valid_seed == 0
    train, valid = rows_of(tiny_dataset_carved.train), rows_of(tiny_dataset_carved.valid)
    for user in range(tiny_data.n_users):
        original = tiny_data.rows["train"][user] + tiny_data.rows["valid"][user]
        assert sorted(train[user] + valid.get(user, [])) == sorted(original)
        assert not set(train[user]) & set(valid.get(user, []))
    assert tiny_dataset_carved.valid.nnz > 0


def test_same_carve_seed_gives_the_same_split_and_fingerprint(tiny_dataset_dir_no_valid: Path) -> None:
    first = load_dataset(tiny_dataset_dir_no_valid, valid_seed=4)
    second = load_dataset(tiny_dataset_dir_no_valid, valid_seed=4)
    for split in SPLITS:
        assert np.array_equal(first.split(split).indptr, second.split(split).indptr)
        assert np.array_equal(first.split(split).items, second.split(split).items)
    assert first.fingerprint == second.fingerprint


def test_different_carve_seed_gives_another_split_and_fingerprint(tiny_dataset_dir_no_valid: Path) -> None:
    first = load_dataset(tiny_dataset_dir_no_valid, valid_seed=4)
    second = load_dataset(tiny_dataset_dir_no_valid, valid_seed=5)
    assert rows_of(first.valid) != rows_of(second.valid)
    assert first.fingerprint != second.fingerprint


def test_carve_seed_is_part_of_the_fingerprint_even_for_an_identical_split() -> None:
    # one item per user: nothing can be carved, whatever the seed
    train = Interactions.from_rows({0: np.array([1]), 1: np.array([0])}, 2)
    test = Interactions.from_rows({0: np.array([0]), 1: np.array([1])}, 2)
    datasets = []
    for seed in (0, 1):
        kept, valid = carve_validation(train, seed)
        datasets.append(Dataset("d", 2, 2, kept, valid, test, valid_carved=True, valid_seed=seed))
    assert rows_of(datasets[0].train) == rows_of(datasets[1].train)
    assert datasets[0].fingerprint != datasets[1].fingerprint


# ------------------------------------------------------------------------------ CSV / TSV tables

# alice's rows are out of time order; (alice, book-3) repeats later; bob's t=5 tie keeps file order
TABLE = [
    ("alice", "book-7", 70),
    ("alice", "book-1", 10),
    ("bob", "007", 5),
    ("alice", "book-3", 30),
    ("alice", "book-9", 90),
    ("alice", "book-2", 20),
    ("bob", "book-1", 5),
    ("alice", "book-10", 100),
    ("alice", "book-4", 40),
    ("alice", "book-3", 95),
    ("alice", "book-5", 50),
    ("bob", "book-2", 1),
    ("alice", "book-8", 80),
    ("bob", "book-9", 9),
    ("carol", "book-5", 3),
    ("alice", "book-6", 60),
    ("bob", "book-4", 2),
]


def write_table(path: Path, delimiter: str, header: bool = True) -> Path:
    lines = [delimiter.join(("user", "item", "timestamp"))] if header else []
    lines += [delimiter.join((user, item, str(stamp))) for user, item, stamp in TABLE]
    path.write_text("\n".join(lines) + "\n")
    return path


def named_rows(dataset: Dataset, split: str) -> dict[str, list[str]]:
    assert dataset.user_ids is not None and dataset.item_ids is not None
    return {
        dataset.user_ids[user]: [dataset.item_ids[i] for i in items]
        for user, items in rows_of(dataset.split(split)).items()
    }


@pytest.mark.parametrize(("name", "delimiter"), [("events.csv", ","), ("events.tsv", "\t")])
def test_table_is_split_eight_one_one_in_time_order(tmp_path: Path, name: str, delimiter: str) -> None:
    dataset = load_dataset(write_table(tmp_path / name, delimiter))
    alice = [f"book-{n}" for n in range(1, 11)]  # by timestamp; the repeat of book-3 is dropped
    assert named_rows(dataset, "train") == {
        "alice": alice[:8],
        "bob": ["book-2", "book-4", "007", "book-1"],
        "carol": ["book-5"],
    }
    assert named_rows(dataset, "valid") == {"alice": ["book-9"]}
    assert named_rows(dataset, "test") == {"alice": ["book-10"], "bob": ["book-9"]}
    assert dataset.name == "events"


def test_table_drops_repeated_pairs(tmp_path: Path) -> None:
    dataset = load_dataset(write_table(tmp_path / "events.csv", ","))
    distinct = {(user, item) for user, item, _ in TABLE}
    assert sum(dataset.split(split).nnz for split in SPLITS) == len(distinct) == len(TABLE) - 1


def test_table_ids_map_back_to_the_callers_strings(tmp_path: Path) -> None:
    dataset = load_dataset(write_table(tmp_path / "events.csv", ",", header=False))
    assert dataset.user_ids is not None and dataset.item_ids is not None
    assert sorted(dataset.user_ids) == ["alice", "bob", "carol"]
    assert len(set(dataset.item_ids)) == dataset.n_items == len({item for _, item, _ in TABLE})
    assert "007" in dataset.item_ids  # kept as a string, not read as the number 7
    pairs = set()
    for split in SPLITS:
        part = dataset.split(split)
        pairs |= {(dataset.user_ids[u], dataset.item_ids[i]) for u, i in zip(part.users(), part.items, strict=True)}
    assert pairs == {(user, item) for user, item, _ in TABLE}


def test_table_without_timestamps_keeps_file_order(tmp_path: Path) -> None:
    path = tmp_path / "plain.csv"
    path.write_text("".join(f"u1,{item}\n" for item in "jihgfedcba"))
    dataset = load_dataset(path)
    assert named_rows(dataset, "train") == {"u1": list("jihgfedc")}
    assert named_rows(dataset, "valid") == {"u1": ["b"]}
    assert named_rows(dataset, "test") == {"u1": ["a"]}


# ------------------------------------------------------------------------------ errors


def test_non_integer_token_names_file_line_and_token(tmp_path: Path) -> None:
    directory = write_dir(tmp_path / "d", train_txt="0 1 2\n1 2 3\n2 4 x5\n", test_txt="0 3\n")
    with pytest.raises(DataError, match="x5") as caught:
        load_dataset(directory)
    assert f"{directory / 'train.txt'}:3:" in str(caught.value)


@pytest.mark.parametrize("token", ["99999999999999999999", "--5"])
def test_out_of_range_or_malformed_digit_token_is_a_data_error(tmp_path: Path, token: str) -> None:
    directory = write_dir(tmp_path / "d", train_txt=f"0 1 2\n1 {token} 3\n", test_txt="0 3\n")
    with pytest.raises(DataError) as caught:
        load_dataset(directory)
    assert f"{directory / 'train.txt'}:2:" in str(caught.value)


def test_negative_id_names_file_and_line(tmp_path: Path) -> None:
    directory = write_dir(tmp_path / "d", train_txt="0 1 2\n", test_txt="0 3\n\n1 -4\n")
    with pytest.raises(DataError, match="negative id -4") as caught:
        load_dataset(directory)
    assert f"{directory / 'test.txt'}:3:" in str(caught.value)


def test_duplicate_user_line_names_file_and_line(tmp_path: Path) -> None:
    directory = write_dir(tmp_path / "d", train_txt="0 1 2\n1 2\n0 3\n", test_txt="0 4\n")
    with pytest.raises(DataError, match="user 0 appears on more than one line") as caught:
        load_dataset(directory)
    assert f"{directory / 'train.txt'}:3:" in str(caught.value)


def test_item_listed_twice_on_a_line_names_file_and_line(tmp_path: Path) -> None:
    directory = write_dir(tmp_path / "d", train_txt="0 1 2 1\n", test_txt="0 4\n")
    with pytest.raises(DataError, match="lists an item twice") as caught:
        load_dataset(directory)
    assert f"{directory / 'train.txt'}:1:" in str(caught.value)


def test_item_beyond_declared_n_items_names_file_and_id(tmp_path: Path) -> None:
    directory = write_dir(tmp_path / "d", train_txt="0 1 2\n1 9 3\n", test_txt="0 4\n")
    (directory / "meta.json").write_text(json.dumps({"n_users": 2, "n_items": 8}))
    with pytest.raises(DataError, match="item id 9 >= n_items=8") as caught:
        load_dataset(directory)
    assert str(directory / "train.txt") in str(caught.value)


def test_item_beyond_declared_n_items_names_the_line(tmp_path: Path) -> None:
    directory = write_dir(tmp_path / "d", train_txt="0 1 2\n1 9 3\n", test_txt="0 4\n")
    (directory / "meta.json").write_text(json.dumps({"n_users": 2, "n_items": 8}))
    with pytest.raises(DataError) as caught:
        load_dataset(directory)
    assert f"{directory / 'train.txt'}:2:" in str(caught.value)


def test_user_beyond_declared_n_users_is_refused(tmp_path: Path) -> None:
    directory = write_dir(tmp_path / "d", train_txt="0 1 2\n", test_txt="5 4\n")
    (directory / "meta.json").write_text(json.dumps({"n_users": 3, "n_items": 8}))
    with pytest.raises(DataError, match="user id 5 is beyond the declared n_users=3") as caught:
        load_dataset(directory)
    assert str(directory / "test.txt") in str(caught.value)


def test_empty_train_file_is_refused(tmp_path: Path) -> None:
    directory = write_dir(tmp_path / "d", train_txt="\n\n", test_txt="0 4\n")
    with pytest.raises(DataError, match="holds no interactions") as caught:
        load_dataset(directory)
    assert str(directory / "train.txt") in str(caught.value)


def test_missing_test_file_is_named(tmp_path: Path) -> None:
    directory = write_dir(tmp_path / "d", train_txt="0 1 2\n", valid_txt="0 3\n")
    with pytest.raises(DataError, match="no test file") as caught:
        load_dataset(directory)
    assert str(directory) in str(caught.value)


def test_nonexistent_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="no such file or directory") as caught:
        load_dataset(missing)
    assert str(missing) in str(caught.value)


def test_file_of_unknown_kind_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "events.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"\.csv/\.tsv"):
        load_dataset(path)


def test_corrupt_gzip_is_a_data_error(tmp_path: Path) -> None:
    directory = write_dir(tmp_path / "d", train_txt="0 1 2\n")
    (directory / "test.txt.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read") as caught:
        load_dataset(directory)
    assert str(directory / "test.txt.gz") in str(caught.value)


def test_csv_with_wrong_field_count_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text("user,item\nu1,i1\nu1,i2,5,extra\n")
    with pytest.raises(DataError, match="got 4 fields") as caught:
        load_dataset(path)
    assert f"{path}:3:" in str(caught.value)


def test_csv_with_non_numeric_timestamp_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "events.tsv"
    path.write_text("u1\ti1\t1\nu1\ti2\tyesterday\n")
    with pytest.raises(DataError, match="'yesterday' is not a number") as caught:
        load_dataset(path)
    assert f"{path}:2:" in str(caught.value)


def test_csv_with_only_a_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text("user,item,timestamp\n")
    with pytest.raises(DataError, match="holds no interactions"):
        load_dataset(path)


@pytest.mark.parametrize(
    ("name", "content"),
    [("latin1.csv", "user,item\njérôme,i1\n".encode("latin-1")), ("broken.csv.gz", b"not gzip at all")],
    ids=["latin-1", "corrupt-gzip"],
)
def test_unreadable_table_is_a_data_error_naming_the_file(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_dataset(path)
    assert str(path) in str(caught.value)
