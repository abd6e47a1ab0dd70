"""The one base class every backbone implements: vectors in, dot-product scores out.

Every backbone reduces to ``score(u, i) = user_vectors(u) · item_vectors()[i]``, which is what lets
any student (and any teacher with vectors) be exported as an ONNX user tower plus a FAISS index.
A model carries the training structure it needs (LightGCN's graph edges, HSTU's histories) as
buffers, so a checkpoint is self-contained and loads without the dataset.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from rcekd.data import Interactions

Batch = dict[str, torch.Tensor]


class Recommender(nn.Module, ABC):
    """A recommender backbone: user/item vectors, its own training loss and batch sampler."""

    arch: ClassVar[str]
    #: embedding tables that receive row-sparse gradients (updated only where a batch touches them)
    sparse_embeddings: bool = False

    def __init__(self, n_users: int, n_items: int, **hparams: Any) -> None:
        super().__init__()
        self.n_users = n_users
        self.n_items = n_items
        self.hparams = dict(hparams)
        self._step_cache: dict[str, Any] | None = None

    @contextmanager
    def one_step(self) -> Iterator[None]:
        """Within one training step, backbones may reuse a forward pass shared by several loss terms
        (LightGCN's propagation is needed by BPR and by every KD term); outside it nothing is cached."""
        self._step_cache = {}
        try:
            yield
        finally:
            self._step_cache = None

    # ------------------------------------------------------------------------------- identity
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild the module before loading its weights."""
        return {"arch": self.arch, "n_users": self.n_users, "n_items": self.n_items, **self.hparams}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ------------------------------------------------------------------------------- vectors
    @abstractmethod
    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        """float[len(users), d] for int64 user rows."""

    @abstractmethod
    def item_vectors(self) -> torch.Tensor:
        """float[n_items, d]."""

    def all_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All user and item vectors; backbones with a shared forward pass (LightGCN) override."""
        users = torch.arange(self.n_users, device=self.device)
        chunks = [self.user_vectors(chunk) for chunk in users.split(4096)]
        return torch.cat(chunks), self.item_vectors()

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of ``items`` (int64[b, k]) for ``users`` (int64[b]) → float[b, k]."""
        user_vecs = self.user_vectors(users)
        item_vecs = self.item_vectors()[items]
        return torch.einsum("bd,bkd->bk", user_vecs, item_vecs)

    def full_scores(self, users: torch.Tensor) -> torch.Tensor:
        return self.user_vectors(users) @ self.item_vectors().T

    # ------------------------------------------------------------------------------- training
    @abstractmethod
    def batches(self, train: Interactions, batch_size: int, rng: np.random.Generator) -> Iterator[Batch]:
        """One epoch of training batches (vectorised sampling; negatives redrawn each call)."""

    @abstractmethod
    def base_loss(self, batch: Batch) -> torch.Tensor:
        """The backbone's own loss on one batch (BPR for MF/LightGCN, sampled softmax for HSTU)."""

    def batch_users(self, batch: Batch) -> torch.Tensor:
        """The user of each row of a batch (the KD term is computed per row's user)."""
        return batch["users"]

    def check_buffers(self) -> None:
        """Raise ValueError when a data buffer (edges, histories) does not fit the model's sizes.

        Loaded checkpoints may come from strangers: an out-of-range id would otherwise reach native
        sparse kernels, which do not bounds-check.
        """

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # Data buffers (graph edges, histories) start empty in a model built from its config alone;
        # take the saved shape so load_state_dict's shape check passes and the data arrives.
        for name, buffer in self._buffers.items():
            incoming = state_dict.get(prefix + name)
            if buffer is not None and buffer.numel() == 0 and incoming is not None:
                self._buffers[name] = buffer.new_empty(incoming.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def bpr_batches(
    train: Interactions, n_items: int, batch_size: int, rng: np.random.Generator, device: torch.device
) -> Iterator[Batch]:
    """(user, positive, negative) rows over all training pairs, shuffled, one fresh negative each.

    Negatives are drawn uniformly among items the user has not interacted with in training;
    collisions are found with one sorted-key search and redrawn, all vectorised.
    """
    users = train.users()
    positives = train.items
    seen_keys = np.sort(users * n_items + positives)
    negatives = rng.integers(0, n_items, size=len(users))
    todo = np.arange(len(users))
    for _ in range(100):
        keys = users[todo] * n_items + negatives[todo]
        pos = np.searchsorted(seen_keys, keys).clip(max=len(seen_keys) - 1)
        clash = seen_keys[pos] == keys
        todo = todo[clash]
        if len(todo) == 0:
            break
        negatives[todo] = rng.integers(0, n_items, size=len(todo))
    # a user holding (nearly) every item may still clash after all rounds: drop those rows
    keep = np.ones(len(users), dtype=bool)
    keep[todo] = False
    order = rng.permutation(np.flatnonzero(keep))
    triples = torch.from_numpy(np.stack([users[order], positives[order], negatives[order]]))
    for start in range(0, len(order), batch_size):
        chunk = triples[:, start : start + batch_size].to(device)
        yield {"users": chunk[0], "pos": chunk[1], "neg": chunk[2]}


def bpr_loss(pos_scores: torch.Tensor, neg_scores: torch.Tensor) -> torch.Tensor:
    """Summed over rows, as in the reference code (the KD weights λ assume this reduction)."""
    return -nn.functional.logsigmoid(pos_scores - neg_scores).sum()
