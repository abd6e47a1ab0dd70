"""RCE-KD: Rejuvenated Cross-Entropy Knowledge Distillation (METHOD.md §2), vectorised over users.

Per epoch, per user (in chunks, no gradients): the student's top-mxK list C and Q_S = C[:K]; the
split of the teacher's top-K Q_T into Q_T1 = Q_T ∩ Q_S and Q_T2 = Q_T \\ Q_T1; rank-aware sampling of
L positions of C without replacement with p_j ∝ exp((z_j + 1)/τ_s), z_j = number of teacher items the
student ranks at or below position j (capped at 50); the set A_u = sampled ∪ (Q_T2 \\ sampled); and the
teacher's softmax targets on Q_S and A_u, which only change once per epoch (its logits on Q_T never
change: they are computed once). Per batch only the student's logits are computed, on one list a
user, [Q_S | sampled | Q_T], in one pass (:func:`rcekd.kd.base.student_scores`).

Sampling without replacement uses the Gumbel-top-k trick: the L largest of log p_j + Gumbel noise
are distributed exactly as L successive weighted draws without replacement.
"""

from __future__ import annotations

from typing import Any

import torch

from rcekd.data import Dataset
from rcekd.kd.base import (
    Distiller,
    Teacher,
    fused_list_loss_available,
    list_cross_entropy,
    rowwise_positions,
    student_scores,
    student_vectors,
    teacher_scores,
    user_chunks,
)
from rcekd.kd.list_ce import ListTable
from rcekd.kd.sampling import MASKED, gumbel_topk
from rcekd.models.base import Batch, Recommender

GAMMA_MODES = ("paper", "sampled")
ABLATIONS = ("none", "wo_sep", "wo_s", "wo_sampling", "const_gamma")
Z_CAP = 50


def sampling_counts(teacher_top: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """z: int64[b, mxK], z[r, j] = #teacher items of row r at student positions ≥ j, capped at 50."""
    return _counts_from_positions(rowwise_positions(teacher_top, candidates), candidates.shape[1])


def _counts_from_positions(teacher_positions: torch.Tensor, mxK: int) -> torch.Tensor:
    """z from each teacher item's position in C (mxK where absent)."""
    at_position = _position_mask(teacher_positions, mxK)  # a teacher item sits at student position j
    reverse_cumsum = at_position.flip(1).cumsum(1).flip(1)
    return reverse_cumsum.clamp(max=Z_CAP)


def _position_mask(positions: torch.Tensor, width: int) -> torch.Tensor:
    """bool[b, width]: True at the given positions; positions ≥ width (absent) are dropped."""
    mask = torch.zeros(positions.shape[0], width + 1, dtype=torch.bool, device=positions.device)
    return mask.scatter_(1, positions.clamp(max=width), True)[:, :width]


def _target(teacher_logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """softmax of the teacher's logits over the valid entries, 0 elsewhere (and on rows with none):
    the fixed side of CE(softmax(t), softmax(s)), computed once per epoch instead of once per batch."""
    if valid is None:
        return torch.softmax(teacher_logits, dim=1)
    probs = torch.softmax(teacher_logits.masked_fill(~valid, -torch.inf), dim=1)
    return torch.where(valid, probs, torch.zeros_like(probs))  # rows without a valid entry: 0, not NaN


def _cross_entropy(
    target: torch.Tensor, student_logits: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """float[b]: −Σ target · log softmax(student) over the valid entries (0 for rows with none).

    Invalid entries get MASKED, not −∞: exp() of it is 0 next to any valid logit, so the log-softmax
    of the valid entries is the same, and rows with none give 0 · finite instead of NaN."""
    if valid is not None:
        student_logits = student_logits.masked_fill(~valid, MASKED)
    return -(target * torch.log_softmax(student_logits, dim=1)).sum(1)


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
        users = torch.arange(self.teacher_top.shape[0], device=self.teacher_top.device)
        self.teacher_top_logits = teacher_scores(teacher, users, self.teacher_top) / tau  # and so are its logits on Q_T
        self.state: dict[str, torch.Tensor] = {}
        self.table: ListTable | None = None

    # -------------------------------------------------------------------------------- per epoch
    def on_epoch_start(self, student: Recommender, epoch: int) -> None:
        user_vecs, item_vecs = student_vectors(student)
        candidates = self.rank_student("C", user_vecs, item_vecs, self.mxK)  # C, training items included
        parts: dict[str, list[torch.Tensor]] = {}
        for start, stop in user_chunks(candidates.shape[0], self.mxK * self.K):
            for name, value in self._plan(start, stop, candidates[start:stop]).items():
                parts.setdefault(name, []).append(value)
        state = {name: torch.cat(values) for name, values in parts.items()}
        if "items" in state:  # the sets as views of the one list a user: Q_S | A_u = sampled | Q_T
            state["student_top"] = state["items"][:, : self.K]
            state["a_items"] = state["items"][:, self.K :]
        self.state = state
        self.table = self._fused_table(student) if fused_list_loss_available(student) else None

    def _fused_table(self, student: Recommender) -> ListTable:
        """The fused kernel's view of this epoch's sets: one list a user, segments Q_S and A_u (or the
        ablation's one segment), checked once here rather than every batch."""
        state, n_items = self.state, student.item_vectors().shape[0]
        if self.ablation == "wo_sep":
            items = state["union_items"]
            return ListTable.of(items, state["p_union"], state["union_valid"], (0, items.shape[1]), n_items)
        if self.ablation == "wo_s":
            items = state["student_top"]
            valid = torch.ones_like(items, dtype=torch.bool)
            return ListTable.of(items, state["p_student_top"], valid, (0, self.K), n_items)
        items = state["items"]
        targets = torch.cat([state["p_student_top"], state["p_a"]], 1)
        valid = torch.cat([torch.ones_like(state["student_top"], dtype=torch.bool), state["a_valid"]], 1)
        return ListTable.of(items, targets, valid, (0, self.K, items.shape[1]), n_items)

    def _plan(self, start: int, stop: int, candidates: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-epoch sets, weights and teacher targets for users start..stop-1."""
        users = torch.arange(start, stop, device=candidates.device)
        teacher_top = self.teacher_top[start:stop]
        teacher_top_logits = self.teacher_top_logits[start:stop]
        student_top = candidates[:, : self.K]  # Q_S
        positions = rowwise_positions(teacher_top, candidates)  # each teacher item's place in C (mxK: absent)
        in_student_top = positions < self.K  # Q_T1 membership over Q_T
        if self.ablation == "wo_sep":
            # one CE over Q_S ∪ Q_T: Q_S plus the teacher items outside it
            items = torch.cat([student_top, teacher_top], 1)
            valid = torch.cat([torch.ones_like(student_top, dtype=torch.bool), ~in_student_top], 1)
            logits = torch.cat([teacher_scores(self.teacher, users, student_top) / self.tau, teacher_top_logits], 1)
            return {"union_items": items, "union_valid": valid, "p_union": _target(logits, valid)}

        if self.ablation == "wo_sampling" or self.L == 0:
            sampled_at = positions.new_zeros(positions.shape[0], 0)
        else:
            z = _counts_from_positions(positions, self.mxK).float()
            sampled_at = gumbel_topk((z + 1) / self.tau_s, self.L, self.generator)
        sampled = candidates.gather(1, sampled_at)
        in_sampled = _position_mask(sampled_at, self.mxK).gather(1, positions.clamp(max=self.mxK - 1))
        in_sampled &= positions < self.mxK
        # A_u = sampled ∪ (Q_T2 minus the sampled items); Q_T2 = Q_T minus Q_S
        a_valid = torch.cat([torch.ones_like(sampled, dtype=torch.bool), ~(in_student_top | in_sampled)], 1)
        overlap = (in_student_top if self.gamma_mode == "paper" else in_sampled).float().mean(1)
        gamma = torch.exp(-self.beta * overlap)
        if self.ablation == "const_gamma":
            gamma = torch.full_like(gamma, self.const_gamma)
        listed = torch.cat([student_top, sampled], 1)  # the teacher's logits on Q_S and the sample: new each epoch
        t_listed = teacher_scores(self.teacher, users, listed) / self.tau
        t_a = torch.cat([t_listed[:, self.K :], teacher_top_logits], 1)
        return {
            "items": torch.cat([listed, teacher_top], 1),
            "p_student_top": _target(t_listed[:, : self.K]),
            "a_valid": a_valid,
            "p_a": _target(t_a, a_valid),
            "gamma": gamma,
        }

    # -------------------------------------------------------------------------------- per batch
    def user_loss(self, users: torch.Tensor, student: Recommender) -> torch.Tensor:
        if not self.state:
            raise RuntimeError("on_epoch_start must run before loss")

        def rows(name: str) -> torch.Tensor:  # index_select copies whole rows: ~4× faster than s[name][users]
            return self.state[name].index_select(0, users)

        if self.ablation == "wo_sep":
            logits = student_scores(student, users, rows("union_items")) / self.tau
            return _cross_entropy(rows("p_union"), logits, rows("union_valid"))

        items = rows("student_top" if self.ablation == "wo_s" else "items")  # [Q_S | sampled | Q_T]
        logits = student_scores(student, users, items)  # one pass over the user's lists
        if self.tau != 1.0:
            logits = logits / self.tau
        l1 = _cross_entropy(rows("p_student_top"), logits[:, : self.K])
        if self.ablation == "wo_s":
            return l1
        l2 = _cross_entropy(rows("p_a"), logits[:, self.K :], rows("a_valid"))
        gamma = rows("gamma")
        return (1 - gamma) * l1 + gamma * l2

    def loss(self, batch: Batch, student: Recommender) -> torch.Tensor:
        """The KD term of a batch; for CPU students in one compiled pass (:func:`list_cross_entropy`),
        which computes the same sum as :meth:`user_loss` (up to rounding) without its torch ops."""
        if not fused_list_loss_available(student):
            return super().loss(batch, student)
        if not self.state:
            raise RuntimeError("on_epoch_start must run before loss")
        users, weights = self.batch_user_weights(batch, student)
        if self.table is None:
            raise RuntimeError("on_epoch_start did not see a student the fused pass can train")
        if self.ablation not in ("wo_sep", "wo_s"):
            gamma = self.state["gamma"].index_select(0, users).unsqueeze(1)
            weights = weights * torch.cat([1 - gamma, gamma], 1)
        return list_cross_entropy(student, users, self.table, weights, 1.0 / self.tau)

    def diagnostics(self) -> dict[str, Any]:
        """Mean γ and |A_u| this epoch: how far the student's top list is from the teacher's."""
        if "gamma" not in self.state:
            return {}
        return {
            "mean_gamma": float(self.state["gamma"].mean()),
            "mean_a_size": float(self.state["a_valid"].sum(1).float().mean()),
        }
