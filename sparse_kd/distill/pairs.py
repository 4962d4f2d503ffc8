"""Distillation beyond the observed pairs: teacher soft labels on sampled unobserved (user, item) pairs.

Notation: W ranks, B global batch, Bp = ratio * B sampled pairs per global batch, S training
steps per epoch, P = S * Bp pairs in the pool (one epoch's worth).

The pool is drawn once per run from (seed, dataset) alone: users with probability proportional
to (train interactions + 1)^user_power, items to (train interactions + 1)^item_power (0:
uniformly over the catalogue, so rarely clicked and never-seen items get many more targets
than clicks), and pairs that are training interactions are left out. The teacher ranker
scores the pool once (:func:`sparse_kd.student.train.predict_checkpoint`); each epoch the pool is reshuffled
(seed, epoch), and training step s of every epoch adds global pool rows [s*Bp, (s+1)*Bp) to
the observed batch, each rank its 1/W slice, so the examples a step sees do not depend on W.
Sampled rows carry label :data:`SAMPLED` (no click target); the training wrapper gives them
only the KD loss.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from sparse_kd.config import ConfigError, PairKDConfig
from sparse_kd.data.batching import NO_TIME, BatchBuilder, KDBatch, target_ids
from sparse_kd.data.schema import Interactions, RecDataset

log = logging.getLogger(__name__)

SAMPLED = -1.0  # label of a sampled pair: no click target, teacher logits only
POOL_SEED_SALT = 0x5EED_9A12  # the pool's random stream is apart from every other use of the seed


def pool_batch(pc: PairKDConfig, global_batch: int) -> int:
    """Sampled pairs per global batch (config validation makes it a multiple of an integer nproc;
    :func:`check_pair_batch` checks it against the real world size)."""
    return int(round(pc.ratio * global_batch))


def check_pair_batch(per_batch: int, world_size: int) -> None:
    """Refuse a pair batch that the ranks cannot split evenly (``nproc: auto``, or a torchrun
    world other than ``nproc``): each rank takes ``per_batch / W`` pairs, and a remainder would
    be dropped silently every step."""
    if per_batch <= 0 or per_batch % world_size:
        raise ConfigError(
            f"distill.pairs.ratio: ratio x train.batch_size gives {per_batch} sampled pairs per global batch, "
            f"which {world_size} ranks cannot split evenly; choose ratio so that the product is a multiple of {world_size}")


def sample_pool(ds: RecDataset, pc: PairKDConfig, size: int, seed: int) -> Interactions:
    """``size`` sampled (user, item) pairs that are not training interactions (labels 0).

    Draws ``size`` pairs, drops those that are training interactions and draws again for them
    (a few rounds; a dataset so dense that pairs keep colliding gets an error).
    """
    tr = ds.splits["train"]
    uc = np.bincount(tr.user, minlength=ds.num_users).astype(np.float64)
    ic = np.bincount(tr.item, minlength=ds.num_items).astype(np.float64)
    pu = (uc + 1.0) ** pc.user_power
    pi = (ic + 1.0) ** pc.item_power
    pu, pi = pu / pu.sum(), pi / pi.sum()
    seen = np.unique(tr.user.astype(np.int64) * ds.num_items + tr.item.astype(np.int64))
    rng = np.random.default_rng([seed, POOL_SEED_SALT])
    users, items = np.zeros(0, np.int64), np.zeros(0, np.int64)
    for _ in range(20):
        need = size - users.shape[0]
        if need <= 0:
            break
        u = rng.choice(ds.num_users, size=need, p=pu)
        i = rng.choice(ds.num_items, size=need, p=pi)
        keys = u * ds.num_items + i
        hit = np.zeros(need, dtype=bool)
        if seen.size:
            pos = np.searchsorted(seen, keys).clip(max=seen.size - 1)
            hit = seen[pos] == keys
        users, items = np.concatenate([users, u[~hit]]), np.concatenate([items, i[~hit]])
    if users.shape[0] < size:
        raise ValueError(
            "distill.pairs: could not draw enough (user, item) pairs outside the training interactions; "
            "the data is too dense for sampled-pair KD: set distill.pairs.enabled: false"
        )
    never = np.full(size, NO_TIME, dtype=np.int64)  # no interaction: every click is earlier
    return Interactions(users[:size], items[:size], np.zeros(size, dtype=np.float32), never)


def concat_batches(a: KDBatch, b: KDBatch) -> KDBatch:
    """The rows of ``a`` then the rows of ``b`` as one batch (same features, any bag lengths)."""
    ka, kb = a.sparse_features, b.sparse_features
    da, db = ka.to_dict(), kb.to_dict()
    keys = ka.keys()
    lengths = torch.cat([torch.cat([da[k].lengths(), db[k].lengths()]) for k in keys])
    values = torch.cat([torch.cat([da[k].values(), db[k].values()]) for k in keys])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths.to(torch.int32))
    return KDBatch(
        dense_features=torch.cat([a.dense_features, b.dense_features]),
        sparse_features=kjt,
        labels=torch.cat([a.labels, b.labels]),
        user=torch.cat([a.user, b.user]),
        item=torch.cat([a.item, b.item]),
        teacher_logits=torch.cat([a.teacher_logits, b.teacher_logits]),
        timestamp=None if a.timestamp is None and b.timestamp is None else torch.cat([_times(a), _times(b)]),
        teacher_ids=None if a.teacher_ids is None else target_ids(torch.cat([a.user, b.user]), torch.cat([a.item, b.item]),
                                                                  a.teacher_ids.keys()),
    )


def _times(b: KDBatch) -> torch.Tensor:
    """The batch's timestamps, :data:`NO_TIME` (after every click) where it has none."""
    return b.timestamp if b.timestamp is not None else torch.full((b.user.shape[0],), NO_TIME, dtype=torch.int64)


def with_sampled_pairs(
    observed: Iterator[KDBatch],
    pool: Interactions,
    pool_logits: torch.Tensor,
    builder: BatchBuilder,
    per_batch: int,
    rank: int,
    world_size: int,
    epoch: int,
    seed: int,
    start_step: int = 0,
) -> Iterator[KDBatch]:
    """Each observed batch (step ``start_step``, ``start_step + 1``, ... of the epoch) followed
    by this rank's slice of that step's ``per_batch`` sampled pairs (labels :data:`SAMPLED`,
    targets ``pool_logits`` (P,))."""
    g = torch.Generator().manual_seed((seed * 1000003 + epoch) ^ POOL_SEED_SALT)
    perm = torch.randperm(len(pool), generator=g)
    check_pair_batch(per_batch, world_size)
    per = per_batch // world_size
    user, item = torch.from_numpy(pool.user), torch.from_numpy(pool.item)
    for step, batch in enumerate(observed, start=start_step):
        lo = (step * per_batch) % max(1, len(pool))
        idx = perm[lo : lo + per_batch]
        if idx.shape[0] < per_batch:  # a pool shorter than the epoch (resumed with other sizes): wrap around
            idx = torch.cat([idx, perm[: per_batch - idx.shape[0]]])
        mine = idx[rank * per : (rank + 1) * per]
        sampled = builder.build(user.index_select(0, mine), item.index_select(0, mine),
                                torch.full((per,), SAMPLED), pool_logits.index_select(0, mine),
                                torch.full((per,), NO_TIME, dtype=torch.int64))
        yield concat_batches(batch, sampled)


def describe_pool(ds: RecDataset, pool: Interactions) -> dict:
    """Share of the pool on items with at most 5 training interactions, against the share of
    training examples on those items (how far the tail is over-represented)."""
    tr = ds.splits["train"]
    ic = np.bincount(tr.item, minlength=ds.num_items)
    tail = ic <= 5
    return {
        "pairs": len(pool),
        "tail_share_pool": round(float(tail[pool.item].mean()), 4) if len(pool) else 0.0,
        "tail_share_train": round(float(tail[tr.item].mean()), 4) if len(tr) else 0.0,
        "never_seen_items_in_pool": int(np.setdiff1d(np.unique(pool.item), np.unique(tr.item)).size),
    }
