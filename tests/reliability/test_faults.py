"""Faults: a rank SIGKILLed mid-training under torchrun --max-restarts resumes from the last
sharded checkpoint and ends with the same metrics as an uninterrupted run; interrupted
checkpoint writes leave the previous checkpoint usable; corrupt checkpoints are rejected."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tiny_config
from helpers.workers import train_worker
from sparse_kd import checkpoint as ckpt
from sparse_kd.local_launch import launch_local

pytestmark = pytest.mark.slow


def test_sigkilled_rank_restarts_and_matches_uninterrupted_run(tmp_path):
    full = launch_local(train_worker, 2, tiny_config(str(tmp_path / "full"), nproc=2, train={"checkpoint_every": 5}))[0]["metrics"]
    out = tmp_path / "killed"
    tests_dir = str(Path(__file__).resolve().parents[1])  # helpers.faults lives under tests/
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
         "--monitor-interval=0.5", "-m", "helpers.faults", str(out), "12"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "metrics.json").read_text())
    # the run that finished is the restarted one, and it resumed from the last checkpoint before
    # the kill at step 12 (checkpoints every 5 steps), not from scratch
    assert doc["restart_count"] == 1, proc.stderr[-3000:]
    assert doc["resumed_from"] is not None and Path(doc["resumed_from"]).name == "step_00000010", doc["resumed_from"]
    resumed = doc["metrics"]
    for split in ("valid", "test", "test_cold"):
        for k in ("auc", "logloss"):
            assert math.isclose(full[split][k], resumed[split][k], abs_tol=1e-6), (split, k)


def test_interrupted_checkpoint_write_keeps_previous_and_corruption_is_detected(tmp_path):
    cfg = tiny_config(str(tmp_path), nproc=1, train={"checkpoint_every": 5, "epochs": 1})
    launch_local(train_worker, 1, cfg, "baseline", 0, 7)
    ck_dir = tmp_path / "baseline" / "checkpoints"
    good = ckpt.latest(ck_dir)
    assert good is not None and good.name == "step_00000007"
    # a writer killed mid-save leaves only a .tmp folder: it is never picked up
    half = ck_dir / "step_00000009.tmp"
    shutil.copytree(good, half)
    (half / "meta.json").unlink()
    assert ckpt.latest(ck_dir) == good
    ckpt.verify(good)
    # truncation and bit flips are caught by the checksums, naming the file
    data = next(p for p in good.iterdir() if p.suffix == ".distcp")
    blob = data.read_bytes()
    data.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ckpt.CheckpointError, match=f"{data.name}: checksum mismatch"):
        ckpt.verify(good)
    data.write_bytes(bytes([blob[0] ^ 0xFF]) + blob[1:])
    with pytest.raises(ckpt.CheckpointError, match="checksum mismatch"):
        ckpt.verify(good)
    data.write_bytes(blob)
    meta = json.loads((good / "meta.json").read_text())
    meta["format_version"] = 99
    (good / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ckpt.CheckpointError, match="format version 99 but this sparse_kd reads version 1"):
        ckpt.verify(good)


def test_hung_collective_times_out_naming_rank_and_step(tmp_path):
    from helpers.workers import hang_worker

    cfg = tiny_config(str(tmp_path), nproc=2, train={"collective_timeout_s": 10})
    msgs = launch_local(hang_worker, 2, cfg, 3)
    assert "[baseline] rank 0/2 failed at epoch 1, step 4" in msgs[0], msgs[0]
    assert "collective_timeout_s=10" in msgs[0]
