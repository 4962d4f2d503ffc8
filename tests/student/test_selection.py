"""Best-epoch selection and early stopping on valid (train.select_best, train.early_stop_patience)."""

import json
import math
import os
import shutil

import pytest
import torch

from helpers import tiny_config, tiny_dataset
from helpers.workers import selection_worker
from sparse_kd.student.selection import FILE, EpochSelector
from sparse_kd.local_launch import launch_local


def test_best_epoch_and_patience(tmp_path):
    sel = EpochSelector(tmp_path, enabled=True, patience=2)
    assert sel.update(1, 0.60) and sel.best_epoch == 1
    assert not sel.update(2, float("nan"))  # NaN never wins
    assert not sel.should_stop()
    assert not sel.update(3, 0.60)  # a tie is not an improvement
    assert sel.should_stop()  # two epochs since the best
    assert sel.update(4, 0.61) and not sel.should_stop()


def test_disabled_selector_does_nothing(tmp_path):
    sel = EpochSelector(tmp_path, enabled=False, patience=1)
    assert not sel.update(1, 0.9) and not sel.should_stop()
    sel.save()
    assert not (tmp_path / FILE).exists()
    assert EpochSelector(tmp_path, enabled=True).best_epoch is None


def test_state_survives_a_restart_and_keep_replaces_the_best_copy(tmp_path):
    ck = tmp_path / "checkpoints"
    for step in (10, 20):
        (ck / f"step_{step:08d}").mkdir(parents=True)
        (ck / f"step_{step:08d}" / "w").write_text(str(step))
    sel = EpochSelector(tmp_path, enabled=True, patience=1)
    sel.update(1, 0.7)
    sel.keep(ck / "step_00000010")
    sel.save()
    sel.prune()
    sel.update(2, 0.8)
    sel.keep(ck / "step_00000020")
    sel.save()
    sel.prune()
    back = EpochSelector(tmp_path, enabled=True, patience=1)
    assert back.history == [{"epoch": 1, "score": 0.7}, {"epoch": 2, "score": 0.8}]
    assert back.best_epoch == 2 and back.best_score == pytest.approx(0.8)
    assert (back.best_path() / "w").read_text() == "20"
    assert [p.name for p in (ck / "best").iterdir()] == ["step_00000020"]  # older best copy removed, no .tmp left
    assert (ck / "step_00000010").is_dir()  # the run's own checkpoints are untouched
    # the best copy is hard links (no time at any checkpoint size), and outlives the original
    assert (back.best_path() / "w").stat().st_ino == (ck / "step_00000020" / "w").stat().st_ino
    shutil.rmtree(ck / "step_00000020")
    assert (back.best_path() / "w").read_text() == "20"


def test_best_copy_falls_back_to_copying_without_hard_links(tmp_path, monkeypatch):
    ck = tmp_path / "checkpoints" / "step_00000010"
    ck.mkdir(parents=True)
    (ck / "w").write_text("10")

    def no_links(src, dst):
        raise OSError("hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    sel = EpochSelector(tmp_path, enabled=True)
    sel.update(1, 0.5)
    kept = sel.keep(ck)
    assert (kept / "w").read_text() == "10" and (kept / "w").stat().st_ino != (ck / "w").stat().st_ino


def _table(checkpoint, name, rows, dim):
    import torch.distributed.checkpoint as dcp

    key = f"model.sparse_arch.embedding_bag_collection.embedding_bags.t_{name}.weight"
    state = {"model": {key: torch.empty(rows, dim)}}
    dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
    return state["model"][key]


@pytest.mark.slow
def test_early_stop_restores_the_best_epoch_and_a_rerun_trains_no_further(tmp_path):
    cfg = tiny_config(str(tmp_path), nproc=2, train={"epochs": 4, "select_best": True, "early_stop_patience": 1})
    out = launch_local(selection_worker, 2, cfg, [0.70, 0.65, 0.60, 0.55])[0]
    sel = json.loads((tmp_path / "baseline" / FILE).read_text())
    assert out["epochs_trained"] == 2 and sel["stopped"] and sel["restored"] and sel["best_epoch"] == 1
    meta = json.loads((tmp_path / "baseline" / "checkpoints" / out["checkpoint"].split("/")[-1] / "meta.json").read_text())
    assert meta["epoch"] == 4  # marked finished
    ds = tiny_dataset(cfg)
    best = tmp_path / "baseline" / sel["best_checkpoint"]
    for feat, n in (("item_id", ds.num_items), ("user_id", ds.num_users)):
        assert torch.equal(_table(out["checkpoint"], feat, n, 8), _table(best, feat, n, 8))
    again = launch_local(selection_worker, 2, cfg, [0.0] * 4)[0]  # a rerun scores nothing: it trains no epoch
    assert again["epochs_trained"] == 0 and again["checkpoint"] == out["checkpoint"]
    for split in ("valid", "test", "test_cold"):
        assert math.isclose(again["metrics"][split]["auc"], out["metrics"][split]["auc"], abs_tol=1e-9)
