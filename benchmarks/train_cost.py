"""Training cost per epoch of each KD method against the student alone, interleaved in one run.

Rounds × methods: in each round every method trains ``--epochs`` epochs from the same start, in
turn, so machine noise hits all methods alike. Reported: median seconds per epoch (training only,
and with one validation per epoch), and each method's ratio to the student alone. The per-epoch
figure leaves out each run's first epoch, which is one of a run's hundreds but carries one-off costs
(RCE-KD's first lists, from an untrained student whose scores are nearly flat, are the slowest to
rank and the longest: about 1.7× a later epoch); the first epoch is reported in its own column.

Usage: python -m benchmarks.train_cost --name gowalla_mf_mf --dataset gowalla \
           --teacher runs/teachers/gowalla-mf300 --methods none rcekd ce cd rrd dcd --rounds 3 --epochs 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch

from benchmarks.common import RESULTS, code_version, data_dir, write_results
from benchmarks.quality import parse_variant
from rcekd.data import load_dataset
from rcekd.kd import make_distiller
from rcekd.metrics import evaluate_model
from rcekd.models import build_model
from rcekd.pipeline import load_teacher
from rcekd.train import TrainConfig, train


def time_method(variant: str, dataset, teacher, teacher_dir: str, epochs: int, seed: int) -> dict[str, float]:
    """Seconds per epoch after the first (training only), of the first epoch, and of one validation.

    ``variant`` is a method, optionally with options (``rcekd:K=100,mxK=100``; see benchmarks.quality)."""
    method, options = parse_variant(variant)
    if method == "hetcomp":
        options.setdefault("trajectory", teacher_dir)  # its training checkpoints
    torch.manual_seed(seed)
    student = build_model("mf", dataset, dim=20)
    distiller = None
    if method != "none":
        distiller = make_distiller(method, teacher, dataset, seed=seed, **options)
    config = TrainConfig(epochs=epochs, eval_every=10**9, patience=10**9, seed=seed)
    result = train(student, dataset, config, distiller=distiller)
    started = time.perf_counter()
    evaluate_model(student, dataset, "valid", ks=(10,))
    seconds = [record["seconds"] for record in result.history]
    return {
        "train": statistics.fmean(seconds[1:]),
        "first_epoch": seconds[0],
        "validation": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["none", "rcekd", "ce", "cd", "rrd", "dcd", "hetcomp"],
        help="methods, optionally with options: rcekd:K=100,mxK=100",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--note", default="", help="a line for the markdown, e.g. what the teacher was")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be ≥ 2: the first epoch of each run is reported apart")
    load_before = os.getloadavg()

    dataset = load_dataset(data_dir(args.dataset))
    teacher, _ = load_teacher(args.teacher, dataset)
    samples: dict[str, list[dict[str, float]]] = {m: [] for m in args.methods}
    for round_no in range(args.rounds):
        for method in args.methods:
            samples[method].append(time_method(method, dataset, teacher, args.teacher, args.epochs, seed=round_no))
            print(f"round {round_no} {method:<8} {samples[method][-1]['train']:.2f} s/epoch", flush=True)

    base_train = statistics.median(s["train"] for s in samples["none"]) if "none" in samples else None
    base_total = statistics.median(s["train"] + s["validation"] for s in samples["none"]) if "none" in samples else None
    base_first = statistics.median(s["first_epoch"] for s in samples["none"]) if "none" in samples else None
    table = {}
    for method, rows in samples.items():
        train_s = statistics.median(s["train"] for s in rows)
        total_s = statistics.median(s["train"] + s["validation"] for s in rows)
        first_s = statistics.median(s["first_epoch"] for s in rows)
        table[method] = {
            "seconds_per_epoch_train": train_s,
            "seconds_first_epoch": first_s,
            "ratio_first_epoch": first_s / base_first if base_first else None,
            "seconds_per_epoch_with_validation": total_s,
            "ratio_train": train_s / base_train if base_train else None,
            "ratio_with_validation": total_s / base_total if base_total else None,
            "samples": rows,
        }
    lines = [
        f"# Training cost per epoch: {args.name} ({dataset.n_users:,} users × {dataset.n_items:,} items)",
        "",
        f"Median of {args.rounds} interleaved rounds of {args.epochs} epochs each (seconds an epoch: the mean of "
        "each run's epochs after its first); torch threads "
        f"{torch.get_num_threads()}; 1-minute load average {load_before[0]:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after (other work on the machine: compare ratios, not seconds). "
        f"Code: {code_version()}.",
        *([f"\n{args.note}"] if args.note else []),
        "",
        "| method | s/epoch (train) | × alone | s/epoch (+ validation) | × alone | first epoch, s | × alone |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, row in table.items():
        lines.append(
            f"| {method} | {row['seconds_per_epoch_train']:.2f} | {row['ratio_train'] or 0:.2f} "
            f"| {row['seconds_per_epoch_with_validation']:.2f} | {row['ratio_with_validation'] or 0:.2f} "
            f"| {row['seconds_first_epoch']:.2f} | {row['ratio_first_epoch'] or 0:.2f} |"
        )
    lines += [
        "",
        f"Command: `python -m benchmarks.train_cost --name {args.name} --dataset {args.dataset} "
        f"--teacher {args.teacher} --methods {' '.join(args.methods)} --rounds {args.rounds} "
        f"--epochs {args.epochs}`",
        "",
    ]
    markdown = "\n".join(lines)
    write_results(f"train_cost_{args.name}", {"settings": vars(args), "table": table}, markdown)
    plot(table, RESULTS / f"train_cost_{args.name}.png", args.name)
    print(markdown)


def plot(table: dict[str, Any], path, name: str) -> None:  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(table)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(methods, [table[m]["seconds_per_epoch_train"] for m in methods], label="training")
    ax.bar(
        methods,
        [table[m]["seconds_per_epoch_with_validation"] - table[m]["seconds_per_epoch_train"] for m in methods],
        bottom=[table[m]["seconds_per_epoch_train"] for m in methods],
        label="validation",
    )
    ax.set_ylabel("seconds per epoch")
    ax.set_title(f"training cost: {name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
