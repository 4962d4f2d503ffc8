"""Turn (user, item) index pairs into torchrec batches, split across ranks.

Notation: B batch size (per rank), F sparse features, Du/Di dense dims per user/item.

The dense input of an example is ``cat(user_dense[u], item_dense[i])`` (B, Du + Di); the sparse
input is a :class:`KeyedJaggedTensor` with one key per feature of the dataset, in
``RecDataset.feature_names`` order, whose bags come from the owning user's or item's CSR row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from sparse_kd.data.schema import Interactions, RecDataset

log = logging.getLogger(__name__)

NO_TIME = torch.iinfo(torch.int64).max  # the timestamp of a pair with no interaction: after every click
# sparse feature -> key of its row in the alignment-target table (sparse_kd.distill.targets)
TARGET_KEYS = {"user_id": "teacher_user", "item_id": "teacher_item"}
# keys of the teacher ranker's user and item text features held in that frozen table (features_layout: sharded)
USER_ROWS_KEY = "teacher_user_features"
ITEM_ROWS_KEY = "teacher_item_features"
KEY_OWNER = {"teacher_user": "user", "teacher_item": "item", USER_ROWS_KEY: "user", ITEM_ROWS_KEY: "item"}  # whose index each key looks up


def target_ids(user: torch.Tensor, item: torch.Tensor, keys: Sequence[str] = tuple(TARGET_KEYS.values())) -> KeyedJaggedTensor:
    """The KJT that looks up each example's rows in the frozen teacher table: one id per bag and
    key, the user's index under a user key (``teacher_user``, :data:`USER_ROWS_KEY`), the item's
    under an item key (``teacher_item``, :data:`ITEM_ROWS_KEY`)."""
    keys = list(keys)
    for k in keys:
        if k not in KEY_OWNER:
            raise ValueError(f"target_ids: unknown key {k!r} (known: {', '.join(KEY_OWNER)})")
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat([user if KEY_OWNER[k] == "user" else item for k in keys]).to(torch.int64),
        lengths=torch.ones(len(keys) * user.shape[0], dtype=torch.int32))


@dataclass
class KDBatch(Batch):
    """A torchrec ``Batch`` that also carries the entity indices and the teacher's logits.

    user, item: (B,) int64 entity indices (for text-embedding lookups in distillation losses).
    teacher_logits: (B,) float32 soft targets of the teacher ranker (zeros when unused).
    timestamp: (B,) int64 time of each example (its interaction's; for pairs that have none, such
        as sampled pairs, :data:`NO_TIME`, later than every click), for features that may only look
        at earlier clicks (the teacher ranker's history attention); None: every click is earlier.
    teacher_ids: :func:`target_ids` of the batch, when the ranker holds rows in the frozen
        teacher table (``distill.align.layout: sharded``, ``distill.teacher_ranker.features_layout:
        sharded``); else None.
    """

    user: torch.Tensor
    item: torch.Tensor
    teacher_logits: torch.Tensor
    timestamp: Optional[torch.Tensor] = None
    teacher_ids: Optional[KeyedJaggedTensor] = None

    def to(self, device: torch.device, non_blocking: bool = False) -> "KDBatch":
        return KDBatch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=self.sparse_features.to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            user=self.user.to(device=device, non_blocking=non_blocking),
            item=self.item.to(device=device, non_blocking=non_blocking),
            teacher_logits=self.teacher_logits.to(device=device, non_blocking=non_blocking),
            timestamp=None if self.timestamp is None else self.timestamp.to(device=device, non_blocking=non_blocking),
            teacher_ids=None if self.teacher_ids is None else self.teacher_ids.to(device=device, non_blocking=non_blocking),
        )

    def record_stream(self, stream: torch.Stream) -> None:  # pragma: no cover - CUDA only
        super().record_stream(stream)
        self.user.record_stream(stream)
        self.item.record_stream(stream)
        self.teacher_logits.record_stream(stream)
        if self.timestamp is not None:
            self.timestamp.record_stream(stream)
        if self.teacher_ids is not None:
            self.teacher_ids.record_stream(stream)

    def pin_memory(self) -> "KDBatch":  # pragma: no cover - CUDA only
        return KDBatch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
            user=self.user.pin_memory(),
            item=self.item.pin_memory(),
            teacher_logits=self.teacher_logits.pin_memory(),
            timestamp=None if self.timestamp is None else self.timestamp.pin_memory(),
            teacher_ids=None if self.teacher_ids is None else self.teacher_ids.pin_memory(),
        )


def count_dense(ds: RecDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Default dense features: log(1 + number of training interactions) of each user and item.

    Returns user_dense (U, 1), item_dense (I, 1) float32. Cold items get 0, as at serving time.
    With implicit feedback only positives count (sampled negatives are not part of the log).
    """
    uc, ic = (c.astype(np.float32) for c in ds.train_counts())
    return torch.from_numpy(np.log1p(uc))[:, None], torch.from_numpy(np.log1p(ic))[:, None]


class _CSR:
    """One feature's CSR as tensors, with a fast path for single-id features."""

    def __init__(self, offsets: np.ndarray, values: np.ndarray) -> None:
        self.offsets = torch.from_numpy(np.ascontiguousarray(offsets, dtype=np.int64))
        self.values = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
        self.lengths = self.offsets[1:] - self.offsets[:-1]
        self.single = bool(torch.all(self.lengths == 1))
        # user_id / item_id: entity e has the single id e, so a gather would copy e
        self.identity = self.single and torch.equal(self.values, torch.arange(self.values.shape[0]))

    def single_ids(self, e: torch.Tensor) -> torch.Tensor:
        """Single-id features only: e (B,) entity indices -> (B,) ids."""
        if self.identity:
            return e.to(torch.int64)
        return self.values.index_select(0, e)  # cheaper than self.values[e]

    def gather(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """e: (B,) entity indices -> (lengths (B,), values (sum lengths,))."""
        if self.single:
            return torch.ones_like(e), self.single_ids(e)
        lengths = self.lengths[e]
        starts = self.offsets[e]
        # position of each output value: start of its bag + rank inside the bag
        excl = torch.cumsum(lengths, 0) - lengths
        idx = torch.repeat_interleave(starts - excl, lengths) + torch.arange(int(lengths.sum()))
        return lengths, self.values[idx]


class BatchBuilder:
    """Builds :class:`KDBatch` es for index pairs of one dataset.

    Args:
        ds: the dataset (its features define the KJT keys).
        user_dense: (U, Du) float32 per-user dense features.
        item_dense: (I, Di) float32 per-item dense features.
        target_keys: give every batch its :func:`target_ids` under these keys (a ranker with
            rows in the frozen teacher table: sharded alignment targets, the teacher ranker's
            sharded user features); empty: none.

    Example::

        ub, ib = count_dense(ds)
        bb = BatchBuilder(ds, ub, ib)
        batch = bb.build(torch.tensor([0, 1]), torch.tensor([5, 7]), torch.tensor([1.0, 0.0]))
        batch.dense_features.shape  # (2, 2)
    """

    def __init__(self, ds: RecDataset, user_dense: torch.Tensor, item_dense: torch.Tensor,
                 target_keys: Sequence[str] = ()) -> None:
        if user_dense.shape[0] != ds.num_users or item_dense.shape[0] != ds.num_items:
            raise ValueError(f"dense features for {user_dense.shape[0]} users and {item_dense.shape[0]} items, but "
                             f"the dataset has {ds.num_users} users and {ds.num_items} items: build them from this "
                             "dataset (count_dense(ds)), or load the entity_dense.pt of the same run")
        self.keys = ds.feature_names
        self.owners = [f.owner for f in ds.features]
        self.csr = [_CSR(f.offsets, f.values) for f in ds.features]
        self.all_single = all(c.single for c in self.csr)
        self.user_dense = user_dense.float().contiguous()
        self.item_dense = item_dense.float().contiguous()
        self.target_keys = tuple(target_keys)

    @property
    def dense_dim(self) -> int:
        return self.user_dense.shape[1] + self.item_dense.shape[1]

    def build(
        self,
        user: torch.Tensor,
        item: torch.Tensor,
        labels: torch.Tensor,
        teacher_logits: Optional[torch.Tensor] = None,
        timestamp: Optional[torch.Tensor] = None,
    ) -> KDBatch:
        if self.all_single:  # one id per bag in every feature: all lengths are 1
            values = [csr.single_ids(user if owner == "user" else item) for owner, csr in zip(self.owners, self.csr)]
            lens = torch.ones(len(self.csr) * user.shape[0], dtype=torch.int32)
        else:
            lengths, values = [], []
            for owner, csr in zip(self.owners, self.csr):
                ln, vl = csr.gather(user if owner == "user" else item)
                lengths.append(ln)
                values.append(vl)
            lens = torch.cat(lengths).to(torch.int32)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=self.keys, values=torch.cat(values), lengths=lens)
        # (B, Du + Di); index_select: row gathers, cheaper than advanced indexing
        dense = torch.cat([self.user_dense.index_select(0, user), self.item_dense.index_select(0, item)], dim=1)
        if teacher_logits is None:
            teacher_logits = torch.zeros(user.shape[0])
        return KDBatch(
            dense_features=dense,
            sparse_features=kjt,
            labels=labels.float(),
            user=user,
            item=item,
            teacher_logits=teacher_logits.float(),
            timestamp=timestamp,
            teacher_ids=target_ids(user, item, self.target_keys) if self.target_keys else None,
        )


def train_batches(
    split: Interactions,
    builder: BatchBuilder,
    global_batch: int,
    rank: int,
    world_size: int,
    epoch: int,
    seed: int,
    teacher_logits: Optional[torch.Tensor] = None,
    start_step: int = 0,
    block_rows: int = 1 << 16,
    window_blocks: int = 16,
) -> Iterator[KDBatch]:
    """Shuffled training batches of this rank for one epoch of an in-memory split (no sampled
    negatives), in the order of :mod:`sparse_kd.data.stream` (what ``train_ranker`` iterates).

    All ranks draw the same order (seed, epoch) and take their slice of every global batch, so
    1 process with batch B and 2 processes with B/2 each see the same examples. An incomplete
    last batch is left out. ``start_step`` skips batches already trained (resume).
    """
    from sparse_kd.data.stream import ArrayBlocks, TrainStream, rank_batches

    stream = TrainStream(ArrayBlocks(split, block_rows), window_blocks)
    return rank_batches(stream, builder, global_batch, rank, world_size, epoch, seed, start_step, teacher_logits)


def steps_per_epoch(n: int, global_batch: int, world_size: int) -> int:
    return n // global_batch


def eval_batches(
    split: Interactions, builder: BatchBuilder, global_batch: int, rank: int, world_size: int
) -> Iterator[KDBatch]:
    """Evaluation batches of this rank covering the whole split, in order.

    Global batch g gives rank r the rows [g*W*per + r*per, ... + per) clipped to the split, with
    per = global_batch // W. Every rank yields the same number of batches of ``per`` rows
    (sharded lookups are collectives): short slices are padded by repeating their first row,
    and the caller drops the padding (see ``student.predict.predict_sharded``).
    """
    n = len(split)
    user = torch.from_numpy(split.user)
    item = torch.from_numpy(split.item)
    label = torch.from_numpy(split.label)
    ts = torch.from_numpy(split.timestamp)
    per = max(1, global_batch // world_size)
    for start in range(0, n, per * world_size):
        lo = min(n, start + rank * per)
        idx = torch.arange(lo, min(n, lo + per))
        if idx.shape[0] < per:
            pad_from = idx[:1] if idx.shape[0] else torch.tensor([0])
            idx = torch.cat([idx, pad_from.repeat(per - idx.shape[0])])
        yield builder.build(user[idx], item[idx], label[idx], timestamp=ts[idx])
