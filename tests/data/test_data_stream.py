"""The training order (sparse_kd/data/stream.py): every example once per epoch, the same global
batches for any number of ranks, resumption from any step, bounded windows, per-epoch negatives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparse_kd.config import DataConfig, SyntheticConfig
from sparse_kd.data import load_dataset
from sparse_kd.data.batching import BatchBuilder, count_dense, train_batches
from sparse_kd.data.negatives import Pool
from sparse_kd.data.schema import Interactions
from sparse_kd.data.stream import ArrayBlocks, TrainStream, train_source


def split_of(n: int, seed: int = 0) -> Interactions:
    rng = np.random.default_rng(seed)
    return Interactions(rng.integers(0, 50, n), rng.integers(0, 30, n), rng.integers(0, 2, n).astype(np.float32),
                        np.zeros(n, dtype=np.int64))


@pytest.mark.parametrize("n,block,window,g", [(1000, 64, 3, 50), (1000, 1000, 1, 128), (257, 16, 100, 16), (90, 7, 2, 30)])
def test_epoch_covers_each_row_once(n, block, window, g):
    st = TrainStream(ArrayBlocks(split_of(n), block), window)
    batches = list(st.global_batches(epoch=0, seed=3, global_batch=g))
    assert len(batches) == n // g == st.steps_per_epoch(g) and all(len(b) == g for b in batches)
    rows = np.concatenate([b.row for b in batches]) if batches else np.zeros(0, dtype=np.int64)
    assert len(set(rows.tolist())) == len(rows) == (n // g) * g  # no repeats; only the incomplete tail is left out
    other = np.concatenate([b.row for b in st.global_batches(epoch=1, seed=3, global_batch=g)])
    assert not np.array_equal(rows, other)  # reshuffled every epoch
    again = np.concatenate([b.row for b in st.global_batches(epoch=0, seed=3, global_batch=g)])
    assert np.array_equal(rows, again)  # deterministic
    assert max(len(w) for w in st.windows(0, 3)) <= block * window  # memory: one window


def test_order_mixes_across_blocks():
    st = TrainStream(ArrayBlocks(split_of(4096), 64), 8)
    first = next(st.global_batches(0, 0, 256)).row
    assert len({int(r) // 64 for r in first}) >= 6  # one batch draws from many blocks of its window


@pytest.mark.parametrize("start", [0, 1, 5, 9, 15, 19])
def test_resume_neither_repeats_nor_skips(start):
    st = TrainStream(ArrayBlocks(split_of(700), 32), 3)  # windows of 96 rows: resuming skips whole windows
    full = [b.row for b in st.global_batches(2, 7, 35)]
    tail = [b.row for b in st.global_batches(2, 7, 35, start_step=start)]
    assert len(full) == 20 and len(tail) == 20 - start
    assert all(np.array_equal(a, b) for a, b in zip(full[start:], tail))


def _tiny():
    ds = load_dataset(DataConfig(synthetic=SyntheticConfig(num_users=40, num_items=30, interactions_per_user=20)))
    ub, ib = count_dense(ds)
    return ds, BatchBuilder(ds, ub, ib)


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_slice_the_same_global_batches(world):
    ds, bb = _tiny()
    split = ds.splits["train"]
    one = list(train_batches(split, bb, 64, 0, 1, epoch=1, seed=0, block_rows=50, window_blocks=2))
    parts = [list(train_batches(split, bb, 64, r, world, epoch=1, seed=0, block_rows=50, window_blocks=2)) for r in range(world)]
    assert all(len(p) == len(one) for p in parts)
    for step, b in enumerate(one):
        for key in ("user", "item", "labels", "dense_features"):
            joined = torch.cat([getattr(parts[r][step], key) for r in range(world)])
            assert torch.equal(joined, getattr(b, key)), (step, key)
        kjt = torch.cat([parts[r][step].sparse_features.values() for r in range(world)])
        assert kjt.numel() == b.sparse_features.values().numel()


def test_teacher_logits_follow_their_rows():
    ds, bb = _tiny()
    split = ds.splits["train"]
    tl = torch.arange(len(split), dtype=torch.float32)  # logit = stored row number
    for b in train_batches(split, bb, 32, 1, 2, epoch=0, seed=0, teacher_logits=tl, block_rows=16, window_blocks=2):
        rows = b.teacher_logits.long()
        assert torch.equal(b.user, torch.from_numpy(split.user)[rows]) and torch.equal(b.item, torch.from_numpy(split.item)[rows])


def test_per_epoch_negatives(tmp_path, implicit_folder):
    ds = load_dataset(DataConfig(source="csv", path=str(implicit_folder(tmp_path)), negatives=2, cold_item_fraction=0.2,
                                 shuffle_block_rows=64, shuffle_window_blocks=2))
    src = train_source(ds, DataConfig(shuffle_block_rows=64, shuffle_window_blocks=2))
    n_pos = len(ds.splits["train"])
    assert src.num_examples == 3 * n_pos  # nobody has every warm item
    pos = {(u, i) for sp in ds.splits.values() for u, i, y in zip(sp.user.tolist(), sp.item.tolist(), sp.label) if y == 1}
    warm = set(ds.sampler.pool("train").items.tolist())
    epochs = []
    for e in range(2):
        bs = list(src.stream.global_batches(e, seed=0, global_batch=30))
        rows = [r for b in bs for r in zip(b.user.tolist(), b.item.tolist(), b.label.tolist(), b.row.tolist())]
        neg = [(u, i) for u, i, y, r in rows if y == 0]
        assert all(r == -1 for u, i, y, r in rows if y == 0) and all(r >= 0 for u, i, y, r in rows if y == 1)
        assert len(rows) == (3 * n_pos // 30) * 30 and len(neg) >= 2 * n_pos - 30
        assert not set(neg) & pos and {i for _, i in neg} <= warm
        epochs.append(neg)
    assert epochs[0] != epochs[1]  # resampled every epoch
    again = [(int(u), int(i)) for b in src.stream.global_batches(0, 0, 30) for u, i, y in zip(b.user, b.item, b.label) if y == 0]
    assert again == epochs[0]
    with pytest.raises(Exception, match="train_negatives=fixed"):
        next(src.batches(None, 30, 0, 1, 0, 0, teacher_logits=torch.zeros(n_pos)))


def test_per_epoch_negatives_resume(tmp_path, implicit_folder):
    ds = load_dataset(DataConfig(source="csv", path=str(implicit_folder(tmp_path)), negatives=3, cold_item_fraction=0.2))
    pool = ds.sampler.pool("train")
    st = TrainStream(ArrayBlocks(ds.splits["train"], 40), 2, (pool, 3))
    full = [(b.user, b.item) for b in st.global_batches(1, 5, 48)]
    for start in (1, 4, len(full) - 1):
        tail = [(b.user, b.item) for b in st.global_batches(1, 5, 48, start_step=start)]
        assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(full[start:], tail))
        assert len(tail) == len(full) - start


def test_pool_rows_with_negatives_counted_per_block():
    split = Interactions(np.array([0, 1, 0, 1, 0]), np.array([0, 0, 1, 1, 0]), np.ones(5, dtype=np.float32), np.zeros(5, dtype=np.int64))
    pool = Pool.build(np.array([0, 1]), 2, 3, np.array([0, 0, 1]), np.array([0, 1, 0]))  # user 0 has both pool items
    st = TrainStream(ArrayBlocks(split, 2), 1, (pool, 2))
    assert st.expanded.tolist() == [2 + 2, 2 + 2, 1]  # user 1 rows get 2 negatives each, user 0 none
    rows = np.concatenate([b.row for b in st.global_batches(0, 0, 1)])
    assert len(rows) == 9 and sorted(rows[rows >= 0].tolist()) == [0, 1, 2, 3, 4]
