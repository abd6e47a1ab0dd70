"""Matrix factorisation trained with BPR: the paper's MF backbone (teacher d=300–400, student d=20)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from rcekd.data import Interactions
from rcekd.models.base import Batch, Recommender, bpr_batches, bpr_loss


class MF(Recommender):
    arch = "mf"

    def __init__(self, n_users: int, n_items: int, dim: int = 20, init_std: float = 0.01, sparse: bool = True) -> None:
        """``sparse``: row-sparse gradients and updates (a batch touches ~6k rows of tables with up to
        70k rows: far faster on big tables). Dense updates decay every row's L2 term at every step, a
        different regulariser that helped the CiteULike teacher slightly (README)."""
        super().__init__(n_users, n_items, dim=dim, init_std=init_std, sparse=sparse)
        self.sparse_embeddings = sparse
        self.user_emb = nn.Embedding(n_users, dim, sparse=sparse)
        self.item_emb = nn.Embedding(n_items, dim, sparse=sparse)
        nn.init.normal_(self.user_emb.weight, std=init_std)
        nn.init.normal_(self.item_emb.weight, std=init_std)

    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        return self.user_emb(users)

    def item_vectors(self) -> torch.Tensor:
        return self.item_emb.weight

    def all_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_emb.weight, self.item_emb.weight

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        # gather only the rows used, so gradients stay row-sparse
        return torch.einsum("bd,bkd->bk", self.user_emb(users), self.item_emb(items))

    def batches(self, train: Interactions, batch_size: int, rng: np.random.Generator) -> Iterator[Batch]:
        return bpr_batches(train, self.n_items, batch_size, rng, self.device)

    def base_loss(self, batch: Batch) -> torch.Tensor:
        user = self.user_emb(batch["users"])
        pos = (user * self.item_emb(batch["pos"])).sum(-1)
        neg = (user * self.item_emb(batch["neg"])).sum(-1)
        return bpr_loss(pos, neg)
