"""Quality of KD methods for one teacher → student setting: methods × seeds, one budget for all.

Each (variant, seed) is one `distill_and_save` run into runs/quality/<name>/ (while it runs, one JSON
line an epoch goes to ``<run>.progress.jsonl`` beside it); finished runs are read back, so an
interrupted benchmark resumes; with ``--reuse-committed`` a run missing there is taken from the
committed ``benchmarks/results/quality_<name>.json`` (same settings only; each run keeps the code
version that made it), so seeds can be added on a machine that lacks the earlier run directories. The
summary gives mean ± std of Recall/NDCG@10/20 in both
protocols, a paired t-test (pairs = same seed) of RCE-KD against the best other variant, and a plot of
validation NDCG@10 per epoch (seed of the first run) for every variant.

A variant is a method name, optionally with options: ``rcekd``, ``rcekd:ablation=wo_sep``,
``rcekd:gamma_mode=sampled``, ``cd:weight=1.0``.

Usage:
  python -m benchmarks.quality --name citeulike_mf_mf --dataset citeulike \
      --teacher runs/teachers/citeulike-mf400 --variants none ce cd rrd dcd hetcomp rcekd --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, code_version, data_dir, write_results
from rcekd.train import Progress

RUNS = Path(__file__).resolve().parents[1] / "runs" / "quality"
METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``method[:key=value,...]`` → (method, options) with numbers and booleans parsed."""
    method, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for pair in filter(None, rest.split(",")):
        key, _, raw = pair.partition("=")
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(raw)
                    break
                except ValueError:
                    continue
        options[key] = value
    return method, options


def progress_path(out: Path) -> Path:
    """Where a run in progress appends one JSON line an epoch (its directory appears only at the end)."""
    return out.parent / f"{out.name}.progress.jsonl"


def progress_logger(path: Path) -> Callable[[Progress], None]:
    """An ``on_progress`` callback appending each epoch's :class:`Progress` (and the time) to ``path``:
    runs last up to hours, and this is how to see how far one has got (``tail -f``)."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def log(progress: Progress) -> None:
        with path.open("a") as f:
            f.write(json.dumps({"time": time.time(), **progress.as_dict()}) + "\n")

    return log


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One distillation (in a worker process with one torch thread)."""
    import torch

    from rcekd.pipeline import distill_and_save
    from rcekd.train import TrainConfig

    torch.set_num_threads(job["threads"])
    out = Path(job["out"])
    if not (out / "manifest.json").is_file():
        method, options = parse_variant(job["variant"])
        config = TrainConfig(
            epochs=job["epochs"],
            eval_every=job["eval_every"],
            patience=job["patience"],
            seed=job["seed"],
            batch_size=job["batch_size"],
            lr=job["lr"],
            weight_decay=job["weight_decay"],
        )
        distill_and_save(
            job["data"],
            job["teacher"],
            method,
            out,
            student_arch=job["student"],
            student_params={"dim": job["dim"]},
            method_options=options,
            config=config,
            on_progress=progress_logger(progress_path(out)),
            overwrite=True,
        )
        (out / "benchmark_code.txt").write_text(job.get("code", "unknown"))
    code_file = out / "benchmark_code.txt"
    manifest = json.loads((out / "manifest.json").read_text())
    training = manifest["training"]
    return {
        "variant": job["variant"],
        "seed": job["seed"],
        "metrics": manifest["metrics"],
        "kd": manifest["kd"],
        "teacher_weights_sha256": manifest.get("teacher", {}).get("weights_sha256"),
        "platform": training.get("platform"),  # CPU and libraries: runs agree to the bit only on alike ones
        "best_epoch": training["best_epoch"],
        "epochs_run": training["epochs_run"],
        "seconds": training["seconds"],
        "seconds_per_epoch_train": training["seconds_per_epoch_train"],
        "valid_curve": [(h["epoch"], h["valid_ndcg@10"]) for h in training["history"] if "valid_ndcg@10" in h],
        # each epoch's summed loss and the method's diagnostics (γ, HetComp's stages, …): what a claim
        # about a run's course cites, kept in the committed results once the run directory is gone
        "train_curve": [(h["epoch"], h["loss"], h.get("kd", {})) for h in training["history"]],
        "code": code_file.read_text().strip() if code_file.is_file() else "unknown",
    }


# Settings that must match for a committed run to stand in for a new one.
SAME_BUDGET = (
    "dataset",
    "teacher",
    "student",
    "dim",
    "epochs",
    "eval_every",
    "patience",
    "batch_size",
    "lr",
    "weight_decay",
)


def committed_runs(name: str, settings: dict[str, Any]) -> dict[tuple[str, int], dict[str, Any]]:
    """(variant, seed) → run from the committed results of ``name``; refuses a different budget."""
    path = RESULTS / f"quality_{name}.json"
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    differ = {
        k: (saved["settings"].get(k), settings[k]) for k in SAME_BUDGET if saved["settings"].get(k) != settings[k]
    }
    if differ:
        raise SystemExit(f"--reuse-committed: {path.name} was run with other settings (committed, now): {differ}")
    code = saved.get("machine", {}).get("code", "unknown")
    return {(r["variant"], r["seed"]): {"code": code, **r} for r in saved["runs"]}


def finished(job: dict[str, Any]) -> bool:
    return (Path(job["out"]) / "manifest.json").is_file()


def summarise(runs: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for variant in variants:
        mine = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["seed"])
        if not mine:
            continue
        row: dict[str, Any] = {"seeds": [r["seed"] for r in mine]}
        for block in ("test", "test_paper", "valid"):
            for metric in METRICS:
                values = [r["metrics"][block][metric] for r in mine]
                row[f"{block}/{metric}"] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "values": values,
                }
        row["seconds_per_epoch_train"] = statistics.median(r["seconds_per_epoch_train"] for r in mine)
        row["best_epoch"] = [r["best_epoch"] for r in mine]
        row["code"] = sorted({r.get("code", "unknown") for r in mine})
        table[variant] = row
    return table


def platform_counts(runs: list[dict[str, Any]]) -> dict[str, int]:
    """Runs per machine kind (CPU, torch's vector kernels, numba's target); empty when none recorded."""
    counts: dict[str, int] = {}
    for run in runs:
        record = run.get("platform")
        kind = (
            f"{record['cpu']}, torch {record['torch_cpu_capability']}, numba {record['numba_target']}"
            if record
            else "not recorded"
        )
        counts[kind] = counts.get(kind, 0) + 1
    return counts if set(counts) != {"not recorded"} else {}


def significance(table: dict[str, Any], target: str = "rcekd") -> dict[str, Any] | None:
    """Paired t-test of ``target`` against the best variant of any other method (by mean test NDCG@20):
    a variant of the target's own method (an ablation) is not a competitor, another method's
    configuration (``cd:weight=2``) is."""
    from rcekd.metrics import paired_t_test

    if target not in table:
        return None
    method = target.partition(":")[0]
    others = {v: row for v, row in table.items() if v.partition(":")[0] != method}
    if not others:
        return None
    best = max(others, key=lambda v: others[v]["test/ndcg@20"]["mean"])
    seeds = sorted(set(table[target]["seeds"]) & set(table[best]["seeds"]))
    if len(seeds) < 2:
        return {"target": target, "against": best, "note": "fewer than 2 shared seeds"}

    def by_seed(variant: str) -> list[float]:
        values = dict(zip(table[variant]["seeds"], table[variant]["test/ndcg@20"]["values"], strict=True))
        return [values[s] for s in seeds]

    return {
        "target": target,
        "against": best,
        "metric": "test/ndcg@20",
        "seeds": seeds,
        **paired_t_test(by_seed(target), by_seed(best)),
    }


def against_full(table: dict[str, Any], target: str = "rcekd") -> dict[str, dict[str, Any]]:
    """Each variant of ``target`` (``target:...``) against the full method on their shared seeds:
    mean test NDCG@20 difference and on how many seeds the variant was below."""
    if target not in table:
        return {}
    full = dict(zip(table[target]["seeds"], table[target]["test/ndcg@20"]["values"], strict=True))
    out = {}
    for variant, row in table.items():
        if not variant.startswith(f"{target}:"):
            continue
        pairs = [(v, full[s]) for s, v in zip(row["seeds"], row["test/ndcg@20"]["values"], strict=True) if s in full]
        if pairs:
            out[variant] = {
                "seeds": len(pairs),
                "mean_diff": statistics.fmean(v - f for v, f in pairs),
                "below": sum(v < f for v, f in pairs),
            }
    return out


def plot(runs: list[dict[str, Any]], variants: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    seed = min(r["seed"] for r in runs)
    for variant in variants:
        curve = next((r["valid_curve"] for r in runs if r["variant"] == variant and r["seed"] == seed), None)
        if curve:
            ax.plot([e for e, _ in curve], [v for _, v in curve], label=variant)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation NDCG@10 (strict)")
    ax.set_title(f"{path.stem}: validation NDCG@10 per epoch (seed {seed})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(
    name: str,
    table: dict[str, Any],
    test: dict[str, Any] | None,
    command: str,
    missing: list[tuple[str, int]] | None = None,
    note: str = "",
    runs: list[dict[str, Any]] | None = None,
) -> str:
    """The results file's text; ``missing``: requested (variant, seed) runs that have not finished;
    ``runs``: the run records, for the machines that made them."""
    lines = [
        f"# KD quality: {name}",
        "",
        "Test split, mean ± std over seeds. Strict protocol; paper protocol NDCG@20 in its own column.",
        *([note] if note else []),
        "",
        "| variant | seeds | Recall@10 | NDCG@10 | Recall@20 | NDCG@20 | NDCG@20 (paper) | s/epoch |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant, row in table.items():
        cells = [f"{row[f'test/{m}']['mean']:.4f} ± {row[f'test/{m}']['std']:.4f}" for m in METRICS]
        paper = row["test_paper/ndcg@20"]
        lines.append(
            f"| {variant} | {len(row['seeds'])} | "
            + " | ".join(cells)
            + f" | {paper['mean']:.4f} ± {paper['std']:.4f} | {row['seconds_per_epoch_train']:.2f} |"
        )
    if test:
        if "p" in test:
            lines += [
                "",
                f"Paired t-test, {test['target']} vs {test['against']} on test NDCG@20 (seeds {test['seeds']}): "
                f"mean difference {test['mean_diff']:+.5f}, t = {test['t']:.2f}, one-sided p = {test['p']:.4g}.",
            ]
        else:
            lines += ["", f"Paired t-test vs {test['against']}: {test['note']}."]
    codes = {variant: row.get("code", []) for variant, row in table.items()}
    if any(codes.values()):
        lines += ["", "Code that made the runs: " + "; ".join(f"{v}: {', '.join(c)}" for v, c in codes.items()) + "."]
    platforms = platform_counts(runs or [])
    if platforms:
        kinds = "; ".join(f"{kind} ({count} runs)" for kind, count in platforms.items())
        lines += ["", f"Machines that made the runs: {kinds}."]
    ablations = against_full(table)
    if ablations:
        lines += ["", "Variants of RCE-KD against full RCE-KD (test NDCG@20, same seeds):", ""]
        lines += ["| variant | seeds | mean difference | seeds below full |", "|---|---|---|---|"]
        for variant, row in ablations.items():
            lines.append(f"| {variant} | {row['seeds']} | {row['mean_diff']:+.5f} | {row['below']} / {row['seeds']} |")
    lines += ["", f"Command: `{command}`", ""]
    if missing:
        runs = ", ".join(f"{variant} seed {seed}" for variant, seed in missing)
        lines += [f"Partial: {len(missing)} requested runs have not finished ({runs}).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="results name: benchmarks/results/quality_<name>.*")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--teacher", required=True, help="teacher artifact directory")
    parser.add_argument("--student", default="mf")
    parser.add_argument("--dim", type=int, default=20)
    parser.add_argument("--variants", nargs="+", required=True)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--workers", type=int, default=2, help="parallel runs, one torch thread each")
    parser.add_argument(
        "--summarise-only", action="store_true", help="no training: summarise the runs that have finished"
    )
    parser.add_argument(
        "--reuse-committed",
        action="store_true",
        help="take runs missing under runs/quality/<name>/ from the committed results (same settings only)",
    )
    parser.add_argument("--note", default="", help="a line for the markdown, e.g. which code made the runs")
    parser.add_argument(
        "--target", default="rcekd", help="the variant tested against the best variant of every other method"
    )
    args = parser.parse_args()

    jobs = [
        {
            "variant": variant,
            "seed": seed,
            "data": str(data_dir(args.dataset)),
            "teacher": args.teacher,
            "student": args.student,
            "dim": args.dim,
            "epochs": args.epochs,
            "eval_every": args.eval_every,
            "patience": args.patience,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "threads": 1 if args.workers > 1 else os.cpu_count() or 1,
            "out": str(RUNS / args.name / f"{variant.replace(':', '__').replace('=', '-')}-s{seed}"),
            "code": code_version(),
        }
        for seed in args.seeds
        for variant in args.variants
    ]
    runs: list[dict[str, Any]] = []
    if args.reuse_committed:
        saved = committed_runs(args.name, vars(args))
        reused = [saved[key] for job in jobs if (key := (job["variant"], job["seed"])) in saved and not finished(job)]
        runs += reused
        reused_keys = {(r["variant"], r["seed"]) for r in reused}
        jobs = [job for job in jobs if (job["variant"], job["seed"]) not in reused_keys]
        print(f"reusing {len(reused)} committed runs", flush=True)
    if args.summarise_only:
        jobs = [job for job in jobs if finished(job)]
    if jobs:
        print(f"{len(jobs)} runs; epochs so far: tail {RUNS / args.name}/*.progress.jsonl", flush=True)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for result in pool.map(run_one, jobs):
            runs.append(result)
            test = result["metrics"]["test"]
            print(
                f"{result['variant']:<32} seed {result['seed']}  ndcg@20 {test['ndcg@20']:.4f}  "
                f"recall@20 {test['recall@20']:.4f}  best epoch {result['best_epoch']}",
                flush=True,
            )
    table = summarise(runs, args.variants)
    test = significance(table, args.target)
    done = {(run["variant"], run["seed"]) for run in runs}
    missing = [(variant, seed) for seed in args.seeds for variant in args.variants if (variant, seed) not in done]
    command = "python -m benchmarks.quality " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if k not in ("summarise_only", "note", "reuse_committed")
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(runs, args.variants, RESULTS / f"quality_{args.name}.png")
    write_results(
        f"quality_{args.name}",
        {"settings": vars(args), "table": table, "significance": test, "variants": against_full(table), "runs": runs},
        text := markdown(args.name, table, test, command, missing, args.note, runs),
    )
    print(text)


if __name__ == "__main__":
    main()
