"""RCE-KD: Rejuvenated Cross-Entropy Knowledge Distillation (METHOD.md §2), vectorised over users.

Per epoch, per user (in chunks, no gradients): the student's top-mxK list C and Q_S = C[:K]; the
split of the teacher's top-K Q_T into Q_T1 = Q_T ∩ Q_S and Q_T2 = Q_T \\ Q_T1; rank-aware sampling of
L positions of C without replacement with p_j ∝ exp((z_j + 1)/τ_s), z_j = number of teacher items the
student ranks at or below position j (capped at 50); the set A_u = sampled ∪ (Q_T2 \\ sampled); and the
teacher's logits on Q_S and A_u, which only change once per epoch. Per batch only the student's
logits are computed.

Sampling without replacement uses the Gumbel-top-k trick: the L largest of log p_j + Gumbel noise
are distributed exactly as L successive weighted draws without replacement.
"""

from __future__ import annotations

from typing import Any

import torch

from rcekd.data import Dataset
from rcekd.kd.base import Distiller, Teacher, rowwise_isin, soft_cross_entropy, student_vectors, topk_items, user_chunks
from rcekd.kd.sampling import gumbel_topk
from rcekd.models.base import Recommender

GAMMA_MODES = ("paper", "sampled")
ABLATIONS = ("none", "wo_sep", "wo_s", "wo_sampling", "const_gamma")
Z_CAP = 50


def sampling_counts(teacher_top: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """z: int64[b, mxK], z[r, j] = #teacher items of row r at student positions ≥ j, capped at 50."""
    at_position = rowwise_isin(candidates, teacher_top)  # candidate j is a teacher item
    reverse_cumsum = at_position.flip(1).cumsum(1).flip(1)
    return reverse_cumsum.clamp(max=Z_CAP)


class RCEKD(Distiller):
    name = "rcekd"

    def __init__(
        self,
        teacher: Teacher,
        dataset: Dataset,
        weight: float = 500.0,
        seed: int = 0,
        *,
        K: int = 50,
        L: int = 50,
        mxK: int = 200,
        beta: float = 3.0,
        tau: float = 1.0,
        tau_s: float = 10.0,
        gamma_mode: str = "paper",
        ablation: str = "none",
        const_gamma: float = 0.5,
    ) -> None:
        if gamma_mode not in GAMMA_MODES:
            raise ValueError(f"gamma_mode must be one of {GAMMA_MODES}")
        if ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {ABLATIONS}")
        if not 0 < K <= mxK <= teacher.n_items or mxK < L:
            raise ValueError(f"need 0 < K ≤ mxK ≤ n_items and L ≤ mxK (K={K}, L={L}, mxK={mxK})")
        super().__init__(
            teacher,
            dataset,
            weight,
            seed,
            K=K,
            L=L,
            mxK=mxK,
            beta=beta,
            tau=tau,
            tau_s=tau_s,
            gamma_mode=gamma_mode,
            ablation=ablation,
            const_gamma=const_gamma,
        )
        self.K, self.L, self.mxK = K, L, mxK
        self.beta, self.tau, self.tau_s = beta, tau, tau_s
        self.gamma_mode, self.ablation, self.const_gamma = gamma_mode, ablation, const_gamma
        self.teacher_top = teacher.topk(K)  # Q_T, once: the teacher is frozen
        self.state: dict[str, torch.Tensor] = {}

    # -------------------------------------------------------------------------------- per epoch
    def on_epoch_start(self, student: Recommender, epoch: int) -> None:
        user_vecs, item_vecs = student_vectors(student)
        candidates = topk_items(user_vecs, item_vecs, self.mxK)  # C, training items included
        parts: dict[str, list[torch.Tensor]] = {}
        for start, stop in user_chunks(candidates.shape[0], self.mxK * self.K):
            for name, value in self._plan(start, stop, candidates[start:stop]).items():
                parts.setdefault(name, []).append(value)
        self.state = {name: torch.cat(values) for name, values in parts.items()}

    def _plan(self, start: int, stop: int, candidates: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-epoch sets, weights and teacher logits for users start..stop-1."""
        users = torch.arange(start, stop, device=candidates.device)
        teacher_top = self.teacher_top[start:stop]
        student_top = candidates[:, : self.K]  # Q_S
        in_student_top = rowwise_isin(teacher_top, student_top)  # Q_T1 membership over Q_T
        if self.ablation == "wo_sep":
            # one CE over Q_S ∪ Q_T: Q_S plus the teacher items outside it
            items = torch.cat([student_top, teacher_top], 1)
            valid = torch.cat([torch.ones_like(student_top, dtype=torch.bool), ~in_student_top], 1)
            return {"union_items": items, "union_valid": valid, "t_union": self.teacher.score(users, items) / self.tau}

        if self.ablation == "wo_sampling" or self.L == 0:
            sampled = candidates[:, :0]
        else:
            z = sampling_counts(teacher_top, candidates).float()
            positions = gumbel_topk((z + 1) / self.tau_s, self.L, self.generator)
            sampled = candidates.gather(1, positions)
        in_sampled = rowwise_isin(teacher_top, sampled)
        # A_u = sampled ∪ (Q_T2 minus the sampled items); Q_T2 = Q_T minus Q_S
        a_items = torch.cat([sampled, teacher_top], 1)
        a_valid = torch.cat([torch.ones_like(sampled, dtype=torch.bool), ~(in_student_top | in_sampled)], 1)
        overlap = (in_student_top if self.gamma_mode == "paper" else in_sampled).float().mean(1)
        gamma = torch.exp(-self.beta * overlap)
        if self.ablation == "const_gamma":
            gamma = torch.full_like(gamma, self.const_gamma)
        return {
            "student_top": student_top,
            "t_student_top": self.teacher.score(users, student_top) / self.tau,
            "a_items": a_items,
            "a_valid": a_valid,
            "t_a": self.teacher.score(users, a_items) / self.tau,
            "gamma": gamma,
        }

    # -------------------------------------------------------------------------------- per batch
    def user_loss(self, users: torch.Tensor, student: Recommender) -> torch.Tensor:
        if not self.state:
            raise RuntimeError("on_epoch_start must run before loss")
        s = self.state
        if self.ablation == "wo_sep":
            items = s["union_items"][users]
            return soft_cross_entropy(
                s["t_union"][users], student.score(users, items) / self.tau, s["union_valid"][users]
            )

        top = s["student_top"][users]
        l1 = soft_cross_entropy(
            s["t_student_top"][users], student.score(users, top) / self.tau, torch.ones_like(top, dtype=torch.bool)
        )
        if self.ablation == "wo_s":
            return l1
        a_items = s["a_items"][users]
        l2 = soft_cross_entropy(s["t_a"][users], student.score(users, a_items) / self.tau, s["a_valid"][users])
        gamma = s["gamma"][users]
        return (1 - gamma) * l1 + gamma * l2

    def diagnostics(self) -> dict[str, Any]:
        """Mean γ and |A_u| this epoch: how far the student's top list is from the teacher's."""
        if "gamma" not in self.state:
            return {}
        return {
            "mean_gamma": float(self.state["gamma"].mean()),
            "mean_a_size": float(self.state["a_valid"].sum(1).float().mean()),
        }
