"""Sampled negatives for implicit feedback (a log of positives only, e.g. ``interactions.csv``
without a ``label`` column).

Notation: U users, P items in a pool, M rows to sample for, k = ``DataConfig.negatives``.

Policy:

* Each positive (user u, item i) gets k negatives (u, j, label 0) with j drawn uniformly from the
  **pool** of the positive's split, never an item u has a positive with anywhere in the data (any
  split): a negative is never an item the user is known to have chosen. Draws are with
  replacement (the k negatives of one positive may repeat).
* Pools: ``train``, ``valid`` and ``test`` draw from the warm items; ``valid_cold`` from the
  validation cold items and ``test_cold`` from the test cold items. So cold-item AUC measures
  how a user's positive cold item ranks among *cold items* (all unseen in training), not how
  cold items rank against warm ones, which would mostly measure popularity.
* A user with positives on every item of a pool can get no negative there; such positives keep
  no negatives and are counted (``report["feedback"]["positives_without_negatives"]``).
* Evaluation negatives are fixed per split (stream ``data.seed``/split name). Training negatives
  are either resampled every epoch by the training stream (``data.train_negatives: per_epoch``,
  stream ``train.seed``/epoch; the train split then holds positives only) or sampled once like
  the evaluation ones and stored as train rows (``fixed``; needed by logit distillation, whose
  teacher logits are per train row).
* Randomness is counter-based (:func:`~sparse_kd.data.hashing.hash_uniform` of the positive's
  position in its split), so the negatives do not depend on chunking, number of processes or
  DataLoader workers: the in-memory loader and ``sparse-kd data convert`` produce the same rows.
* Layout: every positive is followed by its negatives.

Sampling is exact and vectorised: with user u's positives in a pool at sorted pool indices
s_0 < s_1 < ..., the r-th (0-based) pool index that is *not* a positive is r + #{t : s_t - t <= r};
one ``searchsorted`` over all users' ``u * P + s_t - t`` (sorted) answers every row at once.
Memory: 8 bytes per positive (the sorted keys).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparse_kd.data.hashing import hash_uniform, stream_key
from sparse_kd.data.interactions import TEST_COLD, TRAIN, VALID_COLD, Interactions

POOL_OF_SPLIT = {"train": "warm", "valid": "warm", "test": "warm", "valid_cold": "valid_cold", "test_cold": "test_cold"}
POOL_CODE = {"warm": TRAIN, "valid_cold": VALID_COLD, "test_cold": TEST_COLD}


@dataclass
class Pool:
    """The items negatives of some splits are drawn from, and each user's positives among them.

    items: (P,) int64 sorted item indices.   count: (U,) int64 positives of each user in the pool.
    offsets: (U + 1,) int64 start of each user's run in ``adj``.
    adj: (sum count,) int64 ``u * P + s_t - t`` for user u's t-th positive at pool index s_t.
    """

    items: np.ndarray
    count: np.ndarray
    offsets: np.ndarray
    adj: np.ndarray

    @classmethod
    def build(cls, items: np.ndarray, num_users: int, num_items: int, pos_user: np.ndarray, pos_item: np.ndarray) -> "Pool":
        items = np.sort(np.asarray(items, dtype=np.int64))
        p = len(items)
        pidx = np.full(num_items, -1, dtype=np.int64)
        pidx[items] = np.arange(p)
        pi = pidx[pos_item]
        inside = pi >= 0
        keys = np.unique(np.asarray(pos_user, dtype=np.int64)[inside] * max(p, 1) + pi[inside])  # sorted, deduplicated
        u = keys // max(p, 1)
        count = np.bincount(u, minlength=num_users).astype(np.int64)
        offsets = np.zeros(num_users + 1, dtype=np.int64)
        np.cumsum(count, out=offsets[1:])
        adj = keys - (np.arange(len(keys), dtype=np.int64) - offsets[u])
        return cls(items, count, offsets, adj)

    @property
    def size(self) -> int:
        return len(self.items)

    def available(self, users: np.ndarray) -> np.ndarray:
        """(M,) int64 number of pool items each user has no positive with."""
        return self.size - self.count[users]

    def sample(self, users: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
        """users (M,), uniforms (M,) in [0, 1) -> (M,) int64 items, -1 where the user has none left."""
        users = np.asarray(users, dtype=np.int64)
        avail = self.available(users)
        ok = avail > 0
        r = np.minimum((uniforms * avail).astype(np.int64), np.maximum(avail - 1, 0))
        j = np.searchsorted(self.adj, users * self.size + r, side="right") - self.offsets[users]
        out = np.full(len(users), -1, dtype=np.int64)
        out[ok] = self.items[(r + j)[ok]]
        return out


@dataclass
class NegativeSampler:
    """The three pools of :data:`POOL_CODE` and k negatives per positive."""

    pools: dict[str, Pool]
    k: int

    @classmethod
    def build(cls, item_code: np.ndarray, num_users: int, pos_user: np.ndarray, pos_item: np.ndarray, k: int) -> "NegativeSampler":
        """item_code: (I,) split code of every item (``split.item_codes``); pos_*: every positive."""
        n_items = len(item_code)
        pools = {name: Pool.build(np.flatnonzero(item_code == code), num_users, n_items, pos_user, pos_item)
                 for name, code in POOL_CODE.items()}
        return cls(pools, k)

    def pool(self, split: str) -> Pool:
        return self.pools[POOL_OF_SPLIT[split]]

    def negatives_for(self, split: str, users: np.ndarray, first: int, key: int) -> np.ndarray:
        """(M, k) int64 negatives of M positives of ``users`` at positions ``first ..`` of their
        split, from stream ``key``; -1 where the user has no pool item left."""
        m = len(users)
        idx = (np.arange(first, first + m, dtype=np.int64)[:, None] * self.k + np.arange(self.k)).ravel()
        return self.pool(split).sample(np.repeat(users, self.k), hash_uniform(key, idx)).reshape(m, self.k)

    def expand(self, split: str, pos: Interactions, first: int, key: int) -> Interactions:
        """Positives -> positives each followed by their negatives (label 0, same timestamp)."""
        neg = self.negatives_for(split, pos.user, first, key)
        items = np.concatenate([pos.item[:, None], neg], axis=1).ravel()  # (M * (1 + k),)
        labels = np.zeros((len(pos), 1 + self.k), dtype=np.float32)
        labels[:, 0] = pos.label
        keep = items >= 0
        rep = lambda a: np.repeat(a, 1 + self.k)[keep]  # noqa: E731
        return Interactions(rep(pos.user), items[keep], labels.ravel()[keep], rep(pos.timestamp))


def eval_key(seed: int, split: str) -> int:
    """The stream of the fixed negatives of ``split`` (evaluation splits, and train when fixed)."""
    return stream_key(seed, "negatives", split)


def train_key(seed: int, epoch: int) -> int:
    """The stream of epoch ``epoch``'s training negatives (``train_negatives: per_epoch``)."""
    return stream_key(seed, "train-negatives", epoch)


def add_negatives(splits: dict[str, Interactions], item_code: np.ndarray, num_users: int, k: int, seed: int,
                  train_negatives: str) -> tuple[dict[str, Interactions], NegativeSampler, dict]:
    """Implicit feedback: give every split its negatives (train only when ``fixed``).

    Returns the new splits, the sampler and ``report["feedback"]``.
    """
    pos_user = np.concatenate([sp.user for sp in splits.values()])
    pos_item = np.concatenate([sp.item for sp in splits.values()])
    sampler = NegativeSampler.build(item_code, num_users, pos_user, pos_item, k)
    out, without = {}, {}
    for name, sp in splits.items():
        if name == "train" and train_negatives == "per_epoch":
            out[name] = sp
            without[name] = int((sampler.pool(name).available(sp.user) == 0).sum())
            continue
        out[name] = sampler.expand(name, sp, 0, eval_key(seed, name))
        without[name] = int((sampler.pool(name).available(sp.user) == 0).sum())
    return out, sampler, feedback_report(k, train_negatives, without, {n: p.size for n, p in sampler.pools.items()})


def feedback_report(k: int, train_negatives: str, without: dict, pool_sizes: dict) -> dict:
    return {
        "kind": "implicit (no label column): every row is a positive; negatives are sampled",
        "negatives_per_positive": k,
        "train_negatives": ("resampled every epoch (train.seed, epoch)" if train_negatives == "per_epoch"
                            else "sampled once (data.seed), stored in the train split"),
        "eval_negatives": "fixed per split (data.seed)",
        "pools": {"train/valid/test": f"{pool_sizes['warm']} warm items",
                  "valid_cold": f"{pool_sizes['valid_cold']} validation cold items",
                  "test_cold": f"{pool_sizes['test_cold']} test cold items"},
        "excluded": "every item the user has a positive with (any split)",
        "positives_without_negatives": without,
    }
