"""Training recipe for a sharded DLRM ranker (the teacher ranker and every student variant).

It reads like torchrec's golden training example (``examples/golden_training/train_dlrm.py``):
tables on ``meta``, the model in its training wrapper, the in-backward sparse optimizer,
``DistributedModelParallel`` over a hand-built plan, ``TrainPipelineSparseDist``, then a loop
of ``pipeline.progress``. What a real run adds lives in named modules: sharding-independent
table init and weight transfer (:mod:`~sparse_kd.student.init`), optimizers
(:mod:`~sparse_kd.student.optim`), sharded checkpoints and resumption
(:mod:`sparse_kd.checkpoint`), evaluation (:mod:`~sparse_kd.student.predict`), the log
(:mod:`~sparse_kd.student.train_log`), refit after training (:mod:`sparse_kd.student.refit`).

The same function runs as 1 process or under ``torchrun --nproc_per_node N``: every rank draws
the same example permutation and takes its slice of each global batch.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from tqdm import tqdm

from sparse_kd import checkpoint as ckpt
from sparse_kd.config import ExperimentConfig
from sparse_kd.data.batching import ITEM_ROWS_KEY, TARGET_KEYS, USER_ROWS_KEY, BatchBuilder
from sparse_kd.data.schema import RecDataset
from sparse_kd.data.stream import train_source
from sparse_kd.dist import DistEnv, on_main
from sparse_kd.distill.module import RankerTrain
from sparse_kd.distill.pairs import check_pair_batch, pool_batch, with_sampled_pairs
from sparse_kd.distill.targets import sharded_layout, write_targets
from sparse_kd.student.refit import refit_rows
from sparse_kd.student.init import localize_sources, write_tables
from sparse_kd.student.model import arch_of, build_dlrm, table_name
from sparse_kd.student.optim import check_sparse_optimizer, combined_optimizer, sparse_optimizer
from sparse_kd.student.predict import predict_sharded, split_logits, split_metrics
from sparse_kd.student.reshard import check_resume
from sparse_kd.student.selection import BEST_DIR, EpochSelector
from sparse_kd.student.sharding import build_plan, describe_plan
from sparse_kd.student.spec import RankerResult, RankerSpec
from sparse_kd.student.train_log import TrainLog

log = logging.getLogger(__name__)


class ShardedRanker(NamedTuple):
    builder: BatchBuilder
    module: RankerTrain  # the training wrapper before sharding (its ``last_parts`` are the loss parts)
    dmp: DistributedModelParallel
    optimizer: CombinedOptimizer  # fused sparse + data_parallel tables' + dense
    lazy_optimizers: tuple[KeyedOptimizerWrapper, ...]  # the parts whose state exists after a first step


def build_sharded(cfg: ExperimentConfig, ds: RecDataset, spec: RankerSpec, env: DistEnv, seed: int) -> ShardedRanker:
    """Model, sharding and optimizers of one ranker, with its tables initialised (weight transfer
    applied)."""
    sc = cfg.student
    torch.manual_seed(seed)  # dense layers: identical on every rank and for any world size
    num_emb = {f.name: f.num_embeddings for f in ds.features}
    arch = spec.arch or arch_of(sc)
    dlrm = build_dlrm(num_emb, spec.dense_dim, arch, device="meta")
    al, texts = spec.distill.align, {"user_id": spec.user_text, "item_id": spec.item_text}
    sharded_targets = al.enabled and all(texts.get(f) is not None for f in al.features) and sharded_layout(
        al.layout, {f: tuple(texts[f].shape) for f in al.features}, env.world_size)
    for f in sorted(al.features if al.enabled and not sharded_targets else ()):
        if getattr(texts.get(f), "sharded", False):  # replicated targets: every rank holds every row (a collective)
            texts[f] = texts[f].full()
            if env.is_main:
                log.info("[%s] replicated alignment targets: every %s text row gathered on every rank", spec.name, f)
    # the teacher ranker's text features split over the ranks (users', items'), or none
    features = {key: rows for key, rows in ((USER_ROWS_KEY, spec.user_rows), (ITEM_ROWS_KEY, spec.item_rows)) if rows is not None}
    module = RankerTrain(dlrm, spec.distill, ds.feature_names, texts["user_id"], texts["item_id"],
                         embedding_dim=arch.embedding_dim, pair_feature=spec.pair_feature,
                         embedding_l2=cfg.train.embedding_l2, sharded_targets=sharded_targets,
                         user_rows_shape=None if spec.user_rows is None else tuple(spec.user_rows.shape),
                         user_dense_dim=spec.user_dense.shape[1],
                         item_rows_shape=None if spec.item_rows is None else tuple(spec.item_rows.shape))
    builder = BatchBuilder(ds, spec.user_dense, spec.item_dense, target_keys=module.frozen_keys)
    opt_cls, opt_kwargs = sparse_optimizer(cfg.train)
    apply_optimizer_in_backward(opt_cls, module.model.sparse_arch.parameters(), opt_kwargs)
    plan = build_plan(module, sc, env.world_size, env.device.type, local_world_size=env.local_world_size,
                      batch_size=cfg.train.batch_size // env.world_size)
    check_sparse_optimizer(cfg.train, plan, env.device.type)
    dmp = DistributedModelParallel(module=module, device=env.device, plan=plan)
    if env.is_main:
        log.info("[%s] sharding plan: %s", spec.name, describe_plan(plan))
    # rows split over the ranks (users' own text) arrive for this rank's shards, in one all-to-all each
    written = write_tables(dmp, seed, localize_sources(dmp, spec.init_rows, table_name))
    if written and env.is_main:
        log.info("[%s] weight transfer: rows seeded from text per feature: %s", spec.name, written)
    if sharded_targets:
        held = write_targets(dmp, {TARGET_KEYS[f]: texts[f] for f in al.features}, unit=al.kind == "cosine")  # a collective where rows are split
        log.info("[%s] alignment targets sharded row_wise: rank %d holds %s rows", spec.name, env.rank, held)
    if features:
        held = write_targets(dmp, features)
        log.info("[%s] text features sharded row_wise: rank %d holds %s rows", spec.name, env.rank, held)
    optimizer, lazy = combined_optimizer(dmp, cfg.train)
    return ShardedRanker(builder, module, dmp, optimizer, lazy)


@dataclass
class _Position:
    epoch: int = 0
    step: int = 0  # within the epoch
    global_step: int = 0


def predict_checkpoint(cfg: ExperimentConfig, ds: RecDataset, spec: RankerSpec, checkpoint: Path, rows, env: DistEnv,
                       seed: int) -> torch.Tensor:
    """A trained ranker's logits (N,) on ``rows`` (:class:`~sparse_kd.data.schema.Interactions`),
    from its checkpoint (every rank; collective): the sharded model is built as for training,
    ``checkpoint`` loaded, and ``rows`` predicted as evaluation does. The distilled student uses
    it for the teacher's logits on its sampled pairs (:mod:`sparse_kd.distill.pairs`)."""
    r, pipeline = _loaded(cfg, ds, spec, checkpoint, env, seed)
    return predict_sharded(pipeline, r.dmp, rows, r.builder, cfg.train.eval_batch_size, env)


def evaluate_checkpoint(cfg: ExperimentConfig, ds: RecDataset, spec: RankerSpec, checkpoint: Path, env: DistEnv,
                        seed: int, examples_per_s: float = 0.0) -> RankerResult:
    """A trained ranker's result read from its checkpoint, training nothing and writing nothing
    (every rank; collective): its metrics on every evaluation split and its logits on ``train``
    and on those splits, as :func:`train_ranker` returns them for a teacher. A teacher ranker
    trained by another run is reused this way (``distill.teacher_ranker.from_run``)."""
    r, pipeline = _loaded(cfg, ds, spec, checkpoint, env, seed)
    eval_logits, metrics, train_logits = _evaluated(pipeline, r, ds, cfg.train.eval_batch_size, env, True)
    return RankerResult(spec.name, metrics, Path(checkpoint), train_logits, examples_per_s, eval_logits=eval_logits)


def _loaded(cfg: ExperimentConfig, ds: RecDataset, spec: RankerSpec, checkpoint: Path, env: DistEnv,
            seed: int) -> tuple[ShardedRanker, TrainPipelineSparseDist]:
    """The sharded ranker built as for training with ``checkpoint``'s weights, and its pipeline."""
    r = build_sharded(cfg, ds, spec, env, seed)
    ckpt.load(checkpoint, r.dmp)
    return r, TrainPipelineSparseDist(r.dmp, r.optimizer, env.device)


def _evaluated(pipeline, r: ShardedRanker, ds: RecDataset, batch: int, env: DistEnv, want_train_logits: bool):
    """(split logits, split metrics, train logits or None) of a trained ranker."""
    eval_logits = split_logits(pipeline, r.dmp, ds, r.builder, batch, env)
    train_logits = predict_sharded(pipeline, r.dmp, ds.splits["train"], r.builder, batch, env) if want_train_logits else None
    return eval_logits, split_metrics(ds, eval_logits), train_logits


def _resume(ck_dir: Path, r: ShardedRanker, sparse_optimizer_name: str, world_size: int) -> tuple[_Position, Optional[Path]]:
    """Load the newest complete checkpoint in ``ck_dir`` into the model and optimizers, if any."""
    latest = ckpt.latest(ck_dir)
    if latest is None:
        return _Position(), None
    # optimizer state is created lazily; make it exist so the checkpoint can load into it
    # (a zero-gradient step of Adam, Adagrad or SGD leaves the parameters unchanged)
    check_resume(latest, r.dmp.plan, sparse_optimizer_name, world_size)  # refuse what DCP cannot reshard
    for opt in r.lazy_optimizers:
        opt.init_state()
        opt.zero_grad()
    meta = ckpt.load(latest, r.dmp, r.optimizer)
    return _Position(meta["epoch"], meta["step_in_epoch"], meta["global_step"]), latest


def train_ranker(
    cfg: ExperimentConfig,
    ds: RecDataset,
    spec: RankerSpec,
    out_dir: Path,
    env: DistEnv,
    seed: Optional[int] = None,
    want_train_logits: bool = False,
    stop_after_steps: Optional[int] = None,
    on_step: Optional[Callable[[int], None]] = None,
) -> RankerResult:
    """Train one ranker; evaluate on valid/test/test_cold; save a sharded checkpoint per epoch.

    Resumes from the newest complete checkpoint in ``out_dir/checkpoints`` if there is one.
    ``stop_after_steps`` ends the run early (after saving); ``on_step(global_step)`` is called
    after every step.
    """
    seed = cfg.train.seed if seed is None else seed
    tc, out_dir = cfg.train, Path(out_dir)
    np.random.seed(seed)  # torch is seeded in build_sharded, right before the dense layers are made
    if use_deterministic(tc.deterministic, env.device.type):
        torch.use_deterministic_algorithms(True, warn_only=True)

    if spec.kd_pool is not None:  # before any work: the ranks must split the pair batch evenly
        check_pair_batch(pool_batch(spec.distill.pairs, tc.batch_size), env.world_size)
    r = build_sharded(cfg, ds, spec, env, seed)
    ck_dir = out_dir / "checkpoints"
    pos, last_saved = _resume(ck_dir, r, tc.sparse_optimizer, env.world_size)  # a finished run resumed: its last checkpoint is the result
    if last_saved is not None and env.is_main:
        log.info("[%s] resumed from %s (epoch %d, step %d)", spec.name, last_saved, pos.epoch, pos.step)
    pipeline = TrainPipelineSparseDist(r.dmp, r.optimizer, env.device)

    def save(epoch: int, step: int) -> Path:
        return ckpt.save(ck_dir, r.dmp, r.optimizer, epoch, step, pos.global_step, tc.keep_checkpoints)

    source = train_source(ds, cfg.data)  # in memory, or streamed from Parquet shards
    spe = source.steps_per_epoch(tc.batch_size)
    if env.is_main:
        log.info(
            "[%s] %d train examples, global batch %d (%d per rank x %d ranks), %d steps/epoch, %d epochs",
            spec.name, source.num_examples, tc.batch_size, tc.batch_size // env.world_size, env.world_size, spe, tc.epochs,
        )
    writer = TrainLog(out_dir) if env.is_main else None
    history: list[dict] = []
    t_train, n_seen = 0.0, 0
    sel = EpochSelector(out_dir, tc.select_best, tc.early_stop_patience)  # train.select_best
    if sel.enabled and pos.step == 0 and 0 < pos.epoch < tc.epochs and sel.last_epoch < pos.epoch and last_saved:
        # stopped between an epoch's checkpoint and its selection record: score that epoch now
        _select(sel, pos.epoch, _valid(pipeline, r, ds, tc, env)["auc"], last_saved, env, tc.epochs)
    for epoch in range(pos.epoch, tc.epochs):
        if sel.stopped:
            break
        pos.epoch = epoch
        batches = source.batches(r.builder, tc.batch_size, env.rank, env.world_size, pos.epoch, seed,
                                 start_step=pos.step, teacher_logits=spec.teacher_logits)
        if spec.kd_pool is not None:  # distill.pairs: sampled pairs with the teacher's logits
            batches = with_sampled_pairs(batches, spec.kd_pool, spec.kd_pool_logits, r.builder,
                                         pool_batch(spec.distill.pairs, tc.batch_size), env.rank, env.world_size,
                                         pos.epoch, seed, start_step=pos.step)
        bar = tqdm(total=spe, initial=pos.step, desc=f"{spec.name} epoch {pos.epoch + 1}/{tc.epochs}",
                   disable=None if env.is_main else True, leave=False)
        r.dmp.train()
        t0 = time.perf_counter()
        while True:
            try:
                _, logits, _ = pipeline.progress(batches)
            except StopIteration:
                break
            except RuntimeError as e:  # a collective timed out or a peer died: say where
                raise _step_failed(e, spec.name, env, pos, tc.collective_timeout_s, ck_dir) from e
            pos.step += 1
            pos.global_step += 1
            n_seen += logits.numel() * env.world_size
            bar.update(1)
            if writer and pos.global_step % tc.log_every == 0:
                parts = {k: float(v) for k, v in r.module.last_parts.items()}
                writer.losses(pos.global_step, pos.epoch, parts)
                bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()})
            if on_step is not None:
                on_step(pos.global_step)
            stop_now = stop_after_steps is not None and pos.global_step >= stop_after_steps
            if (tc.checkpoint_every and pos.global_step % tc.checkpoint_every == 0 and pos.step < spe) or stop_now:
                last_saved = save(pos.epoch, pos.step)
            if stop_now:
                bar.close()
                return RankerResult(spec.name, {}, last_saved)
        t_train += time.perf_counter() - t0
        bar.close()
        pos.step = 0
        last_saved = save(pos.epoch + 1, 0)
        valid = _valid(pipeline, r, ds, tc, env)
        row = {"epoch": pos.epoch + 1, "global_step": pos.global_step, "valid_auc": valid["auc"], "valid_logloss": valid["logloss"]}
        history.append(row)
        if writer:
            writer.epoch(row)
            log.info("[%s] epoch %d/%d: valid AUC %.4f, log loss %.4f", spec.name, pos.epoch + 1, tc.epochs, valid["auc"], valid["logloss"])
        if _select(sel, pos.epoch + 1, valid["auc"], last_saved, env, tc.epochs) and env.is_main:
            log.info("[%s] early stop: no valid AUC gain for %d epoch(s); best epoch %d (valid AUC %.4f)",
                     spec.name, tc.early_stop_patience, sel.best_epoch, sel.best_score)
    if sel.enabled and not sel.restored and sel.best_path() is not None:
        last_saved = _restore_best(sel, r, ck_dir, tc, pos, env, spec.name, last_saved)

    if spec.refit is not None and last_saved is not None:
        num_rows = {f.name: f.num_embeddings for f in ds.features}
        rows = localize_sources(r.dmp, refit_rows(last_saved, spec.refit, num_rows, cfg.student.embedding_dim), table_name)
        written = write_tables(r.dmp, seed, rows, reinit=False)
        if written:
            if env.is_main:
                log.info("[%s] weight transfer refit: rows of rarely seen entities set from text: %s", spec.name, written)
            last_saved = save(tc.epochs, 0)
    eval_logits, metrics, train_logits = _evaluated(pipeline, r, ds, tc.eval_batch_size, env, want_train_logits)
    if writer:
        writer.close()
    eps = n_seen / t_train if t_train > 0 else 0.0
    # a teacher (want_train_logits) keeps its split logits too: an ensemble averages them
    return RankerResult(spec.name, metrics, last_saved or ckpt.latest(ck_dir), train_logits, eps, history,
                        eval_logits=eval_logits if want_train_logits else None)


def use_deterministic(setting, device_type: str, environ=None) -> bool:
    """``train.deterministic``: True / False as given; ``auto`` is on for CPU and, on CUDA, only
    when ``CUBLAS_WORKSPACE_CONFIG`` is set (without it deterministic cuBLAS calls fail)."""
    if setting != "auto":
        return bool(setting)
    environ = os.environ if environ is None else environ
    return device_type != "cuda" or bool(environ.get("CUBLAS_WORKSPACE_CONFIG"))


# ----------------------------------------------------------- best-epoch selection (train.select_best)


def _valid(pipeline, r: ShardedRanker, ds: RecDataset, tc, env: DistEnv) -> dict:
    return split_metrics(ds, split_logits(pipeline, r.dmp, ds, r.builder, tc.eval_batch_size, env, ("valid",)))["valid"]


def _select(sel: EpochSelector, epoch: int, score: float, checkpoint: Path, env: DistEnv, epochs: int) -> bool:
    """Record an epoch's valid score (every rank, same numbers); rank 0 keeps a copy of a new best
    epoch's checkpoint and writes selection.json. Returns True when training stops early."""
    if not sel.enabled:
        return False
    improved = sel.update(epoch, score)
    if improved:
        sel.best_checkpoint = str((checkpoint.parent / BEST_DIR / checkpoint.name).relative_to(sel.out_dir))
    sel.stopped = sel.should_stop() and epoch < epochs

    def record() -> None:  # rank 0's file work; the others wait on the long group, not a short barrier
        if improved:
            sel.keep(checkpoint)
        sel.save()
        sel.prune()

    on_main(record)
    return sel.stopped


def _restore_best(sel: EpochSelector, r: ShardedRanker, ck_dir: Path, tc, pos: _Position, env: DistEnv, name: str,
                  last_saved: Optional[Path]) -> Path:
    """Load the best epoch's weights (unless the last epoch is the best) and save them as the final
    checkpoint, marked finished so a rerun trains no further."""
    best = sel.best_path()
    if sel.best_epoch != sel.last_epoch:
        ckpt.load(best, r.dmp, r.optimizer)
        if env.is_main:
            log.info("[%s] best epoch %d of %d (valid AUC %.4f): its weights are the result", name, sel.best_epoch,
                     sel.last_epoch, sel.best_score)
    if sel.best_epoch != sel.last_epoch or sel.stopped or last_saved is None:
        last_saved = ckpt.save(ck_dir, r.dmp, r.optimizer, tc.epochs, 0, pos.global_step, tc.keep_checkpoints)
    sel.restored = True
    on_main(sel.save)
    return last_saved


def _step_failed(e: RuntimeError, name: str, env: DistEnv, pos: _Position, timeout_s: int, ck_dir: Path) -> RuntimeError:
    return RuntimeError(
        f"[{name}] rank {env.rank}/{env.world_size} failed at epoch {pos.epoch + 1}, step {pos.step + 1} "
        f"(global step {pos.global_step + 1}): {str(e).splitlines()[0][:300]}. A peer rank may have died or hung; "
        f"collectives wait train.collective_timeout_s={timeout_s}s. Rerun to resume "
        f"from the last checkpoint in {ck_dir}."
    )
