"""The ``rcekd`` command: ``train`` a backbone, ``distill`` a teacher into a student, ``evaluate`` either."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import signal
import sys
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from rcekd.checkpoint import CheckpointError, load_model
from rcekd.data import load_dataset
from rcekd.kd import METHODS, distiller_class, method_options
from rcekd.metrics import evaluate_model
from rcekd.models import MODELS
from rcekd.pipeline import MODEL_DEFAULTS, TRAIN_DEFAULTS, distill_and_save, train_and_save
from rcekd.train import Progress, TrainConfig

#: flag → (hyper-parameter, type, help); which backbones use it is read from MODEL_DEFAULTS
MODEL_FLAGS: dict[str, tuple[str, type | str, str]] = {
    "--dim": ("dim", int, "embedding size (MF 400, LightGCN 64, HSTU 64)"),
    "--init-std": ("init_std", float, "std of the normal initialisation (MF 0.01, LightGCN 0.1)"),
    "--sparse": ("sparse", "bool", "MF row-sparse updates (default: from 4M weights on); false: dense Adam"),
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


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="artifact directory to write")
    for flag, (_, kind, text) in MODEL_FLAGS.items():
        parser.add_argument(flag, type=_parse_bool if kind == "bool" else kind, default=None, help=text)
    train_p = parser
    train_p.add_argument("--epochs", type=int, default=300, help="maximum epochs (300)")
    train_p.add_argument(
        "--batch-size", type=int, default=None, help="rows per batch (MF 2048, LightGCN 8192, HSTU 128 users)"
    )
    train_p.add_argument("--lr", type=float, default=None, help="Adam learning rate (1e-3; LightGCN 5e-3)")
    train_p.add_argument("--weight-decay", type=float, default=None, help="L2 weight decay (0)")
    train_p.add_argument("--eval-every", type=int, default=2, help="validate every N epochs (2)")
    train_p.add_argument("--patience", type=int, default=10, help="evaluations without improvement (10)")
    train_p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    train_p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    train_p.add_argument("--trajectory-every", type=int, default=0, help="save weights every N epochs (0: off)")
    train_p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    train_p.add_argument("--quiet", action="store_true", help="no progress bar")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rcekd", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train_p = commands.add_parser("train", help="train a backbone (a teacher, or a student alone)")
    _add_data_args(train_p)
    train_p.add_argument("--model", required=True, choices=sorted(MODELS), help="backbone")
    train_p.add_argument("--role", default="teacher", choices=["teacher", "student"])
    _add_training_args(train_p)

    distill_p = commands.add_parser("distill", help="distil a teacher artifact into a student")
    _add_data_args(distill_p)
    distill_p.add_argument("--teacher", required=True, help="teacher artifact directory")
    distill_p.add_argument("--method", required=True, choices=sorted(METHODS), help="KD method ('none': student alone)")
    distill_p.add_argument("--student", default="mf", choices=sorted(MODELS), help="student backbone (mf)")
    _add_training_args(distill_p)
    for name, (kind, defaults) in method_options().items():
        text = ", ".join(f"{method} {default}" for method, default in defaults.items())
        parse = _parse_bool if kind is bool else kind
        distill_p.add_argument(_flag(name), dest=f"kd_{name}", type=parse, default=None, help=f"defaults: {text}")

    eval_p = commands.add_parser("evaluate", help="full-ranking metrics of an artifact directory, as JSON")
    _add_data_args(eval_p)
    eval_p.add_argument("--model", required=True, help="artifact directory")
    eval_p.add_argument("--split", default="test", choices=["valid", "test"])
    eval_p.add_argument("--protocol", default="strict", choices=["strict", "paper"])
    return parser


def _model_params(args: argparse.Namespace, arch: str) -> dict[str, Any]:
    known = MODEL_DEFAULTS[arch]
    params = {}
    for flag, (name, _, _) in MODEL_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        if name not in known:
            raise SystemExit(f"rcekd: {flag} does not apply to the {arch} backbone")
        params[name] = value
    return params


def _train_config(args: argparse.Namespace, arch: str) -> TrainConfig:
    defaults = TRAIN_DEFAULTS[arch]
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


class StopRequest:
    """SIGINT / SIGTERM end training at the next epoch boundary; the best model so far is saved."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._request)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _request(self, signum: int, frame: object) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        print("rcekd: stopping after this epoch (signal again to abort)", file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return self.requested


class ProgressBar:
    """Progress on stderr: a tqdm bar on a terminal, one line per validation in a log file."""

    def __init__(self, total: int, desc: str, disable: bool) -> None:
        self.desc = desc
        self.log_lines = not disable and not sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit="epoch", disable=disable or self.log_lines, file=sys.stderr)

    def __call__(self, progress: Progress) -> None:
        self.bar.update(1)
        postfix = {"loss": f"{progress.loss:.4g}", "best ndcg@10": f"{progress.best_ndcg:.4f}"}
        self.bar.set_postfix(postfix, refresh=False)
        if self.log_lines and progress.valid_ndcg is not None:
            print(
                f"{self.desc}: epoch {progress.epoch}/{progress.max_epochs} loss {progress.loss:.4g} "
                f"valid ndcg@10 {progress.valid_ndcg:.4f} (best {progress.best_ndcg:.4f} at {progress.best_epoch}) "
                f"{progress.seconds:.0f}s elapsed, eta {progress.eta_seconds:.0f}s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        self.bar.close()


def _summary(args: argparse.Namespace, manifest: dict[str, Any]) -> dict[str, Any]:
    keys = ("best_epoch", "epochs_run", "seconds", "seconds_per_epoch_train")
    return {
        "out": args.out,
        "id": manifest["id"],
        "metrics": manifest["metrics"],
        "training": {k: manifest["training"][k] for k in keys},
    }


def _run_train(args: argparse.Namespace) -> dict[str, Any]:
    config = _train_config(args, args.model)
    bar = ProgressBar(config.epochs, f"train {args.model}", args.quiet)
    with StopRequest() as stop, contextlib.closing(bar):
        manifest, _ = train_and_save(
            args.data,
            args.model,
            args.out,
            model_params=_model_params(args, args.model),
            config=config,
            role=args.role,
            valid_seed=args.valid_seed,
            on_progress=bar,
            should_stop=stop,
            overwrite=args.overwrite,
        )
    return _summary(args, manifest)


def _kd_options(args: argparse.Namespace) -> dict[str, Any]:
    """The KD flags given on the command line, refused when the method has no such option."""
    if args.method == "none":
        return {}
    accepted = inspect.signature(distiller_class(args.method).__init__).parameters
    options: dict[str, Any] = {}
    for name in method_options():
        value = getattr(args, f"kd_{name}")
        if value is None:
            continue
        if name not in accepted:
            raise SystemExit(f"rcekd: {_flag(name)} does not apply to --method {args.method}")
        options[name] = value
    return options


def _run_distill(args: argparse.Namespace) -> dict[str, Any]:
    config = _train_config(args, args.student)
    options = _kd_options(args)
    bar = ProgressBar(config.epochs, f"distill {args.method}", args.quiet)
    with StopRequest() as stop, contextlib.closing(bar):
        manifest, _ = distill_and_save(
            args.data,
            args.teacher,
            args.method,
            args.out,
            student_arch=args.student,
            student_params=_model_params(args, args.student),
            method_options=options,
            config=config,
            valid_seed=args.valid_seed,
            on_progress=bar,
            should_stop=stop,
            overwrite=args.overwrite,
        )
    return {**_summary(args, manifest), "kd": manifest["kd"]}


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
        runner = {"train": _run_train, "distill": _run_distill, "evaluate": _run_evaluate}[args.command]
        result = runner(args)
    except (ValueError, FileExistsError) as exc:  # DataError and CheckpointError are ValueErrors
        print(f"rcekd: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
