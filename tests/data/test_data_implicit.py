"""Implicit feedback: interactions.csv without a label column; sampled negatives (seeded, never a
positive of the user, from the split's own item pool, fixed for evaluation) and exact sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_kd.config import ConfigError, DataConfig
from sparse_kd.data import DataError, load_dataset
from sparse_kd.data.negatives import Pool
from sparse_kd.data.split import split_cold_items
from sparse_kd.data.stream import check_logit_kd



def cfg(root: Path, **kw) -> DataConfig:
    kw.setdefault("cold_item_fraction", 0.2)
    return DataConfig(source="csv", path=str(root), **kw)


def positives_of(ds) -> set[tuple[int, int]]:
    return {(u, i) for sp in ds.splits.values() for u, i, y in zip(sp.user.tolist(), sp.item.tolist(), sp.label) if y == 1}


@pytest.mark.parametrize("train_negatives", ["per_epoch", "fixed"])
def test_implicit_negatives(tmp_path, implicit_folder, train_negatives):
    c = cfg(implicit_folder(tmp_path), negatives=3, train_negatives=train_negatives)
    ds = load_dataset(c)
    assert ds.implicit and ds.negatives == 3
    assert (ds.sampler is not None) == (train_negatives == "per_epoch")
    fb = ds.report["feedback"]
    assert "implicit" in fb["kind"] and fb["negatives_per_positive"] == 3 and "implicit" in ds.summary()["feedback"]
    assert ds.report["split"]["split"] == "random"  # no timestamps: seeded random split
    vcold, tcold = (set(a.tolist()) for a in split_cold_items(ds.num_items, c))
    warm = set(range(ds.num_items)) - vcold - tcold
    pos = positives_of(ds)
    n_pos = sum(int((sp.label == 1).sum()) for sp in ds.splits.values())
    assert n_pos == 900  # every row a positive (a repeated pair stays two positives)
    pools = {"train": warm, "valid": warm, "test": warm, "valid_cold": vcold, "test_cold": tcold}
    for name, sp in ds.splits.items():
        neg = sp.label == 0
        if name == "train" and train_negatives == "per_epoch":
            assert not neg.any()  # sampled by the training stream, every epoch
            continue
        # k negatives per positive, unless the user has a positive on every item of the pool
        full = {u for u in range(ds.num_users) if all((u, i) in pos for i in pools[name])}
        with_neg = [u not in full for u in sp.user[~neg].tolist()]
        assert neg.sum() == 3 * sum(with_neg) and ds.report["feedback"]["positives_without_negatives"][name] == with_neg.count(False)
        # layout: each positive followed by its negatives, same user
        owner = np.maximum.accumulate(np.where(~neg, np.arange(len(sp)), 0))
        assert np.array_equal(sp.user, sp.user[owner]) and not neg[0]
        for u, i in zip(sp.user[neg].tolist(), sp.item[neg].tolist()):
            assert (u, i) not in pos and i in pools[name]
    # fixed per split and seeded: the same twice, other negatives under another data.seed
    again = load_dataset(c)
    assert all(np.array_equal(ds.splits[s].item, again.splits[s].item) for s in ds.splits)
    other = load_dataset(cfg(tmp_path, negatives=3, train_negatives=train_negatives, seed=1))
    assert not np.array_equal(ds.splits["valid"].item, other.splits["valid"].item)


def test_user_with_every_item_gets_no_negatives(tmp_path, implicit_folder):
    ds = load_dataset(cfg(implicit_folder(tmp_path, saturated_user=True), cold_item_fraction=0.0, train_negatives="fixed"))
    fan = ds.user_ids.index("ufan")
    without = ds.report["feedback"]["positives_without_negatives"]
    for name in ("train", "valid", "test"):
        sp = ds.splits[name]
        assert not ((sp.user == fan) & (sp.label == 0)).any()
        assert without[name] == int(((sp.user == fan) & (sp.label == 1)).sum())
    assert sum(without.values()) == 40


def test_label_like_column_is_an_error(tmp_path, implicit_folder):
    implicit_folder(tmp_path, header="user_id,item_id,Label")
    (tmp_path / "interactions.csv").write_text("user_id,item_id,Label\nu1,m1,1\n")
    with pytest.raises(DataError) as ei:
        load_dataset(cfg(tmp_path))
    msg = str(ei.value)
    assert "interactions.csv" in msg and "line 1" in msg and "column 'Label'" in msg and "implicit" in msg and "Fix:" in msg


def test_explicit_labels_still_explicit(tmp_path, implicit_folder):
    implicit_folder(tmp_path)
    (tmp_path / "interactions.csv").write_text("user_id,item_id,label\nu1,m1,1\nu2,m2,0\nu1,m3,0\n")
    ds = load_dataset(cfg(tmp_path, cold_item_fraction=0.0))
    assert not ds.implicit and ds.sampler is None and "feedback" not in ds.summary()
    assert sorted(np.concatenate([sp.label for sp in ds.splits.values()]).tolist()) == [0, 0, 1]


def test_logit_kd_refused_with_per_epoch_negatives():
    with pytest.raises(ConfigError, match="train_negatives=fixed"):
        check_logit_kd(True, True)
    check_logit_kd(True, False)
    check_logit_kd(False, True)


@settings(max_examples=80, deadline=None)
@given(p=st.integers(1, 12), seed=st.integers(0, 1000), n_users=st.integers(1, 4))
def test_pool_sampling_is_exact(p, seed, n_users):
    """Evenly spaced uniforms hit each of a user's non-positive pool items exactly once."""
    rng = np.random.default_rng(seed)
    num_items = p + 3
    items = np.sort(rng.choice(num_items, size=p, replace=False))
    pos_u = rng.integers(0, n_users, size=20)
    pos_i = rng.integers(0, num_items, size=20)
    pool = Pool.build(items, n_users, num_items, pos_u, pos_i)
    for u in range(n_users):
        allowed = sorted(set(items.tolist()) - {int(i) for uu, i in zip(pos_u, pos_i) if uu == u})
        assert pool.available(np.array([u]))[0] == len(allowed)
        if not allowed:
            assert pool.sample(np.array([u]), np.array([0.5]))[0] == -1
            continue
        a = len(allowed)
        got = pool.sample(np.full(a, u), (np.arange(a) + 0.5) / a)
        assert got.tolist() == allowed
