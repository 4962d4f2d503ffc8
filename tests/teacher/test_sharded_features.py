"""The teacher ranker's user features split over the ranks (issue 20, 4b;
``distill.teacher_ranker.features_layout: sharded``): the lazily computed PCA rows equal the
replicated ones, each rank holds about half of them, and the teacher trains and evaluates as with
every row on every rank, its checkpoints loading across the two layouts."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import tiny_config
from helpers.metrics import assert_close_metrics
from helpers.tiny import tiny_dataset
from sparse_kd.config import ConfigError, config_from_dict
from sparse_kd.distill.history import HistoryRows
from sparse_kd.distill.transfer import pca_reduce, pca_rows
from sparse_kd.teacher_inputs import features_sharded, teacher_features


def _text(n: int, h: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, h, generator=g) * torch.linspace(3.0, 0.5, h) + 0.7


@pytest.mark.parametrize("dim", [4, 8, 16])  # 16 > H: zero directions, as pca_reduce pads them
def test_pca_rows_give_pca_reduce_computed_where_read(dim):
    text = _text(300, 12)
    rows = pca_rows(text, dim)
    assert rows.shape == (300, dim)
    assert torch.allclose(rows[0:300], pca_reduce(text, dim), atol=1e-4)
    assert torch.allclose(rows[100:140, 1:3], pca_reduce(text, dim)[100:140, 1:3], atol=1e-4)  # a block, some columns


def test_pca_rows_of_click_history_rows():
    cfg = tiny_config("unused")
    ds = tiny_dataset(cfg)
    hist = HistoryRows(ds, _text(ds.num_items, 12, 1))
    assert torch.allclose(pca_rows(hist, 8)[0:ds.num_users], pca_reduce(hist, 8), atol=1e-4)


def test_auto_layout_shards_only_what_would_not_fit():
    assert features_sharded("auto", 10_000_000, 32, 2)  # 1.2 GiB on every rank
    assert not features_sharded("auto", 10_000_000, 32, 1)  # one rank: nothing to split
    assert not features_sharded("auto", 1_000_000, 32, 8)  # 122 MiB: the faster replicated rows
    assert not features_sharded("auto", 10_000_000, 30, 2)  # not for the fused tables
    assert features_sharded("sharded", 60, 8, 1) and not features_sharded("replicated", 10**9, 384, 8)


def test_sharded_features_leave_only_counts_in_the_replicated_part():
    cfg = tiny_config("unused", distill={"teacher_ranker": {"features_layout": "sharded"}})
    ds = tiny_dataset(cfg)
    ut, it = _text(ds.num_users, 12, 2), _text(ds.num_items, 12, 3)
    whole = teacher_features(tiny_config("unused"), ds, ut, it)
    split = teacher_features(cfg, ds, ut, it)
    assert whole.user_rows is None and whole.user_dense.shape == (ds.num_users, 9)  # count + 8 text dims
    assert split.user_dense.shape == (ds.num_users, 1) and split.user_rows.shape == (ds.num_users, 8)
    got = torch.cat([split.user_dense, split.user_rows[0:ds.num_users]], 1)
    assert torch.allclose(got, whole.user_dense, atol=1e-4)  # the same columns, in the same order
    assert whole.item_rows is None and whole.item_dense.shape == (ds.num_items, 9)
    assert split.item_dense.shape == (ds.num_items, 1) and split.item_rows.shape == (ds.num_items, 8)
    got = torch.cat([split.item_dense, split.item_rows[0:ds.num_items]], 1)
    assert torch.allclose(got, whole.item_dense, atol=1e-4)
    assert split.item_text is None  # no history attention reads the whole items' part


def test_sharded_features_need_dims_the_fused_tables_take():
    raw = {"name": "x", "output_dir": "runs/x", "student": {"teacher_text_dim": 6},
           "distill": {"teacher_ranker": {"features_layout": "sharded"}}}
    with pytest.raises(ConfigError, match=r"distill.teacher_ranker.features_layout.*multiple of 4.*text dims are 6"):
        config_from_dict(raw, "cfg.yaml")
    raw["distill"]["teacher_ranker"]["features_layout"] = "auto"
    config_from_dict(raw, "cfg.yaml")  # auto falls back to replicated


@pytest.mark.slow
def test_two_ranks_train_the_same_teacher_with_features_split(tmp_path):
    """PCA features of whole user and item rows, of rows split over the ranks (``ShardedRows``), and
    every dim of split rows (``text_dim: -1``, which the replicated layout cannot read split), the
    users' and the items' features in the split table: the same metrics as the replicated
    features, and the replicated checkpoint evaluates the same with them split."""
    from helpers.workers import sharded_features_worker
    from sparse_kd.local_launch import launch_local

    cfg = tiny_config(str(tmp_path / "run"), train={"epochs": 1})
    cases = [(8, False), (8, True), (-1, True)]
    out = launch_local(sharded_features_worker, 2, cfg, cases)
    ds = tiny_dataset(cfg)
    for case, r in out[0].items():
        assert_close_metrics(r["replicated"]["metrics"], r["sharded"]["metrics"], 2e-3)
        assert_close_metrics(r["replicated"]["metrics"], r["cross"], 1e-6 if case.startswith("-1") else 2e-3)
        assert r["replicated"]["dense_cols"] > 1 and r["sharded"]["dense_cols"] == 1, case
        assert r["replicated"]["item_cols"] > 1 and r["sharded"]["item_cols"] == 1, case
        for key, n in (("teacher_user_features", ds.num_users), ("teacher_item_features", ds.num_items)):
            held = [out[k][case]["held"][key] for k in (0, 1)]
            assert sum(held) == n and max(held) <= math.ceil(n / 2), (case, key, held)
