"""A side-by-side table of artifact directories: size and test metrics (``python -m rcekd.report DIR ...``)."""

from __future__ import annotations

import sys
from pathlib import Path

from rcekd.checkpoint import read_manifest


def table(directories: list[str | Path]) -> str:
    rows = [
        "| model | role | arch | KD | parameters | MiB | Recall@20 | NDCG@20 | NDCG@20 vs first |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    reference = None
    for directory in directories:
        manifest = read_manifest(directory)
        test = manifest["metrics"]["test"]
        reference = reference or test["ndcg@20"]
        # the served model's files: the training trajectory (HetComp's input) is not part of it
        size = sum(meta["bytes"] for name, meta in manifest["files"].items() if not name.startswith("trajectory/"))
        size /= 2**20
        arch = f"{manifest['arch']} d={manifest['hyperparameters']['dim']}"
        rows.append(
            f"| {Path(directory).name} | {manifest['role']} | {arch} "
            f"| {manifest.get('kd', {}).get('method', '-')} | {manifest['n_parameters']:,} | {size:.1f} "
            f"| {test['recall@20']:.4f} | {test['ndcg@20']:.4f} | {test['ndcg@20'] / reference:.1%} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    directories = sys.argv[1:] if argv is None else argv
    if not directories:
        print("usage: python -m rcekd.report ARTIFACT_DIR [ARTIFACT_DIR ...]", file=sys.stderr)
        return 2
    print(table(directories))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
