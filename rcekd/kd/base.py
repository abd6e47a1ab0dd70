"""The frozen teacher and the one base class every KD method implements.

A distiller refreshes what it needs from the student once per epoch (``on_epoch_start``, no
gradients) and returns its KD term for a batch (``loss``). Per METHOD.md §2 step 8 the KD term is
computed for each batch row's user and summed; since rows of one user share the term, it is computed
once per distinct user and weighted by the user's row count — the same value, far cheaper.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import scipy.sparse as sp
import torch

from rcekd.data import Dataset
from rcekd.kd import kernels
from rcekd.kd.list_ce import ListCrossEntropy, ListTable
from rcekd.kd.topk import topk_items
from rcekd.models.base import Batch, Recommender


def rowwise_isin(values: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """bool[b, k]: values[r, j] occurs in pool[r, :] (broadcast compare; callers chunk the rows)."""
    return (values.unsqueeze(2) == pool.unsqueeze(1)).any(2)


def user_chunks(n_users: int, per_user: int, budget: int = 2**26) -> list[tuple[int, int]]:
    """(start, stop) row ranges so that temporaries of ``per_user`` elements a user stay under ``budget``."""
    step = max(1, budget // max(per_user, 1))
    return [(start, min(start + step, n_users)) for start in range(0, n_users, step)]


def rowwise_positions(values: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """int64[b, k]: the column of ``values[r, j]`` in ``pool[r, :]`` (rows of distinct ids), or
    ``pool.shape[1]`` where absent. On CPU a compiled scratch-table lookup (:func:`kernels.list_positions`);
    elsewhere a sort and a binary search — O(n log n) a row where the broadcast compare of
    :func:`rowwise_isin` is O(k · n)."""
    n = pool.shape[1]
    if n == 0:
        return torch.zeros_like(values)
    if values.device.type == "cpu":
        return kernels.list_positions(values, pool)
    return sorted_positions(values, pool)


def sorted_positions(values: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """:func:`rowwise_positions` by a sort and a binary search (any device; rows of distinct ids)."""
    n = pool.shape[1]
    sorted_pool, order = pool.sort(1)
    at = torch.searchsorted(sorted_pool, values).clamp_(max=n - 1)
    found = sorted_pool.gather(1, at) == values
    return torch.where(found, order.gather(1, at), n)


def gathered_scores(user_vecs: torch.Tensor, item_vecs: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """float[b, w]: ``einsum("bd,bwd->bw", user_vecs, item_vecs[items])`` (same values up to rounding),
    differentiable in both vector sets. On CPU through the compiled loops of :mod:`rcekd.kd.kernels`
    (one pass forward, one back, the item gradient a scatter-add): torch's gather writes a fresh
    b × w × d tensor each way, and its sparse kernels sort the b · w item ids every batch; on a
    Gowalla batch both cost 2–3× the loops."""
    compiled = (
        item_vecs.device.type == "cpu"
        and items.numel() > 0
        and items.dtype == torch.int64
        and item_vecs.dtype in kernels.FLOATS
        and user_vecs.dtype == item_vecs.dtype
    )
    if not compiled:  # CUDA (or odd dtypes): torch's own gather is the fast path there
        return torch.einsum("bd,bwd->bw", user_vecs, item_vecs[items])
    return kernels.ListScores.apply(user_vecs, item_vecs, items)


def student_scores(student: Recommender, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """The student's ``score(users, items)`` for a KD term, by the faster :func:`gathered_scores`.

    Every backbone scores by ``user_vectors(u) · item_vectors()[i]``; students with row-sparse
    embeddings keep their own ``score`` (a dense item gradient would defeat their sparse updates).
    """
    if student.sparse_embeddings:
        return student.score(users, items)
    return gathered_scores(student.user_vectors(users), student.item_vectors(), items)


def fused_list_loss_available(student: Recommender) -> bool:
    """Whether :func:`list_cross_entropy` can run the compiled kernel for this student (CPU, float
    vectors, dense embeddings); otherwise a distiller computes its term from :func:`student_scores`."""
    item_vecs = student.item_vectors()
    return item_vecs.device.type == "cpu" and item_vecs.dtype in kernels.FLOATS and not student.sparse_embeddings


def list_cross_entropy(
    student: Recommender, users: torch.Tensor, table: ListTable, weights: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """The weighted sum of soft cross-entropies on segments of each batch user's list (row ``users[r]``
    of ``table``), in one compiled pass (:class:`ListCrossEntropy`): for CPU students with dense
    embeddings (see :func:`fused_list_loss_available`); equal, up to rounding, to the same sum of torch ops."""
    return ListCrossEntropy.apply(student.user_vectors(users), student.item_vectors(), table, users, weights, scale)


def teacher_scores(teacher: Teacher, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """``teacher.score(users, items)`` (same values up to rounding); for a vector :class:`Teacher`
    by :func:`gathered_scores`, which never gathers the b × k × d item rows (d = 300: 7× faster)."""
    if type(teacher).score is not Teacher.score:  # e.g. an ONNX teacher: only its own score
        return teacher.score(users, items)
    with torch.no_grad():
        return gathered_scores(teacher.user_vecs[users], teacher.item_vecs, items) * teacher.logit_scale


class Teacher:
    """A frozen teacher with vectors: its scores for any (user, items) set, computed on demand.

    ``logit_scale`` multiplies its scores (cosine teachers such as HSTU give nearly flat softmaxes
    unless their logits are scaled; the default for them is 1 / their training temperature).
    """

    def __init__(self, model: Recommender, logit_scale: float | None = None, device: torch.device | None = None):
        self.model = model
        self.arch = model.arch
        self.logit_scale = float(logit_scale if logit_scale is not None else default_logit_scale(model))
        device = device or model.device
        was_training = model.training
        model.eval()
        with torch.no_grad():
            users, items = model.all_vectors()
        model.train(was_training)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
            parameter.grad = None  # frozen: leftovers of its own training are dropped
        self.user_vecs = users.detach().to(device)
        self.item_vecs = items.detach().to(device)

    def to(self, device: torch.device | str) -> Teacher:
        self.user_vecs = self.user_vecs.to(device)
        self.item_vecs = self.item_vecs.to(device)
        return self

    @property
    def n_users(self) -> int:
        return self.user_vecs.shape[0]

    @property
    def n_items(self) -> int:
        return self.item_vecs.shape[0]

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """float[b, k] scaled teacher logits of ``items`` (int64[b, k]) for ``users`` (int64[b]).

        Rows go in sub-chunks: gathering item vectors materialises b × k × d floats, which for a
        d=300 teacher and a whole epoch's sets would be gigabytes.
        """
        step = max(1, 2**22 // max(items.shape[1] * self.item_vecs.shape[1], 1))
        parts = [
            torch.einsum("bd,bkd->bk", self.user_vecs[users[i : i + step]], self.item_vecs[items[i : i + step]])
            for i in range(0, len(users), step)
        ]
        return torch.cat(parts) * self.logit_scale if parts else items.new_zeros(items.shape, dtype=torch.float)

    def topk(self, k: int, exclude: sp.csr_matrix | None = None) -> torch.Tensor:
        return topk_items(self.user_vecs, self.item_vecs, k, exclude)


def default_logit_scale(model: Recommender) -> float:
    """Cosine models are trained with logits / temperature; their KD logits get the same scale."""
    temperature = model.hparams.get("temperature")
    return 1.0 / temperature if model.arch == "hstu" and temperature else 1.0


def student_vectors(student: Recommender) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's current vectors without gradients, in eval mode (no dropout)."""
    was_training = student.training
    student.eval()
    with torch.no_grad():
        users, items = student.all_vectors()
    student.train(was_training)
    return users, items


def soft_cross_entropy(teacher_logits: torch.Tensor, student_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-row CE(softmax(t), softmax(s)) over the entries where ``valid``; 0 for rows with none."""
    neg_inf = torch.tensor(-torch.inf, device=teacher_logits.device)
    t = torch.where(valid, teacher_logits, neg_inf)
    s = torch.where(valid, student_logits, neg_inf)
    has_any = valid.any(1, keepdim=True)
    t = torch.where(has_any, t, torch.zeros_like(t))
    s = torch.where(has_any, s, torch.zeros_like(s))
    target = torch.softmax(t, dim=1)
    log_q = torch.log_softmax(s, dim=1)
    return -(target * torch.where(valid, log_q, torch.zeros_like(log_q))).sum(1) * has_any.squeeze(1)


class Distiller(ABC):
    """A KD method: a loss added to the student's own loss with weight ``weight`` (λ)."""

    name: ClassVar[str]

    def __init__(self, teacher: Teacher, dataset: Dataset, weight: float = 1.0, seed: int = 0, **options: Any):
        self.teacher = teacher
        self.dataset = dataset
        self.weight = weight
        self.seed = seed
        self.options = options
        self.generator = torch.Generator(device=teacher.user_vecs.device).manual_seed(seed)
        self._last_rankings: dict[str, torch.Tensor] = {}

    def rank_student(
        self, key: str, query: torch.Tensor, targets: torch.Tensor, k: int, exclude: sp.csr_matrix | None = None
    ) -> torch.Tensor:
        """:func:`topk_items` of the student, hinted by the ranking it made under ``key`` last epoch
        (its worst score is a valid threshold; late in training sometimes a tighter one). The hint
        only speeds things up: a resumed run, which starts without one, ranks the same."""
        top = topk_items(query, targets, k, exclude, hint=self._last_rankings.get(key))
        self._last_rankings[key] = top
        return top

    def settings(self) -> dict[str, Any]:
        """What the manifest records: the method, λ and every option."""
        return {
            "method": self.name,
            "weight": self.weight,
            "teacher_logit_scale": self.teacher.logit_scale,
            **self.options,
        }

    @abstractmethod
    def on_epoch_start(self, student: Recommender, epoch: int) -> None:
        """Refresh per-epoch state from the student (no gradients)."""

    @abstractmethod
    def user_loss(self, users: torch.Tensor, student: Recommender) -> torch.Tensor:
        """float[len(users)]: the KD term of each (distinct) user."""

    def diagnostics(self) -> dict[str, Any]:
        """Per-epoch figures worth logging (e.g. RCE-KD's mean γ); none by default."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What carries over from one epoch to the next, so a killed run can resume (:mod:`rcekd.resume`).

        Per-epoch state is rebuilt by ``on_epoch_start`` from the student, so only the sampling
        generator is needed here; methods that accumulate state across epochs extend both hooks.
        Values are tensors or JSON values (nested dicts, lists and tuples of them are fine).
        """
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (from this method, same settings)."""
        self.generator.set_state(state["generator"].to("cpu", torch.uint8))

    def loss(self, batch: Batch, student: Recommender) -> torch.Tensor:
        users, counts = torch.unique(student.batch_users(batch), return_counts=True)
        return self.weight * (self.user_loss(users, student) * counts).sum()

    def batch_user_weights(self, batch: Batch, student: Recommender) -> tuple[torch.Tensor, torch.Tensor]:
        """(the batch's distinct users, float[b, 1] = λ × each one's row count): the per-row
        reduction of :meth:`loss`, for methods that sum their term in one fused pass."""
        users, counts = torch.unique(student.batch_users(batch), return_counts=True)
        return users, (self.weight * counts.float()).unsqueeze(1)  # the kernel casts to the vectors' dtype
