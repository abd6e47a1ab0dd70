"""DCD: Dual Correction Distillation (Lee & Kim, CIKM 2021), user side (UCD) and item side (ICD).

For each user: the teacher's top-mxK (training items excluded, computed once) with teacher ranks r_T;
every epoch the student's *exact* ranks r_S of those items among all the user's non-training items
(ranks are read off one sort of the student's scores per user chunk with ``searchsorted``), the
student's own top-mxK and the teacher's exact ranks of *those* (one sort of the teacher's scores: the
student's list changes every epoch). Under-estimated items (the teacher ranks them higher) get weight
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

from typing import Any

import scipy.sparse as sp
import torch

from rcekd.data import Dataset
from rcekd.kd.base import CHUNK_SCORES, Distiller, Teacher, rowwise_isin, student_vectors, topk_items, user_chunks
from rcekd.kd.rcekd import gumbel_topk
from rcekd.kd.rrd import allowed_counts, listwise_loss
from rcekd.models.base import Batch, Recommender

MIN_WEIGHT = 1e-5


def masked_scores(
    query_vecs: torch.Tensor, target_vecs: torch.Tensor, exclude: sp.csr_matrix, start: int, stop: int
) -> torch.Tensor:
    """float[stop-start, n_targets]: dot products of rows start..stop-1, excluded pairs at −∞."""
    scores = query_vecs[start:stop] @ target_vecs.T
    coo = exclude[start:stop].tocoo()
    rows = torch.from_numpy(coo.row.astype("int64")).to(scores.device)
    cols = torch.from_numpy(coo.col.astype("int64")).to(scores.device)
    scores[rows, cols] = -torch.inf
    return scores


def ranks_in(sorted_ascending: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """int64[b, k]: 0-based rank of each value = number of entries of its row strictly above it."""
    n = sorted_ascending.shape[1]
    return n - torch.searchsorted(sorted_ascending, values.contiguous(), right=True)


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
        device = teacher.user_vecs.device
        train = dataset.csr("train")
        # (query side, its exclusion CSR, its allowed counts, teacher top list) for users, then items
        self.sides: dict[str, dict[str, Any]] = {
            "user": {
                "exclude": train,
                "allowed": allowed_counts(train, device),
                "teacher_top": topk_items(teacher.user_vecs, teacher.item_vecs, mxK, train),
            },
        }
        if icd:
            train_t = train.T.tocsr()
            self.sides["item"] = {
                "exclude": train_t,
                "allowed": allowed_counts(train_t, device),
                "teacher_top": topk_items(teacher.item_vecs, teacher.user_vecs, mxK, train_t),
            }
        self.icd_active = icd  # switched off for good by the first batch without positive items
        self.state: dict[str, dict[str, torch.Tensor]] = {}

    # -------------------------------------------------------------------------------- per epoch
    def on_epoch_start(self, student: Recommender, epoch: int) -> None:
        user_vecs, item_vecs = student_vectors(student)
        t_user, t_item = self.teacher.user_vecs, self.teacher.item_vecs
        self.state = {"user": self._side("user", (user_vecs, item_vecs), (t_user, t_item))}
        if self.icd_active:
            self.state["item"] = self._side("item", (item_vecs, user_vecs), (t_item, t_user))

    def _side(
        self,
        side: str,
        student_vecs: tuple[torch.Tensor, torch.Tensor],
        teacher_vecs: tuple[torch.Tensor, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """Sampled under-/over-estimated lists of every query row (user, or item for ICD)."""
        spec = self.sides[side]
        n_rows, n_targets = student_vecs[0].shape[0], student_vecs[1].shape[0]
        parts: dict[str, list[torch.Tensor]] = {}
        # a chunk holds two score rows and their sorts (values + int64 indices) per query row
        for start, stop in user_chunks(n_rows, 4 * n_targets, budget=CHUNK_SCORES):
            planned = self._plan(spec, start, stop, student_vecs, teacher_vecs)
            for name, value in planned.items():
                parts.setdefault(name, []).append(value)
        return {name: torch.cat(values) for name, values in parts.items()}

    def _plan(
        self,
        spec: dict[str, Any],
        start: int,
        stop: int,
        student_vecs: tuple[torch.Tensor, torch.Tensor],
        teacher_vecs: tuple[torch.Tensor, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        teacher_top = spec["teacher_top"][start:stop]  # [c, m], teacher ranks 0..m-1
        m = teacher_top.shape[1]
        n = min(self.n_samples, m)
        device = teacher_top.device
        position = torch.arange(m, device=device)
        valid = position < spec["allowed"][start:stop].unsqueeze(1)

        s_scores = masked_scores(*student_vecs, spec["exclude"], start, stop).to(device)
        s_sorted, s_order = s_scores.sort(1)
        student_top = s_order[:, -m:].flip(1)  # student ranks 0..m-1
        r_s_under = ranks_in(s_sorted, s_scores.gather(1, teacher_top))
        del s_scores, s_sorted, s_order
        t_scores = masked_scores(*teacher_vecs, spec["exclude"], start, stop)
        t_sorted = t_scores.sort(1).values
        r_t_over = ranks_in(t_sorted, t_scores.gather(1, student_top))
        del t_scores, t_sorted

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
        logits = scorer(rows, torch.cat([s["under"][rows], s["over"][rows]], 1))
        return listwise_loss(logits[:, :n], logits[:, n:], s["under_valid"][rows], s["over_valid"][rows])

    def user_loss(self, users: torch.Tensor, student: Recommender) -> torch.Tensor:
        """UCD of each distinct user."""
        if not self.state:
            raise RuntimeError("on_epoch_start must run before loss")
        return self._correction("user", users, student.score)

    def item_loss(self, items: torch.Tensor, student: Recommender) -> torch.Tensor:
        """ICD of each distinct item: its users, scored by the student one (user, item) pair at a time."""

        def score_users(rows: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
            pairs_items = rows.repeat_interleave(users.shape[1]).unsqueeze(1)
            return student.score(users.reshape(-1), pairs_items).reshape(users.shape)

        return self._correction("item", items, score_users)

    def loss(self, batch: Batch, student: Recommender) -> torch.Tensor:
        """UCD per row's user plus (when on) ICD per row's positive item, both summed over rows."""
        total = super().loss(batch, student)
        if not self.icd_active:
            return total
        if "pos" not in batch:
            self.icd_active = False  # sequence batches (HSTU) have no positive items: no ICD
            self.state.pop("item", None)
            return total
        items, counts = torch.unique(batch["pos"], return_counts=True)
        return total + self.weight * (self.item_loss(items, student) * counts).sum()

    def diagnostics(self) -> dict[str, Any]:
        """Mean weight of the drawn under-estimated items: near 1 while the student misranks the teacher's."""
        if "user" not in self.state:
            return {}
        s = self.state["user"]
        return {"mean_under_weight": float((s["under_weight"] * s["under_valid"]).sum() / s["under_valid"].sum())}
