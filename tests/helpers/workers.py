"""Functions each rank runs under :func:`sparse_kd.local_launch.launch_local` in the multi-rank tests."""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import torch

from helpers.tiny import tiny_dataset
from sparse_kd.config import ExperimentConfig
from sparse_kd.dist import init_distributed
from sparse_kd.pipeline import baseline_spec, distilled_spec
from sparse_kd.student.init import local_tables, write_tables
from sparse_kd.student.train import build_sharded, train_ranker


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("torchrec").setLevel(logging.ERROR)


def train_worker(cfg: ExperimentConfig, name: str = "baseline", seed: int = 0, stop_after_steps: int | None = None) -> dict:
    """Train one ranker on the tiny dataset in this rank.

    ``name`` picks the spec: ``baseline`` or ``distilled`` (cfg.distill, random stand-in text
    embeddings so no BERT is needed). Returns the metrics and the per-epoch history.
    """
    _quiet()
    env = init_distributed("gloo", 120)
    ds = tiny_dataset(cfg)
    spec = baseline_spec(ds, name)
    if name == "distilled":
        g = torch.Generator().manual_seed(123)
        ut, it = torch.randn(ds.num_users, 12, generator=g), torch.randn(ds.num_items, 12, generator=g)
        assert not cfg.distill.logit.enabled and cfg.distill.transfer.projection == "pca"
        spec = distilled_spec(cfg, ds, ut, it, None, name="distilled")
    res = train_ranker(cfg, ds, spec, Path(cfg.output_dir) / name, env, seed=seed, stop_after_steps=stop_after_steps)
    return {"metrics": res.metrics, "history": res.history}


def local_tables_worker(cfg: ExperimentConfig, init_rows: dict, seed: int = 0) -> dict:
    """Build the sharded model with ``init_rows`` seeded and return this rank's local shards:
    {table: [(row offset, col offset, tensor)]}, plus the count of rows written per feature."""
    _quiet()
    env = init_distributed("gloo", 120)
    ds = tiny_dataset(cfg)
    spec = baseline_spec(ds, "t")
    spec.init_rows = init_rows
    dmp = build_sharded(cfg, ds, spec, env, seed).dmp
    out = {table: [(r0, c0, t.detach().clone()) for (r0, c0), t in shards]
           for table, shards, _, _ in local_tables(dmp.state_dict())}
    return {"tables": out, "written": write_tables(dmp, seed, init_rows)}


def hang_worker(cfg: ExperimentConfig, step: int) -> str:
    """Rank 1 stops answering at ``step`` (sleeps past the collective timeout); rank 0 must fail
    with a message naming its rank and step. Returns rank 0's error message ('' on rank 1)."""
    _quiet()
    env = init_distributed("gloo", cfg.train.collective_timeout_s)
    ds = tiny_dataset(cfg)

    class _Stalled(Exception):
        pass

    def hook(global_step: int) -> None:
        if env.rank == 1 and global_step == step:
            time.sleep(cfg.train.collective_timeout_s + 5)
            raise _Stalled

    try:
        train_ranker(cfg, ds, baseline_spec(ds), Path(cfg.output_dir) / "baseline", env, on_step=hook)
    except RuntimeError as e:
        return str(e)
    except _Stalled:
        return ""
    return ""



def env_worker(*names: str) -> dict:
    """This rank's values of the environment variables ``names``, and torch's thread count."""
    import torch

    return {**{n: os.environ.get(n) for n in names}, "threads": torch.get_num_threads(), "cwd": os.getcwd()}


def selection_worker(cfg: ExperimentConfig, valid_scores: list[float]) -> dict:
    """Train the tiny baseline with the per-epoch valid AUC replaced by ``valid_scores`` (so a test
    decides which epoch is best; train.select_best). Returns metrics, the result checkpoint and
    the number of epochs trained in this call."""
    from sparse_kd.student import train as T

    _quiet()
    scores = iter(valid_scores)
    T._valid = lambda *a, **k: {"auc": next(scores), "logloss": 0.5, "n": 1}
    env = init_distributed("gloo", 120)
    ds = tiny_dataset(cfg)
    res = train_ranker(cfg, ds, baseline_spec(ds), Path(cfg.output_dir) / "baseline", env)
    return {"metrics": res.metrics, "checkpoint": str(res.checkpoint), "epochs_trained": len(res.history)}


def sampled_pairs_worker(cfg: ExperimentConfig) -> dict:
    """Train the tiny student with sampled-pair KD (distill.pairs) against stand-in teacher logits
    (a fixed function of the pair, so no teacher ranker is needed). Returns the metrics."""
    import numpy as np

    from sparse_kd.data.stream import train_source
    from sparse_kd.distill.pairs import pool_batch, sample_pool

    _quiet()
    env = init_distributed("gloo", 120)
    ds = tiny_dataset(cfg)
    spec = baseline_spec(ds, "pairs")
    spec.distill = cfg.distill
    steps = train_source(ds, cfg.data).steps_per_epoch(cfg.train.batch_size)
    spec.kd_pool = sample_pool(ds, cfg.distill.pairs, steps * pool_batch(cfg.distill.pairs, cfg.train.batch_size), cfg.train.seed)
    spec.kd_pool_logits = torch.from_numpy(np.sin(spec.kd_pool.user * 0.7 + spec.kd_pool.item * 1.3)).float() * 2.0
    res = train_ranker(cfg, ds, spec, Path(cfg.output_dir) / "pairs", env)
    return {"metrics": res.metrics}


def sharded_targets_worker(cfg: ExperimentConfig) -> dict:
    """Build the tiny distilled student with its alignment targets sharded
    (distill.align.layout=sharded, random stand-in text of 12 dims) and look up rows that other
    ranks hold. Returns the rows this rank holds per feature and the largest difference between
    looked-up rows and the source rows scaled to unit norm."""
    from sparse_kd.checkpoint import frozen
    from sparse_kd.data.batching import target_ids
    from sparse_kd.distill.targets import MODULE, lookup, unit_rows

    _quiet()
    env = init_distributed("gloo", 120)
    ds = tiny_dataset(cfg)
    g = torch.Generator().manual_seed(123)
    ut, it = torch.randn(ds.num_users, 12, generator=g), torch.randn(ds.num_items, 12, generator=g)
    dmp = build_sharded(cfg, ds, distilled_spec(cfg, ds, ut, it, None, name="distilled"), env, 0).dmp
    held = {k.split(".")[-2]: sum(s.tensor.shape[0] for s in v.local_shards())
            for k, v in dmp.state_dict().items() if frozen(k) and k.endswith(".weight")}
    # every rank asks for rows from the whole table: most of them live on the other rank
    user = torch.arange(ds.num_users).flip(0)[env.rank :: env.world_size]
    item = torch.arange(ds.num_items)[env.rank :: env.world_size][: user.shape[0]]
    user = user[: item.shape[0]]
    rows = lookup(getattr(dmp.module, MODULE), target_ids(user, item), ("teacher_user", "teacher_item"))
    err = max(float((rows["teacher_user"] - unit_rows(ut)[user]).abs().max()),
              float((rows["teacher_item"] - unit_rows(it)[item]).abs().max()))
    return {"held": held, "max_err": err, "n": int(user.shape[0])}


def train_many_worker(cfgs: list) -> list[dict]:
    """:func:`train_worker`'s baseline for each config in turn, in one launch (one process group,
    one start-up): a list of {"metrics"}, in the order of ``cfgs``."""
    _quiet()
    env = init_distributed("gloo", 120)
    out = []
    for cfg in cfgs:
        ds = tiny_dataset(cfg)
        res = train_ranker(cfg, ds, baseline_spec(ds), Path(cfg.output_dir) / "baseline", env, seed=0)
        out.append({"metrics": res.metrics})
    return out


def sharded_features_worker(cfg: ExperimentConfig, cases: list) -> dict:
    """Train the tiny teacher ranker with its users' and items' text features replicated and
    sharded (``distill.teacher_ranker.features_layout``) for each case (text_dim, the users' and
    the items' rows split over the ranks as ``ShardedRows``): the metrics of each, the feature
    rows this rank holds, and the replicated run's checkpoint evaluated under the sharded layout."""
    import dataclasses

    from sparse_kd.checkpoint import frozen
    from sparse_kd.dist import split_range
    from sparse_kd.student.train import evaluate_checkpoint
    from sparse_kd.teacher.sharded_rows import ShardedRows
    from sparse_kd.teacher_inputs import teacher_spec

    _quiet()
    env = init_distributed("gloo", 120)
    ds = tiny_dataset(cfg)
    g = torch.Generator().manual_seed(7)
    scale = torch.linspace(3.0, 0.5, 12)  # distinct variances: a stable PCA
    ut, it = torch.randn(ds.num_users, 12, generator=g) * scale, torch.randn(ds.num_items, 12, generator=g) * scale
    lo, hi = split_range(ds.num_users, env.rank, env.world_size)
    ilo, ihi = split_range(ds.num_items, env.rank, env.world_size)
    out: dict = {}
    for text_dim, split_rows in cases:
        case = f"{text_dim}_{'split' if split_rows else 'whole'}"
        res = {}
        for layout in ("replicated", "sharded"):
            tr = dataclasses.replace(cfg.distill.teacher_ranker, text_dim=text_dim, features_layout=layout)
            c = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher_ranker=tr))
            split = split_rows and layout == "sharded"  # replicated: every row, as the gathered run has
            users = ShardedRows(ut[lo:hi].clone(), torch.arange(ds.num_users), lo, ds.num_users) if split else ut
            items = ShardedRows(it[ilo:ihi].clone(), torch.arange(ds.num_items), ilo, ds.num_items) if split else it
            spec = teacher_spec(c, ds, users, items, world_size=env.world_size)
            r = train_ranker(c, ds, spec, Path(c.output_dir) / case / layout, env, seed=0)
            res[layout] = {"metrics": r.metrics, "dense_cols": spec.user_dense.shape[1], "checkpoint": r.checkpoint,
                           "item_cols": spec.item_dense.shape[1]}
            if layout == "sharded":  # the replicated run's checkpoint, evaluated with the features sharded
                res["cross"] = evaluate_checkpoint(c, ds, spec, res["replicated"]["checkpoint"], env, 0).metrics
                dmp = build_sharded(c, ds, spec, env, 0).dmp
                res["held"] = {k.split(".")[-2]: sum(s.tensor.shape[0] for s in v.local_shards())
                               for k, v in dmp.state_dict().items() if frozen(k) and k.endswith(".weight")}
        for layout in ("replicated", "sharded"):
            res[layout]["checkpoint"] = str(res[layout]["checkpoint"])
        out[case] = res
    return out
