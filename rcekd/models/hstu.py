"""HSTU (Zhai et al. 2024): a causal pointwise-attention sequence encoder, trained by next-item prediction.

A user is the encoder's output at the last slot of their training history, so top-N is still one dot
product with the (L2-normalised) item embeddings. Histories are LEFT-padded to ``max_len`` (token 0 is
padding, item i is token i+1) so slot -1 always holds the most recent item. They are kept as a buffer,
so a checkpoint (and the exported ONNX user tower) needs no dataset.

Training feeds each history shifted right by one slot (its last item becomes the target of slot -1),
so the slot that makes the user vector at serving time, and its positional embedding, is the one that
is trained; feeding the unshifted row would leave slot -1 without any loss.

Init follows the reference code: item embeddings N(0, 0.02²), positional N(0, 1/d), UVQK N(0, 0.02²),
output projections Xavier-uniform.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rcekd.data import Interactions
from rcekd.models.base import Batch, Recommender


class HSTUBlock(nn.Module):
    """Pre-norm block: SiLU(n W) → U, V, Q, K; A = SiLU(QKᵀ)/N (no softmax); y = x + W_o(U ⊙ LN(AV))."""

    def __init__(self, dim: int, n_heads: int, dqk: int, dv: int, dropout: float) -> None:
        super().__init__()
        self.dim, self.n_heads, self.dqk, self.dv = dim, n_heads, dqk, dv
        self.uvqk = nn.Linear(dim, 2 * n_heads * (dv + dqk), bias=False)
        self.out = nn.Linear(n_heads * dv, dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.normal_(self.uvqk.weight, std=0.02)
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, max_len: int) -> torch.Tensor:
        """``x``: float[b, n, d]; ``mask``: float[b, 1, n, n], 1 where query t may read key s.

        The attention is divided by the padded length ``max_len`` even when the leading all-padding
        columns were trimmed off (n < max_len): trimming then changes nothing but the cost.
        """
        b, n = x.shape[0], x.shape[1]
        h, hv, hqk = self.n_heads, self.n_heads * self.dv, self.n_heads * self.dqk
        normed = F.layer_norm(x, (self.dim,))  # a Python int, not x.shape[-1], so ONNX export sees a constant
        u, v, q, k = F.silu(self.uvqk(normed)).split([hv, hv, hqk, hqk], dim=-1)
        q = q.reshape(b, n, h, self.dqk).transpose(1, 2)
        k = k.reshape(b, n, h, self.dqk).transpose(1, 2)
        v = v.reshape(b, n, h, self.dv).transpose(1, 2)
        attn = F.silu(q @ k.transpose(-1, -2)) * (mask / max_len)  # pointwise: masked keys contribute 0
        o = (attn @ v).transpose(1, 2).reshape(b, n, hv)
        return x + self.out(self.dropout(u * F.layer_norm(o, (hv,))))


class HSTU(Recommender):
    arch = "hstu"

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int = 64,
        n_blocks: int = 8,
        n_heads: int = 4,
        dqk: int = 8,
        dv: int = 16,
        max_len: int = 100,
        dropout: float = 0.2,
        temperature: float = 0.05,
        n_negatives: int = 256,
        train: Interactions | None = None,
    ) -> None:
        super().__init__(
            n_users,
            n_items,
            dim=dim,
            n_blocks=n_blocks,
            n_heads=n_heads,
            dqk=dqk,
            dv=dv,
            max_len=max_len,
            dropout=dropout,
            temperature=temperature,
            n_negatives=n_negatives,
        )
        if max_len < 2:
            raise ValueError(f"HSTU needs max_len >= 2 (one input and one target), got {max_len}")
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=dim**-0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(HSTUBlock(dim, n_heads, dqk, dv, dropout) for _ in range(n_blocks))
        if train is None:
            histories = torch.zeros(0, max_len, dtype=torch.int64)  # resized on load_state_dict
        else:
            if train.n_users != n_users:
                raise ValueError(f"train has {train.n_users} users, the model {n_users}")
            histories = torch.from_numpy(self.left_padded(train, max_len))
        self.register_buffer("histories", histories)

    def check_buffers(self) -> None:
        expected = (self.n_users, self.hparams["max_len"])
        if tuple(self.histories.shape) != expected:
            raise ValueError(f"histories must have shape {expected}, got {tuple(self.histories.shape)}")
        if self.histories.numel() and (self.histories.min() < 0 or self.histories.max() > self.n_items):
            raise ValueError(f"histories hold tokens outside 0..{self.n_items}")

    @staticmethod
    def left_padded(train: Interactions, max_len: int) -> np.ndarray:
        """int64[n_users, max_len]: each user's last ``max_len`` items as tokens (item + 1), right-aligned."""
        lengths = train.lengths()
        users = train.users()
        rank = np.arange(train.nnz) - np.repeat(train.indptr[:-1], lengths)
        column = max_len - lengths[users] + rank
        keep = column >= 0
        out = np.zeros((train.n_users, max_len), dtype=np.int64)
        out[users[keep], column[keep]] = train.items[keep] + 1
        return out

    def encode(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """float[b, n, d] L2-normalised outputs for left-padded tokens int64[b, n]; output t sees ≤ t.

        ``tokens`` may be the last n = max_len − offset columns of the padded histories (the leading
        columns all padding): positions stay absolute, so the outputs are the same.
        """
        n = tokens.shape[1]
        valid = (tokens != 0).to(self.item_emb.weight.dtype)
        x = self.item_emb(tokens) * self.hparams["dim"] ** 0.5 + self.pos_emb.weight[offset : offset + n]
        x = self.input_dropout(x)  # padded slots keep their positional embedding: a cold user is not 0
        pos = torch.arange(n, device=tokens.device)
        causal = (pos.unsqueeze(1) >= pos.unsqueeze(0)).to(x.dtype)  # [query, key]
        mask = (causal * valid.unsqueeze(1)).unsqueeze(1)  # padded keys masked; [b, 1, N, N]
        for block in self.blocks:
            x = block(x, mask, self.hparams["max_len"])
        return F.normalize(x, dim=-1)

    def user_vectors(self, users: torch.Tensor) -> torch.Tensor:
        return self.encode(self.histories[users])[:, -1]

    def item_vectors(self) -> torch.Tensor:
        return F.normalize(self.item_emb.weight[1:], dim=-1)

    def all_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Users in chunks of 1024 of similar history length, each trimmed to its longest history.

        Most histories are far shorter than max_len, so this skips most of the padding's compute.
        """
        lengths = (self.histories != 0).sum(1)
        order = lengths.argsort()
        out = torch.empty(self.n_users, self.hparams["dim"], device=self.device)
        for chunk in order.split(1024):
            tokens, offset = self._trimmed(self.histories[chunk])
            out[chunk] = self.encode(tokens, offset)[:, -1]
        return out, self.item_vectors()

    def _trimmed(self, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Drop the leading columns that are padding in every row (keep at least one column)."""
        longest = int((tokens != 0).sum(1).max())
        offset = min(tokens.shape[1] - longest, tokens.shape[1] - 1)
        return tokens[:, offset:], offset

    def batches(self, train: Interactions, batch_size: int, rng: np.random.Generator) -> Iterator[Batch]:
        """Users with ≥ 2 training items in length buckets, plus ``n_negatives`` uniform items per batch.

        Users are sorted by history length (random order within a length), cut into batches, and the
        batches shuffled: a batch is then trimmed to its own longest history, which skips most of the
        padding's compute (CiteULike: mean history 19 of max_len 100). ``norm`` is the number of
        positions a batch of randomly drawn users would hold on average, so the loss keeps the
        weighting of random batches: every position counts the same.
        """
        lengths = np.minimum(train.lengths(), self.hparams["max_len"])
        eligible = np.flatnonzero(lengths >= 2)
        by_length = eligible[np.lexsort((rng.random(len(eligible)), lengths[eligible]))]
        groups = [by_length[start : start + batch_size] for start in range(0, len(by_length), batch_size)]
        norm = float(batch_size * (lengths[eligible] - 1).mean()) if len(eligible) else 1.0
        negatives = rng.integers(0, self.n_items, size=(len(groups), self.hparams["n_negatives"]))
        negatives = torch.from_numpy(negatives.astype(np.int64))
        for index in rng.permutation(len(groups)):
            users = torch.from_numpy(groups[index].astype(np.int64))
            yield {
                "users": users.to(self.device),
                "negatives": negatives[index].to(self.device),
                "norm": torch.tensor(norm, device=self.device),
            }

    def base_loss(self, batch: Batch) -> torch.Tensor:
        """Sampled-softmax next-item loss (cosine / temperature), summed over positions / ``norm``."""
        targets = self.histories[batch["users"]]
        inputs = F.pad(targets[:, :-1], (1, 0))  # slot t predicts the token now at slot t of `targets`
        inputs, offset = self._trimmed(inputs)
        targets = targets[:, offset:]
        valid = inputs != 0
        outputs = self.encode(inputs, offset)[valid]  # [P, d]
        positives = targets[valid]  # tokens, all real items
        neg_tokens = batch["negatives"] + 1
        pos_logits = (outputs * F.normalize(self.item_emb(positives), dim=-1)).sum(-1, keepdim=True)
        neg_logits = (outputs @ F.normalize(self.item_emb(neg_tokens), dim=-1).T).masked_fill(
            neg_tokens.unsqueeze(0) == positives.unsqueeze(1), float("-inf")
        )
        logits = torch.cat([pos_logits, neg_logits], dim=1) / self.hparams["temperature"]
        return (torch.logsumexp(logits, dim=1) - logits[:, 0]).sum() / batch["norm"]
