"""The training pipeline, run by every rank (SPMD): data -> teacher text embeddings -> teacher
ranker -> baseline student -> distilled student -> metrics.

Each stage writes into ``cfg.output_dir`` (the run folder), which later stages and the
compression stage read:

    config.yaml                  the resolved config
    data/mappings.json           raw id -> index maps and feature vocabularies (for serving)
    data/entity_dense.pt         per-user / per-item dense features
    data/text_embeddings.safetensors   teacher text embeddings, user (U, H) and item (I, H)
    <variant>/model_meta.json, <variant>/checkpoints/   per trained ranker
    metrics.json, metrics.md     AUC / log loss per variant and split

:func:`run_training` is the whole pipeline; the studies compose its public steps
(:func:`prepare_data`, :func:`text_embeddings`, the ``*_spec`` builders, :func:`train_variant`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch
import yaml
from safetensors.torch import load_file, save_file

from sparse_kd import atomic
from sparse_kd.config import DistillConfig, ExperimentConfig, to_dict
from sparse_kd.data import load_dataset
from sparse_kd.data.batching import count_dense
from sparse_kd.data.schema import RecDataset
from sparse_kd.data.stream import check_logit_kd, train_source
from sparse_kd.dist import DistEnv, barrier, broadcast_object, init_distributed
from sparse_kd.distill.history import HistoryPairFeature, resolve_mode, resolve_user_text
from sparse_kd.distill.pairs import describe_pool, pool_batch, sample_pool
from sparse_kd.distill.transfer import pca_reduce, transfer_rows
from sparse_kd.report import metrics_table
from sparse_kd.run_folder import StaleRunError, check_run_folder
from sparse_kd.student.export import check_fingerprint, load_dlrm, write_model_meta
from sparse_kd.student.spec import RankerResult, RankerSpec, RefitSpec
from sparse_kd.student.train import predict_checkpoint, train_ranker

log = logging.getLogger(__name__)

TEACHER = "teacher_ranker"


def prepare_data(cfg: ExperimentConfig, env: DistEnv) -> RecDataset:
    """Load the dataset (every rank, deterministically) and write the run's data folder (rank 0)."""
    t0 = time.perf_counter()
    ds = load_dataset(cfg.data)
    check_logit_kd(cfg.distill.logit.enabled, ds.sampler is not None)
    out = Path(cfg.output_dir)
    if env.is_main:
        (out / "data").mkdir(parents=True, exist_ok=True)
        atomic.write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        with atomic.replacing(out / "data" / "mappings.json") as tmp:
            ds.save_mappings(tmp)
        ub, ib = count_dense(ds)
        with atomic.replacing(out / "data" / "entity_dense.pt") as tmp:
            torch.save({"user": ub, "item": ib}, tmp)
        with atomic.replacing(out / "data" / "heldout_pairs.csv") as tmp:
            write_heldout_pairs(ds, tmp)
        s = ds.summary()
        log.info(
            "data: %d users, %d items, features %s; splits %s (%.1fs)",
            s["users"], s["items"], s["features"],
            {k: v["n"] for k, v in s["splits"].items()}, time.perf_counter() - t0,
        )
        skipped = {k: ds.report[k] for k in ("dropped", "truncated_texts", "blank_lines", "empty_user_text", "ignored_columns")
                   if ds.report.get(k)}
        log.info("data: skipped or changed while loading: %s (also in metrics.json data_report)", skipped or "nothing")
    barrier()
    return ds


def write_heldout_pairs(ds: RecDataset, path: Path) -> None:
    """The test and test_cold interactions as raw-id CSV (split,user_id,item_id,label), so a serving
    process can score them without the data loaders."""
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["split", "user_id", "item_id", "label"])
        for split in ("test", "test_cold"):
            sp = ds.splits[split]
            for u, i, y in zip(sp.user, sp.item, sp.label):
                w.writerow([split, ds.user_ids[u], ds.item_ids[i], int(y)])


def text_embeddings(cfg: ExperimentConfig, ds: RecDataset, env: DistEnv) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher embeddings of user and item text: rank 0 encodes (or reads the cache), the others
    read the file it writes. Returns user (U, H), item (I, H)."""
    from sparse_kd.teacher import encode_texts

    path = Path(cfg.output_dir) / "data" / "text_embeddings.safetensors"
    if env.is_main:
        item = encode_texts(cfg.teacher, ds.item_text, "items")
        user = encode_texts(cfg.teacher, ds.user_text, "users")
        with atomic.replacing(path) as tmp:
            save_file({"user": user.contiguous(), "item": item.contiguous()}, str(tmp))
    barrier()
    t = load_file(str(path))
    return t["user"], t["item"]


def _variant_dir(cfg: ExperimentConfig, name: str) -> Path:
    return Path(cfg.output_dir) / name


def train_variant(
    cfg: ExperimentConfig, ds: RecDataset, spec: RankerSpec, env: DistEnv, seed: int, want_train_logits: bool = False
) -> RankerResult:
    """Train one ranker into ``output_dir/<spec.name>`` (every rank): refuse a folder trained with
    other settings (:func:`fingerprint`), write its model_meta.json, train (resuming if a
    checkpoint is there), log the result. Used by :func:`run_training` and the studies."""
    d = _variant_dir(cfg, spec.name)
    fp = fingerprint(cfg, spec, seed)
    check_fingerprint(d, fp)  # every rank, so all of them stop with the same error
    if env.is_main:
        num_emb = {f.name: f.num_embeddings for f in ds.features}
        write_model_meta(d, num_emb, spec.dense_dim, to_dict(cfg.student), fp)
    barrier()
    t0 = time.perf_counter()
    res = train_ranker(cfg, ds, spec, d, env, seed=seed, want_train_logits=want_train_logits)
    if env.is_main:
        log.info("[%s] trained in %.1fs (%.0f examples/s); test AUC %.4f, test_cold AUC %.4f",
                 spec.name, time.perf_counter() - t0, res.examples_per_s,
                 res.metrics["test"]["auc"], res.metrics["test_cold"]["auc"])
    return res


def fingerprint(cfg: ExperimentConfig, spec: RankerSpec, seed: int) -> dict:
    """The settings that change what a ranker's training produces (not epochs: more epochs continue)."""
    return variant_fingerprint(cfg, spec.name, spec.distill, seed)


def variant_fingerprint(cfg: ExperimentConfig, name: str, distill: DistillConfig, seed: int) -> dict:
    """:func:`fingerprint` of the ranker ``name`` trained with ``distill``."""
    train = {k: v for k, v in to_dict(cfg.train).items() if k not in ("epochs", "checkpoint_every", "keep_checkpoints", "log_every", "eval_batch_size", "collective_timeout_s")}
    data = {k: v for k, v in to_dict(cfg.data).items() if k != "loader_workers"}  # how batches are built, not which
    student = {k: v for k, v in to_dict(cfg.student).items() if k != "planner"}  # memory caps: same training
    # a ranker without distillation (the baseline) does not depend on the distill settings
    fp = {"data": data, "student": student, "train": train, "seed": seed, "distill": to_dict(distill) if distill.any_enabled else {}}
    if name == TEACHER or distill.any_enabled:
        fp["teacher"] = {k: v for k, v in to_dict(cfg.teacher).items() if k in ("model", "max_length")}
    if name == TEACHER:
        fp["teacher_ranker"] = {"user_text": cfg.distill.user_text, **to_dict(cfg.distill.teacher_ranker)}
    return fp


def baseline_spec(ds: RecDataset, name: str = "baseline") -> RankerSpec:
    """The student without distillation: entity counts as dense features, nothing from text."""
    ub, ib = count_dense(ds)
    return RankerSpec(name, ub, ib)


def trained_variants(cfg: ExperimentConfig, variants: tuple[str, ...]) -> list[str]:
    """The rankers :func:`run_training` trains for ``variants``, in order (the teacher ranker is
    added when a distillation method needs it)."""
    out = [TEACHER] if TEACHER in variants or ("distilled" in variants and needs_teacher_ranker(cfg)) else []
    return out + [v for v in ("baseline", "distilled") if v in variants]


def check_before_training(cfg: ExperimentConfig, variants: tuple[str, ...] = (TEACHER, "baseline", "distilled"),
                          seed: Optional[int] = None) -> None:
    """Everything that refuses a training command, decided before anything is written (reads only):
    the run folder must hold this experiment or nothing (:class:`StaleRunError`) and the teacher
    model must load (:class:`~sparse_kd.teacher.encoder.TeacherModelError`)."""
    from sparse_kd.teacher.encoder import resolve_model_path

    seed = cfg.train.seed if seed is None else seed
    fps = {v: variant_fingerprint(cfg, v, cfg.distill if v == "distilled" else DistillConfig(), seed)
           for v in trained_variants(cfg, variants)}
    check_run_folder(cfg, fps)
    resolve_model_path(cfg.teacher.model, allow_pickle_weights=cfg.teacher.allow_pickle_weights)


def check_on_main(env: DistEnv, check) -> None:
    """Run ``check()`` on rank 0 only and raise the refusal it raises on every rank, so that all
    ranks stop together and only rank 0 says why (refusals: StaleRunError, TeacherModelError)."""
    from sparse_kd.teacher.encoder import TeacherModelError

    kinds = {"StaleRunError": StaleRunError, "TeacherModelError": TeacherModelError}
    refusal, failure = None, None
    if env.is_main:
        try:
            check()
        except (StaleRunError, TeacherModelError) as e:
            refusal = (type(e).__name__, str(e))
        except Exception as e:  # not a refusal (a bug, an unreadable disk): the other ranks must not wait
            refusal, failure = ("failure", f"rank 0 failed before training: {type(e).__name__}: {e}"), e
    refusal = broadcast_object(refusal)
    if failure is not None:
        raise failure
    if refusal is not None:
        if refusal[0] == "failure":
            raise RuntimeError(refusal[1])
        err = kinds[refusal[0]](refusal[1])
        err.on_every_rank = True  # the CLI lets the ranks leave together, once rank 0 has said why
        raise err


def user_text_for(cfg: ExperimentConfig, ds: RecDataset, user_text: torch.Tensor, item_text: torch.Tensor,
                  env: Optional[DistEnv] = None) -> torch.Tensor:
    """What stands for user text in the teacher ranker and the distillation methods
    (``distill.user_text``: the users' own text, or their train-click history; see
    :mod:`sparse_kd.distill.history`). (U, H) or (U, 2H) for ``both``."""
    emb, mode = resolve_user_text(cfg.distill.user_text, ds, user_text, item_text)
    if env is None or env.is_main:
        log.info("user text: %s (distill.user_text=%s)", {"text": "the users' own text", "history": "mean teacher embedding "
                 "of each user's train clicks", "both": "own text and train-click history"}[mode], cfg.distill.user_text)
    return emb


def teacher_spec(cfg, ds, user_text, item_text) -> RankerSpec:
    """The teacher ranker sees the students' inputs plus PCA-reduced text embeddings as dense features
    (``user_text`` as given by :func:`user_text_for`), and with ``distill.teacher_ranker.history_pair``
    the user-item history similarity (:class:`~sparse_kd.distill.history.HistoryPairFeature`)."""
    ub, ib = count_dense(ds)
    k = cfg.student.teacher_text_dim
    spec = RankerSpec(TEACHER, torch.cat([ub, pca_reduce(user_text, k)], 1), torch.cat([ib, pca_reduce(item_text, k)], 1))
    if cfg.distill.teacher_ranker.history_pair:
        spec.pair_feature = HistoryPairFeature(ds, item_text)
    return spec


def distilled_spec(cfg, ds, user_text, item_text, teacher: Optional[RankerResult], name: str = "distilled",
                   teacher_ranker_spec: Optional[RankerSpec] = None, env: Optional[DistEnv] = None, seed: int = 0) -> RankerSpec:
    """A distilled student: ``cfg.distill``'s methods, fed by the teacher ranker's result.

    ``distill.pairs`` also needs the teacher's spec, ``env`` and ``seed``: the teacher scores the
    sampled pool from its checkpoint (a collective: call on every rank)."""
    ub, ib = count_dense(ds)
    dc = cfg.distill
    spec = RankerSpec(name, ub, ib, distill=dc)
    if dc.logit.enabled:
        if teacher is None or teacher.train_logits is None:
            raise ValueError(f"{name}: distill.logit needs the teacher ranker's train logits; train it first "
                             "(it is trained automatically by run_training)")
        spec.teacher_logits = teacher.train_logits
    if dc.pairs.enabled:
        if teacher is None or teacher.checkpoint is None or teacher_ranker_spec is None or env is None:
            raise ValueError("distill.pairs needs the trained teacher ranker (its result, spec and checkpoint) and the DistEnv")
        steps = train_source(ds, cfg.data).steps_per_epoch(cfg.train.batch_size)  # sampled negatives included
        pool = sample_pool(ds, dc.pairs, steps * pool_batch(dc.pairs, cfg.train.batch_size), seed)
        spec.kd_pool = pool
        spec.kd_pool_logits = predict_checkpoint(cfg, ds, teacher_ranker_spec, teacher.checkpoint, pool, env, seed)
        if env.is_main:
            log.info("[%s] sampled-pair KD pool: %s", name, describe_pool(ds, pool))
    if dc.align.enabled:
        spec.user_text, spec.item_text = user_text, item_text
    user_counts, item_counts = ds.train_counts()
    if dc.transfer.enabled and dc.transfer.refit:
        feats = dc.transfer.refit_features
        spec.refit = RefitSpec(
            text={f: (user_text if f == "user_id" else item_text) for f in feats},
            counts={f: user_counts if f == "user_id" else item_counts for f in feats},
            min_count=dc.transfer.refit_min_count,
            l2=dc.transfer.ridge_l2,
        )
    if dc.transfer.enabled and dc.transfer.init:
        tr = dc.transfer
        teacher_tables = None
        if tr.projection == "learned":
            if teacher is None:
                raise ValueError(f"{name}: distill.transfer.projection 'learned' needs the trained teacher ranker; "
                                 "train it first (run_training does)")
            teacher_tables = load_dlrm(_variant_dir(cfg, TEACHER)).sparse_arch.embedding_bag_collection.embedding_bags
        # users given by their click history live in the item-text space: project them on the
        # items' PCA basis, so seeded user . item products follow history . item similarity
        shared = resolve_mode(dc.user_text, ds) == "history"
        for f in tr.features:
            text = user_text if f == "user_id" else item_text
            warm = torch.from_numpy((user_counts if f == "user_id" else item_counts) > 0)
            trows = teacher_tables[f"t_{f}"].weight.detach() if teacher_tables is not None else None
            basis = item_text if (f == "user_id" and shared) else None
            spec.init_rows[f] = transfer_rows(text, cfg.student.embedding_dim, tr.projection, tr.scale, trows, warm,
                                              basis_text=basis)
    return spec


def needs_teacher_ranker(cfg: ExperimentConfig) -> bool:
    t = cfg.distill
    return t.logit.enabled or t.pairs.enabled or (t.transfer.enabled and t.transfer.projection == "learned")


def run_training(cfg: ExperimentConfig, variants: tuple[str, ...] = (TEACHER, "baseline", "distilled"), seed: Optional[int] = None) -> dict:
    """Train the requested variants on every rank; rank 0 writes metrics.json / metrics.md.

    Refusals (a run folder of another experiment, a teacher model that cannot load) are decided
    on rank 0 before anything is written and raised on every rank (:func:`check_before_training`).

    The teacher ranker is trained whenever it is requested or a distillation method needs it.
    Returns {variant: {split: {auc, logloss, n}}} (on every rank).
    """
    env = init_distributed(cfg.train.backend, cfg.train.collective_timeout_s)
    seed = cfg.train.seed if seed is None else seed
    check_on_main(env, lambda: check_before_training(cfg, variants, seed))
    ds = prepare_data(cfg, env)
    user_text, item_text = text_embeddings(cfg, ds, env)
    user_text = user_text_for(cfg, ds, user_text, item_text, env)
    results: dict[str, RankerResult] = {}
    teacher = None
    t_spec = teacher_spec(cfg, ds, user_text, item_text)
    if TEACHER in variants or ("distilled" in variants and needs_teacher_ranker(cfg)):
        teacher = train_variant(cfg, ds, t_spec, env, seed, want_train_logits=True)
        results[TEACHER] = teacher
    if "baseline" in variants:
        results["baseline"] = train_variant(cfg, ds, baseline_spec(ds), env, seed)
    if "distilled" in variants:
        spec = distilled_spec(cfg, ds, user_text, item_text, teacher, teacher_ranker_spec=t_spec, env=env, seed=seed)
        results["distilled"] = train_variant(cfg, ds, spec, env, seed)
    metrics = {name: r.metrics for name, r in results.items()}
    if env.is_main:
        doc = {
            "config": to_dict(cfg),
            "seed": seed,
            "world_size": env.world_size,
            "data": ds.summary(),
            "data_report": ds.report,
            "metrics": metrics,
            "examples_per_s": {n: r.examples_per_s for n, r in results.items()},
            "history": {n: r.history for n, r in results.items()},
        }
        out = Path(cfg.output_dir)
        atomic.write_text(out / "metrics.json", json.dumps(doc, indent=1))
        table = metrics_table(metrics)
        atomic.write_text(out / "metrics.md", table + "\n")
        print("\n" + table + "\n", flush=True)
    return broadcast_object(metrics)
