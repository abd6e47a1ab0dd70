"""How much of each held-out split no collaborative model can rank: items absent from training.

Usage: python -m benchmarks.cold_items [--datasets citeulike gowalla]
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.common import data_dir, write_results
from rcekd.data import load_dataset


def cold_shares(name: str) -> dict[str, float]:
    dataset = load_dataset(data_dir(name))
    popularity = np.bincount(dataset.train.items, minlength=dataset.n_items)
    shares = {}
    for split in ("valid", "test"):
        items = dataset.split(split).items
        shares[f"{split}_cold"] = float((popularity[items] == 0).mean()) if len(items) else 0.0
        shares[f"{split}_at_most_2_train"] = float((popularity[items] <= 2).mean()) if len(items) else 0.0
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", nargs="+", default=["citeulike", "gowalla"])
    args = parser.parse_args()
    rows = {name: cold_shares(name) for name in args.datasets}
    lines = [
        "# Held-out interactions on items without (or with few) training interactions",
        "",
        "| dataset | valid: cold | valid: ≤ 2 in train | test: cold | test: ≤ 2 in train |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['valid_cold']:.1%} | {r['valid_at_most_2_train']:.1%} | {r['test_cold']:.1%} "
            f"| {r['test_at_most_2_train']:.1%} |"
        )
    lines += ["", f"Command: `python -m benchmarks.cold_items --datasets {' '.join(args.datasets)}`", ""]
    write_results("cold_items", {"datasets": rows}, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
