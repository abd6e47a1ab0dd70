"""Full-ranking evaluation cost: wall time and peak memory of one strict test evaluation.

Usage: python -m benchmarks.eval_speed [--dataset gowalla] [--dim 64] [--repeats 3]
The model is an MF with random d-dimensional vectors (evaluation cost does not depend on the
weights' values), so the benchmark needs no trained checkpoint.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch

from benchmarks.common import data_dir, write_results
from rcekd.data import load_dataset
from rcekd.metrics import CHUNK_SCORES, evaluate_model
from rcekd.models import MF


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="gowalla")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    dataset = load_dataset(data_dir(args.dataset))
    _ = dataset.csr("train"), dataset.csr("valid"), dataset.csr("test")
    torch.manual_seed(0)
    model = MF(dataset.n_users, dataset.n_items, dim=args.dim, init_std=0.1)
    rss_before = peak_rss_mib()
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        metrics = evaluate_model(model, dataset, "test")
        seconds.append(time.perf_counter() - start)
    rss_after = peak_rss_mib()
    payload = {
        "dataset": dataset.summary(),
        "dim": args.dim,
        "chunk_scores": CHUNK_SCORES,
        "seconds": seconds,
        "median_seconds": statistics.median(seconds),
        "peak_rss_mib_before_eval": round(rss_before, 1),
        "peak_rss_mib_after_eval": round(rss_after, 1),
        "metrics_random_model": metrics,
    }
    md = (
        f"# Full-ranking evaluation cost ({dataset.name}, {dataset.n_users:,} users × {dataset.n_items:,} items, "
        f"d={args.dim})\n\n"
        f"| runs | median s | min s | max s | peak RSS before eval (MiB) | peak RSS of the process (MiB) |\n"
        f"|---|---|---|---|---|---|\n"
        f"| {len(seconds)} | {statistics.median(seconds):.2f} | {min(seconds):.2f} | {max(seconds):.2f} "
        f"| {rss_before:.0f} | {rss_after:.0f} |\n\n"
        f"Machine: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, 1-min load average "
        f"{os.getloadavg()[0]:.1f} when measured (other training jobs were running).\n\n"
        "Command: `python -m benchmarks.eval_speed --dataset "
        f"{args.dataset} --dim {args.dim} --repeats {args.repeats}`\n"
    )
    write_results(f"eval_speed_{dataset.name}", payload, md)
    print(md)


if __name__ == "__main__":
    main()
