"""Training recipe for a sharded DLRM ranker (the teacher ranker and every student variant).

Read top to bottom: tables on ``meta``, the training wrapper with its losses, the fused
in-backward sparse optimizer, a hand-built sharding plan, ``DistributedModelParallel``,
deterministic (sharding-independent) table initialisation plus optional weight transfer,
``TrainPipelineSparseDist``, a loop of ``pipeline.progress``, evaluation, sharded checkpoints.

The same function runs as 1 process or under ``torchrun --nproc_per_node N``: every rank draws
the same example permutation and takes its slice of each global batch.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad
from tqdm import tqdm

from sparse_kd import checkpoint as ckpt
from sparse_kd.config import DistillConfig, ExperimentConfig
from sparse_kd.data.batching import BatchBuilder, eval_batches
from sparse_kd.data.schema import RecDataset
from sparse_kd.data.stream import train_source
from sparse_kd.dist import DistEnv, all_gather_cat
from sparse_kd.distill.module import RankerTrain
from sparse_kd.student.model import build_dlrm, feature_of
from sparse_kd.student.sharding import build_plan, describe_plan

log = logging.getLogger(__name__)

EVAL_SPLITS = ("valid", "test", "valid_cold", "test_cold")


@dataclass
class RankerSpec:
    """What distinguishes one ranker run from another.

    user_dense, item_dense: (U, Du), (I, Di) dense features per entity.
    teacher_logits: (N_train,) soft targets aligned with the train split, for logit KD.
    user_text, item_text: (U, H), (I, H) text embeddings, for feature alignment.
    init_rows: feature -> (num_embeddings, D) rows to seed the table with (weight transfer);
        NaN rows keep the default initialisation.
    """

    name: str
    user_dense: torch.Tensor
    item_dense: torch.Tensor
    distill: DistillConfig = field(default_factory=DistillConfig)
    teacher_logits: Optional[torch.Tensor] = None
    user_text: Optional[torch.Tensor] = None
    item_text: Optional[torch.Tensor] = None
    init_rows: dict[str, torch.Tensor] = field(default_factory=dict)
    refit: Optional["RefitSpec"] = None


@dataclass
class RefitSpec:
    """After training, replace rows of rarely seen entities by a text -> row ridge regression
    fitted on the others (weight transfer into the student's learned space).

    text: feature -> (N, H) text embeddings; counts: feature -> (N,) training interactions.
    """

    text: dict[str, torch.Tensor]
    counts: dict[str, np.ndarray]
    min_count: int = 1
    l2: float = 1.0


@dataclass
class RankerResult:
    name: str
    metrics: dict  # split -> {"auc", "logloss", "n"}
    checkpoint: Optional[Path]
    train_logits: Optional[torch.Tensor] = None  # (N_train,) when requested
    examples_per_s: float = 0.0
    history: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------
# Initialisation that does not depend on how tables are sharded

_INIT_CHUNK = 1 << 16


def _table_seed(seed: int, table: str, chunk: int) -> int:
    h = hashlib.sha256(f"{seed}/{table}/{chunk}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def init_rows_block(seed: int, table: str, num_rows: int, dim: int, row0: int, nrows: int) -> torch.Tensor:
    """Rows [row0, row0 + nrows) of a table's default init, U(-1/sqrt(N), 1/sqrt(N)) like torchrec's.

    Generated in fixed chunks of 65536 rows, each from its own seed, so any shard of the table
    gets the same values whichever rank builds it.
    """
    bound = 1.0 / math.sqrt(num_rows)
    out = torch.empty(nrows, dim)
    r = row0
    while r < row0 + nrows:
        c = r // _INIT_CHUNK
        c_lo, c_hi = c * _INIT_CHUNK, min((c + 1) * _INIT_CHUNK, num_rows)
        g = torch.Generator().manual_seed(_table_seed(seed, table, c))
        block = torch.empty(c_hi - c_lo, dim).uniform_(-bound, bound, generator=g)
        lo, hi = r, min(row0 + nrows, c_hi)
        out[lo - row0 : hi - row0] = block[lo - c_lo : hi - c_lo]
        r = hi
    return out


@torch.no_grad()
def write_tables(dmp: torch.nn.Module, seed: int, init_rows: dict[str, torch.Tensor], reinit: bool = True) -> dict[str, int]:
    """Set every embedding table (each rank its local shards) to the sharding-independent init
    (unless ``reinit`` is False), then overwrite rows from ``init_rows`` (feature -> (N, D),
    NaN rows skipped).

    Returns feature -> number of rows written from ``init_rows`` (summed over ranks).
    """
    written: dict[str, int] = {}
    sd = dmp.state_dict()
    for key, value in sd.items():
        if "embedding_bags" not in key or not key.endswith(".weight"):
            continue
        table = key.split(".")[-2]
        feat = feature_of(table)
        shards = value.local_shards() if hasattr(value, "local_shards") else None
        if shards is None:  # data_parallel / unsharded
            shards_iter = [((0, 0), value)]
            full_rows, full_dim = value.shape
        else:
            shards_iter = [(tuple(s.metadata.shard_offsets), s.tensor) for s in shards]
            full_rows, full_dim = value.size()
        seeded = init_rows.get(feat)
        if seeded is None and not reinit:
            continue
        n_written = 0
        for (r0, c0), t in shards_iter:
            n, d = t.shape
            # one init chunk of rows at a time (the state_dict tensors are views of the live
            # weights): a temporary as large as the shard would add the largest table to peak memory
            lo = 0
            while lo < n:
                hi = min(n, ((r0 + lo) // _INIT_CHUNK + 1) * _INIT_CHUNK - r0)
                if reinit:
                    block = init_rows_block(seed, table, full_rows, full_dim, r0 + lo, hi - lo)[:, c0 : c0 + d]
                else:
                    block = t[lo:hi].detach().clone()
                if seeded is not None:
                    src = seeded[r0 + lo : r0 + hi, c0 : c0 + d].float()
                    ok = ~torch.isnan(src).any(dim=1)
                    block[ok] = src[ok]
                    # count each row once: first column shard; replicated tables on rank 0 only
                    replica = shards is None and dist.is_initialized() and dist.get_rank() > 0
                    n_written += int(ok.sum()) if c0 == 0 and not replica else 0
                t[lo:hi].copy_(block)
                lo = hi
        if seeded is not None:
            written[feat] = n_written
    dmp.load_state_dict(sd, strict=False)
    if written and dist.is_initialized() and dist.get_world_size() > 1:
        counts = torch.tensor([written[f] for f in sorted(written)], dtype=torch.int64)
        dist.all_reduce(counts)
        written = dict(zip(sorted(written), counts.tolist()))
    return written


def refit_rows(checkpoint: Path, refit: RefitSpec, num_rows: dict[str, int], dim: int) -> dict[str, torch.Tensor]:
    """Rows to write for a :class:`RefitSpec`: feature -> (N, D), NaN where a row is kept.

    Reads each table in full from the checkpoint (every rank reads the files; no collective).
    """
    import torch.distributed.checkpoint as dcp

    from sparse_kd.distill.transfer import ridge_apply, ridge_fit

    out = {}
    for feat, text in refit.text.items():
        key = f"model.sparse_arch.embedding_bag_collection.embedding_bags.t_{feat}.weight"
        state = {"model": {key: torch.empty(num_rows[feat], dim)}}
        dcp.load(state, checkpoint_id=str(checkpoint), no_dist=True)
        trained = state["model"][key]
        counts = torch.from_numpy(np.asarray(refit.counts[feat]))
        fit_on = counts >= refit.min_count
        if int(fit_on.sum()) < 2 or bool(fit_on.all()):
            continue
        w = ridge_fit(text[fit_on].float(), trained[fit_on], l2=refit.l2)
        rows = torch.full_like(trained, float("nan"))
        rows[~fit_on] = ridge_apply(text[~fit_on].float(), w)
        out[feat] = rows
    return out


# ------------------------------------------------------------------------------------------


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC with ties counted half (Mann-Whitney U)."""
    n_pos = int(labels.sum())
    n_neg = labels.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    s = scores[order]
    ranks = torch.empty_like(scores, dtype=torch.float64)
    # average ranks over ties
    _, inverse, counts = torch.unique_consecutive(s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks[order] = avg[inverse]
    pos_rank_sum = ranks[labels.bool()].sum()
    return float((pos_rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    logits, labels = logits.double(), labels.double()
    ll = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).item() if labels.numel() else float("nan")
    return {"auc": _auc(logits, labels), "logloss": ll, "n": int(labels.numel())}


def _predict(pipeline, dmp, split, builder, cfg: ExperimentConfig, env: DistEnv) -> torch.Tensor:
    """Logits (N,) for a whole split, on every rank (sharded lookups are collective)."""
    n = len(split)
    if n == 0:
        return torch.zeros(0)
    dmp.eval()
    per = max(1, cfg.train.eval_batch_size // env.world_size)
    outs = []
    batches = eval_batches(split, builder, cfg.train.eval_batch_size, env.rank, env.world_size)
    with torch.no_grad():
        while True:
            try:
                _, logits, _ = pipeline.progress(batches)
            except StopIteration:
                break
            outs.append(all_gather_cat(logits.reshape(-1).cpu()))  # (W * per,)
    dmp.train()
    # undo the per-rank padding: global batch g holds rank r's rows at [r*per, r*per + real)
    result = []
    for g, chunk in enumerate(outs):
        start = g * per * env.world_size
        for r in range(env.world_size):
            lo = min(n, start + r * per)
            real = min(n, lo + per) - lo
            result.append(chunk[r * per : r * per + real])
    return torch.cat(result)[:n]


def evaluate(pipeline, dmp, ds: RecDataset, builder, cfg, env, splits=EVAL_SPLITS) -> dict:
    out = {}
    for s in splits:
        sp = ds.splits[s]
        logits = _predict(pipeline, dmp, sp, builder, cfg, env)
        out[s] = binary_metrics(logits, torch.from_numpy(sp.label))
    return out


def _make_optimizer(dmp, cfg: ExperimentConfig):
    dense = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=cfg.train.dense_lr),
    )
    return CombinedOptimizer([dmp.fused_optimizer, dense]), dense


def _sparse_optimizer(cfg: ExperimentConfig):
    name = cfg.train.sparse_optimizer
    if name == "rowwise_adagrad":
        return RowWiseAdagrad, {"lr": cfg.train.sparse_lr}
    if name == "adagrad":
        return torch.optim.Adagrad, {"lr": cfg.train.sparse_lr}
    return torch.optim.SGD, {"lr": cfg.train.sparse_lr}


def build_sharded(cfg: ExperimentConfig, ds: RecDataset, spec: RankerSpec, env: DistEnv, seed: int):
    """Model, sharding and optimizers of one ranker, with its tables initialised (weight transfer
    applied). Returns (builder, train module, DMP, combined optimizer, dense optimizer)."""
    sc = cfg.student
    torch.manual_seed(seed)  # dense layers: identical on every rank and for any world size
    builder = BatchBuilder(ds, spec.user_dense, spec.item_dense)
    num_emb = {f.name: f.num_embeddings for f in ds.features}
    dlrm = build_dlrm(num_emb, builder.dense_dim, sc, device="meta")
    module = RankerTrain(
        dlrm, spec.distill, ds.feature_names, spec.user_text, spec.item_text, embedding_dim=sc.embedding_dim
    )
    opt_cls, opt_kwargs = _sparse_optimizer(cfg)
    apply_optimizer_in_backward(opt_cls, module.model.sparse_arch.parameters(), opt_kwargs)
    plan = build_plan(module, sc, env.world_size, env.device.type)
    dmp = DistributedModelParallel(module=module, device=env.device, plan=plan)
    if env.is_main:
        log.info("[%s] sharding plan: %s", spec.name, describe_plan(plan))
    written = write_tables(dmp, seed, spec.init_rows)
    if written and env.is_main:
        log.info("[%s] weight transfer: rows seeded from text per feature: %s", spec.name, written)
    optimizer, dense_opt = _make_optimizer(dmp, cfg)

    return builder, module, dmp, optimizer, dense_opt


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
    """Train one ranker; evaluate on the splits of EVAL_SPLITS; save a sharded checkpoint per epoch.

    Resumes from the newest complete checkpoint in ``out_dir/checkpoints`` if there is one.
    ``stop_after_steps`` ends the run early (after saving), for tests of resumption;
    ``on_step(global_step)`` is called after every step (fault-injection tests use it).
    """
    seed = cfg.train.seed if seed is None else seed
    out_dir = Path(out_dir)
    tc = cfg.train
    np.random.seed(seed)  # torch is seeded in build_sharded, right before the dense layers are made
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    builder, module, dmp, optimizer, dense_opt = build_sharded(cfg, ds, spec, env, seed)

    ck_dir = out_dir / "checkpoints"
    start_epoch, start_step, global_step = 0, 0, 0
    latest = ckpt.latest(ck_dir)
    if latest is not None:
        # optimizer state is created lazily; make it exist so the checkpoint can load into it
        # (a zero-gradient Adam step leaves the parameters unchanged)
        dense_opt.init_state()
        dense_opt.zero_grad()
        meta = ckpt.load(latest, dmp, optimizer)
        start_epoch, start_step, global_step = meta["epoch"], meta["step_in_epoch"], meta["global_step"]
        if env.is_main:
            log.info("[%s] resumed from %s (epoch %d, step %d)", spec.name, latest, start_epoch, start_step)

    pipeline = TrainPipelineSparseDist(dmp, optimizer, env.device)
    source = train_source(ds, cfg.data)
    spe = source.steps_per_epoch(tc.batch_size)
    if env.is_main:
        log.info(
            "[%s] %d train examples, global batch %d (%d per rank x %d ranks), %d steps/epoch, %d epochs",
            spec.name, source.num_examples, tc.batch_size, tc.batch_size // env.world_size, env.world_size, spe, tc.epochs,
        )
    history: list[dict] = []
    writer = _Logger(out_dir, spec.name) if env.is_main else None
    t_train, n_seen = 0.0, 0
    last_saved = latest  # a finished run resumed: its last checkpoint is the result
    for epoch in range(start_epoch, tc.epochs):
        dmp.train()
        it = source.batches(
            builder, tc.batch_size, env.rank, env.world_size, epoch, seed,
            start_step=start_step if epoch == start_epoch else 0, teacher_logits=spec.teacher_logits,
        )
        step = start_step if epoch == start_epoch else 0
        bar = tqdm(total=spe, initial=step, desc=f"{spec.name} epoch {epoch + 1}/{tc.epochs}", disable=None if env.is_main else True, leave=False)
        t0 = time.perf_counter()
        while True:
            try:
                out = pipeline.progress(it)
            except StopIteration:
                break
            except RuntimeError as e:  # a collective timed out or a peer died: say where
                raise RuntimeError(
                    f"[{spec.name}] rank {env.rank}/{env.world_size} failed at epoch {epoch + 1}, step {step + 1} "
                    f"(global step {global_step + 1}): {str(e).splitlines()[0][:300]}. A peer rank may have died or hung; "
                    f"collectives wait train.collective_timeout_s={tc.collective_timeout_s}s. Rerun to resume "
                    f"from the last checkpoint in {ck_dir}."
                ) from e
            step += 1
            global_step += 1
            n_seen += out[1].numel() * env.world_size
            bar.update(1)
            if writer and global_step % tc.log_every == 0:
                parts = {k: float(v) for k, v in module.last_parts.items()}
                writer.scalars(global_step, epoch, parts)
                bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()})
            if on_step is not None:
                on_step(global_step)
            stop_now = stop_after_steps is not None and global_step >= stop_after_steps
            if (tc.checkpoint_every and global_step % tc.checkpoint_every == 0 and step < spe) or stop_now:
                last_saved = ckpt.save(ck_dir, dmp, optimizer, epoch, step, global_step, tc.keep_checkpoints)
            if stop_now:
                bar.close()
                return RankerResult(spec.name, {}, last_saved)
        t_train += time.perf_counter() - t0
        bar.close()
        last_saved = ckpt.save(ck_dir, dmp, optimizer, epoch + 1, 0, global_step, tc.keep_checkpoints)
        valid = evaluate(pipeline, dmp, ds, builder, cfg, env, splits=("valid",))["valid"]
        row = {"epoch": epoch + 1, "global_step": global_step, "valid_auc": valid["auc"], "valid_logloss": valid["logloss"]}
        history.append(row)
        if writer:
            writer.epoch(row)
            log.info("[%s] epoch %d/%d: valid AUC %.4f, log loss %.4f", spec.name, epoch + 1, tc.epochs, valid["auc"], valid["logloss"])
    if spec.refit is not None and last_saved is not None:
        num_rows = {f.name: f.num_embeddings for f in ds.features}
        rows = refit_rows(last_saved, spec.refit, num_rows, cfg.student.embedding_dim)
        written = write_tables(dmp, seed, rows, reinit=False)
        if written:
            if env.is_main:
                log.info("[%s] weight transfer refit: rows of rarely seen entities set from text: %s", spec.name, written)
            last_saved = ckpt.save(ck_dir, dmp, optimizer, tc.epochs, 0, global_step, tc.keep_checkpoints)
    metrics = evaluate(pipeline, dmp, ds, builder, cfg, env)
    train_logits = _predict(pipeline, dmp, ds.splits["train"], builder, cfg, env) if want_train_logits else None
    if writer:
        writer.close()
    eps = n_seen / t_train if t_train > 0 else 0.0
    return RankerResult(spec.name, metrics, last_saved or ckpt.latest(ck_dir), train_logits, eps, history)


class _Logger:
    """Rank 0's training log: a CSV of loss parts and valid AUC, and TensorBoard scalars."""

    def __init__(self, out_dir: Path, name: str) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "train_log.csv"
        self.f = open(self.path, "a", newline="")
        self.w = csv.writer(self.f)
        if self.f.tell() == 0:
            self.w.writerow(["global_step", "epoch", "name", "value"])
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except Exception:  # pragma: no cover - tensorboard is pinned; stay usable without it
            self.tb = None

    def scalars(self, step: int, epoch: int, parts: dict) -> None:
        for k, v in parts.items():
            self.w.writerow([step, epoch, f"loss/{k}", f"{v:.6f}"])
            if self.tb:
                self.tb.add_scalar(f"loss/{k}", v, step)

    def epoch(self, row: dict) -> None:
        for k in ("valid_auc", "valid_logloss"):
            self.w.writerow([row["global_step"], row["epoch"], k, f"{row[k]:.6f}"])
            if self.tb:
                self.tb.add_scalar(k, row[k], row["global_step"])
        self.f.flush()

    def close(self) -> None:
        self.f.close()
        if self.tb:
            self.tb.close()
