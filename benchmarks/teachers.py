"""Train the reference teachers (and the MF d=20 student alone) and record their figures.

Each entry is one `rcekd train` invocation; its artifact goes to runs/teachers/<name> (not committed:
weights are large) and its manifest's metrics, training time and command go to
benchmarks/results/teachers.json and .md. Entries already trained are read back, not retrained.

Usage: python -m benchmarks.teachers [--only NAME ...] [--force]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, data_dir, write_results

RUNS = Path(__file__).resolve().parents[1] / "runs" / "teachers"

#: name → (dataset, rcekd train flags)
TEACHERS: dict[str, tuple[str, list[str]]] = {
    "citeulike-mf400": (
        "citeulike",
        ["--model", "mf", "--dim", "400", "--sparse", "false", "--weight-decay", "1e-3", "--trajectory-every", "10"],
    ),
    "citeulike-mf20-alone": ("citeulike", ["--model", "mf", "--dim", "20", "--role", "student"]),
    "citeulike-mf20-alone-s1": ("citeulike", ["--model", "mf", "--dim", "20", "--role", "student", "--seed", "1"]),
    "citeulike-mf20-alone-s2": ("citeulike", ["--model", "mf", "--dim", "20", "--role", "student", "--seed", "2"]),
    "citeulike-lightgcn": ("citeulike", ["--model", "lightgcn", "--dim", "64", "--eval-every", "5", "--patience", "6"]),
    "citeulike-hstu": ("citeulike", ["--model", "hstu", "--eval-every", "5", "--patience", "6"]),
    "gowalla-mf300": (
        "gowalla",
        ["--model", "mf", "--dim", "300", "--eval-every", "5", "--patience", "6", "--trajectory-every", "10"],
    ),
    "gowalla-lightgcn64": (
        "gowalla",
        [
            "--model",
            "lightgcn",
            "--dim",
            "64",
            "--batch-size",
            "32768",
            "--lr",
            "1e-2",
            "--epochs",
            "200",
            "--eval-every",
            "5",
            "--patience",
            "6",
        ],
    ),
}


def train_one(name: str, force: bool) -> dict:
    dataset, flags = TEACHERS[name]
    out = RUNS / name
    command = ["rcekd", "train", "--data", str(data_dir(dataset)), *flags, "--out", str(out)]
    if force or not (out / "manifest.json").is_file():
        started = time.perf_counter()
        subprocess.run([str(Path(sys.executable).with_name("rcekd")), *command[1:], "--overwrite"], check=True)
        print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    manifest = json.loads((out / "manifest.json").read_text())
    training = manifest["training"]
    return {
        "name": name,
        "command": shlex.join(command)
        .replace(str(data_dir(dataset)), f"../shared/data/{dataset}")
        .replace(str(RUNS.parents[1]) + "/", ""),
        "arch": manifest["arch"],
        "hyperparameters": manifest["hyperparameters"],
        "n_parameters": manifest["n_parameters"],
        "metrics": manifest["metrics"],
        "best_epoch": training["best_epoch"],
        "epochs_run": training["epochs_run"],
        "wall_seconds": training["seconds"],
        "seconds_per_epoch_train": training["seconds_per_epoch_train"],
        "train_config": {k: training[k] for k in ("lr", "batch_size", "weight_decay", "eval_every", "patience")},
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "# Teachers and students alone (test split, strict protocol; paper protocol in brackets)",
        "",
        "| model | params | Recall@20 | NDCG@20 | NDCG@20 (paper protocol) | best epoch / run | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        test, paper = row["metrics"]["test"], row["metrics"]["test_paper"]
        lines.append(
            f"| {row['name']} | {row['n_parameters']:,} | {test['recall@20']:.4f} | {test['ndcg@20']:.4f} "
            f"| {paper['ndcg@20']:.4f} | {row['best_epoch']} / {row['epochs_run']} "
            f"| {row['wall_seconds'] / 60:.1f} min |"
        )
    lines += ["", "Commands:", ""] + [f"- `{row['command']}`" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", choices=sorted(TEACHERS), help="train just these")
    parser.add_argument("--force", action="store_true", help="retrain even if an artifact exists")
    args = parser.parse_args()
    previous = {}
    if (RESULTS / "teachers.json").is_file():
        previous = {row["name"]: row for row in json.loads((RESULTS / "teachers.json").read_text())["teachers"]}
    for name in args.only or TEACHERS:
        previous[name] = train_one(name, args.force)
    rows = [previous[name] for name in TEACHERS if name in previous]
    write_results("teachers", {"teachers": rows}, markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
