"""Teacher checkpoints uploaded to POST /distill, loaded without trusting them (DESIGN.md).

Formats are told apart by their bytes, never by the file's name: a project artifact archive (zip or
tar, extracted member by member after checking paths, kinds, counts and sizes), a bare safetensors
file, a PyTorch ``state_dict`` (only ever read with ``torch.load(weights_only=True)``; raw and legacy
pickles are refused unread), or an ONNX ``user_ids → scores`` graph. Every teacher is checked
against the dataset's users, items and, when it carries one, fingerprint.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import safe_open

from rcekd.checkpoint import MANIFEST, CheckpointError, load_model, load_weights, model_from_weights, trajectory_paths
from rcekd.data import Dataset
from rcekd.kd import METHODS, Teacher
from rcekd.kd.onnx_teacher import OnnxScoresTeacher, looks_like_onnx
from rcekd.models import MODELS, Recommender, build_model, model_from_config
from rcekd.pipeline import check_teacher_fits
from rcekd.safe_archive import check_zip_limits, extract_archive, is_zip

VECTOR_METHODS = frozenset(METHODS)
#: methods whose code uses only ``teacher.score`` / ``teacher.topk`` (DCD and HetComp rank with vectors)
SCORE_METHODS = frozenset({"rcekd", "ce", "cd", "rrd", "none"})
MAX_MEMBERS = 10_000
_EPOCH = re.compile(r"epoch_(\d+)\.safetensors$")
_TORCH_ZIP = re.compile(r"(^|/)data\.pkl$")


class MethodUnsupported(ValueError):  # noqa: N818 - the name callers catch
    """The KD method needs something this teacher does not have (vectors, a trajectory)."""


@dataclass
class ImportedTeacher:
    format: str  # "artifact" | "safetensors" | "state_dict" | "onnx_scores"
    teacher: Teacher | OnnxScoresTeacher  # ready for make_distiller
    model: Recommender | None  # the torch model when the teacher has vectors (None for ONNX scores)
    fingerprint: str | None  # dataset fingerprint the teacher carries, if any
    verified: bool  # fingerprint present and equal to the dataset's
    trajectory_dir: Path | None  # a directory holding trajectory/epoch_*.safetensors (HetComp)
    manifest: dict[str, Any]  # the artifact's manifest, or a synthesized one
    supports: frozenset[str]  # KD methods this teacher can drive


def require_method(imported: ImportedTeacher, method: str) -> None:
    """Refuse, before any training, a KD method this teacher cannot drive."""
    if method in imported.supports:
        return
    if method not in METHODS:
        raise MethodUnsupported(f"unknown KD method {method!r}; expected one of {sorted(METHODS)}")
    if imported.format == "onnx_scores":
        raise MethodUnsupported(
            f"{method} needs the teacher's user and item vectors; an ONNX scores teacher only gives scores "
            f"(it supports {sorted(imported.supports)})"
        )
    raise MethodUnsupported(
        "hetcomp needs the teacher's trajectory checkpoints (an artifact archive with "
        f"trajectory/epoch_*.safetensors saved before its best epoch); this {imported.format} teacher has none"
    )


def import_teacher(
    path: Path,
    dataset: Dataset,
    workdir: Path,
    *,
    arch: str | None = None,
    hyperparameters: dict[str, Any] | None = None,
    max_extract_bytes: int = 4 << 30,
    max_members: int = MAX_MEMBERS,
    logit_scale: float | None = None,
) -> ImportedTeacher:
    """Load an uploaded teacher of any accepted format, checked against ``dataset``.

    ``arch``/``hyperparameters`` describe the model when the file does not (state_dicts, safetensors
    without a "config" metadata entry). Archives are extracted into a fresh folder under ``workdir``,
    removed again when the teacher is refused.
    """
    path = Path(path)
    if path.is_dir():  # an artifact directory the service holds (POST /teachers): nothing to extract
        return _artifact_teacher(path, dataset, logit_scale)
    kind = detect_format(path)
    if kind == "onnx_scores":
        teacher = OnnxScoresTeacher.from_file(path, dataset.n_users, dataset.n_items, logit_scale=logit_scale or 1.0)
        manifest = {"arch": "onnx", "hyperparameters": {}, "n_parameters": teacher.info["n_parameters"], "format": kind}
        return ImportedTeacher(kind, teacher, None, None, False, None, manifest, SCORE_METHODS)
    if kind == "artifact":
        Path(workdir).mkdir(parents=True, exist_ok=True)
        dest = Path(tempfile.mkdtemp(prefix="teacher.", dir=workdir))
        try:
            return _artifact_teacher(extract_archive(path, dest, max_extract_bytes, max_members), dataset, logit_scale)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
    if kind == "state_dict":
        check_zip_limits(path, max_extract_bytes, max_members)
        state, (config, fingerprint) = _torch_state(path), (None, None)
    else:
        state, (config, fingerprint) = load_weights(path), _safetensors_meta(path)
    config = {**_sizes(dataset), **(config or _spec_config(kind, arch, hyperparameters, dataset))}
    try:
        model = model_from_weights(config, _with_data_buffers(config, state, dataset))
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (the dataset has {dataset.n_users} users × {dataset.n_items} items)") from exc
    hyper = {k: v for k, v in model.config().items() if k != "arch"}
    manifest = {"arch": model.arch, "hyperparameters": hyper, "n_parameters": model.num_parameters(), "format": kind}
    return _vector_teacher(kind, model.eval(), manifest, fingerprint, None, dataset, logit_scale)


def _artifact_teacher(root: Path, dataset: Dataset, logit_scale: float | None) -> ImportedTeacher:
    model, manifest = load_model(root)
    recorded = manifest.get("dataset")
    fingerprint = recorded.get("fingerprint") if isinstance(recorded, dict) else None
    trajectory = root if _has_early_trajectory(root, manifest) else None
    return _vector_teacher("artifact", model, manifest, fingerprint, trajectory, dataset, logit_scale)


def _vector_teacher(
    kind: str,
    model: Recommender,
    manifest: dict[str, Any],
    fingerprint: str | None,
    trajectory_dir: Path | None,
    dataset: Dataset,
    logit_scale: float | None,
) -> ImportedTeacher:
    """Refuse a teacher of other data (other splits leak the test set), else wrap it."""
    check_teacher_fits(model, fingerprint, dataset, required=False)
    supports = VECTOR_METHODS if trajectory_dir else VECTOR_METHODS - {"hetcomp"}
    teacher = Teacher(model, logit_scale=logit_scale)
    verified = fingerprint is not None
    return ImportedTeacher(kind, teacher, model, fingerprint, verified, trajectory_dir, manifest, supports)


# ------------------------------------------------------------------------------------ detection
def detect_format(path: Path) -> str:
    """'artifact' | 'state_dict' | 'safetensors' | 'onnx_scores', from the bytes."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if is_zip(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise CheckpointError(f"{path.name}: a damaged zip archive ({exc})") from exc
        if any(_TORCH_ZIP.search(name) for name in names):
            return "state_dict"
        if any(PurePosixPath(name).name == MANIFEST and len(PurePosixPath(name).parts) <= 2 for name in names):
            return "artifact"
        raise CheckpointError(f"unrecognised teacher format: {path.name} is a zip without {MANIFEST} or data.pkl")
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    if 2 <= header_len <= min(path.stat().st_size - 8, 100 << 20) and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"\x1f\x8b" or tarfile.is_tarfile(path):
        return "artifact"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise CheckpointError(
            f"{path.name} is a raw pickle (or a legacy, pre-zip torch.save file): refused, since unpickling can "
            "run code; re-save the state_dict with torch.save (zip format, PyTorch ≥ 1.6) or as safetensors"
        )
    if looks_like_onnx(path):
        return "onnx_scores"
    raise CheckpointError(
        f"unrecognised teacher format: {path.name} is none of an artifact archive (.zip/.tar/.tar.gz), "
        "safetensors, a torch.save state_dict or an ONNX model"
    )


def _torch_state(path: Path) -> dict[str, torch.Tensor]:
    """dict[str, Tensor] from a torch.save zip, possibly under "state_dict"/"model"; never runs pickle code."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # a global outside the allowlist: code that would have run
        found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?:\. Please|\n|$)", str(exc))
        raise CheckpointError(
            f"{path.name}: refused: it holds objects other than tensors, which unpickling could run as code "
            f"(torch.load weights_only=True: {found.group(1) if found else 'not weights only'})"
        ) from exc
    except Exception as exc:  # damaged zips, truncated records
        raise CheckpointError(f"{path.name}: not a readable torch.save file ({str(exc)[:200]})") from exc
    for key in ("state_dict", "model"):  # training scripts often wrap the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path.name}: expected a state_dict (dict of tensors), got {type(obj).__name__}")
    bad = [f"{k!r}: {type(v).__name__}" for k, v in obj.items() if not (isinstance(k, str) and _dense(v))]
    if bad:
        raise CheckpointError(f"{path.name}: a state_dict holds only dense tensors, not {', '.join(bad[:5])}")
    return obj


def _dense(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.layout == torch.strided


def _safetensors_meta(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(config, dataset fingerprint) from the header's metadata, each None when absent."""
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    try:
        config = json.loads(meta["config"]) if "config" in meta else None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"safetensors metadata 'config' is not JSON ({exc})") from exc
    if config is not None and not isinstance(config, dict):
        raise CheckpointError("safetensors metadata 'config' must be a JSON object")
    return config, meta.get("dataset_fingerprint")


def _spec_config(kind: str, arch: str | None, hyper: dict[str, Any] | None, dataset: Dataset) -> dict[str, Any]:
    if arch is None:
        raise CheckpointError(f"a {kind} file does not describe its model: give the architecture and hyper-parameters")
    if arch not in MODELS:
        raise CheckpointError(f"unknown architecture {arch!r}; expected one of {sorted(MODELS)}")
    params = {k: v for k, v in (hyper or {}).items() if k not in ("arch", "n_users", "n_items", "train")}
    return {"arch": arch, **params, **_sizes(dataset)}


def _sizes(dataset: Dataset) -> dict[str, int]:
    return {"n_users": dataset.n_users, "n_items": dataset.n_items}


def _with_data_buffers(config: dict[str, Any], state: dict[str, torch.Tensor], dataset: Dataset) -> dict[str, Any]:
    """Fill data buffers (LightGCN edges, HSTU histories) a foreign state_dict lacks from the dataset."""
    try:
        with torch.device("meta"):
            template = model_from_config(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"config does not describe a known model: {exc}") from exc
    missing = [name for name, buffer in template.named_buffers() if buffer.numel() == 0 and name not in state]
    if not missing:
        return state
    hyper = {k: v for k, v in config.items() if k not in ("arch", "n_users", "n_items")}
    built = build_model(config["arch"], dataset, **hyper).state_dict()
    return {**state, **{name: built[name] for name in missing}}


# ------------------------------------------------------------------------------------ archives
def _has_early_trajectory(root: Path, manifest: dict[str, Any]) -> bool:
    """What HetComp's load_trajectory needs: a checkpoint saved before the best epoch."""
    best = (manifest.get("training") or {}).get("best_epoch")
    epochs = [int(m.group(1)) for p in trajectory_paths(root) if (m := _EPOCH.search(p.name))]
    return any(not best or epoch < best for epoch in epochs)
