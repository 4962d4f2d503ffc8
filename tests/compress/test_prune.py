"""Row importance, row selection, FBGEMM-built remaps and the three pruned-id fills."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparse_kd.compress.importance import (
    access_counts,
    ranking,
    row_importance,
    table_importance,
)
from sparse_kd.compress.prune import prune_table, select_rows, table_settings, text_rows
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
