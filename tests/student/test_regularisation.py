"""train.weight_decay reaches the dense optimizer and train.embedding_l2 really shrinks the rows
training updates (issue 21: the baseline's regularisation is searchable)."""

import torch

from helpers import tiny_config

from sparse_kd.config import TrainConfig
from sparse_kd.pipeline import run_training
from sparse_kd.student.export import load_dlrm
from sparse_kd.distill.losses import embedding_l2
from sparse_kd.student.optim import combined_optimizer


def test_embedding_l2_is_the_mean_squared_norm_of_pooled_rows():
    pooled = torch.tensor([[[1.0, 2.0], [0.0, 1.0]], [[0.0, 0.0], [3.0, 0.0]]])  # (B=2, F=2, D=2)
    assert float(embedding_l2(pooled)) == (6.0 + 9.0) / 2


def test_dense_weight_decay_reaches_adam(monkeypatch):
    import sparse_kd.student.optim as O

    monkeypatch.setattr(O, "CombinedOptimizer", lambda parts: parts)  # the dense part alone, unwrapped
    dense = torch.nn.Linear(2, 2)
    _, (opt,) = combined_optimizer(type("M", (), {"named_parameters": dense.named_parameters,
                                               "fused_optimizer": type("F", (), {"optimizers": []})()})(), TrainConfig(weight_decay=0.01))
    assert all(g["weight_decay"] == 0.01 for g in opt._optimizer.param_groups)


def test_weight_decay_shrinks_the_trained_rows(tmp_path):
    norms = {}
    for wd in (0.0, 0.5):
        out = tmp_path / f"wd{wd}"
        cfg = tiny_config(str(out), nproc=1, train={"epochs": 2, "batch_size": 64, "sparse_lr": 0.2, "dense_lr": 0.01,
                                                     "log_every": 5, "eval_batch_size": 256, "embedding_l2": wd})
        run_training(cfg, ("baseline",))
        w = load_dlrm(out / "baseline").sparse_arch.embedding_bag_collection.embedding_bags["t_item_id"].weight
        norms[wd] = float(w.norm())
    assert norms[0.5] < 0.9 * norms[0.0], norms
