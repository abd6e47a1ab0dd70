"""DCD: Dual Correction Distillation (Lee & Kim, CIKM 2021), user side (UCD) and item side (ICD).

For each user: the teacher's top-mxK (training items excluded) with teacher ranks r_T, and each epoch
the student's top-mxK (training items excluded) with student ranks r_S. The other model's rank of each
listed item is looked up in that model's top-(mxK + 10·T) list — the teacher's computed once, the
student's once per epoch — and set to that list's length when absent. This is *exact* for the weights:
an item absent from the deeper list is more than 10·T ranks below every listed position < mxK, where
tanh rounds to 1 in float32 exactly as it would with its true rank; so no full sort and no per-epoch
teacher scoring is needed (a full-sort version did not finish two CiteULike-sized epochs in 110 s on 2
CPU cores). Under-estimated items (the teacher ranks them higher) get weight
max(tanh(max((r_S − r_T)/T, 0)), 1e-5), over-estimated ones the mirror. ``n_samples`` of each are drawn
without replacement in proportion to those weights (Gumbel-top-k); the Plackett–Luce loss of RRD ranks
the under-estimated items (in teacher order) above the over-estimated ones. ICD is the same with users
and items swapped — each item's ranked list of users — and is applied to the distinct positive items of
a batch (MF/LightGCN); batches without ``pos`` (HSTU) skip it, and after one such batch the item-side
state is no longer computed.

All of it is per-epoch state computed for every user (and item) in chunks without gradients; per batch
only the student's logits are computed.
"""

from __future__ import annotations

import math
from typing import Any

import scipy.sparse as sp
import torch

from rcekd.data import Dataset
from rcekd.kd.base import (
    Distiller,
    Teacher,
    fused_list_loss_available,
    gathered_scores,
    rowwise_isin,
    rowwise_positions,
    student_scores,
    student_vectors,
    user_chunks,
)
from rcekd.kd.listwise import ListwiseLoss
from rcekd.kd.sampling import allowed_counts, gumbel_topk, listwise_loss
from rcekd.kd.topk import topk_items
from rcekd.models.base import Batch, Recommender

MIN_WEIGHT = 1e-5
#: tanh(x) rounds to 1 in float32 from x ≈ 9: ranks this many T's apart give the same weight as farther ones
SATURATION = 10


def correction_weights(rank_low: torch.Tensor, rank_high: torch.Tensor, T: float) -> torch.Tensor:
    """max(tanh(max((rank_low − rank_high)/T, 0)), 1e-5): how far an item is ranked too low."""
    gap = ((rank_low - rank_high).float() / T).clamp(min=0)
    return torch.tanh(gap).clamp(min=MIN_WEIGHT)


class DCD(Distiller):
    name = "dcd"

    def __init__(
        self,
        teacher: Teacher,
        dataset: Dataset,
        weight: float = 0.01,
        seed: int = 0,
        *,
        mxK: int = 500,
        n_samples: int = 100,
        T: float = 10.0,
        icd: bool = True,
    ) -> None:
        if mxK <= 0 or n_samples <= 0 or T <= 0:
            raise ValueError(f"need mxK, n_samples, T > 0 (mxK={mxK}, n_samples={n_samples}, T={T})")
        super().__init__(teacher, dataset, weight, seed, mxK=mxK, n_samples=n_samples, T=T, icd=icd)
        self.mxK, self.n_samples, self.T, self.icd = mxK, n_samples, T, icd
        # lists this deep give exact weights: a rank beyond them is ≥ 10·T+1 from any rank < mxK,
        # where tanh is 1 in float32
        self.depth = mxK + math.ceil(SATURATION * T)
        train = dataset.csr("train")
        # per query side (users; items for ICD): what it excludes, and the teacher's ranked list, once
        self.sides: dict[str, dict[str, Any]] = {"user": self._side_spec(teacher.user_vecs, teacher.item_vecs, train)}
        if icd:
            self.sides["item"] = self._side_spec(teacher.item_vecs, teacher.user_vecs, train.T.tocsr())
        self.icd_active = icd  # switched off for good by the first batch without positive items
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    def _side_spec(self, query: torch.Tensor, targets: torch.Tensor, exclude: sp.csr_matrix) -> dict[str, Any]:
        return {
            "exclude": exclude,
            "allowed": allowed_counts(exclude, query.device),
            "teacher_top": topk_items(query, targets, self.depth, exclude),  # [rows, depth], frozen
        }

    # -------------------------------------------------------------------------------- per epoch
    def on_epoch_start(self, student: Recommender, epoch: int) -> None:
        user_vecs, item_vecs = student_vectors(student)
        self.state = {"user": self._side("user", user_vecs, item_vecs)}
        if self.icd_active:
            self.state["item"] = self._side("item", item_vecs, user_vecs)

    def _side(self, side: str, query: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sampled under-/over-estimated lists of every query row (user, or item for ICD)."""
        spec = self.sides[side]
        student_top = self.rank_student(side, query, targets, self.depth, spec["exclude"])
        student_top = student_top.to(spec["teacher_top"].device)
        parts: dict[str, list[torch.Tensor]] = {}
        for start, stop in user_chunks(student_top.shape[0], 4 * self.depth):
            planned = self._plan(spec, start, stop, student_top[start:stop])
            for name, value in planned.items():
                parts.setdefault(name, []).append(value)
        state = {name: torch.cat(values) for name, values in parts.items()}
        # one list a row for the fused kernel: the under-estimated items (ranked), then the over-estimated
        state["lists"] = torch.cat([state["under"], state["over"]], 1)
        state["lists_valid"] = torch.cat([state["under_valid"], state["over_valid"]], 1)
        return state

    def _plan(self, spec: dict[str, Any], start: int, stop: int, student_deep: torch.Tensor) -> dict[str, torch.Tensor]:
        teacher_deep = spec["teacher_top"][start:stop]
        m = min(self.mxK, teacher_deep.shape[1])
        n = min(self.n_samples, m)
        teacher_top, student_top = teacher_deep[:, :m], student_deep[:, :m]  # ranks 0..m-1 on their own side
        position = torch.arange(m, device=teacher_top.device)
        valid = position < spec["allowed"][start:stop].unsqueeze(1)

        r_s_under = rowwise_positions(teacher_top, student_deep)  # the student's rank of the teacher's items
        r_t_over = rowwise_positions(student_top, teacher_deep)  # the teacher's rank of the student's items
        w_under = correction_weights(r_s_under, position, self.T)
        w_over = correction_weights(r_t_over, position, self.T)
        under_pos = gumbel_topk(w_under.log().masked_fill(~valid, -torch.inf), n, self.generator).sort(1).values
        over_pos = gumbel_topk(w_over.log().masked_fill(~valid, -torch.inf), n, self.generator)
        under, under_valid = teacher_top.gather(1, under_pos), valid.gather(1, under_pos)
        over, over_valid = student_top.gather(1, over_pos), valid.gather(1, over_pos)
        # an item drawn on both sides (equal ranks) would be ranked above itself: keep it above only
        over_valid &= ~rowwise_isin(over, under.masked_fill(~under_valid, -1))
        return {
            "under": under,
            "under_valid": under_valid,
            "over": over,
            "over_valid": over_valid,
            "under_weight": w_under.gather(1, under_pos),
        }

    # -------------------------------------------------------------------------------- per batch
    def _correction(self, side: str, rows: torch.Tensor, scorer: Any) -> torch.Tensor:
        s = self.state[side]
        n = s["under"].shape[1]
        logits = scorer(rows, s["lists"].index_select(0, rows))  # [under | over], joined once an epoch
        valid = s["lists_valid"].index_select(0, rows)
        return listwise_loss(logits[:, :n], logits[:, n:], valid[:, :n], valid[:, n:])

    def user_loss(self, users: torch.Tensor, student: Recommender) -> torch.Tensor:
        """UCD of each distinct user."""
        if not self.state:
            raise RuntimeError("on_epoch_start must run before loss")
        return self._correction("user", users, lambda rows, items: student_scores(student, rows, items))

    def item_loss(self, items: torch.Tensor, student: Recommender) -> torch.Tensor:
        """ICD of each distinct item: the student's scores of its listed users."""

        def score_users(rows: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
            if student.sparse_embeddings:  # keep its row-sparse gradients: one (user, item) pair at a time
                pairs_items = rows.repeat_interleave(users.shape[1]).unsqueeze(1)
                return student.score(users.reshape(-1), pairs_items).reshape(users.shape)
            # the item plays the user's part: its vector against its listed users' vectors, so no
            # b × w copy of user vectors is made (and scattered back) as pair-by-pair scoring would
            all_users, all_items = student.all_vectors()
            return gathered_scores(all_items[rows], all_users, users)

        return self._correction("item", items, score_users)

    def _fused(
        self, side: str, rows: torch.Tensor, query_vecs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """One side's term for CPU students, in one compiled pass (:class:`ListwiseLoss`)."""
        s = self.state[side]
        lists, valid = s["lists"].index_select(0, rows), s["lists_valid"].index_select(0, rows)
        return ListwiseLoss.apply(query_vecs, targets, lists, valid, s["under"].shape[1], weights)

    def loss(self, batch: Batch, student: Recommender) -> torch.Tensor:
        """UCD per row's user plus (when on) ICD per row's positive item, both summed over rows; for CPU
        students with dense embeddings each side in one compiled pass (the same sum, up to rounding)."""
        fused = fused_list_loss_available(student)
        if not fused:
            total = super().loss(batch, student)
        elif not self.state:
            raise RuntimeError("on_epoch_start must run before loss")
        else:
            users, weights = self.batch_user_weights(batch, student)
            total = self._fused("user", users, student.user_vectors(users), student.item_vectors(), weights[:, 0])
        if not self.icd_active:
            return total
        if "pos" not in batch:
            self.icd_active = False  # sequence batches (HSTU) have no positive items: no ICD
            self.state.pop("item", None)
            return total
        items, counts = torch.unique(batch["pos"], return_counts=True)
        if fused:  # the item plays the user's part: its vector against its listed users' vectors
            all_users, all_items = student.all_vectors()
            weights = self.weight * counts.to(all_items.dtype)
            return total + self._fused("item", items, all_items.index_select(0, items), all_users, weights)
        return total + self.weight * (self.item_loss(items, student) * counts).sum()

    def state_dict(self) -> dict[str, Any]:
        """The generator plus whether ICD is still on (a sequence batch switches it off for good)."""
        return {**super().state_dict(), "icd_active": self.icd_active}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.icd_active = bool(state["icd_active"]) and self.icd

    def diagnostics(self) -> dict[str, Any]:
        """Mean weight of the drawn under-estimated items: near 1 while the student misranks the teacher's."""
        if "user" not in self.state:
            return {}
        s = self.state["user"]
        return {"mean_under_weight": float((s["under_weight"] * s["under_valid"]).sum() / s["under_valid"].sum())}
