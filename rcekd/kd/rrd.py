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

import numpy as np
import scipy.sparse as sp
import torch

from rcekd.data import Dataset
from rcekd.kd.base import Distiller, Teacher, user_chunks
from rcekd.kd.rcekd import gumbel_topk
from rcekd.models.base import Recommender

#: stands in for −∞ on masked entries: exp() of it is 0, yet differences of two of them stay finite,
#: so masked rows never produce NaN gradients (−∞ − −∞ would)
MASKED = -1e9


def listwise_loss(
    ranked_logits: torch.Tensor,
    below_logits: torch.Tensor,
    ranked_valid: torch.Tensor | None = None,
    below_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """float[b]: −log Plackett–Luce likelihood of the ranked list (best first), all above ``below``.

    −Σ_k [ s_k − log( Σ_{j≥k} e^{s_j} + Σ_l e^{b_l} ) ] over the valid ranked entries; computed with a
    reversed logcumsumexp and one logsumexp so large logits cannot overflow. Rows without a valid
    ranked entry give 0. Invalid ranked entries are skipped (they join neither a numerator nor a tail).
    """
    s = ranked_logits if ranked_valid is None else ranked_logits.masked_fill(~ranked_valid, MASKED)
    b = below_logits if below_valid is None else below_logits.masked_fill(~below_valid, MASKED)
    tail = torch.logcumsumexp(s.flip(1), dim=1).flip(1)  # log Σ_{j ≥ k} e^{s_j}
    below = torch.logsumexp(b, dim=1, keepdim=True) if b.shape[1] else torch.full_like(s[:, :1], MASKED)
    terms = s - torch.logaddexp(tail, below)
    if ranked_valid is not None:
        terms = terms * ranked_valid
    return -terms.sum(1)


def allowed_counts(exclude: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    """int64[rows]: how many columns each row may rank (all minus the excluded ones).

    ``topk_items`` puts excluded columns last (score −∞), so position j of a row's list is a real
    candidate iff j < allowed[row]; only matters when a list is longer than that (tiny catalogues).
    """
    counts = exclude.shape[1] - np.diff(exclude.indptr)
    return torch.from_numpy(counts.astype(np.int64)).to(device)


def pair_keys(exclude: sp.csr_matrix, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """int64[nnz]: row * n_cols + col of the excluded pairs of rows start..stop-1 (global row ids)."""
    block = exclude[start:stop]
    rows = np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(block.indptr))
    keys = rows * exclude.shape[1] + block.indices.astype(np.int64)
    return torch.from_numpy(keys).to(device)


def sample_excluding(
    rows: torch.Tensor,
    n_samples: int,
    n_cols: int,
    forbidden: torch.Tensor,
    generator: torch.Generator,
    rounds: int = 30,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cols int64[b, n], valid bool[b, n]): ~uniform draws per row, no forbidden pair, no repeats.

    ``forbidden`` holds the keys row * n_cols + col that may not be drawn (any order). Draws that hit
    one, or repeat an earlier draw of the row, are redrawn (all at once) for up to ``rounds`` rounds;
    what still collides after that (rows with fewer than n allowed columns) is marked invalid.
    """
    device = rows.device
    forbidden = forbidden.sort().values
    cols = torch.randint(0, n_cols, (rows.shape[0], n_samples), generator=generator, device=device)
    bad = torch.ones_like(cols, dtype=torch.bool)
    for _ in range(rounds):
        fresh = torch.randint(0, n_cols, cols.shape, generator=generator, device=device)
        cols = torch.where(bad, fresh, cols)
        bad = _collisions(rows, cols, n_cols, forbidden)
        if not bad.any():
            break
    return cols, ~bad


def _collisions(rows: torch.Tensor, cols: torch.Tensor, n_cols: int, forbidden: torch.Tensor) -> torch.Tensor:
    """bool[b, n]: the draw is forbidden, or an earlier-sorted duplicate of the same row exists."""
    keys = rows.unsqueeze(1) * n_cols + cols
    if forbidden.numel():
        at = torch.searchsorted(forbidden, keys).clamp(max=forbidden.numel() - 1)
        hit = forbidden[at] == keys
    else:
        hit = torch.zeros_like(cols, dtype=torch.bool)
    ordered, order = cols.sort(1)
    repeat_sorted = torch.zeros_like(ordered, dtype=torch.bool)
    repeat_sorted[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    repeat = torch.zeros_like(repeat_sorted).scatter(1, order, repeat_sorted)
    return hit | repeat


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
        self.state = {name: torch.cat(values) for name, values in parts.items()}

    def _draw(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        top, valid = self.teacher_top[start:stop], self.top_valid[start:stop]
        device = top.device
        rank = torch.arange(top.shape[1], device=device, dtype=torch.float32)
        log_weights = (-rank / self.T).expand_as(top).masked_fill(~valid, -torch.inf)
        positions = gumbel_topk(log_weights, self.K, self.generator).sort(1).values  # teacher-rank order
        users = torch.arange(start, stop, device=device)
        n_items = self.teacher.n_items
        forbidden = torch.cat(
            [pair_keys(self.train_csr, start, stop, device), (users.unsqueeze(1) * n_items + top).flatten()]
        )
        below, below_valid = sample_excluding(users, self.L, n_items, forbidden, self.generator)
        return {
            "interesting": top.gather(1, positions),
            "interesting_valid": valid.gather(1, positions),
            "below": below,
            "below_valid": below_valid,
        }

    def user_loss(self, users: torch.Tensor, student: Recommender) -> torch.Tensor:
        if not self.state:
            raise RuntimeError("on_epoch_start must run before loss")
        s = self.state
        items = torch.cat([s["interesting"][users], s["below"][users]], 1)
        logits = student.score(users, items)  # one call: LightGCN propagates once per score()
        return listwise_loss(
            logits[:, : self.K], logits[:, self.K :], s["interesting_valid"][users], s["below_valid"][users]
        )
