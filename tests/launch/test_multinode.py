"""Two torchrun agents on this machine acting as two nodes (``--nnodes 2 --nproc_per_node 1``,
c10d rendezvous on localhost) train the same tables and reach the same metrics as one node
with 2 processes: ranks, hosts and table_row_wise placement follow LOCAL_WORLD_SIZE."""

import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from sparse_kd.dist import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
WORKER = str(Path(__file__).with_name("_multinode_worker.py"))
TIMEOUT = 300


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args, WORKER]


def _two_nodes(out: Path) -> None:
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    common = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
              "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", run_id, "--local_addr", "127.0.0.1",
              "--monitor-interval", "0.5"]
    procs = [
        subprocess.Popen([*_torchrun(*common, "--rdzv_conf", f"is_host={int(host)}"), str(out)],
                         env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for host in (True, False)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]


def _one_node(out: Path) -> None:
    cmd = [*_torchrun("--standalone", "--nproc_per_node", "2", "--monitor-interval", "0.5"), str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _tables(result: dict) -> dict[str, torch.Tensor]:
    """Every table in full, read from the sharded checkpoint in this process."""
    key = "model.sparse_arch.embedding_bag_collection.embedding_bags.t_{}.weight"
    state = {"model": {key.format(f): torch.empty(n, result["embedding_dim"]) for f, n in result["num_embeddings"].items()}}
    dcp.load(state, checkpoint_id=result["checkpoint"], no_dist=True)
    return state["model"]


def test_two_nodes_match_one_node_with_two_processes(tmp_path):
    nodes, node = tmp_path / "two_nodes", tmp_path / "one_node"
    _two_nodes(nodes)
    _one_node(node)
    a = json.loads((nodes / "result.json").read_text())
    b = json.loads((node / "result.json").read_text())
    assert (a["world_size"], a["local_world_size"], a["nnodes"]) == (2, 1, 2)
    assert (b["world_size"], b["local_world_size"]) == (2, 2)
    # table_row_wise splits rows within a host: over both ranks of one node, on one rank per node
    assert b["ranks"]["t_item_id"] == [0, 1] and len(a["ranks"]["t_item_id"]) == 1
    assert a["ranks"]["t_user_id"] == b["ranks"]["t_user_id"] == [0, 1]  # row_wise: over all ranks
    for split in ("valid", "test", "test_cold"):
        for k in ("auc", "logloss"):
            assert math.isclose(a["metrics"][split][k], b["metrics"][split][k], abs_tol=1e-5), (split, k)
    ta, tb = _tables(a), _tables(b)
    assert set(ta) == set(tb) and len(ta) == 6
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=1e-5), (k, (ta[k] - tb[k]).abs().max())
    # and training moved the tables away from their (shared) initialisation
    assert a["metrics"]["valid"]["auc"] > 0.55
