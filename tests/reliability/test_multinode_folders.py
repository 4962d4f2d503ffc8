"""Issue 20, items 2 and 4: multi-node runs without a shared filesystem are refused up front, and
rank-0-only (or uneven) work waits on the long-wait group, not inside train.collective_timeout_s.

- Two torchrun agents (acting as two nodes) whose working folders differ, with the same relative
  ``output_dir``: every rank stops with one clear error naming the rank and host that cannot see
  the run folder, before anything is trained (not a FileNotFoundError later).
- A 2-rank run with a 5 s collective timeout whose rank 0 spends longer than that writing the
  held-out pairs, encoding text and hashing a checkpoint file finishes: those waits go through
  the long-wait group. The same wait inside a plain barrier times out. Teacher encoding is split
  over the ranks, checkpoint files are hashed once, and the weight transfer's maps (learned and
  refit) are fitted on rank 0 from the tables they need.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
import time
import uuid
import warnings
import zlib
from pathlib import Path

import pytest
import torch

from helpers.tiny import tiny_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SLOW_S = 8.0  # rank 0's extra work per slowed step: longer than the collective timeout below
TIMEOUT_S = 5


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), PYTHONWARNINGS="ignore",
                OMP_NUM_THREADS="1")


def test_two_nodes_with_their_own_disks_are_refused_on_every_rank(tmp_path):
    from sparse_kd.dist import free_port

    port, run_id = free_port(), uuid.uuid4().hex[:8]
    common = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
              "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", run_id, "--local_addr", "127.0.0.1",
              "--monitor-interval", "0.5"]
    args = ["-m", "sparse_kd.cli", "train", str(ROOT / "configs" / "demo.yaml"), "output_dir=run", "nproc=2",
            "data.synthetic.num_users=60", "data.synthetic.num_items=40", "data.synthetic.interactions_per_user=20",
            "train.epochs=1", "train.batch_size=64", "--variants", "baseline"]
    procs = []
    for host in (True, False):
        node = tmp_path / ("node_a" if host else "node_b")  # each agent's own disk: same relative output_dir
        node.mkdir()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *common, "--rdzv_conf", f"is_host={int(host)}", *args],
            cwd=node, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    both = "\n".join(logs)
    assert all(p.returncode != 0 for p in procs), both[-3000:]
    assert "FileNotFoundError" not in both and "Timed out" not in both, both[-3000:]
    said = [line for line in both.splitlines() if line.startswith("error: output_dir run is not one folder shared")]
    assert len(said) == 1, both[-3000:]  # rank 0 says why, once
    assert "rank(s) 1 (host " in said[0] and "NFS" in said[0] and "set output_dir=" in said[0], said[0]
    assert "exitcode  : 2" in both, both[-3000:]  # every rank left with the refusal, none with a traceback
    # nothing of the run was written on either node, and rank 0's token is gone
    assert sorted(p.name for p in (tmp_path / "node_a" / "run").iterdir()) == []
    assert not (tmp_path / "node_b" / "run").exists()


# ------------------------------------------------------------------------------ long waits


class _SlowEncoder:
    """A stand-in teacher: a fixed random vector per distinct text; rank 0 takes SLOW_S longer
    per call. Records what this rank encoded."""

    dim = 16
    encoded: list[str] = []

    def identity(self) -> dict:
        return {"model": "stand-in", "model_fingerprint": "0" * 64}

    def encode(self, texts) -> torch.Tensor:
        texts = list(texts)
        _SlowEncoder.encoded += texts
        if int(os.environ["RANK"]) == 0:
            time.sleep(SLOW_S)
        rows = [torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(t.encode()))) for t in texts]
        return torch.nn.functional.normalize(torch.stack(rows), dim=1) if rows else torch.zeros(0, self.dim)

    @classmethod
    def from_config(cls, cfg, **overrides) -> "_SlowEncoder":
        return cls()


def slow_rank0_worker(cfg, timeout_s: int) -> dict:
    """Run the pipeline with a collective timeout of ``timeout_s`` and rank 0 slowed by SLOW_S at
    the held-out pairs, the teacher encoding and its first checkpoint hash; then show that the
    same wait in a plain barrier times out. Returns what this rank saw."""
    import torch.distributed as dist

    import sparse_kd.teacher as teacher
    from sparse_kd import checkpoint as ckpt
    from sparse_kd import pipeline as P
    from sparse_kd.dist import barrier, init_distributed

    warnings.filterwarnings("ignore")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    env = init_distributed("gloo", 120)  # a calm rendezvous; then the short timeout for everything after
    dist.distributed_c10d._set_pg_timeout(datetime.timedelta(seconds=timeout_s))
    teacher.TextEncoder = _SlowEncoder
    real_pairs, real_hash = P.write_heldout_pairs, ckpt.sha256_file
    hashed: list[str] = []
    state = {"slowed_hash": False}

    def slow_pairs(ds, path):
        time.sleep(SLOW_S)
        real_pairs(ds, path)

    def slow_hash(path):
        hashed.append(str(Path(path).relative_to(cfg.output_dir)))
        if env.rank == 0 and not state["slowed_hash"]:
            state["slowed_hash"] = True
            time.sleep(SLOW_S)
        return real_hash(path)

    if env.rank == 0:
        P.write_heldout_pairs = slow_pairs
    ckpt.sha256_file = slow_hash
    said: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda r: said.append(r.getMessage())  # type: ignore[method-assign]
    train_log = logging.getLogger("sparse_kd.student.train")
    train_log.addHandler(handler)
    train_log.setLevel(logging.INFO)
    metrics = P.run_training(cfg)
    out = {"metrics": metrics, "encoded": list(_SlowEncoder.encoded), "hashed": hashed,
           "transfer": [m for m in said if "weight transfer" in m]}
    try:  # the old way: rank 0's work inside a plain barrier
        if env.rank == 0:
            time.sleep(SLOW_S)
        barrier()
        out["plain_barrier"] = "passed"
    except RuntimeError as e:
        out["plain_barrier"] = str(e).splitlines()[0]
    return out


def test_rank0_work_longer_than_the_collective_timeout_waits_on_the_long_group(tmp_path):
    from sparse_kd.local_launch import launch_local

    cfg = tiny_config(str(tmp_path / "run"), nproc=2, train={"epochs": 1, "checkpoint_every": 0},
                      teacher={"cache_dir": str(tmp_path / "cache")},
                      distill={"logit": {"enabled": True}, "align": {"enabled": True, "layout": "sharded"},
                               "transfer": {"enabled": True, "projection": "learned"}})
    out = launch_local(slow_rank0_worker, 2, cfg, TIMEOUT_S)
    assert set(out[0]["metrics"]) == {"teacher_ranker", "baseline", "distilled"}
    assert out[0]["metrics"] == out[1]["metrics"]
    # learned weight transfer (map fitted on rank 0 from the teacher's table) and the refit both wrote rows
    said = " ".join(out[0]["transfer"])
    assert "rows seeded from text" in said and "refit: rows of rarely seen entities set from text" in said, said
    # the plain barrier around the same wait times out: the run above needed the long group
    assert "passed" not in (out[0]["plain_barrier"], out[1]["plain_barrier"]), out
    # teacher encoding split across the ranks: each distinct text once, on one rank
    enc0, enc1 = out[0]["encoded"], out[1]["encoded"]
    assert enc0 and enc1 and not set(enc0) & set(enc1)
    assert len(enc0 + enc1) == len(set(enc0 + enc1))
    # checkpoint files hashed once: each rank its own shard files (rank 0 also .metadata), none twice
    h0, h1 = set(out[0]["hashed"]), set(out[1]["hashed"])
    assert h0 and h1 and not h0 & h1, (h0, h1)
    assert all("/__1_" in h for h in h1 if h.endswith(".distcp") and "/step_" in h), h1
