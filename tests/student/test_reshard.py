"""Resuming with another world size: which checkpoints can be resharded, the refusal message, the
world size recorded in meta.json, and (slow) a row_wise run saved by 2 ranks finished by 1."""

import json
import math

import pytest
import torch

from sparse_kd import checkpoint as ckpt
from sparse_kd.config import StudentConfig
from sparse_kd.student.model import build_dlrm
from sparse_kd.student.reshard import check_resume, resume_problem, unreshardable
from sparse_kd.student.sharding import hand_built_plan


def test_only_per_row_state_of_column_wise_tables_is_stuck():
    sharding = {"t_user_id": "column_wise", "t_item_id": "row_wise", "t_genre": "column_wise", "t_city": "table_wise"}
    assert unreshardable(sharding, "rowwise_adagrad") == ["t_genre", "t_user_id"]
    assert unreshardable(sharding, "adagrad") == []  # element-wise state is shaped like the weights
    assert unreshardable(sharding, "sgd") == []
    assert unreshardable({"t_user_id": "row_wise", "t_item_id": "table_row_wise"}, "rowwise_adagrad") == []


def test_resume_problem_names_tables_and_the_fix():
    cw = {"t_user_id": "column_wise", "t_item_id": "table_wise"}
    assert resume_problem(2, 2, cw, "rowwise_adagrad") is None
    assert resume_problem(None, 4, cw, "rowwise_adagrad") is None  # a checkpoint from before world sizes were recorded
    msg = resume_problem(2, 1, cw, "rowwise_adagrad")
    assert "saved by 2 process(es), resumed by 1" in msg and "t_user_id" in msg and "t_item_id" not in msg
    assert "nproc=2" in msg
    assert resume_problem(2, 1, cw, "adagrad") is None


def _plan(world: int, sharding: str):
    cfg = StudentConfig(embedding_dim=8, dense_arch=(8,), over_arch=(4, 1), default_sharding=sharding)
    return hand_built_plan(build_dlrm({"user_id": 20, "item_id": 10}, 2, cfg, device="meta"), cfg, world, world)


def test_check_resume_reads_meta_and_refuses_before_loading(tmp_path):
    step = tmp_path / "step_00000007"
    step.mkdir()
    (step / "meta.json").write_text(json.dumps({"format_version": 1, "world_size": 1, "files": {}}))
    check_resume(step, _plan(1, "column_wise"), "rowwise_adagrad", 1)
    check_resume(step, _plan(2, "row_wise"), "rowwise_adagrad", 2)
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000007: saved by 1 process\(es\), resumed by 2: .*t_item_id, t_user_id"):
        check_resume(step, _plan(2, "column_wise"), "rowwise_adagrad", 2)
    (step / "meta.json").write_text("{")
    with pytest.raises(ckpt.CheckpointError, match="unreadable manifest"):
        check_resume(step, _plan(2, "column_wise"), "rowwise_adagrad", 2)


def test_save_records_world_size_and_sharding(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = ckpt.save(tmp_path, model, opt, epoch=1, step_in_epoch=0, global_step=4)
    meta = ckpt.verify(path)
    assert meta["world_size"] == 1 and meta["sharding"] == {}

    class Planned(torch.nn.Linear):  # a stand-in for DistributedModelParallel, which exposes .plan
        plan = _plan(2, "row_wise")

    path = ckpt.save(tmp_path, Planned(3, 2), opt, epoch=1, step_in_epoch=0, global_step=5)
    assert ckpt.read_meta(path)["sharding"] == {"t_user_id": "row_wise", "t_item_id": "row_wise"}


@pytest.mark.slow
def test_row_wise_checkpoint_of_two_ranks_resumes_on_one(tmp_path):
    """Where DCP can reshard, a run saved by 2 ranks mid-epoch and finished by 1 process ends
    like the uninterrupted 2-rank run (the global batch, not the world size, sets the maths)."""
    from helpers.tiny import tiny_config
    from helpers.workers import train_worker
    from sparse_kd.local_launch import launch_local as launch

    kw = dict(student={"default_sharding": "row_wise"}, train={"checkpoint_every": 5})
    full = launch(train_worker, 2, tiny_config(str(tmp_path / "full"), nproc=2, **kw))[0]["metrics"]
    out = str(tmp_path / "cut")
    launch(train_worker, 2, tiny_config(out, nproc=2, **kw), "baseline", 0, 7)
    saved = ckpt.latest(tmp_path / "cut" / "baseline" / "checkpoints")
    assert ckpt.read_meta(saved)["world_size"] == 2
    resumed = launch(train_worker, 1, tiny_config(out, nproc=1, **kw))[0]["metrics"]
    for split in ("valid", "test", "test_cold"):
        for k in ("auc", "logloss"):
            assert math.isclose(full[split][k], resumed[split][k], abs_tol=1e-4), (split, k, full[split][k], resumed[split][k])
