"""The shared split protocol: sizes, cold items, temporal order, file order without timestamps."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_kd.config import DataConfig
from sparse_kd.data.split import choose_cold_items, make_feature, split_interactions


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 60), num_items=st.integers(1, 12), cold=st.sampled_from([0.0, 0.1, 0.5, 0.95]),
       fr=st.sampled_from([(0.1, 0.1), (0.45, 0.44), (0.01, 0.3)]), seed=st.integers(0, 3), with_ts=st.booleans())
def test_split_partitions(n, num_items, cold, fr, seed, with_ts):
    rng = np.random.default_rng(seed)
    item = rng.integers(0, num_items, size=n)
    ts = rng.integers(0, 5, size=n) if with_ts else None
    cfg = DataConfig(cold_item_fraction=cold, valid_fraction=fr[0], test_fraction=fr[1], seed=seed)
    splits, rep = split_interactions(np.arange(n), item, rng.integers(0, 2, size=n), ts, num_items, cfg)
    rows = np.concatenate([splits[s].user for s in ("train", "valid", "test", "test_cold")])
    assert sorted(rows.tolist()) == list(range(n))  # a partition (user column = row id here)
    cold_items = set(choose_cold_items(num_items, cfg).tolist())
    assert len(cold_items) < max(num_items, 2)
    assert set(splits["test_cold"].item.tolist()) <= cold_items
    order = np.concatenate([splits[s].user for s in ("train", "valid", "test")])
    key = ts[order] if with_ts else np.zeros(len(order))
    assert np.all(np.diff(key) >= 0)
    if not with_ts:
        assert np.all(np.diff(order) > 0)  # file order
    # ties broken in source order
    if with_ts:
        assert all(order[j] < order[j + 1] for j in range(len(order) - 1) if key[j] == key[j + 1])
    assert rep["sizes"] == {s: len(sp) for s, sp in splits.items()}


def test_make_feature_dedups_and_orders():
    f = make_feature("g", "item", [["b", "a", "b"], [], ["a"]])
    assert f.vocab == ["b", "a"] and f.offsets.tolist() == [0, 2, 2, 3] and f.values.tolist() == [0, 1, 1]
    assert f.offsets.dtype == np.int64 and f.values.dtype == np.int64
    f.validate(3)
