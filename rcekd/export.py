"""Export a trained model's serving files: ONNX user tower, FAISS item index, seen items, id maps.

The user tower is exported with torch.export (``torch.onnx.export(dynamo=True)``, onnxscript), the
default and maintained path in torch 2.13; the deprecated TorchScript exporter (``dynamo=False``) also
gives a correct graph for all three backbones and is ~20× faster, so it stays available as an option.
Every export is checked against PyTorch by running the written file in onnxruntime, and a mismatch is
an error, not a warning.

* MF / LightGCN: the user vectors are fixed once trained (LightGCN's are the propagated ones), so the
  tower is one Gather over a constant table — the graph propagation is not needed at serving time.
* HSTU: the real network — the users' padded histories are a constant table inside the graph and the
  transformer blocks run on them, so a user's vector is computed, not looked up.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from rcekd import faiss_index
from rcekd.data import Dataset
from rcekd.models import HSTU, Recommender
from rcekd.retrieval import IDS_FILE, INDEX_FILE, ONNX_FILE, PROVIDER_HINT, SEEN_FILE, onnx_opset, write_ids, write_seen

#: above this many bytes of weights the ONNX protobuf (2 GiB limit) keeps them in model.onnx.data
EXTERNAL_DATA_BYTES = 1_800_000_000
#: users whose vectors are compared against the PyTorch model when checking recall of an ANN index
RECALL_QUERIES = 1000


class ExportError(ValueError):
    """The exported graph does not reproduce the PyTorch model's user vectors."""


class TableTower(nn.Module):
    """user_ids → rows of a constant table (an ONNX Gather over an initializer)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", table.detach().float().contiguous().clone())

    def forward(self, user_ids: torch.Tensor) -> torch.Tensor:
        return self.table.index_select(0, user_ids)


class NetworkTower(nn.Module):
    """user_ids → the model's own ``user_vectors`` (HSTU: histories buffer + transformer blocks)."""

    def __init__(self, model: Recommender) -> None:
        super().__init__()
        self.model = model

    def forward(self, user_ids: torch.Tensor) -> torch.Tensor:
        return self.model.user_vectors(user_ids)


def user_tower(model: Recommender) -> tuple[nn.Module, str]:
    """The module to export and its kind ("network" for HSTU, "table" otherwise); ``model`` in eval."""
    if isinstance(model, HSTU):
        return NetworkTower(model), "network"
    with torch.no_grad():
        users, _ = model.all_vectors()
    return TableTower(users), "table"


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def export_user_tower(
    model: Recommender, path: Path, *, parity_users: int = 256, atol: float = 1e-4, dynamo: bool = True
) -> dict:
    """Write the ONNX user tower (user_ids int64[batch] → user_vectors float32[batch, d]) and check it.

    Parity: onnxruntime on a seeded sample of ``parity_users`` users (one batch) and on a batch of one
    user, against the PyTorch model in eval mode; ExportError when max |Δ| > ``atol``.
    """
    if parity_users < 1:
        raise ValueError(f"parity_users must be at least 1, got {parity_users}")
    path = Path(path)
    was_training = model.training
    model.eval()
    try:
        tower, kind = user_tower(model)
        tower.eval()
        n_bytes = sum(t.numel() * t.element_size() for t in [*tower.parameters(), *tower.buffers()])
        example = torch.zeros(2, dtype=torch.int64, device=model.device)
        kwargs: dict[str, Any]
        if dynamo:
            kwargs = {"external_data": n_bytes > EXTERNAL_DATA_BYTES, "verbose": False}
            kwargs["dynamic_shapes"] = {"user_ids": {0: torch.export.Dim("batch")}}
        else:
            kwargs = {"dynamic_axes": {"user_ids": {0: "batch"}, "user_vectors": {0: "batch"}}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notices from inside the exporters
            torch.onnx.export(
                tower,
                (example,),
                str(path),
                dynamo=dynamo,
                input_names=["user_ids"],
                output_names=["user_vectors"],
                **kwargs,
            )
        rng = np.random.default_rng(0)
        users = np.sort(rng.choice(model.n_users, size=min(parity_users, model.n_users), replace=False))
        users = users.astype(np.int64)
        session = _session(path)
        diff = 0.0
        for batch in (users, users[:1]):
            onnx_out = session.run(["user_vectors"], {"user_ids": batch})[0]
            with torch.no_grad():
                torch_out = model.user_vectors(torch.from_numpy(batch).to(model.device)).float().cpu().numpy()
            if onnx_out.shape != torch_out.shape:
                raise ExportError(f"ONNX user tower returned {onnx_out.shape}, PyTorch {torch_out.shape}")
            diff = max(diff, float(np.abs(onnx_out - torch_out).max(initial=0.0)))
    finally:
        model.train(was_training)
    if not diff <= atol:
        raise ExportError(f"ONNX user tower differs from PyTorch by {diff:.3g} (> atol {atol:g}) on {len(users)} users")
    return {
        "opset": onnx_opset(path),
        "parity_max_abs_diff": diff,
        "parity_users": len(users),
        "dim": int(torch_out.shape[1]),
        "exporter": f"torch.onnx.export(dynamo={dynamo}), torch {torch.__version__}",
        "tower": kind,
        "external_data": dynamo and n_bytes > EXTERNAL_DATA_BYTES,
    }


def write_serving_files(
    directory: Path,
    model: Recommender,
    dataset: Dataset,
    *,
    index: str = "flat",
    index_options: dict[str, Any] | None = None,
) -> dict:
    """Write model.onnx, items.faiss, seen.npz and ids.json; return the manifest's serving section."""
    directory = Path(directory)
    if (model.n_users, model.n_items) != (dataset.n_users, dataset.n_items):
        raise ValueError(
            f"model has {model.n_users}×{model.n_items} users×items, dataset {dataset.n_users}×{dataset.n_items}"
        )
    options = faiss_index.index_options(index, model.n_items, index_options)  # fail before the slow export
    onnx_info = export_user_tower(model, directory / ONNX_FILE)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            users, items = model.all_vectors()
            users, items = (np.ascontiguousarray(t.float().cpu().numpy()) for t in (users, items))
    finally:
        model.train(was_training)
    built = faiss_index.build_index(items, index, **options)
    faiss_index.save_index(built, directory / INDEX_FILE)
    recall = 1.0
    if index != "flat":
        sample = np.random.default_rng(0).choice(len(users), size=min(RECALL_QUERIES, len(users)), replace=False)
        recall = faiss_index.recall_against_flat(built, items, np.ascontiguousarray(users[np.sort(sample)]), k=20)
    write_seen(directory / SEEN_FILE, dataset)
    write_ids(directory / IDS_FILE, dataset)
    return {
        "mode": "vectors",
        "onnx": onnx_info,
        "index": {"kind": index, "options": options, "recall@20_vs_flat": recall, "ntotal": int(built.ntotal)},
        "provider_hint": list(PROVIDER_HINT),
    }


def serving_writer(
    model: Recommender, dataset: Dataset, index: str = "flat", index_options: dict[str, Any] | None = None
) -> Callable[[Path], dict]:
    """The ``serving`` hook of :func:`rcekd.checkpoint.save_artifact` for this model and dataset."""

    def write(staging: Path) -> dict:
        return write_serving_files(staging, model, dataset, index=index, index_options=index_options)

    return write
