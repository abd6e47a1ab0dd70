"""HetComp (Kang et al., WWW 2023) on one teacher's training trajectory: easy-to-hard targets per user.

The original distils an ensemble of heterogeneous teachers by walking each user through their training
checkpoints; with one teacher, its trajectory is the sequence (the RCE-KD authors' adaptation).

* Each checkpoint gives each user a top-``top_k`` list (training items excluded), computed once.
* Dynamic knowledge construction, as in the authors' code: every ``p`` completed epochs the student's
  top-``top_k`` (training excluded) is compared with the *next* checkpoint's list; discrepancy =
  1 − NDCG-style overlap (a student position j holding one of the list's items earns
  (2^{exp(−j/10)} − 1)/log2(j + 2)). The first check only records it. Later a user moves one checkpoint
  on when last/now — the discrepancy to the next checkpoint recorded at the user's previous move (or the
  first check) over the current one — is above θ = α·decay^(completed epochs // p) (the student closed
  in on the next list fast) or below 1 (it drifts away from it). θ falls below 1 after ~10 checks, so
  every user eventually reaches the final checkpoint. All of it is one state vector over users.
* Targets of a user: training positives (at most ``max_positives``, redrawn each epoch) plus the current
  checkpoint's top list. Set-level loss, as the original: for each target i,
  −log( e^{s_i} / (e^{s_i} + Σ_{j non-target} e^{s_j}) ) = softplus(log Σ_j e^{s_j} − s_i), with the sum
  over all non-training, non-target items estimated from ``n_negatives`` uniform draws scaled by
  (#such items / #draws) — an unbiased estimate of the sum, so the loss keeps the original's scale.
* Once every user has reached the final checkpoint (and ``final_ranking``), the loss switches, as in the
  authors' code, to ListMLE: positives in the final teacher's order, plus ½·(the final top list +
  its first tenth), each ranked above the non-target items (same estimate).

Padded tensors with masks keep every user's targets rectangular. Per batch only the student's logits
are computed; everything else is per-epoch state over all users.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rcekd.data import Dataset
from rcekd.kd.base import (
    Distiller,
    Teacher,
    rowwise_isin,
    student_scores,
    student_vectors,
    teacher_scores,
    user_chunks,
)
from rcekd.kd.sampling import MASKED, allowed_counts, listwise_loss, sample_excluding
from rcekd.kd.trajectory import load_trajectory
from rcekd.models.base import Recommender


def overlap_discrepancy(student_top: torch.Tensor, target_top: torch.Tensor, decay: float = 10.0) -> torch.Tensor:
    """float[b]: 1 − NDCG-style overlap of the student's list with a target list (authors' measure)."""
    k = student_top.shape[1]
    position = torch.arange(k, device=student_top.device, dtype=torch.float32)
    gain = (2 ** torch.exp(-position / decay) - 1) / torch.log2(position + 2)
    parts = []
    for start, stop in user_chunks(student_top.shape[0], k * target_top.shape[1]):  # isin is b × k × k
        hits = rowwise_isin(student_top[start:stop], target_top[start:stop]).float()
        parts.append(1 - (hits * gain).sum(1) / gain.sum())
    return torch.cat(parts)


def sample_positives(
    csr: Any, cap: int, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(items int64[U, cap], valid bool[U, cap]): up to ``cap`` training items per user, uniformly, no loop."""
    n_users = csr.shape[0]
    lengths = torch.from_numpy(np.diff(csr.indptr).astype(np.int64)).to(device)
    items = torch.from_numpy(csr.indices.astype(np.int64)).to(device)
    owners = torch.repeat_interleave(torch.arange(n_users, device=device), lengths)
    # float64: owner + U(0, 1) must not round into the next owner's keys
    keys = torch.rand(items.shape, generator=generator, device=device, dtype=torch.float64) + owners
    order = keys.argsort()
    starts = torch.cumsum(lengths, 0) - lengths
    slot = torch.arange(items.numel(), device=device) - starts[owners[order]]
    keep = slot < cap
    out = torch.zeros(n_users, cap, dtype=torch.int64, device=device)
    valid = torch.zeros(n_users, cap, dtype=torch.bool, device=device)
    out[owners[order][keep], slot[keep]] = items[order][keep]
    valid[owners[order][keep], slot[keep]] = True
    return out, valid


class HetComp(Distiller):
    """``trajectory``: the teacher's checkpoints early → final (``teacher`` itself last), or the teacher's
    artifact directory (loaded by :func:`load_trajectory`: 3 evenly spaced earlier checkpoints + ``teacher``).
    """

    name = "hetcomp"

    def __init__(
        self,
        teacher: Teacher,
        dataset: Dataset,
        weight: float = 0.005,
        seed: int = 0,
        *,
        trajectory: list[Teacher] | str | Path | None = None,
        top_k: int = 50,
        p: int = 10,
        alpha: float = 1.05,
        alpha_decay: float = 0.995,
        max_positives: int = 50,
        n_negatives: int = 100,
        final_ranking: bool = True,
    ) -> None:
        if isinstance(trajectory, str | Path):  # a teacher artifact directory (what a CLI can pass)
            trajectory = load_trajectory(trajectory, teacher, device=teacher.user_vecs.device)
        if trajectory is None or len(trajectory) < 2:
            raise ValueError(
                "HetComp needs the teacher's training trajectory (≥ 2 checkpoints, early → final), got "
                f"{0 if trajectory is None else len(trajectory)}: retrain the teacher with trajectory checkpoints "
                "(--trajectory-every)"
            )
        if any(t.n_users != dataset.n_users or t.n_items != dataset.n_items for t in trajectory):
            raise ValueError("every trajectory checkpoint must have the dataset's users and items")
        if top_k <= 0 or p <= 0 or max_positives < 0 or n_negatives <= 0:
            raise ValueError("need top_k, p, n_negatives > 0 and max_positives ≥ 0")
        top_k = min(top_k, dataset.n_items)
        # the trajectory itself is not a setting (not JSON); its length is
        super().__init__(
            teacher,
            dataset,
            weight,
            seed,
            n_checkpoints=len(trajectory),
            top_k=top_k,
            p=p,
            alpha=alpha,
            alpha_decay=alpha_decay,
            max_positives=max_positives,
            n_negatives=n_negatives,
            final_ranking=final_ranking,
        )
        self.top_k, self.p, self.alpha, self.alpha_decay = top_k, p, alpha, alpha_decay
        self.max_positives, self.n_negatives, self.final_ranking = max_positives, n_negatives, final_ranking
        self.train_csr = dataset.csr("train")
        device = teacher.user_vecs.device
        # [C, U, top_k], early → final; only the lists are kept, not the checkpoints' vectors
        self.checkpoint_tops = torch.stack([t.topk(top_k, exclude=self.train_csr).to(device) for t in trajectory])
        self.last = len(trajectory) - 1
        allowed = allowed_counts(self.train_csr, device)
        self.top_valid = torch.arange(top_k, device=device) < allowed.unsqueeze(1)
        self.n_rest = (allowed - top_k).clamp(min=0)  # non-training items outside the top list
        self.stage = torch.zeros(dataset.n_users, dtype=torch.int64, device=device)
        self.reference = torch.full((dataset.n_users,), math.nan, device=device)  # "last" discrepancy
        self.checks = 0
        self.state: dict[str, torch.Tensor] = {}

    @classmethod
    def from_teacher_dir(
        cls, teacher_dir: str | Path, teacher: Teacher, dataset: Dataset, *, n_checkpoints: int = 4, **kwargs: Any
    ) -> HetComp:
        """HetComp on a saved teacher's trajectory (:func:`load_trajectory`), ``teacher`` being the final one."""
        return cls(
            teacher, dataset, trajectory=load_trajectory(teacher_dir, teacher, n_checkpoints=n_checkpoints), **kwargs
        )

    # -------------------------------------------------------------------------------- per epoch
    @property
    def final_phase(self) -> bool:
        return self.final_ranking and bool((self.stage == self.last).all())

    def on_epoch_start(self, student: Recommender, epoch: int) -> None:
        done = epoch - 1  # epochs completed before this one
        if done >= self.p and done % self.p == 0 and not bool((self.stage == self.last).all()):
            self._advance(student, done)
        users = torch.arange(self.stage.shape[0], device=self.stage.device)
        targets = self.checkpoint_tops[self.stage, users]
        positives, positives_valid = sample_positives(self.train_csr, self.max_positives, self.generator, users.device)
        if self.final_phase:  # ListMLE needs the positives in the final teacher's order
            dim = self.teacher.user_vecs.shape[1]
            positive_scores = torch.cat(
                [
                    teacher_scores(self.teacher, users[a:b], positives[a:b])
                    for a, b in user_chunks(users.shape[0], self.max_positives * dim)
                ]
            )
            order = positive_scores.masked_fill(~positives_valid, -torch.inf).argsort(1, descending=True)
            positives, positives_valid = positives.gather(1, order), positives_valid.gather(1, order)
        negatives, negatives_valid = [], []
        for start, stop in user_chunks(users.shape[0], self.top_k + self.n_negatives):
            drawn, valid = sample_excluding(
                self.train_csr, start, stop, targets[start:stop], self.n_negatives, self.generator
            )
            negatives.append(drawn)
            negatives_valid.append(valid)
        negatives_valid_t = torch.cat(negatives_valid)
        drawn_count = negatives_valid_t.sum(1).clamp(min=1)
        self.state = {
            "positives": positives,
            "positives_valid": positives_valid,
            "targets": targets,
            "negatives": torch.cat(negatives),
            "negatives_valid": negatives_valid_t,
            # log(#non-target items / #draws): turns the sampled Σ e^{s_j} into an estimate of the full one
            "log_scale": torch.log(self.n_rest.clamp(min=1).float() / drawn_count),
        }

    def _advance(self, student: Recommender, done: int) -> None:
        """One dynamic-knowledge-construction check: who moves one checkpoint on (vectorised)."""
        user_vecs, item_vecs = student_vectors(student)
        student_top = self.rank_student("top", user_vecs, item_vecs, self.top_k, exclude=self.train_csr)
        student_top = student_top.to(self.stage.device)
        users = torch.arange(self.stage.shape[0], device=self.stage.device)
        following = self.checkpoint_tops[(self.stage + 1).clamp(max=self.last), users]
        now = overlap_discrepancy(student_top, following)
        if self.checks == 0:
            self.reference = now
        else:
            threshold = self.alpha * self.alpha_decay ** (done // self.p)
            ratio = self.reference / now.clamp(min=1e-12)
            move = ((ratio > threshold) | (ratio < 1)) & (self.stage < self.last)
            self.stage = self.stage + move.long()
            after = self.checkpoint_tops[(self.stage + 1).clamp(max=self.last), users]
            self.reference = torch.where(move, overlap_discrepancy(student_top, after), self.reference)
        self.checks += 1

    def state_dict(self) -> dict[str, Any]:
        """The generator plus the curriculum: each user's checkpoint and last discrepancy, checks done."""
        return {**super().state_dict(), "stage": self.stage, "reference": self.reference, "checks": self.checks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        stage, reference = state["stage"].to(self.stage), state["reference"].to(self.reference)
        if stage.shape != self.stage.shape or reference.shape != self.reference.shape or stage.numel() == 0:
            raise ValueError(f"HetComp state must cover {self.stage.shape[0]} users")
        if not 0 <= int(stage.min()) <= int(stage.max()) <= self.last:
            raise ValueError(f"HetComp stages must lie in 0..{self.last}")
        self.stage, self.reference, self.checks = stage, reference, int(state["checks"])

    # -------------------------------------------------------------------------------- per batch
    def user_loss(self, users: torch.Tensor, student: Recommender) -> torch.Tensor:
        if not self.state:
            raise RuntimeError("on_epoch_start must run before loss")
        s = self.state
        n_pos, n_top = s["positives"].shape[1], s["targets"].shape[1]
        items = torch.cat([s["positives"][users], s["targets"][users], s["negatives"][users]], 1)
        logits = student_scores(student, users, items)  # one call for all the lists
        pos, top, neg = logits[:, :n_pos], logits[:, n_pos : n_pos + n_top], logits[:, n_pos + n_top :]
        pos_valid, top_valid = s["positives_valid"][users], self.top_valid[users]
        neg = neg.masked_fill(~s["negatives_valid"][users], MASKED) + s["log_scale"][users].unsqueeze(1)
        if self.final_phase:
            tenth = max(1, n_top // 10)
            ranking = listwise_loss(top, neg, top_valid) + listwise_loss(top[:, :tenth], neg, top_valid[:, :tenth])
            return listwise_loss(pos, neg, pos_valid) + ranking / 2
        rest = torch.logsumexp(neg, 1, keepdim=True)  # log Σ_{non-target} e^{s_j}, estimated
        targets = torch.cat([pos, top], 1)
        valid = torch.cat([pos_valid, top_valid], 1)
        return (F.softplus(rest - targets) * valid).sum(1)

    def diagnostics(self) -> dict[str, Any]:
        """Where the users are on the trajectory: mean checkpoint index and the share at the final one."""
        return {
            "mean_stage": float(self.stage.float().mean()),
            "at_final": float((self.stage == self.last).float().mean()),
            "final_phase": self.final_phase,
        }
