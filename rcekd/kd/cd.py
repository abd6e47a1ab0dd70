"""CD: Collaborative Distillation (Lee et al., ICDM 2019), as METHOD.md §3 specifies it.

Every epoch, per user (in chunks, no gradients): the student's top-mxK unobserved items (training items
excluded), from which ``n_samples`` are drawn without replacement with rank-discounted probability
p ∝ exp(−rank/T_rank) (Gumbel-top-k), and the teacher's soft labels σ(t_ui / T) on them, which only
change once per epoch. Per batch: Σ over the sampled items of BCE(σ(s_ui), σ(t_ui / T)) — items the
student already ranks high are pulled towards the teacher's confidence in them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rcekd.data import Dataset
from rcekd.kd.base import Distiller, Teacher, student_scores, student_vectors, teacher_scores, user_chunks
from rcekd.kd.sampling import allowed_counts, gumbel_topk
from rcekd.kd.threads import single_torch_thread
from rcekd.models.base import Recommender


class CD(Distiller):
    name = "cd"

    def __init__(
        self,
        teacher: Teacher,
        dataset: Dataset,
        weight: float = 0.5,
        seed: int = 0,
        *,
        n_samples: int = 10,
        mxK: int = 100,
        T_rank: float = 10.0,
        T: float = 2.0,
    ) -> None:
        mxK = min(mxK, teacher.n_items)
        if not 0 < n_samples <= mxK or T_rank <= 0 or T <= 0:
            raise ValueError(f"need 0 < n_samples ≤ mxK and T_rank, T > 0 (n_samples={n_samples}, mxK={mxK})")
        super().__init__(teacher, dataset, weight, seed, n_samples=n_samples, mxK=mxK, T_rank=T_rank, T=T)
        self.n_samples, self.mxK, self.T_rank, self.T = n_samples, mxK, T_rank, T
        self.train_csr = dataset.csr("train")
        self.allowed = allowed_counts(self.train_csr, teacher.user_vecs.device)
        self.state: dict[str, torch.Tensor] = {}

    def on_epoch_start(self, student: Recommender, epoch: int) -> None:
        user_vecs, item_vecs = student_vectors(student)
        candidates = self.rank_student("top", user_vecs, item_vecs, self.mxK, exclude=self.train_csr)
        parts: dict[str, list[torch.Tensor]] = {}
        # teacher.score materialises n_samples × d floats a user
        per_user = max(self.mxK, self.n_samples * self.teacher.user_vecs.shape[1])
        for start, stop in user_chunks(candidates.shape[0], per_user):
            for name, value in self._draw(start, stop, candidates[start:stop]).items():
                parts.setdefault(name, []).append(value)
        self.state = {name: torch.cat(values) for name, values in parts.items()}

    def _draw(self, start: int, stop: int, candidates: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sampled items, their validity and the teacher's soft labels for users start..stop-1."""
        device = candidates.device
        rank = torch.arange(candidates.shape[1], device=device)
        valid = rank < self.allowed[start:stop].unsqueeze(1)  # false only on tiny catalogues
        log_weights = (-rank.float() / self.T_rank).expand(candidates.shape).masked_fill(~valid, -torch.inf)
        positions = gumbel_topk(log_weights, self.n_samples, self.generator)
        items = candidates.gather(1, positions)
        users = torch.arange(start, stop, device=device)
        logits = teacher_scores(self.teacher, users, items) / self.T
        # one thread: torch splits an element-wise op among its threads, and each part's last few
        # elements take a scalar sigmoid that can round differently from the vector one (on CiteULike's
        # 5,219 × 10 labels, one label changed with the thread count, and with it a run's NDCG@20)
        with single_torch_thread():
            labels = torch.sigmoid(logits)
        return {"items": items, "valid": valid.gather(1, positions), "labels": labels}

    def user_loss(self, users: torch.Tensor, student: Recommender) -> torch.Tensor:
        if not self.state:
            raise RuntimeError("on_epoch_start must run before loss")
        s = self.state
        logits = student_scores(student, users, s["items"][users])
        bce = F.binary_cross_entropy_with_logits(logits, s["labels"][users], reduction="none")
        return (bce * s["valid"][users]).sum(1)
