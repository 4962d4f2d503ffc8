"""Training from a converted Parquet folder on 2 ranks with DataLoader workers: the same metrics as
in-memory training (same batches), and a run stopped mid-epoch after a checkpoint resumes from
its place in the stream (same metrics as the uninterrupted run)."""

from __future__ import annotations

import math

import pytest

from sparse_kd.data import convert
from helpers.tiny import tiny_config
from helpers.workers import train_worker
from sparse_kd.local_launch import launch_local as launch

pytestmark = pytest.mark.slow

BLOCKS = {"shuffle_block_rows": 200, "shuffle_window_blocks": 4}  # two windows per epoch


def _close(a: dict, b: dict, tol: float) -> None:
    assert set(a) == set(b) == {"valid", "test", "valid_cold", "test_cold"}
    for split in a:
        for k in ("auc", "logloss"):
            assert math.isclose(a[split][k], b[split][k], abs_tol=tol), (split, k, a[split][k], b[split][k])


def test_streamed_training_equals_in_memory_and_resumes(tmp_path):
    train = {"checkpoint_every": 5}
    mem_cfg = tiny_config(str(tmp_path / "mem"), nproc=2, data=BLOCKS, train=train)
    convert(mem_cfg.data, tmp_path / "conv")
    streamed = {**BLOCKS, "source": "parquet", "path": str(tmp_path / "conv"), "loader_workers": 1}
    cut_cfg = tiny_config(str(tmp_path / "cut"), nproc=2, data=streamed, train=train)

    mem = launch(train_worker, 2, mem_cfg)[0]
    # streamed, stopped at step 7 (a checkpoint mid-window) and resumed: the batches and the result
    # of the uninterrupted in-memory run (either difference alone would show)
    stopped = launch(train_worker, 2, cut_cfg, "baseline", 0, 7)[0]
    assert stopped["metrics"] == {}
    resumed = launch(train_worker, 2, cut_cfg)[0]
    _close(mem["metrics"], resumed["metrics"], 1e-6)
    assert mem["metrics"]["valid"]["auc"] > 0.55
