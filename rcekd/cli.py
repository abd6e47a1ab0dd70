"""The ``rcekd`` command: ``train`` a backbone into an artifact directory, ``evaluate`` one."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from rcekd.checkpoint import CheckpointError, load_model
from rcekd.data import DataError, load_dataset
from rcekd.metrics import evaluate_model
from rcekd.models import MODELS
from rcekd.pipeline import MODEL_DEFAULTS, TRAIN_DEFAULTS, train_and_save
from rcekd.train import Progress, TrainConfig

#: flag → (hyper-parameter, type, help); which backbones use it is read from MODEL_DEFAULTS
MODEL_FLAGS: dict[str, tuple[str, type, str]] = {
    "--dim": ("dim", int, "embedding size (MF 400, LightGCN 64, HSTU 64)"),
    "--init-std": ("init_std", float, "std of the normal initialisation (MF 0.01, LightGCN 0.1)"),
    "--layers": ("n_layers", int, "LightGCN propagation layers (3)"),
    "--blocks": ("n_blocks", int, "HSTU blocks (8; a student uses 1)"),
    "--heads": ("n_heads", int, "HSTU attention heads (4)"),
    "--dqk": ("dqk", int, "HSTU query/key size per head (8)"),
    "--dv": ("dv", int, "HSTU value size per head (16)"),
    "--max-len": ("max_len", int, "HSTU history length (100)"),
    "--dropout": ("dropout", float, "HSTU dropout (0.2)"),
    "--temperature": ("temperature", float, "HSTU sampled-softmax temperature (0.05)"),
    "--negatives": ("n_negatives", int, "HSTU sampled negatives per batch (256)"),
}


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset directory (u i1 i2 ... files) or CSV/TSV file")
    parser.add_argument(
        "--valid-seed", type=int, default=0, help="seed of the validation carve-out when there is no valid file"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rcekd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train_p = commands.add_parser("train", help="train a backbone (a teacher, or a student alone)")
    _add_data_args(train_p)
    train_p.add_argument("--model", required=True, choices=sorted(MODELS), help="backbone")
    train_p.add_argument("--out", required=True, help="artifact directory to write")
    train_p.add_argument("--role", default="teacher", choices=["teacher", "student"])
    for flag, (_, kind, text) in MODEL_FLAGS.items():
        train_p.add_argument(flag, type=kind, default=None, help=text)
    train_p.add_argument("--epochs", type=int, default=300, help="maximum epochs (300)")
    train_p.add_argument("--batch-size", type=int, default=None, help="rows per batch (MF/LightGCN 2048, HSTU 128)")
    train_p.add_argument("--lr", type=float, default=None, help="Adam learning rate (1e-3)")
    train_p.add_argument("--weight-decay", type=float, default=None, help="L2 weight decay (0)")
    train_p.add_argument("--eval-every", type=int, default=2, help="validate every N epochs (2)")
    train_p.add_argument("--patience", type=int, default=10, help="evaluations without improvement (10)")
    train_p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    train_p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    train_p.add_argument("--trajectory-every", type=int, default=0, help="save weights every N epochs (0: off)")
    train_p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    train_p.add_argument("--quiet", action="store_true", help="no progress bar")

    eval_p = commands.add_parser("evaluate", help="full-ranking metrics of an artifact directory, as JSON")
    _add_data_args(eval_p)
    eval_p.add_argument("--model", required=True, help="artifact directory")
    eval_p.add_argument("--split", default="test", choices=["valid", "test"])
    eval_p.add_argument("--protocol", default="strict", choices=["strict", "paper"])
    return parser


def _model_params(args: argparse.Namespace) -> dict[str, Any]:
    known = MODEL_DEFAULTS[args.model]
    params = {}
    for flag, (name, _, _) in MODEL_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        if name not in known:
            raise SystemExit(f"rcekd: {flag} does not apply to --model {args.model}")
        params[name] = value
    return params


def _train_config(args: argparse.Namespace) -> TrainConfig:
    defaults = TRAIN_DEFAULTS[args.model]
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size or defaults["batch_size"],
        lr=args.lr or defaults["lr"],
        weight_decay=defaults["weight_decay"] if args.weight_decay is None else args.weight_decay,
        eval_every=args.eval_every,
        patience=args.patience,
        seed=args.seed,
        device=args.device,
        trajectory_every=args.trajectory_every,
    )


def _run_train(args: argparse.Namespace) -> dict[str, Any]:
    config = _train_config(args)
    bar = tqdm(total=config.epochs, desc=f"train {args.model}", unit="epoch", disable=args.quiet, file=sys.stderr)

    def report(progress: Progress) -> None:
        bar.update(1)
        postfix = {"loss": f"{progress.loss:.4g}", "best ndcg@10": f"{progress.best_ndcg:.4f}"}
        bar.set_postfix(postfix, refresh=False)

    try:
        manifest, _ = train_and_save(
            args.data,
            args.model,
            args.out,
            model_params=_model_params(args),
            config=config,
            role=args.role,
            valid_seed=args.valid_seed,
            on_progress=report,
            overwrite=args.overwrite,
        )
    finally:
        bar.close()
    return {
        "out": args.out,
        "id": manifest["id"],
        "metrics": manifest["metrics"],
        "training": {
            k: manifest["training"][k] for k in ("best_epoch", "epochs_run", "seconds", "seconds_per_epoch_train")
        },
    }


def _run_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    dataset = load_dataset(args.data, valid_seed=args.valid_seed)
    model, manifest = load_model(args.model)
    recorded = manifest.get("dataset", {}).get("fingerprint")
    if recorded and recorded != dataset.fingerprint:
        raise CheckpointError(
            f"{args.model} was trained on dataset {recorded[:12]}…, not {dataset.fingerprint[:12]}… "
            "(other files or another --valid-seed)"
        )
    metrics = evaluate_model(model, dataset, args.split, args.protocol)
    return {"model": args.model, "split": args.split, "protocol": args.protocol, **metrics}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = _run_train(args) if args.command == "train" else _run_evaluate(args)
    except (DataError, CheckpointError, FileExistsError) as exc:
        print(f"rcekd: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
