"""RRD: the relaxed ranking distillation of DE-RRD (Kang et al., CIKM 2020), vectorised over users.

The teacher's top-mxK (training items excluded) is computed once: the teacher is frozen. Every epoch,
per user (in chunks, no gradients): K "interesting" items drawn without replacement among them with
p ∝ exp(−rank/T) (Gumbel-top-k) and kept in teacher-rank order, and L "uninteresting" items drawn
uniformly from the rest of the catalogue (neither in that list nor training items). Per batch only the
student's logits are computed, and the Plackett–Luce likelihood of "the interesting items in teacher
order, all above the uninteresting ones" is maximised (:func:`listwise_loss`, shared with DCD).

Only the teacher's *ranks* are used, so its logit scale does not matter here.
"""

from __future__ import annotations

import torch

from rcekd.data import Dataset
from rcekd.kd.base import Distiller, Teacher, fused_list_loss_available, student_scores, user_chunks
from rcekd.kd.listwise import ListwiseLoss
from rcekd.kd.sampling import allowed_counts, gumbel_topk, listwise_loss, sample_excluding
from rcekd.models.base import Batch, Recommender


class RRD(Distiller):
    name = "rrd"

    def __init__(
        self,
        teacher: Teacher,
        dataset: Dataset,
        weight: float = 0.01,
        seed: int = 0,
        *,
        K: int = 100,
        L: int = 200,
        mxK: int = 500,
        T: float = 10.0,
    ) -> None:
        mxK = min(mxK, teacher.n_items)
        K = min(K, mxK)
        if K <= 0 or L < 0 or T <= 0:
            raise ValueError(f"need K > 0, L ≥ 0 and T > 0 (K={K}, L={L}, T={T})")
        super().__init__(teacher, dataset, weight, seed, K=K, L=L, mxK=mxK, T=T)
        self.K, self.L, self.mxK, self.T = K, L, mxK, T
        self.train_csr = dataset.csr("train")
        self.teacher_top = teacher.topk(mxK, exclude=self.train_csr)  # frozen teacher: once
        device = self.teacher_top.device
        self.top_valid = torch.arange(self.teacher_top.shape[1], device=device) < allowed_counts(
            self.train_csr, device
        ).unsqueeze(1)
        self.state: dict[str, torch.Tensor] = {}

    def on_epoch_start(self, student: Recommender, epoch: int) -> None:
        """Redraw the interesting and uninteresting items of every user (the student is not needed)."""
        parts: dict[str, list[torch.Tensor]] = {}
        for start, stop in user_chunks(self.teacher_top.shape[0], self.mxK + self.K + self.L):
            for name, value in self._draw(start, stop).items():
                parts.setdefault(name, []).append(value)
        state = {name: torch.cat(values) for name, values in parts.items()}
        # one list a user for the fused kernel: the interesting items (ranked), then the rest
        state["lists"] = torch.cat([state["interesting"], state["below"]], 1)
        state["lists_valid"] = torch.cat([state["interesting_valid"], state["below_valid"]], 1)
        self.state = state

    def _draw(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        top, valid = self.teacher_top[start:stop], self.top_valid[start:stop]
        device = top.device
        rank = torch.arange(top.shape[1], device=device, dtype=torch.float32)
        log_weights = (-rank / self.T).expand_as(top).masked_fill(~valid, -torch.inf)
        positions = gumbel_topk(log_weights, self.K, self.generator).sort(1).values  # teacher-rank order
        below, below_valid = sample_excluding(self.train_csr, start, stop, top, self.L, self.generator)
        return {
            "interesting": top.gather(1, positions),
            "interesting_valid": valid.gather(1, positions),
            "below": below,
            "below_valid": below_valid,
        }

    def user_loss(self, users: torch.Tensor, student: Recommender) -> torch.Tensor:
        if not self.state:
            raise RuntimeError("on_epoch_start must run before loss")
        items, valid = (self.state[name].index_select(0, users) for name in ("lists", "lists_valid"))
        logits = student_scores(student, users, items)  # one call for all the lists
        return listwise_loss(logits[:, : self.K], logits[:, self.K :], valid[:, : self.K], valid[:, self.K :])

    def loss(self, batch: Batch, student: Recommender) -> torch.Tensor:
        """The KD term of a batch; for CPU students in one compiled pass (:class:`ListwiseLoss`),
        the same sum as :meth:`user_loss` gives (up to rounding) without its torch ops."""
        if not fused_list_loss_available(student):
            return super().loss(batch, student)
        if not self.state:
            raise RuntimeError("on_epoch_start must run before loss")
        users, weights = self.batch_user_weights(batch, student)
        lists, valid = (self.state[name].index_select(0, users) for name in ("lists", "lists_valid"))
        n_ranked = self.state["interesting"].shape[1]
        return ListwiseLoss.apply(
            student.user_vectors(users), student.item_vectors(), lists, valid, n_ranked, weights[:, 0]
        )
