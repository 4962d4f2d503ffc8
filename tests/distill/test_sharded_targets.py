"""Alignment targets in a frozen row_wise sharded table (distill.align.layout=sharded): each rank
holds its share of the rows, lookups return the right rows from any rank, training matches the
replicated targets, and checkpoints neither hold nor need them."""

import json
import math

import pytest
import torch

from helpers import tiny_config
from helpers.metrics import assert_close_metrics
from helpers.workers import sharded_targets_worker, train_worker
from sparse_kd.local_launch import launch_local
from sparse_kd.distill.targets import sharded_layout, target_collection

ALIGN = {"align": {"enabled": True, "kind": "cosine", "weight": 0.5, "features": ["item_id", "user_id"]}}


def _distill(layout: str) -> dict:
    return {"distill": {"align": {**ALIGN["align"], "layout": layout}, "transfer": {"enabled": False}}}


def test_target_dims_must_suit_fused_tables():
    with pytest.raises(ValueError, match=r"teacher_user table would have 10 dims.*align.layout=replicated"):
        target_collection({"teacher_user": (5, 10)})
    with pytest.raises(ValueError, match=r"teacher_user_features table would have 6 dims.*features_layout=replicated"):
        target_collection({"teacher_user_features": (5, 6)})
    ebc = target_collection({"teacher_item": (7, 12)})
    assert [t.name for t in ebc.embedding_bag_configs()] == ["teacher_item"]


def test_auto_layout_shards_only_what_would_not_fit():
    big = {"user_id": (1_000_000, 384), "item_id": (200_000, 384)}  # 1.76 GB of fp32 rows per rank
    assert sharded_layout("auto", big, 2) and not sharded_layout("auto", big, 1)
    assert not sharded_layout("auto", {"user_id": (20_000, 384)}, 8)  # 31 MB: the faster replicated rows
    assert not sharded_layout("auto", {"user_id": (1_000_000, 385)}, 2)  # not for the fused tables
    assert sharded_layout("sharded", {"user_id": (5, 8)}, 1) and not sharded_layout("replicated", big, 8)


@pytest.mark.slow
def test_each_rank_holds_half_and_looks_up_the_others_rows(tmp_path):
    cfg = tiny_config(str(tmp_path / "t"), nproc=2, **_distill("sharded"))
    out = launch_local(sharded_targets_worker, 2, cfg)
    for r in out.values():
        assert r["max_err"] < 1e-6 and r["n"] > 4
    users = out[0]["held"]["teacher_user"] + out[1]["held"]["teacher_user"]
    items = out[0]["held"]["teacher_item"] + out[1]["held"]["teacher_item"]
    from helpers.tiny import tiny_dataset

    ds = tiny_dataset(cfg)
    assert (users, items) == (ds.num_users, ds.num_items)
    # row_wise: about half each, not the whole table on every rank
    assert max(out[0]["held"]["teacher_user"], out[1]["held"]["teacher_user"]) <= math.ceil(ds.num_users / 2)


@pytest.mark.slow
def test_sharded_targets_train_as_replicated_and_resume(tmp_path):
    """A run with sharded targets, stopped mid-epoch and resumed, ends with the metrics of an
    uninterrupted run with replicated targets; its checkpoints hold no target rows. (Also the
    suite's test that in-memory training resumes mid-epoch to the uninterrupted result.)"""
    rep = launch_local(train_worker, 2, tiny_config(str(tmp_path / "rep"), nproc=2, **_distill("replicated")), "distilled")[0]
    cut = tiny_config(str(tmp_path / "cut"), nproc=2, train={"checkpoint_every": 5}, **_distill("sharded"))
    assert launch_local(train_worker, 2, cut, "distilled", 0, 7)[0]["metrics"] == {}
    ck = sorted((tmp_path / "cut" / "distilled" / "checkpoints").glob("step_*"))[-1]
    meta = torch.distributed.checkpoint.FileSystemReader(str(ck)).read_metadata()
    assert [k for k in meta.state_dict_metadata if "embedding_bags" in k]  # the ID tables are there
    assert not [k for k in meta.state_dict_metadata if "teacher_rows" in k]
    assert "teacher_user" not in json.loads((ck / "meta.json").read_text())["sharding"]
    resumed = launch_local(train_worker, 2, cut, "distilled")[0]
    assert_close_metrics(rep["metrics"], resumed["metrics"], 1e-5)
