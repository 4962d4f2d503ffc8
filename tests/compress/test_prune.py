"""Row importance, row selection, FBGEMM-built remaps, the pruned-id fills and folded remaps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparse_kd.data.batching import BatchBuilder

from sparse_kd.compress.importance import (
    access_counts,
    ranking,
    row_importance,
    table_importance,
)
from sparse_kd.compress.prune import (
    CLUSTER_PRIOR,
    fold_dataset,
    fold_remaps,
    num_clusters,
    prune_table,
    prune_tables,
    select_rows,
    table_settings,
    text_rows,
)
from sparse_kd.compress.stage import model_weights
from sparse_kd.config import CompressConfig, ConfigError


def test_access_counts_match_brute_force(tiny):
    ds, _, _, _ = tiny
    tr = ds.splits["train"]
    for f in ds.features:
        expect = np.zeros(f.num_embeddings, dtype=np.int64)
        for u, i in zip(tr.user, tr.item):
            e = u if f.owner == "user" else i
            for v in f.values[f.offsets[e]: f.offsets[e + 1]]:
                expect[v] += 1
        assert np.array_equal(access_counts(ds, f.name), expect), f.name
    # cold items are never read in training
    cold = np.unique(ds.splits["test_cold"].item)
    assert np.all(access_counts(ds, "item_id")[cold] == 0)


def test_importance_kinds(tiny):
    ds, text, model, _ = tiny
    w = model_weights(model)
    imps = table_importance("distill", w, ds, text)
    assert imps["item_id"].kind == "distill" and imps["user_id"].kind == "distill"
    assert imps["tags"].kind == "frequency" and imps["age"].kind == "frequency"  # no per-row text: fallback
    cold = np.unique(ds.splits["test_cold"].item)
    assert np.all(imps["item_id"].scores[cold] == 0)
    l2 = row_importance("l2", "user_id", w["user_id"], ds)
    assert np.allclose(l2.scores, w["user_id"].norm(dim=1).double().numpy())
    with pytest.raises(ValueError, match="compress.importance"):
        row_importance("bogus", "user_id", w["user_id"], ds)


def test_select_rows_top_k_and_threshold(tiny):
    ds, _, model, _ = tiny
    imp = row_importance("frequency", "item_id", model_weights(model)["item_id"], ds)
    kept = select_rows(imp, keep_ratio=0.25)
    assert len(kept) == 10 and np.all(np.diff(kept) > 0)
    assert imp.scores[kept].min() >= np.delete(imp.scores, kept).max()
    assert list(ranking(imp)[:10]) == sorted(ranking(imp)[:10], key=lambda r: (-imp.scores[r], r))
    assert len(select_rows(imp, keep_ratio=1e-6)) == 1  # at least one row
    thr = select_rows(imp, threshold=float(np.median(imp.scores)))
    assert np.all(imp.scores[thr] > np.median(imp.scores))


def test_prune_table_remap_from_fbgemm():
    w = torch.randn(12, 4)
    kept = np.array([1, 4, 5, 11])
    pt = prune_table("x", w, kept, "zero")
    assert pt.num_rows == 4 and torch.equal(pt.weight, w[kept])
    expect = -torch.ones(12, dtype=torch.int32)
    expect[kept] = torch.arange(4, dtype=torch.int32)
    assert torch.equal(pt.remap, expect)
    assert torch.equal(pt.lookup_rows()[kept], w[kept]) and torch.all(pt.lookup_rows()[[0, 2, 3]] == 0)
    m = prune_table("x", w, kept, "mean")
    assert m.num_rows == 5 and torch.allclose(m.weight[4], w[np.setdiff1d(np.arange(12), kept)].mean(0))
    assert prune_table("x", w, np.arange(12), "mean").remap is None  # nothing pruned: no remap
    with pytest.raises(ValueError, match="text"):
        prune_table("x", w, kept, "text")


def test_text_fill_recovers_rows_that_follow_their_text():
    g = torch.Generator().manual_seed(0)
    n, h, d = 200, 16, 8
    text = torch.randn(n, h, generator=g)
    w = text @ torch.randn(h, d, generator=g) * 0.1 + 0.01 * torch.randn(n, d, generator=g)
    kept = np.arange(0, n, 2)
    pr = np.setdiff1d(np.arange(n), kept)
    errs = {}
    for fill in ("zero", "mean", "text"):
        pt = prune_table("item_id", w, kept, fill, text)
        errs[fill] = float((pt.lookup_rows()[pr] - w[pr]).norm() / w[pr].norm())
    assert errs["text"] < 0.2 < errs["mean"] <= errs["zero"] + 1e-6, errs
    # new entities: rows from text only
    new = text_rows(text[:3], pt.text_map)
    assert torch.allclose(new, w[:3], atol=0.05)
    with pytest.raises(ValueError, match="text map"):
        text_rows(torch.randn(2, h + 1), pt.text_map)


def test_table_settings_reject_unknown_features():
    cfg = CompressConfig(keep_ratio={"nope": 0.5})
    with pytest.raises(ConfigError, match="compress.keep_ratio.nope"):
        table_settings(cfg, ["user_id", "item_id"])
    s = table_settings(CompressConfig(default_dtype="int4", dtype={"item_id": "fp16"}), ["user_id", "item_id"])
    assert s["user_id"]["dtype"] == "int4" and s["item_id"]["dtype"] == "fp16"


def _two_groups(n: int = 40, d: int = 6, seed: int = 0):
    """Rows of two far-apart groups (even ids near +5, odd near -5) and random texts."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.arange(n) % 2 == 0, 5.0, -5.0)
    return sign[:, None] * torch.ones(n, d) + 0.1 * torch.randn(n, d, generator=g)


def test_cluster_fill_shares_weighted_mean_rows_among_pruned_ids():
    w = _two_groups()
    kept = np.arange(10)
    reads = np.arange(40, dtype=np.int64) % 7
    pt = prune_table("item_id", w, kept, "cluster", clusters=2, reads=reads)
    assert (pt.num_rows, pt.num_kept, pt.clusters, pt.fill) == (12, 10, 2, "cluster")
    assert torch.equal(pt.weight[:10], w[kept]) and torch.equal(pt.remap[kept], torch.arange(10, dtype=torch.int32))
    pr = np.arange(10, 40)
    rows = pt.remap[pr]
    assert bool(((rows >= 10) & (rows < 12)).all())
    # one shared row per group, and it is the (reads + prior)-weighted mean of the group's trained rows
    for parity in (0, 1):
        members = pr[pr % 2 == parity]
        assert len(set(pt.remap[members].tolist())) == 1
        wt = torch.from_numpy(reads[members] + CLUSTER_PRIOR).double()
        expect = (w[members].double() * wt[:, None]).sum(0) / wt.sum()
        assert torch.allclose(pt.weight[int(pt.remap[members[0]])].double(), expect, atol=1e-5)
    assert len(set(pt.remap[pr].tolist())) == 2
    # lookups: every pruned id gets its group's row (close to its own), never zero
    err = (pt.lookup_rows()[pr] - w[pr]).norm(dim=1) / w[pr].norm(dim=1)
    assert float(err.max()) < 0.1
    with pytest.raises(ValueError, match="clusters >= 1"):
        prune_table("item_id", w, kept, "cluster", clusters=0)


def test_text_cluster_groups_by_text_not_by_row():
    w = _two_groups()
    g = torch.Generator().manual_seed(1)
    # text groups cut across the row groups: ids < 25 talk about one thing, the rest another
    topic = torch.where(torch.arange(40) < 25, 1.0, -1.0)
    text = topic[:, None] * torch.ones(40, 8) + 0.05 * torch.randn(40, 8, generator=g)
    pt = prune_table("item_id", w, np.arange(10), "text_cluster", text, clusters=2)
    pr = np.arange(10, 40)
    assert len(set(pt.remap[pr[pr < 25]].tolist())) == 1 and len(set(pt.remap[pr[pr >= 25]].tolist())) == 1
    assert len(set(pt.remap[pr].tolist())) == 2
    with pytest.raises(ValueError, match="text"):
        prune_table("item_id", w, np.arange(10), "text_cluster", clusters=2)


def test_num_clusters_bounds():
    assert num_clusters(100, 50, 0.05) == 5
    assert num_clusters(100, 98, 0.05) == 2  # never more than the pruned ids
    assert num_clusters(100, 100, 0.05) == 0  # nothing pruned
    assert num_clusters(10, 0, 0.01) == 1
    with pytest.raises(ValueError, match="cluster ratio"):
        num_clusters(10, 5, 0.0)


def test_prune_tables_text_cluster_without_text_falls_back_with_a_note(tiny):
    ds, text, model, _ = tiny
    weights = model_weights(model)
    imps = table_importance("frequency", weights, ds, text)
    fills = {f: "text_cluster" for f in weights}
    pts = prune_tables(weights, imps, {f: 0.5 for f in weights}, fills, text, {f: 0.2 for f in weights})
    assert pts["item_id"].fill == "text_cluster" and pts["tags"].fill == "cluster"
    assert any("tags" in n and "used cluster" in n for n in pts["tags"].notes)
    n = weights["item_id"].shape[0]
    assert pts["item_id"].clusters == num_clusters(n, pts["item_id"].num_kept, 0.2)


def test_fold_dataset_serves_the_remapped_lookups(tiny):
    ds, text, model, _ = tiny
    weights = model_weights(model)
    imps = table_importance("frequency", weights, ds, text)
    fills = {"user_id": "zero", "item_id": "cluster", "age": "zero", "tags": "zero"}
    keep = {"user_id": 0.5, "item_id": 0.4, "age": 1.0, "tags": 0.6}
    pts = prune_tables(weights, imps, keep, fills, text, {f: 0.1 for f in weights})
    folded_ds, folded = fold_remaps(ds, pts)
    assert all(folded[f].remap is None for f in folded)
    assert torch.equal(folded["item_id"].folded, pts["item_id"].remap) and folded["age"].folded is None
    ub, ib = torch.zeros(ds.num_users, 1), torch.zeros(ds.num_items, 1)
    orig, fold = BatchBuilder(ds, ub, ib), BatchBuilder(folded_ds, ub, ib)
    sp = ds.splits["train"]
    u, i, y = (torch.from_numpy(a[:300]) for a in (sp.user, sp.item, sp.label))
    a, b = orig.build(u, i, y).sparse_features.to_dict(), fold.build(u, i, y).sparse_features.to_dict()
    for f in weights:
        # pooled rows: stored rows through the folded bags == each id's row after pruning through the original bags
        want = torch.nn.functional.embedding_bag(a[f].values(), pts[f].lookup_rows(), a[f].offsets(), mode="sum")
        got = torch.nn.functional.embedding_bag(b[f].values(), folded[f].weight, b[f].offsets(), mode="sum")
        assert torch.allclose(got, want, atol=1e-6), f
    # zero fill: pruned ids leave their bag; other features keep their CSR object
    uf = folded_ds.feature("user_id")
    assert int(np.diff(uf.offsets).sum()) == pts["user_id"].num_kept
    assert folded_ds.feature("age") is ds.feature("age") and folded_ds.splits is ds.splits
    with pytest.raises(ValueError, match="entries"):
        fold_dataset(ds, {"age": torch.zeros(2, dtype=torch.int32)})
