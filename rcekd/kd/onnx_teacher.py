"""A teacher known only by its scores: an ONNX graph ``user_ids`` int64[b] → ``scores`` float32[b, n_items].

It lets a user distil any architecture without the project knowing its code (DESIGN.md, "Teacher
checkpoints"). It offers what the score-only KD methods use from :class:`rcekd.kd.base.Teacher` —
``score``, ``topk``, ``n_users``, ``n_items``, ``logit_scale``, ``to`` — and has no vectors, so DCD
and HetComp (which rank with the teacher's user and item vectors) cannot use it.

Scores are computed on demand in user chunks of at most :data:`CHUNK_SCORES` floats: a dense
users × items matrix is never held.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import scipy.sparse as sp
import torch
from onnx.external_data_helper import _get_all_tensors

from rcekd.checkpoint import CheckpointError
from rcekd.kd.topk import CHUNK_SCORES

INPUT = "user_ids"
OUTPUT = "scores"


def _value_type(value: onnx.ValueInfoProto) -> tuple[int, int | None, list[int | str]]:
    """(element type, rank or None, dims: int when static, the symbol's name or '?' when dynamic)."""
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
        return tensor.elem_type, None, []
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
    return tensor.elem_type, len(dims), dims


def check_scores_graph(model: onnx.ModelProto, n_items: int) -> dict[str, Any]:
    """Raise CheckpointError unless ``model`` is a valid, self-contained user_ids → scores graph.

    External data is refused: an upload is one file, and a tensor "stored" at a path of the
    uploader's choosing would be read from this machine's disk.
    """
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in _get_all_tensors(model)):
        raise CheckpointError("ONNX teacher stores tensors in external files: re-export it as one file")
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise CheckpointError(f"ONNX teacher fails onnx.checker: {exc}") from exc
    graph = model.graph
    weights = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in weights]
    if [v.name for v in inputs] != [INPUT]:
        raise CheckpointError(f"ONNX teacher must take one input {INPUT!r}, it takes {[v.name for v in inputs]}")
    elem, rank, dims = _value_type(inputs[0])
    if elem != onnx.TensorProto.INT64 or rank not in (None, 1):
        raise CheckpointError(
            f"ONNX input {INPUT!r} must be int64[batch], it is {onnx.TensorProto.DataType.Name(elem)}{dims}"
        )
    outputs = {v.name: v for v in graph.output}
    if OUTPUT not in outputs:
        raise CheckpointError(f"ONNX teacher must output {OUTPUT!r}, it outputs {sorted(outputs)}")
    elem, rank, dims = _value_type(outputs[OUTPUT])
    if elem != onnx.TensorProto.FLOAT or rank not in (None, 2):
        raise CheckpointError(
            f"ONNX output {OUTPUT!r} must be float32[batch, n_items], "
            f"it is {onnx.TensorProto.DataType.Name(elem)}{dims}"
        )
    if rank == 2 and isinstance(dims[1], int) and dims[1] not in (0, n_items):
        raise CheckpointError(f"ONNX output {OUTPUT!r} has {dims[1]} items, the dataset {n_items}")
    n_parameters = sum(int(np.prod(t.dims)) for t in graph.initializer)
    return {"opset": [f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import], "n_parameters": n_parameters}


def looks_like_onnx(path: str | Path) -> bool:
    """Whether the file parses as an ONNX model with a graph (tried last: protobuf has no magic bytes)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf rejects non-ONNX bytes with assorted exception types
        return False
    return model.ir_version > 0 and len(model.graph.node) > 0


class OnnxScoresTeacher:
    """A frozen scores-only teacher run by onnxruntime on the CPU; results are moved to ``device``."""

    arch = "onnx"

    def __init__(
        self,
        path: str | Path,
        n_users: int,
        n_items: int,
        logit_scale: float = 1.0,
        device: torch.device | str | None = None,
        threads: int | None = None,
    ) -> None:
        if logit_scale <= 0:
            raise ValueError(f"logit_scale must be > 0 (it must not reorder items), got {logit_scale}")
        self.path = Path(path)
        self._n_users, self._n_items = n_users, n_items
        self.logit_scale = float(logit_scale)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for any bad graph
            raise CheckpointError(f"onnxruntime cannot load the ONNX teacher: {exc}") from exc
        self.device = torch.device(device or "cpu")
        # CD and Distiller read ``user_vecs`` for its device (and width, for chunking); a scores teacher
        # has no vectors, so it carries a zero-width stand-in of no memory
        self.user_vecs = torch.empty(n_users, 0, device=self.device)
        self.info: dict[str, Any] = {}  # what the graph check found (opset, n_parameters), set by from_file

    @classmethod
    def from_file(cls, path: str | Path, n_users: int, n_items: int, **kwargs: Any) -> OnnxScoresTeacher:
        """Load, validate (graph, names, dtypes) and probe on two users: a wrong model fails here, not mid-run."""
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError and friends
            raise CheckpointError(f"{Path(path).name}: not an ONNX model ({exc})") from exc
        info = check_scores_graph(model, n_items)
        del model
        teacher = cls(path, n_users, n_items, **kwargs)
        probe = torch.tensor([0, n_users - 1], dtype=torch.int64)
        try:
            scores = teacher._run(probe)
        except Exception as exc:
            raise CheckpointError(f"ONNX teacher fails on user ids {probe.tolist()}: {exc}") from exc
        if not torch.isfinite(scores).all():
            raise CheckpointError("ONNX teacher gives non-finite scores for users 0 and n_users - 1")
        teacher.info = info
        return teacher

    @property
    def n_users(self) -> int:
        return self._n_users

    @property
    def n_items(self) -> int:
        return self._n_items

    def to(self, device: torch.device | str) -> OnnxScoresTeacher:
        self.device = torch.device(device)
        self.user_vecs = self.user_vecs.to(self.device)
        return self

    def _run(self, users: torch.Tensor) -> torch.Tensor:
        """float32[len(users), n_items] raw scores of ``users`` (one onnxruntime call)."""
        ids = np.ascontiguousarray(users.detach().to("cpu").numpy().astype(np.int64, copy=False))
        (scores,) = self.session.run([OUTPUT], {INPUT: ids})
        if scores.shape != (len(ids), self._n_items) or scores.dtype != np.float32:
            raise CheckpointError(
                f"ONNX teacher returned {scores.dtype}{list(scores.shape)} for {len(ids)} users, "
                f"expected float32[{len(ids)}, {self._n_items}]"
            )
        return torch.from_numpy(scores).to(self.device)

    def _chunk(self) -> int:
        return max(1, CHUNK_SCORES // max(self._n_items, 1))

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """float[b, k] scaled logits of ``items`` (int64[b, k]) for ``users`` (int64[b]).

        The graph runs once per chunk of *distinct* users; rows are grouped by user with one sort.
        """
        out = torch.empty(items.shape, dtype=torch.float32, device=self.device)
        if users.numel() == 0:
            return out
        users, items = users.to(self.device), items.to(self.device)
        distinct, inverse = torch.unique(users, return_inverse=True)
        order = inverse.argsort()
        sorted_inverse = inverse[order]
        step = self._chunk()
        starts = torch.arange(0, len(distinct) + step, step, device=self.device).clamp(max=len(distinct))
        bounds = torch.searchsorted(sorted_inverse, starts).tolist()
        for chunk, (lo, hi) in enumerate(pairwise(bounds)):  # every distinct user has rows: lo < hi
            start = chunk * step
            block = self._run(distinct[start : start + step])
            rows = order[lo:hi]
            out[rows] = block[(inverse[rows] - start).unsqueeze(1), items[rows]]
        return out * self.logit_scale

    def topk(self, k: int, exclude: sp.csr_matrix | None = None) -> torch.Tensor:
        """int64[n_users, k]: each user's k best items, best first; ``exclude`` removes items per user."""
        k = min(k, self._n_items)
        step = self._chunk()
        out = torch.empty(self._n_users, k, dtype=torch.int64, device=self.device)
        for start in range(0, self._n_users, step):
            stop = min(start + step, self._n_users)
            scores = self._run(torch.arange(start, stop))
            if exclude is not None:
                coo = exclude[start:stop].tocoo()
                rows = torch.from_numpy(coo.row.astype(np.int64)).to(self.device)
                cols = torch.from_numpy(coo.col.astype(np.int64)).to(self.device)
                scores[rows, cols] = -torch.inf
            out[start:stop] = scores.topk(k, dim=1).indices
        return out
