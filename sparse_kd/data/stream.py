"""The order in which training examples are seen, one implementation for in-memory and streamed data.

Notation: N stored train rows, R block rows (``DataConfig.shuffle_block_rows``), K window blocks
(``DataConfig.shuffle_window_blocks``), G global batch, W world size, k negatives per positive.

Epoch e with seed s (``train.seed``):

1. The stored rows are cut into blocks of R consecutive rows (the last may be shorter); a
   converted Parquet train split stores exactly these blocks as its row groups.
2. The blocks are permuted (stream ``s``/"blocks"/``e``).
3. Each run of K consecutive permuted blocks is a window. Its rows are read (block by block);
   with implicit feedback and ``train_negatives: per_epoch``, each positive gets k negatives
   (:mod:`.negatives`, stream ``s``/``e``, counter = the positive's stored row number); then the
   window's rows are permuted (stream ``s``/"window"/``e``/window number).
4. The windows' rows, in order, are cut into global batches of G rows; an incomplete last batch
   is left out, so every step has the same global batch whatever W. Rank r takes rows
   ``[r * G / W, (r + 1) * G / W)`` of every global batch: 1 process with batch G and W
   processes with G / W each see the same examples at every step.

Memory: one window (K * R rows, times 1 + k with sampled negatives), whatever N; with
K * R >= N the window is the whole split and the order is a full random permutation.
Nothing depends on W, on the number of DataLoader workers, or on whether the rows come from
memory (:class:`ArrayBlocks`) or Parquet (``columnar.ParquetBlocks``): both give the same batches.

Resuming at step t skips windows that end before row t * G without reading them (each block's
size, and how many of its rows get negatives, are known up front), then the first rows of the
next window: a resumed run neither repeats nor skips an example.

:class:`TrainSource` is what the training loop asks for a rank's batches of epoch e from step t.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol

import numpy as np
import torch

from sparse_kd.data.negatives import Pool, train_key
from sparse_kd.data.schema import Interactions
from sparse_kd.data.hashing import hash_uniform, stream_key

log = logging.getLogger(__name__)


@dataclass
class Rows:
    """Training rows. user, item: (M,) int64; label: (M,) float32; row: (M,) int64 stored row
    number in the train split (-1 for negatives sampled on the fly); timestamp: (M,) int64
    (a sampled negative has its positive's)."""

    user: np.ndarray
    item: np.ndarray
    label: np.ndarray
    row: np.ndarray
    timestamp: np.ndarray

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def take(self, idx) -> "Rows":
        return Rows(self.user[idx], self.item[idx], self.label[idx], self.row[idx], self.timestamp[idx])

    @staticmethod
    def concat(parts: list["Rows"]) -> "Rows":
        if len(parts) == 1:
            return parts[0]
        return Rows(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("user", "item", "label", "row", "timestamp")))


class BlockSource(Protocol):
    """Blocks of stored train rows: block b is rows [b * block_rows, min(N, (b + 1) * block_rows))."""

    num_rows: int
    block_rows: int

    def block(self, b: int) -> Rows: ...


class ArrayBlocks:
    """Blocks of an in-memory train split."""

    def __init__(self, split: Interactions, block_rows: int) -> None:
        self.split, self.num_rows, self.block_rows = split, len(split), block_rows

    def block(self, b: int) -> Rows:
        lo, hi = b * self.block_rows, min(self.num_rows, (b + 1) * self.block_rows)
        sp = self.split
        return Rows(sp.user[lo:hi], sp.item[lo:hi], sp.label[lo:hi], np.arange(lo, hi, dtype=np.int64), sp.timestamp[lo:hi])

    def users(self) -> np.ndarray:
        return self.split.user


class TrainStream:
    """One epoch's rows in the order of the module docstring.

    negatives: the warm :class:`~sparse_kd.data.negatives.Pool` and k, for per-epoch sampled
    negatives (implicit feedback), else None. ``rows_with_negatives[b]``: rows of block b whose
    user has a pool item left (computed from ``users`` when not given).
    """

    def __init__(self, blocks: BlockSource, window_blocks: int, negatives: Optional[tuple[Pool, int]] = None,
                 rows_with_negatives: Optional[np.ndarray] = None) -> None:
        self.blocks, self.window_blocks, self.negatives = blocks, window_blocks, negatives
        n, r = blocks.num_rows, blocks.block_rows
        self.num_blocks = -(-n // r)
        sizes = np.full(self.num_blocks, r, dtype=np.int64)
        if self.num_blocks:
            sizes[-1] = n - r * (self.num_blocks - 1)
        self.expanded = sizes
        if negatives is not None:
            pool, k = negatives
            if rows_with_negatives is None:
                has = (pool.available(blocks.users()) > 0).astype(np.int64)  # type: ignore[attr-defined]
                rows_with_negatives = np.add.reduceat(has, np.arange(0, n, r)) if n else np.zeros(0, dtype=np.int64)
            self.expanded = sizes + k * np.asarray(rows_with_negatives, dtype=np.int64)

    @property
    def num_examples(self) -> int:
        """Examples per epoch (stored rows plus sampled negatives)."""
        return int(self.expanded.sum())

    def steps_per_epoch(self, global_batch: int) -> int:
        return self.num_examples // global_batch

    def windows(self, epoch: int, seed: int, skip_rows: int = 0) -> Iterator[Rows]:
        """The epoch's windows of rows, after ``skip_rows`` rows."""
        order = np.random.default_rng(stream_key(seed, "blocks", epoch)).permutation(self.num_blocks)
        for w, start in enumerate(range(0, self.num_blocks, self.window_blocks)):
            bl = order[start : start + self.window_blocks]
            size = int(self.expanded[bl].sum())
            if skip_rows >= size:
                skip_rows -= size
                continue
            rows = Rows.concat([self.blocks.block(int(b)) for b in bl])
            if self.negatives is not None:
                rows = self._with_negatives(rows, epoch, seed)
            assert len(rows) == size, (len(rows), size)
            perm = np.random.default_rng(stream_key(seed, "window", epoch, w)).permutation(size)
            if skip_rows:
                perm, skip_rows = perm[skip_rows:], 0
            yield rows.take(perm)

    def _with_negatives(self, pos: Rows, epoch: int, seed: int) -> Rows:
        pool, k = self.negatives  # type: ignore[misc]
        idx = (pos.row[:, None] * k + np.arange(k)).ravel()
        neg = pool.sample(np.repeat(pos.user, k), hash_uniform(train_key(seed, epoch), idx))
        keep = neg >= 0
        m = int(keep.sum())
        return Rows(np.concatenate([pos.user, np.repeat(pos.user, k)[keep]]), np.concatenate([pos.item, neg[keep]]),
                    np.concatenate([pos.label, np.zeros(m, dtype=np.float32)]),
                    np.concatenate([pos.row, np.full(m, -1, dtype=np.int64)]),
                    np.concatenate([pos.timestamp, np.repeat(pos.timestamp, k)[keep]]))

    def global_batches(self, epoch: int, seed: int, global_batch: int, start_step: int = 0) -> Iterator[Rows]:
        """Global batches ``start_step ..`` of the epoch, each exactly ``global_batch`` rows."""
        steps = self.steps_per_epoch(global_batch)
        if start_step >= steps:
            return
        buf: list[Rows] = []
        have, step = 0, start_step
        for rows in self.windows(epoch, seed, skip_rows=start_step * global_batch):
            buf.append(rows)
            have += len(rows)
            if have < global_batch:
                continue
            allrows = Rows.concat(buf)
            n_full = have // global_batch
            for j in range(n_full):
                yield allrows.take(slice(j * global_batch, (j + 1) * global_batch))
                step += 1
                if step >= steps:
                    return
            rest = allrows.take(np.arange(n_full * global_batch, have))  # a copy: lets the window go
            buf, have = [rest], len(rest)


class TrainSource:
    """What the training loop asks for its batches: ``batches(...)`` for rank r of epoch e from step t.

    Built by :func:`train_source` from a dataset; in-memory and streamed datasets give the same
    batches for the same seed.
    """

    def __init__(self, stream: TrainStream, workers: int = 0) -> None:
        self.stream, self.workers = stream, workers

    @property
    def num_examples(self) -> int:
        return self.stream.num_examples

    def steps_per_epoch(self, global_batch: int) -> int:
        return self.stream.steps_per_epoch(global_batch)

    def batches(self, builder, global_batch: int, rank: int, world_size: int, epoch: int, seed: int,
                start_step: int = 0, teacher_logits: Optional[torch.Tensor] = None) -> Iterator:
        """This rank's :class:`~sparse_kd.data.batching.KDBatch` es of epoch ``epoch`` from ``start_step``."""
        if teacher_logits is not None and self.stream.negatives is not None:
            check_logit_kd(True, True)
        rem = self.num_examples % global_batch
        if rem and rank == 0 and epoch == 0 and start_step == 0:
            log.info("train: the last %d example(s) of each shuffled epoch do not fill a batch and are left out", rem)
        args = (self.stream, builder, global_batch, rank, world_size, epoch, seed, start_step, teacher_logits)
        if self.workers <= 0:
            return rank_batches(*args)
        from torch.utils.data import DataLoader

        # worker j builds steps j, j + w, ...; the DataLoader returns them round-robin, i.e. in order
        return iter(DataLoader(_RankBatches(args), batch_size=None, num_workers=self.workers,
                               pin_memory=torch.cuda.is_available(), worker_init_fn=_one_thread,
                               prefetch_factor=4, persistent_workers=False))


class _RankBatches(torch.utils.data.IterableDataset):
    """:func:`rank_batches` split over DataLoader workers by step."""

    def __init__(self, args: tuple) -> None:
        super().__init__()
        self.args = args

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        every, offset = (info.num_workers, info.id) if info is not None else (1, 0)
        return rank_batches(*self.args, every=every, offset=offset)


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # a worker gathers rows; the training process keeps the cores


def rank_batches(stream: TrainStream, builder, global_batch: int, rank: int, world_size: int, epoch: int, seed: int,
                 start_step: int = 0, teacher_logits: Optional[torch.Tensor] = None, every: int = 1, offset: int = 0) -> Iterator:
    """Rank ``rank``'s slice of every global batch, built into KDBatches; only steps
    ``start_step + offset + j * every`` are built (DataLoader workers share the steps)."""
    per = global_batch // world_size
    for j, rows in enumerate(stream.global_batches(epoch, seed, global_batch, start_step)):
        if j % every != offset:
            continue
        mine = rows.take(slice(rank * per, (rank + 1) * per))
        tl = None
        if teacher_logits is not None:
            tl = teacher_logits.index_select(0, torch.from_numpy(mine.row))
        yield builder.build(torch.from_numpy(mine.user), torch.from_numpy(mine.item), torch.from_numpy(mine.label), tl,
                            torch.from_numpy(mine.timestamp))


def check_logit_kd(logit_kd: bool, per_epoch_negatives: bool) -> None:
    """Logit distillation needs a teacher logit per stored train row: refuse negatives that change every epoch."""
    if logit_kd and per_epoch_negatives:
        from sparse_kd.config import ConfigError

        raise ConfigError("distill.logit.enabled: logit distillation needs the teacher ranker's logit for every training "
                          "example, but with implicit feedback and data.train_negatives=per_epoch the training negatives "
                          "change every epoch. Fix: set data.train_negatives=fixed (negatives sampled once), or disable "
                          "distill.logit")


def train_source(ds, data_cfg) -> TrainSource:
    """The :class:`TrainSource` of a dataset's train split under ``data_cfg`` (a ``DataConfig``)."""
    make = getattr(ds, "train_stream", None)
    if make is not None:  # streamed (columnar) datasets build their own
        return make(data_cfg)
    negatives = (ds.sampler.pool("train"), ds.negatives) if ds.sampler is not None else None
    blocks = ArrayBlocks(ds.splits["train"], data_cfg.shuffle_block_rows)
    workers = 0 if data_cfg.loader_workers < 0 else data_cfg.loader_workers
    return TrainSource(TrainStream(blocks, data_cfg.shuffle_window_blocks, negatives), workers=workers)
