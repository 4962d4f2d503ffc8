"""The synthetic generator: deterministic, text meaning drives clicks, categorical features hide the topic."""

from __future__ import annotations

import numpy as np
import pytest

from sparse_kd.config import DataConfig, SyntheticConfig
from sparse_kd.data import DataError, load_dataset
from sparse_kd.data.synthetic import TOPIC_NAMES, TOPICS, generate


def _all(ds):
    sp = list(ds.splits.values())
    return (np.concatenate([s.user for s in sp]), np.concatenate([s.item for s in sp]),
            np.concatenate([s.label for s in sp]))


def test_deterministic_and_seeded():
    a, b = load_dataset(DataConfig()), load_dataset(DataConfig())
    assert a.item_text == b.item_text and a.user_text == b.user_text
    for s in a.splits:
        for k in ("user", "item", "label", "timestamp"):
            assert np.array_equal(getattr(a.splits[s], k), getattr(b.splits[s], k))
    c = load_dataset(DataConfig(synthetic=SyntheticConfig(seed=1)))
    assert c.item_text != a.item_text


def test_shapes_and_split():
    ds = load_dataset(DataConfig())
    syn = SyntheticConfig()
    assert ds.num_users == syn.num_users and ds.num_items == syn.num_items
    assert sum(len(s) for s in ds.splits.values()) == syn.num_users * syn.interactions_per_user
    assert ds.feature_names == ["user_id", "item_id", "age_bucket", "region", "format", "price_tier"]
    cold = set(ds.splits["test_cold"].item.tolist()) | set(ds.splits["valid_cold"].item.tolist())
    assert ds.report["split"]["cold_items"] == 40 and len(cold) == 40
    assert all(not cold & set(ds.splits[s].item.tolist()) for s in ("train", "valid", "test"))
    t = {s: ds.splits[s].timestamp for s in ("train", "valid", "test")}
    assert t["train"].max() <= t["valid"].min() and t["valid"].max() <= t["test"].min()
    assert all(len(t) > 20 and t.strip() for t in ds.item_text + ds.user_text)
    assert all(any(ch.isdigit() for ch in t) for t in ds.user_text)  # states an age


def test_clicks_depend_on_topic():
    ds, world = generate(DataConfig())
    user, item, label = _all(ds)
    match = world.user_interest[user, world.item_topic[item]]
    on, off = label[match].mean(), label[~match].mean()
    assert 0.3 <= label.mean() <= 0.5
    assert on > 0.65 and off < 0.3 and on > 3 * off, (on, off)
    assert ds.report["click_rate"]["topic_match"] == pytest.approx(on, abs=1e-3)


def test_topic_only_in_text():
    ds, world = generate(DataConfig(synthetic=SyntheticConfig(num_items=2000, interactions_per_user=10)))
    topics = world.item_topic
    # the item text names a subject of its topic
    for i in range(0, ds.num_items, 97):
        assert any(s in ds.item_text[i] for s in TOPICS[TOPIC_NAMES[topics[i]]][0])
    # categorical item features are independent of the topic: per-value topic histograms look alike
    for name in ("format", "price_tier"):
        f = ds.feature(name)
        v = f.values[f.offsets[:-1]]
        T = topics.max() + 1
        for val in range(len(f.vocab)):
            hist = np.bincount(topics[v == val], minlength=T) / max(1, (v == val).sum())
            assert np.abs(hist - 1 / T).max() < 0.08, (name, hist)


def test_bad_synthetic_config():
    with pytest.raises(DataError, match="num_topics"):
        load_dataset(DataConfig(synthetic=SyntheticConfig(num_topics=40)))
    with pytest.raises(DataError, match="interactions_per_user"):
        load_dataset(DataConfig(synthetic=SyntheticConfig(num_items=5, interactions_per_user=10)))


def test_load_dataset_dispatch_errors():
    with pytest.raises(DataError, match="data.path"):
        load_dataset(DataConfig(source="csv"))


def test_large_world_sampler_matches_the_exact_distribution(monkeypatch):
    """Above EXACT_SAMPLING_LIMIT items are drawn per interest set: same law (distinct items per
    user, popularity x topic boost), measured against the exact per-user draw on one world."""
    import sparse_kd.data.synthetic as S

    cfg = DataConfig(synthetic=SyntheticConfig(num_users=3000, num_items=400, interactions_per_user=8))
    exact, w_exact = generate(cfg)
    monkeypatch.setattr(S, "EXACT_SAMPLING_LIMIT", 0)
    fast, w_fast = generate(cfg)
    assert np.array_equal(w_exact.user_interest, w_fast.user_interest)  # same world, other draws
    u, i, _ = _all(fast)
    pairs = u * 400 + i
    assert len(np.unique(pairs)) == len(pairs) == 3000 * 8  # K distinct items per user
    assert np.array_equal(np.bincount(u, minlength=3000), np.full(3000, 8))
    ue, ie, _ = _all(exact)
    m_fast = w_fast.user_interest[u, w_fast.item_topic[i]].mean()
    m_exact = w_exact.user_interest[ue, w_exact.item_topic[ie]].mean()
    assert abs(m_fast - m_exact) < 0.02, (m_fast, m_exact)
    f_fast, f_exact = np.bincount(i, minlength=400) / len(i), np.bincount(ie, minlength=400) / len(ie)
    assert np.abs(f_fast - f_exact).sum() < 0.12  # item frequencies: sampling noise only
    assert not np.array_equal(np.sort(pairs), np.sort(ue * 400 + ie))
