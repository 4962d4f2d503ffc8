"""Helpers for tests and benchmarks: tiny datasets and multi-rank launches on CPU.

Multi-rank tests run N CPU ranks with ``torch.distributed.launcher.api.elastic_launch`` (as
torchrec's own tests do), each on a fresh rendezvous port, so reruns never collide.
"""

from __future__ import annotations

import uuid
from typing import Any, Callable

from sparse_kd.config import ExperimentConfig, config_from_dict
from sparse_kd.data import load_dataset
from sparse_kd.data.schema import RecDataset


def tiny_config(output_dir: str, nproc: int = 2, **sections: Any) -> ExperimentConfig:
    """A config small enough for a test: ~2k interactions, 8-dim embeddings, 3 epochs."""
    raw: dict[str, Any] = {
        "name": "tiny",
        "output_dir": output_dir,
        "nproc": nproc,
        "data": {"synthetic": {"num_users": 60, "num_items": 40, "interactions_per_user": 30, "num_topics": 4}},
        "student": {"embedding_dim": 8, "dense_arch": [16, 8], "over_arch": [16, 1], "teacher_text_dim": 8},
        "train": {"epochs": 3, "batch_size": 64, "sparse_lr": 0.2, "dense_lr": 0.01, "log_every": 5, "eval_batch_size": 256},
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(raw.get(k), dict):
            raw[k] = {**raw[k], **v}  # one level deep: enough for the tests' overrides
        else:
            raw[k] = v
    return config_from_dict(raw, "<tiny_config>")


def tiny_dataset(cfg: ExperimentConfig | None = None) -> RecDataset:
    return load_dataset((cfg or tiny_config("unused")).data)


def launch(fn: Callable[..., Any], nproc: int, *args: Any) -> dict[int, Any]:
    """Run ``fn(*args)`` on ``nproc`` local CPU ranks; return {rank: return value}.

    Each rank gets one OpenMP thread (as torchrun gives it): N ranks x default threads would
    oversubscribe the cores and spin-wait on each other.
    """
    import os

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # read by the spawned ranks when torch starts

    lc = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        rdzv_configs={"timeout": 120},
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    return elastic_launch(lc, entrypoint=fn)(*args)


def train_worker(cfg: ExperimentConfig, name: str = "baseline", seed: int = 0, stop_after_steps: int | None = None) -> dict:
    """Train one ranker on the tiny dataset in this rank (used under :func:`launch`).

    ``name`` picks the spec: ``baseline`` or ``distilled`` (cfg.distill, random stand-in text
    embeddings so no BERT is needed). Returns the metrics and the examples/s.
    """
    import logging
    import warnings
    from pathlib import Path

    import torch

    from sparse_kd.data.batching import count_dense
    from sparse_kd.dist import init_distributed
    from sparse_kd.student.spec import RankerSpec
    from sparse_kd.student.train import train_ranker

    warnings.filterwarnings("ignore")
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    env = init_distributed("gloo", 120)
    ds = tiny_dataset(cfg)
    ub, ib = count_dense(ds)
    spec = RankerSpec(name, ub, ib)
    if name == "distilled":
        from sparse_kd.pipeline import distilled_spec

        g = torch.Generator().manual_seed(123)
        ut, it = torch.randn(ds.num_users, 12, generator=g), torch.randn(ds.num_items, 12, generator=g)
        assert not cfg.distill.logit.enabled and cfg.distill.transfer.projection == "pca"
        spec = distilled_spec(cfg, ds, ut, it, None, name="distilled")
    res = train_ranker(cfg, ds, spec, Path(cfg.output_dir) / name, env, seed=seed, stop_after_steps=stop_after_steps)
    return {"metrics": res.metrics, "history": res.history}


def local_tables_worker(cfg: ExperimentConfig, init_rows: dict, seed: int = 0) -> dict:
    """Build the sharded model with ``init_rows`` seeded and return this rank's local shards:
    {table: [(row offset, col offset, tensor)]}, plus the count of rows written per feature."""
    import warnings

    from sparse_kd.data.batching import count_dense
    from sparse_kd.dist import init_distributed
    from sparse_kd.student.init import write_tables
    from sparse_kd.student.spec import RankerSpec
    from sparse_kd.student.train import build_sharded

    warnings.filterwarnings("ignore")
    env = init_distributed("gloo", 120)
    ds = tiny_dataset(cfg)
    ub, ib = count_dense(ds)
    spec = RankerSpec("t", ub, ib, init_rows=init_rows)
    _, _, dmp, _, _ = build_sharded(cfg, ds, spec, env, seed)
    out: dict = {}
    for key, value in dmp.state_dict().items():
        if "embedding_bags" in key and key.endswith(".weight"):
            table = key.split(".")[-2]
            if hasattr(value, "local_shards"):
                out[table] = [(*s.metadata.shard_offsets, s.tensor.detach().clone()) for s in value.local_shards()]
            else:
                out[table] = [(0, 0, value.detach().clone())]
    return {"tables": out, "written": write_tables(dmp, seed, init_rows)}


def _kill_self_at(step: int, rank: int):
    """An ``on_step`` hook: SIGKILL this process at ``step`` on ``rank``, first attempt only."""
    import os
    import signal

    def hook(global_step: int) -> None:
        if (
            global_step == step
            and int(os.environ.get("RANK", "0")) == rank
            and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
        ):
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def fault_main(argv: list[str] | None = None) -> None:
    """Entry point for ``torchrun -m sparse_kd.testing OUT_DIR KILL_STEP``: train the tiny baseline
    with checkpoints every 5 steps; rank 1 SIGKILLs itself at KILL_STEP on the first attempt.
    Rank 0 writes OUT_DIR/metrics.json at the end."""
    import json
    import sys
    import warnings
    from pathlib import Path

    from sparse_kd.data.batching import count_dense
    from sparse_kd.dist import init_distributed
    from sparse_kd.student.spec import RankerSpec
    from sparse_kd.student.train import train_ranker

    warnings.filterwarnings("ignore")
    out, kill_step = (argv or sys.argv[1:])[:2]
    cfg = tiny_config(out, nproc=2, train={"checkpoint_every": 5})
    env = init_distributed("gloo", 60)
    ds = tiny_dataset(cfg)
    ub, ib = count_dense(ds)
    res = train_ranker(cfg, ds, RankerSpec("baseline", ub, ib), Path(out) / "baseline", env,
                       on_step=_kill_self_at(int(kill_step), rank=1))
    if env.is_main:
        (Path(out) / "metrics.json").write_text(json.dumps(res.metrics))


if __name__ == "__main__":
    fault_main()


def hang_worker(cfg: ExperimentConfig, step: int) -> str:
    """Rank 1 stops answering at ``step`` (sleeps past the collective timeout); rank 0 must fail
    with a message naming its rank and step. Returns rank 0's error message ('' on rank 1)."""
    import time
    import warnings
    from pathlib import Path

    from sparse_kd.data.batching import count_dense
    from sparse_kd.dist import init_distributed
    from sparse_kd.student.spec import RankerSpec
    from sparse_kd.student.train import train_ranker

    warnings.filterwarnings("ignore")
    env = init_distributed("gloo", cfg.train.collective_timeout_s)
    ds = tiny_dataset(cfg)
    ub, ib = count_dense(ds)

    class _Stalled(Exception):
        pass

    def hook(global_step: int) -> None:
        if env.rank == 1 and global_step == step:
            time.sleep(cfg.train.collective_timeout_s + 5)
            raise _Stalled

    try:
        train_ranker(cfg, ds, RankerSpec("baseline", ub, ib), Path(cfg.output_dir) / "baseline", env, on_step=hook)
    except RuntimeError as e:
        return str(e)
    except _Stalled:
        return ""
    return ""


def selection_worker(cfg: ExperimentConfig, valid_scores: list[float]) -> dict:
    """Train the tiny baseline (under :func:`launch`) with the per-epoch valid AUC replaced by
    ``valid_scores`` (so a test decides which epoch is best). Returns metrics and the last step."""
    import warnings
    from pathlib import Path

    from sparse_kd.data.batching import count_dense
    from sparse_kd.dist import init_distributed
    from sparse_kd.student import train as T
    from sparse_kd.student.spec import RankerSpec

    warnings.filterwarnings("ignore")
    scores = iter(valid_scores)
    T._valid = lambda *a, **k: {"auc": next(scores), "logloss": 0.5, "n": 1}
    env = init_distributed("gloo", 120)
    ds = tiny_dataset(cfg)
    ub, ib = count_dense(ds)
    res = T.train_ranker(cfg, ds, RankerSpec("baseline", ub, ib), Path(cfg.output_dir) / "baseline", env)
    return {"metrics": res.metrics, "checkpoint": str(res.checkpoint), "epochs_trained": len(res.history)}
