"""train.sparse_optimizer reaches data_parallel tables (torchrec drops the optimizer set in backward
for them: they used to train with the dense Adam at dense_lr), and adam runs on CPU where FBGEMM's
kernel cannot (data_parallel tables), refused with the fix where it cannot."""

import math

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from helpers.tiny import tiny_config

from sparse_kd import checkpoint as ckpt
from sparse_kd.config import ConfigError
from sparse_kd.pipeline import run_training
from sparse_kd.student.export import load_dlrm

DP = {"default_sharding": "data_parallel"}


def _rows(out) -> torch.Tensor:
    return load_dlrm(out / "baseline").sparse_arch.embedding_bag_collection.embedding_bags["t_item_id"].weight.detach()


def _train(tmp_path, name: str, **train) -> torch.Tensor:
    out = tmp_path / name
    run_training(tiny_config(str(out), nproc=1, student=DP, train={"epochs": 1, **train}), ("baseline",))
    return _rows(out)


def test_data_parallel_rows_follow_sparse_lr_not_dense_lr(tmp_path):
    still_a = _train(tmp_path, "a", sparse_optimizer="sgd", sparse_lr=1e-9, dense_lr=0.01)
    still_b = _train(tmp_path, "b", sparse_optimizer="sgd", sparse_lr=1e-9, dense_lr=0.05)
    moved = _train(tmp_path, "c", sparse_optimizer="sgd", sparse_lr=0.5, dense_lr=0.01)
    assert torch.allclose(still_a, still_b, rtol=0, atol=1e-6)  # the dense optimizer's rate does not reach the rows
    assert (moved - still_a).abs().max() > 1e-3  # the sparse optimizer's does


def test_data_parallel_rows_checkpoint_the_sparse_optimizers_state(tmp_path):
    out = tmp_path / "run"
    run_training(tiny_config(str(out), nproc=1, student=DP, train={"epochs": 1, "sparse_optimizer": "adagrad"}), ("baseline",))
    keys = FileSystemReader(str(ckpt.latest(out / "baseline" / "checkpoints"))).read_metadata().state_dict_metadata
    item = [k.rsplit(".", 1)[1] for k in keys if k.startswith("optim.state.") and ".t_item_id.weight." in k]
    assert sorted(item) == ["step", "sum"], item  # torch Adagrad's accumulator, not the dense Adam's exp_avg / exp_avg_sq


def test_adam_on_sharded_cpu_tables_is_refused_with_the_fix(tmp_path):
    cfg = tiny_config(str(tmp_path), nproc=1, student={"default_sharding": "row_wise"}, train={"sparse_optimizer": "adam"})
    with pytest.raises(ConfigError) as e:
        run_training(cfg, ("baseline",))
    msg = str(e.value)
    assert "train.sparse_optimizer=adam" in msg and "t_item_id" in msg and "default_sharding=data_parallel" in msg


@pytest.mark.slow
def test_adam_on_data_parallel_tables_two_ranks_resume_like_the_full_run(tmp_path):
    """2 ranks, Adam on replicated rows (stepped after DDP's all-reduce), cut mid-run and resumed:
    the result equals the uninterrupted run, so the rows' Adam state is saved and loaded."""
    from helpers.workers import train_worker
    from sparse_kd.local_launch import launch_local as launch

    kw = dict(student=DP, train={"epochs": 2, "checkpoint_every": 5, "sparse_optimizer": "adam", "sparse_lr": 0.05})
    full = launch(train_worker, 2, tiny_config(str(tmp_path / "full"), nproc=2, **kw))[0]["metrics"]
    out = str(tmp_path / "cut")
    launch(train_worker, 2, tiny_config(out, nproc=2, **kw), "baseline", 0, 7)
    resumed = launch(train_worker, 2, tiny_config(out, nproc=2, **kw))[0]["metrics"]
    for split in ("valid", "test"):
        for k in ("auc", "logloss"):
            assert math.isclose(full[split][k], resumed[split][k], abs_tol=1e-5), (split, k, full[split][k], resumed[split][k])


def test_lazy_adam_moves_only_the_rows_a_step_touches_and_keeps_the_dense_gradient():
    from sparse_kd.student.optim import LazyAdam

    w = torch.nn.Parameter(torch.ones(4, 2))
    opt = LazyAdam([w], lr=0.1)
    for touched in ([1, 3], [1]):
        g = torch.zeros(4, 2)
        g[touched] = 1.0
        w.grad = g
        opt.step()
        assert w.grad is g  # the caller's (DDP's) gradient tensor is left in place
    assert torch.equal(w[[0, 2]], torch.ones(2, 2))  # never touched: unchanged
    assert float(w[3, 0]) < 1.0 and float(w[1, 0]) < float(w[3, 0])  # row 3 moved once, row 1 twice
    ref = torch.nn.Parameter(torch.ones(4, 2))
    dense = torch.optim.Adam([ref], lr=0.1)
    for touched in ([1, 3], [1]):
        ref.grad = torch.zeros(4, 2)
        ref.grad[touched] = 1.0
        dense.step()
    assert float(ref[3, 0]) < float(w[3, 0])  # dense Adam moves row 3 again by its momentum; lazy does not
