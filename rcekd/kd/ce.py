"""Vanilla CE: softmax cross-entropy between teacher and student on the teacher's top-K only.

The baseline RCE-KD repairs: Q_T breaks the closure assumption early in training (METHOD.md §1).
"""

from __future__ import annotations

import torch

from rcekd.data import Dataset
from rcekd.kd.base import Distiller, Teacher, soft_cross_entropy, student_scores, teacher_scores
from rcekd.models.base import Recommender


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

    def on_epoch_start(self, student: Recommender, epoch: int) -> None:
        """Nothing to refresh: the set is the teacher's."""

    def user_loss(self, users: torch.Tensor, student: Recommender) -> torch.Tensor:
        items = self.teacher_top[users]
        student_logits = student_scores(student, users, items) / self.tau
        return soft_cross_entropy(self.teacher_logits[users], student_logits, torch.ones_like(items, dtype=torch.bool))
