"""The shared split protocol: a partition, cold items split into valid_cold / test_cold, membership
by time or by a seeded hash (ties in source order), source order kept, exact cut points in
bounded memory whatever the chunking."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_kd.config import DataConfig
from sparse_kd.data.schema import SPLITS
from sparse_kd.data.split import (SplitAssigner, choose_cold_items, make_feature, order_statistics, split_cold_items,
                                  split_interactions, split_keys)


@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 60), num_items=st.integers(1, 12), cold=st.sampled_from([0.0, 0.1, 0.5, 0.95]),
       fr=st.sampled_from([(0.1, 0.1), (0.45, 0.44), (0.01, 0.3)]), seed=st.integers(0, 3), with_ts=st.booleans(),
       mode=st.sampled_from(["auto", "time", "random"]), vcf=st.sampled_from([0.0, 0.5, 1.0]))
def test_split_partitions(n, num_items, cold, fr, seed, with_ts, mode, vcf):
    rng = np.random.default_rng(seed)
    item = rng.integers(0, num_items, size=n)
    ts = rng.integers(0, 5, size=n) if with_ts else None
    cfg = DataConfig(cold_item_fraction=cold, valid_fraction=fr[0], test_fraction=fr[1], seed=seed, split=mode,
                     valid_cold_fraction=vcf)
    splits, rep = split_interactions(np.arange(n), item, rng.integers(0, 2, size=n), ts, num_items, cfg)
    assert tuple(splits) == SPLITS
    rows = np.concatenate([splits[s].user for s in SPLITS])
    assert sorted(rows.tolist()) == list(range(n))  # a partition (user column = row id here)
    for sp in splits.values():
        assert np.all(np.diff(sp.user) > 0)  # source order kept inside every split
    vcold, tcold = split_cold_items(num_items, cfg)
    k = len(vcold) + len(tcold)
    assert k < max(num_items, 2) and len(vcold) == int(np.floor(vcf * k)) and not set(vcold) & set(tcold)
    assert set(choose_cold_items(num_items, cfg).tolist()) == set(vcold) | set(tcold)
    assert set(splits["valid_cold"].item.tolist()) <= set(vcold) and set(splits["test_cold"].item.tolist()) <= set(tcold)
    # warm rows: the first n_train by (key, source order) are train, the next n_valid valid
    warm = np.flatnonzero(~np.isin(item, np.concatenate([vcold, tcold])))
    eff = ("time" if with_ts else "random") if mode == "auto" else mode
    assert rep["split"] == eff
    key = split_keys(eff, 0, ts, n, seed)[warm]
    ranked = warm[np.argsort(key, kind="stable")]
    a, b = len(splits["train"]), len(splits["train"]) + len(splits["valid"])
    assert set(ranked[:a]) == set(splits["train"].user) and set(ranked[a:b]) == set(splits["valid"].user)
    nw = len(warm)
    assert len(splits["test"]) == min(round(nw * fr[1]), nw)
    if eff == "time" and not with_ts:  # file order
        assert np.all(np.diff(np.concatenate([splits[s].user for s in ("train", "valid", "test")])) > 0)
    assert rep["sizes"] == {s: len(sp) for s, sp in splits.items()}


def test_data_seed_changes_the_random_split_and_cold_items():
    n, num_items = 2000, 50
    rng = np.random.default_rng(0)
    item = rng.integers(0, num_items, size=n)
    label = rng.integers(0, 2, size=n)

    def split(seed):
        return split_interactions(np.arange(n), item, label, None, num_items, DataConfig(seed=seed))[0]

    a, b, c = split(0), split(0), split(1)
    assert all(np.array_equal(a[s].user, b[s].user) for s in SPLITS)
    assert not np.array_equal(a["valid"].user, c["valid"].user)
    assert set(a["test_cold"].item.tolist()) != set(c["test_cold"].item.tolist())
    # a random split is not file order: valid rows are spread over the file
    assert a["valid"].user.min() < n // 4 and a["valid"].user.max() > 3 * n // 4


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), spread=st.sampled_from([1, 3, 1000, 2**40, 2**64 - 1]), seed=st.integers(0, 5),
       chunk=st.integers(1, 700))
def test_order_statistics_exact(n, spread, seed, chunk):
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, spread, size=n, dtype=np.uint64, endpoint=True)
    if spread == 2**64 - 1 and n >= 2:
        keys[:2] = [0, 2**64 - 1]  # the extremes of the range
    ranks = sorted({0, n - 1, n // 2, int(rng.integers(n))})
    parts = [keys[i : i + chunk] for i in range(0, n, chunk)]
    got = order_statistics(lambda: iter(parts), ranks)
    s = np.sort(keys)
    for r, (v, less) in zip(ranks, got):
        assert v == int(s[r]) and less == int(np.count_nonzero(keys < s[r]))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 400), ties=st.integers(1, 6), chunk=st.integers(1, 50), seed=st.integers(0, 3))
def test_chunked_assignment_equals_whole(n, ties, chunk, seed):
    """What the streaming converter does (chunks) is what the in-memory loader does (one chunk)."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, ties, size=n).astype(np.uint64)  # heavy ties at the cut points
    cfg = DataConfig(valid_fraction=0.2, test_fraction=0.3)
    whole = SplitAssigner.plan(lambda: [keys], n, cfg).assign(keys)
    parts = [keys[i : i + chunk] for i in range(0, n, chunk)]
    a = SplitAssigner.plan(lambda: iter(parts), n, cfg)
    assert np.array_equal(np.concatenate([a.assign(p) for p in parts]), whole)
    order = np.argsort(keys, kind="stable")
    expect = np.zeros(n, dtype=np.int8)
    n_train, n_valid, _ = a.sizes
    expect[order[n_train : n_train + n_valid]] = 1
    expect[order[n_train + n_valid :]] = 2
    assert np.array_equal(whole, expect)


def test_make_feature_dedups_and_orders():
    f = make_feature("g", "item", [["b", "a", "b"], [], ["a"]])
    assert f.vocab == ["b", "a"] and f.offsets.tolist() == [0, 2, 2, 3] and f.values.tolist() == [0, 1, 1]
    assert f.offsets.dtype == np.int64 and f.values.dtype == np.int64
    f.validate(3)
