"""Matrix factorisation trained with BPR: the paper's MF backbone (teacher d=300–400, student d=20)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from rcekd.data import Interactions
from rcekd.models.base import Batch, Recommender, bpr_batches, bpr_loss

#: tables at least this big get row-sparse updates by default
SPARSE_FROM_WEIGHTS = 2**22


class MF(Recommender):
    arch = "mf"

    def __init__(
        self, n_users: int, n_items: int, dim: int = 20, init_std: float = 0.01, sparse: bool | None = None
    ) -> None:
        """``sparse``: row-sparse gradients and updates. A batch touches ~6k rows, so for big tables
        (Gowalla d=300: 21M weights) that is far faster; for small students the bookkeeping of sparse
        gradients (sorting the ~10⁵ rows a KD term touches) costs more than a dense update of the
        whole table. None picks by size: sparse from 4M weights on. Dense updates also apply the L2
        term to every row at every step, a different regulariser (README)."""
        if sparse is None:
            sparse = (n_users + n_items) * dim >= SPARSE_FROM_WEIGHTS
        super().__init__(n_users, n_items, dim=dim, init_std=init_std, sparse=sparse)
        self.sparse_embeddings = sparse
        self.user_emb = nn.Embedding(n_users, dim, sparse=sparse)
        self.item_emb = nn.Embedding(n_items, dim, sparse=sparse)
        nn.init.normal_(self.user_emb.weight, std=init_std)
        nn.init.normal_(self.item_emb.weight, std=init_std)

    def _rows(self, table: nn.Embedding, index: torch.Tensor) -> torch.Tensor:
        """Rows of a table. Sparse: the embedding op (row-sparse gradient). Dense: index_select, whose
        backward is one index_add — on CPU the embedding op's dense backward sorts and is ~10× slower."""
        if self.sparse_embeddings:
            return table(index)
        return table.weight.index_select(0, index.reshape(-1)).view(*index.shape, table.embedding_dim)

    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        return self._rows(self.user_emb, users)

    def item_vectors(self) -> torch.Tensor:
        return self.item_emb.weight

    def all_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_emb.weight, self.item_emb.weight

    def score(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        # gather only the rows used, so sparse gradients stay row-sparse
        return torch.einsum("bd,bkd->bk", self._rows(self.user_emb, users), self._rows(self.item_emb, items))

    def batches(self, train: Interactions, batch_size: int, rng: np.random.Generator) -> Iterator[Batch]:
        return bpr_batches(train, self.n_items, batch_size, rng, self.device)

    def base_loss(self, batch: Batch) -> torch.Tensor:
        user = self._rows(self.user_emb, batch["users"])
        pos = (user * self._rows(self.item_emb, batch["pos"])).sum(-1)
        neg = (user * self._rows(self.item_emb, batch["neg"])).sum(-1)
        return bpr_loss(pos, neg)
