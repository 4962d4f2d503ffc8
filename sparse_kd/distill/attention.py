"""The teacher ranker's view of user behaviour: target attention over the items a user clicked.

Notation: U users, I items, H' item text dim (as the teacher ranker's dense features have it),
d attention dim, L history length (``max_len``), P clicks in train, B batch size.

DIN-style (Zhou et al., 2018): for an example (user u, item i, time t), the *history* is u's
clicks in the ``train`` split, never valid or test, with

* no leakage of the example itself: the item i is left out of the history wherever it occurs,
  for every example alike (a training click, its negatives, a valid or test pair), so that a
  training click is never explained by itself and every split is scored by the same rule;
* where the data has timestamps, only clicks strictly earlier than t (a sampled negative has its
  positive's time; a pair with no time, :data:`~sparse_kd.data.batching.NO_TIME`, sees them all).
  Without timestamps the order is the stored one.

The history is a set: an item clicked again counts once, at its first click. Of it the last L
clicks are kept. Each item is represented by its text (a learned
projection of the frozen teacher embedding) plus a learned ID row; the target item attends over
the history with DIN's activation unit (an MLP over [q, k, q * k, q - k], ``kind: din``) or a
scaled dot product (``kind: dot``), a masked softmax pools the history, and the feature is
[pooled (d), pooled * q (d), log(1 + clicks attended)]. It trains with the teacher ranker, as a
dense module (replicated on every rank, like the MLPs); the students never see it.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import nn

from sparse_kd.data.schema import RecDataset


class HistoryAttention(nn.Module):
    """forward(user (B,), item (B,), timestamp (B,) or None) -> (B, 2 d + 1) dense features.

    Args:
        ds: the dataset (its train split defines the histories).
        item_text: (I, H') frozen item text embeddings.
        max_len: clicks attended per example (the most recent ones).
        dim: attention dim d.
        kind: ``din`` (activation-unit MLP of ``hidden`` units) or ``dot``.
        item_ids: add a learned ID row per item to its text projection.

    Example::

        att = HistoryAttention(ds, item_text, max_len=20, dim=16)
        att(torch.tensor([0, 3]), torch.tensor([5, 7])).shape  # (2, 33)
    """

    def __init__(self, ds: RecDataset, item_text: torch.Tensor, max_len: int = 50, dim: int = 32,
                 kind: str = "din", hidden: int = 32, item_ids: bool = True) -> None:
        super().__init__()
        if kind not in ("din", "dot"):
            raise ValueError(f"history attention kind {kind!r} is not valid; expected din or dot")
        self.max_len, self.d, self.kind = int(max_len), int(dim), kind
        self.dim = 2 * self.d + 1
        tr = ds.splits["train"]
        pos = tr.label > 0
        u, i, t = tr.user[pos].astype(np.int64), tr.item[pos].astype(np.int64), tr.timestamp[pos].astype(np.int64)
        order = np.lexsort((np.arange(u.shape[0]), t, u))  # by user, then time, then stored order
        u, i, t = u[order], i[order], t[order]
        # each item once per user, at its first click: the history is the set of items clicked before t
        first = np.sort(np.unique(u * ds.num_items + i, return_index=True)[1])
        u, i, t = u[first], i[first], t[first]
        self.timed = bool((tr.timestamp != 0).any())
        times = np.unique(t) if self.timed else np.zeros(0, dtype=np.int64)
        # key of a click: user * M + rank of its time among the distinct click times, sorted as
        # the clicks are; an example's end = the first click of its user at or after its time
        self.m = int(times.shape[0]) + 1
        keys = u * self.m + np.searchsorted(times, t) if self.timed else np.zeros(0, dtype=np.int64)  # untimed: unused
        # non-persistent buffers: they follow the module's device and stay out of checkpoints
        self.register_buffer("hist_item", torch.from_numpy(np.concatenate([i, [0]])), persistent=False)  # (P + 1,)
        self.register_buffer("hist_key", torch.from_numpy(keys), persistent=False)  # (P,) or (0,)
        self.register_buffer("times", torch.from_numpy(times), persistent=False)
        starts = np.searchsorted(u, np.arange(ds.num_users + 1))
        self.register_buffer("user_start", torch.from_numpy(starts.astype(np.int64)), persistent=False)  # (U + 1,)
        self.register_buffer("item_text", item_text.float().contiguous(), persistent=False)  # (I, H')
        self.proj = nn.Linear(item_text.shape[1], self.d)
        self.item_emb: Optional[nn.Embedding] = None
        if item_ids:
            self.item_emb = nn.Embedding(ds.num_items, self.d)
            nn.init.normal_(self.item_emb.weight, std=0.01)
        self.unit = nn.Sequential(nn.Linear(4 * self.d, hidden), nn.ReLU(), nn.Linear(hidden, 1)) if kind == "din" else None

    def window(self, user: torch.Tensor, item: torch.Tensor, timestamp: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The attended clicks: item ids (B, L + 1) and a mask (B, L + 1) of at most L true entries."""
        user, item = user.long(), item.long()
        start = self.user_start.index_select(0, user)
        end = self.user_start.index_select(0, user + 1)
        if self.timed and timestamp is not None:
            rank = torch.searchsorted(self.times, timestamp.long())  # distinct click times before t
            end = torch.searchsorted(self.hist_key, user * self.m + rank)
        n = self.max_len + 1  # one more than kept: the target item may be among them
        pos = end[:, None] - n + torch.arange(n, device=user.device)  # (B, L + 1)
        ok = pos >= start[:, None]
        ids = self.hist_item.index_select(0, pos.clamp_min(0).reshape(-1)).view_as(pos)
        ok = ok & (ids != item[:, None])
        # keep the latest L of what is left, so a click and a non-click see as many items
        later = ok.flip(1).long().cumsum(1).flip(1)  # (B, L + 1) kept entries at or after each position
        return ids, ok & (later <= self.max_len)

    def table(self) -> torch.Tensor:
        """(I, d) every item's representation: projected text plus the learned ID row."""
        v = self.proj(self.item_text)
        return v + self.item_emb.weight if self.item_emb is not None else v

    def represent(self, ids: torch.Tensor) -> torch.Tensor:
        """(...) item ids -> (..., d), gathering only the rows asked for."""
        flat = ids.reshape(-1)
        v = self.proj(self.item_text.index_select(0, flat))
        if self.item_emb is not None:
            v = v + self.item_emb(flat)
        return v.view(*ids.shape, self.d)

    def key_weight(self) -> torch.Tensor:
        """(h, d) the weight DIN's first layer applies to a history entry k alone: W2 - W4."""
        _, w2, _, w4 = self.unit[0].weight.split(self.d, dim=1)
        return w2 - w4

    def scores(self, q: torch.Tensor, k: torch.Tensor, k_proj: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, L + 1) attention logits of the target q (B, d) over the history k (B, L + 1, d).

        DIN's unit is MLP([q, k, q * k, q - k]); its first layer is linear, so with W = [W1 W2 W3 W4]
        it equals (W1 + W4) q + (W2 - W4) k + W3 (q * k) + b: the q part is computed once per example
        instead of once per history entry, and the k part once per item (``k_proj``, gathered) where
        the catalogue is smaller than the batch's history. The same function and gradients as
        ``unit(cat([q, k, q * k, q - k]))``, without building the (B, L + 1, 4 d) input.
        """
        if self.unit is None:
            return (q[:, None, :] * k).sum(-1) / math.sqrt(self.d)
        first, last = self.unit[0], self.unit[2]
        w1, _, w3, w4 = first.weight.split(self.d, dim=1)  # (h, d) each
        kw = k_proj if k_proj is not None else k @ self.key_weight().T  # (B, L + 1, h)
        pre = (q @ (w1 + w4).T + first.bias)[:, None, :] + kw + (q[:, None, :] * k) @ w3.T
        return last(torch.relu(pre)).squeeze(-1)

    def forward(self, user: torch.Tensor, item: torch.Tensor, timestamp: Optional[torch.Tensor] = None) -> torch.Tensor:
        ids, mask = self.window(user, item, timestamp)
        k_proj = None
        if ids.numel() > self.item_text.shape[0]:  # more history entries than items: work per item, then gather
            t = self.table()  # (I, d)
            q, k = t.index_select(0, item.long()), t.index_select(0, ids.reshape(-1)).view(*ids.shape, self.d)
            if self.unit is not None:
                k_proj = (t @ self.key_weight().T).index_select(0, ids.reshape(-1)).view(*ids.shape, -1)
        else:
            both = self.represent(torch.cat([item.long()[:, None], ids], 1))  # (B, L + 2, d)
            q, k = both[:, 0], both[:, 1:]  # (B, d), (B, L + 1, d)
        score = self.scores(q, k, k_proj).masked_fill(~mask, float("-inf"))
        has = mask.any(1, keepdim=True)
        w = torch.softmax(torch.where(has, score, torch.zeros_like(score)), 1) * mask  # no history: all 0
        pooled = (w[:, :, None] * k).sum(1)  # (B, d)
        count = torch.log1p(mask.sum(1, keepdim=True).float())
        return torch.cat([pooled, pooled * q, count], 1)


class PairFeatures(nn.Module):
    """Several pair-feature modules side by side: forward(user, item, timestamp) -> (B, sum of dims)."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.dim = sum(p.dim for p in parts)

    def forward(self, user: torch.Tensor, item: torch.Tensor, timestamp: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.cat([p(user, item, timestamp) for p in self.parts], 1)
