"""Vanilla CE: softmax cross-entropy between teacher and student on the teacher's top-K only.

The baseline RCE-KD repairs: Q_T breaks the closure assumption early in training (METHOD.md §1).
"""

from __future__ import annotations

import torch

from rcekd.data import Dataset
from rcekd.kd.base import (
    Distiller,
    Teacher,
    fused_list_loss_available,
    list_cross_entropy,
    soft_cross_entropy,
    student_scores,
    teacher_scores,
)
from rcekd.kd.list_ce import ListTable
from rcekd.models.base import Batch, Recommender


class VanillaCE(Distiller):
    name = "ce"

    def __init__(
        self, teacher: Teacher, dataset: Dataset, weight: float = 500.0, seed: int = 0, *, K: int = 50, tau: float = 1.0
    ) -> None:
        super().__init__(teacher, dataset, weight, seed, K=K, tau=tau)
        self.tau = tau
        self.teacher_top = teacher.topk(K)
        users = torch.arange(teacher.n_users, device=self.teacher_top.device)
        self.teacher_logits = teacher_scores(teacher, users, self.teacher_top) / tau  # fixed: Q_T never changes
        self.targets = torch.softmax(self.teacher_logits, dim=1)  # and so are its softmax targets
        self.table: ListTable | None = None  # the fused pass's view of them, built on first use

    def on_epoch_start(self, student: Recommender, epoch: int) -> None:
        """Nothing to refresh: the set is the teacher's."""

    def user_loss(self, users: torch.Tensor, student: Recommender) -> torch.Tensor:
        items = self.teacher_top[users]
        student_logits = student_scores(student, users, items) / self.tau
        return soft_cross_entropy(self.teacher_logits[users], student_logits, torch.ones_like(items, dtype=torch.bool))

    def loss(self, batch: Batch, student: Recommender) -> torch.Tensor:
        """For CPU students in one compiled pass (:func:`list_cross_entropy`), the same sum as the
        base class's over :meth:`user_loss` (up to rounding)."""
        if not fused_list_loss_available(student):
            return super().loss(batch, student)
        users, weights = self.batch_user_weights(batch, student)
        if self.table is None:  # Q_T and its targets never change: checked once
            top, targets = self.teacher_top.cpu(), self.targets.cpu()
            valid = torch.ones_like(top, dtype=torch.bool)
            self.table = ListTable.of(top, targets, valid, (0, top.shape[1]), student.item_vectors().shape[0])
        return list_cross_entropy(student, users, self.table, weights, 1.0 / self.tau)
