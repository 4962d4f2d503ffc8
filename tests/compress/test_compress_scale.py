"""The compression stage's per-row steps at scale: ridge maps fit on a bounded sample, rows
predicted by blocks, the cluster fills through the scalable k-means, progress lines."""

from __future__ import annotations

import logging

import numpy as np
import torch

import sparse_kd.compress.importance as I
from sparse_kd.compress.cluster import kmeans
from sparse_kd.compress.prune import CLUSTER_PRIOR, prune_table, prune_tables
from sparse_kd.ridge import ridge_fit, ridge_predict


def test_fit_rows_caps_the_fit_sample_seeded():
    mask = np.zeros(1000, dtype=bool)
    mask[::3] = True  # 334 rows
    assert I.fit_rows(mask, cap=500) is not None and I.fit_rows(mask, cap=500).sum() == 334
    a, b = I.fit_rows(mask, cap=100), I.fit_rows(mask, cap=100)
    assert a.sum() == 100 and np.array_equal(a, b) and not (a & ~mask).any()


def test_predict_rows_by_blocks_equals_one_call(monkeypatch):
    g = torch.Generator().manual_seed(0)
    text, rows = torch.randn(300, 12, generator=g), torch.randn(300, 4, generator=g)
    w = ridge_fit(text, rows, 1.0)
    monkeypatch.setattr(I, "PREDICT_ROWS", 64)
    assert torch.allclose(I.predict_rows(text, w), ridge_predict(text, w), atol=1e-6)
    res, w2 = I.text_residual(rows, text, np.ones(300, dtype=bool), 1.0)
    assert torch.allclose(w2, w)
    assert np.allclose(res, (rows - ridge_predict(text, w)).norm(dim=1).double().numpy(), atol=1e-6)


def test_text_map_of_a_large_table_is_fit_on_a_sample(monkeypatch, caplog):
    g = torch.Generator().manual_seed(1)
    text = torch.randn(400, 8, generator=g)
    true = torch.randn(9, 3, generator=g)
    weight = ridge_predict(text, true)  # rows exactly linear in the text: any sample recovers the map
    monkeypatch.setattr(I, "RIDGE_MAX_ROWS", 50)
    with caplog.at_level(logging.INFO, logger="sparse_kd.compress.importance"):
        pt = prune_table("item_id", weight, np.arange(300), "zero", text, l2=1e-6)
    assert "fit on 50 of 300 rows" in caplog.text
    assert torch.allclose(pt.text_map, true, atol=1e-3)


def test_cluster_fills_match_a_direct_kmeans():
    g = torch.Generator().manual_seed(2)
    n = 400
    weight, text = torch.randn(n, 6, generator=g), torch.randn(n, 10, generator=g)
    reads = np.random.default_rng(0).integers(0, 5, n)
    kept = np.arange(0, n, 4)
    pruned = np.setdiff1d(np.arange(n), kept)
    w = torch.from_numpy(reads[pruned].astype(np.float64)) + CLUSTER_PRIOR
    for fill, space in (("cluster", weight[pruned]),
                        ("text_cluster", torch.nn.functional.normalize(text[pruned], dim=1))):
        pt = prune_table("user_id", weight, kept, fill, text, clusters=20, reads=reads)
        assign, _ = kmeans(space, 20, w)
        assert torch.equal(pt.remap[torch.from_numpy(pruned)].long(), len(kept) + assign)
        assert pt.num_rows == len(kept) + 20


def test_prune_tables_logs_each_big_table(tiny, caplog, monkeypatch):
    import sparse_kd.compress.prune as P

    monkeypatch.setattr(P, "LOUD_ROWS", 1)
    monkeypatch.setattr(I, "LOUD_ROWS", 1)
    ds, _, model, _ = tiny
    from sparse_kd.compress.importance import table_importance
    from sparse_kd.compress.stage import model_weights

    weights = model_weights(model)
    with caplog.at_level(logging.INFO, logger="sparse_kd.compress"):
        imps = table_importance("frequency", weights, ds)
        prune_tables(weights, imps, {f: 0.5 for f in weights}, {f: "cluster" for f in weights})
    for f in weights:
        assert f"importance: {f}" in caplog.text and f"prune: {f} keeps" in caplog.text
