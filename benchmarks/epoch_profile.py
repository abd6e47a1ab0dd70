"""Where a KD method's training epoch goes: the per-epoch sets, and per batch the student's own loss,
the KD term, the backward pass and the optimizer step, against the student alone.

The loop does what :func:`rcekd.train.train` does per epoch (``on_epoch_start``, then per batch
base loss + KD term, backward, step) with a clock around each step; the distiller's ``rank_student``
(the exact top-k of all items for every user) is timed on its own inside ``on_epoch_start``.
Methods are interleaved in rounds from the same start; the median over rounds × epochs (the first
epoch of each run left out: it has no ranking hint yet) is reported.

Usage: python -m benchmarks.epoch_profile --name gowalla_mf300_mf20 --dataset gowalla \
           --teacher runs/teachers/gowalla-mf300 --methods none rcekd cd --rounds 2 --epochs 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS, code_version, data_dir, write_results
from benchmarks.quality import parse_variant
from rcekd.data import Dataset, load_dataset
from rcekd.kd import Teacher, make_distiller
from rcekd.models import build_model
from rcekd.pipeline import load_teacher
from rcekd.train import TrainConfig, make_optimizer, seed_everything

PHASES = ("student ranking", "other per-epoch sets", "student loss", "KD term", "backward", "optimizer step", "rest")


def _timed(clock: dict[str, float], phase: str, function: Callable[..., Any]) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            clock[phase] += time.perf_counter() - started

    return timed


def profile_method(
    variant: str, dataset: Dataset, teacher: Teacher, teacher_dir: str, epochs: int, seed: int
) -> list[dict[str, float]]:
    """Seconds per phase for each epoch after the first."""
    method, options = parse_variant(variant)
    if method == "hetcomp":
        options.setdefault("trajectory", teacher_dir)
    torch.manual_seed(seed)
    student = build_model("mf", dataset, dim=20)
    distiller = make_distiller(method, teacher, dataset, seed=seed, **options) if method != "none" else None
    config = TrainConfig(epochs=epochs, seed=seed)
    rng = seed_everything(seed)
    optimizer = make_optimizer(student, config)
    epochs_out = []
    for epoch in range(1, epochs + 1):
        clock = dict.fromkeys(PHASES, 0.0)
        started = time.perf_counter()
        student.train()
        if distiller is not None:
            distiller.rank_student = _timed(clock, "student ranking", type(distiller).rank_student.__get__(distiller))
            _timed(clock, "other per-epoch sets", distiller.on_epoch_start)(student, epoch)
            clock["other per-epoch sets"] -= clock["student ranking"]
        for batch in student.batches(dataset.train, config.batch_size, rng):
            with student.one_step():
                loss = _timed(clock, "student loss", student.base_loss)(batch)
                if distiller is not None:
                    loss = loss + _timed(clock, "KD term", distiller.loss)(batch, student)
            optimizer.zero_grad(set_to_none=True)
            _timed(clock, "backward", loss.backward)()
            _timed(clock, "optimizer step", optimizer.step)()
            loss.item()
        total = time.perf_counter() - started
        clock["rest"] = total - sum(clock.values())  # batch sampling, bookkeeping
        if epoch > 1:
            epochs_out.append({**clock, "total": total})
    return epochs_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--methods", nargs="+", default=["none", "rcekd", "cd"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--note", default="")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be ≥ 2: the first epoch of each run is left out")

    dataset = load_dataset(data_dir(args.dataset))
    teacher, _ = load_teacher(args.teacher, dataset)
    samples: dict[str, list[dict[str, float]]] = {m: [] for m in args.methods}
    for round_no in range(args.rounds):
        for method in args.methods:
            samples[method] += profile_method(method, dataset, teacher, args.teacher, args.epochs, seed=round_no)
            print(f"round {round_no} {method:<8} {samples[method][-1]['total']:.2f} s/epoch", flush=True)
    table = {
        method: {phase: statistics.median(s[phase] for s in rows) for phase in (*PHASES, "total")}
        for method, rows in samples.items()
    }
    base = table.get("none", {}).get("total")
    lines = [
        f"# Where an epoch goes: {args.name} ({dataset.n_users:,} users × {dataset.n_items:,} items)",
        "",
        f"Seconds per epoch, median of {args.rounds} interleaved rounds × {args.epochs - 1} epochs (each run's "
        f"first epoch left out); torch threads {torch.get_num_threads()}. Code: {code_version()}.",
        *([f"\n{args.note}"] if args.note else []),
        "",
        "| method | " + " | ".join(PHASES) + " | total | × alone |",
        "|---" * (len(PHASES) + 3) + "|",
    ]
    for method, row in table.items():
        ratio = f"{row['total'] / base:.2f}" if base else "—"
        lines.append(
            f"| {method} | " + " | ".join(f"{row[p]:.2f}" for p in PHASES) + f" | {row['total']:.2f} | {ratio} |"
        )
    lines += [
        "",
        f"Command: `python -m benchmarks.epoch_profile --name {args.name} --dataset {args.dataset} "
        f"--teacher {args.teacher} --methods {' '.join(args.methods)} --rounds {args.rounds} --epochs {args.epochs}`",
        "",
    ]
    markdown = "\n".join(lines)
    write_results(f"epoch_profile_{args.name}", {"settings": vars(args), "table": table, "samples": samples}, markdown)
    plot(table, RESULTS / f"epoch_profile_{args.name}.png", args.name)
    print(markdown)


def plot(table: dict[str, dict[str, float]], path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(table)
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(methods)
    for phase in PHASES:
        heights = [table[m][phase] for m in methods]
        ax.bar(methods, heights, bottom=bottom, label=phase)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax.set_ylabel("seconds per epoch")
    ax.set_title(f"where an epoch goes: {name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
