"""The training pipeline, run by every rank (SPMD): data -> teacher text embeddings -> teacher
ranker -> baseline student -> distilled student -> metrics.

Each stage writes into ``cfg.output_dir`` (the run folder), which later stages and the
compression stage read. With several nodes it must be one folder all of them mount (NFS, or a
mounted object store): checked at start (:func:`~sparse_kd.run_folder.check_shared_run_folder`).
What every rank needs from another (text embeddings, rank 0's decisions) goes over the process
group, and waits on one rank's long work over :func:`~sparse_kd.dist.long_group`.

    config.yaml                  the resolved config
    data/mappings.json           raw id -> index maps and feature vocabularies (for serving)
    data/entity_dense.pt         per-user / per-item dense features
    data/text_embeddings.safetensors   teacher text embeddings, user (U, H) and item (I, H); the user
                                 rows are the click-history ones when user text is unused; none
                                 in a baseline-only run (it encodes no text)
    <variant>/model_meta.json, <variant>/checkpoints/   per trained ranker
    metrics.json, metrics.md     AUC / log loss per variant and split

:func:`run_training` is the whole pipeline; the studies compose its public steps
(:func:`prepare_data`, :func:`text_embeddings`, the ``*_spec`` builders, :func:`train_variant`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

from sparse_kd import atomic
from sparse_kd.baseline_search import baseline_candidates, choose_baseline
from sparse_kd.config import ConfigError, DistillConfig, ExperimentConfig, to_dict
from sparse_kd.data import load_dataset
from sparse_kd.data.batching import count_dense
from sparse_kd.data.heldout import write_heldout_pairs
from sparse_kd.data.schema import RecDataset
from sparse_kd.data.stream import check_logit_kd, train_source
from sparse_kd.dist import DistEnv, barrier, init_distributed, long_barrier, long_broadcast_object, on_main
from sparse_kd.distill.history import resolve_mode
from sparse_kd.distill.pairs import describe_pool, pool_batch, sample_pool
from sparse_kd.distill.transfer import fit_window, learned_map, transfer_map
from sparse_kd.run_folder import StaleRunError, check_run_folder, check_shared_run_folder
from sparse_kd.run_report import write_run_report
from sparse_kd.student.cost import ranker_cost
from sparse_kd.student.ensemble import combine, member_name, member_seed
from sparse_kd.student.export import check_fingerprint, write_model_meta
from sparse_kd.student.model import arch_of
from sparse_kd.student.spec import RankerResult, RankerSpec, RefitSpec
from sparse_kd.student.train import evaluate_checkpoint, predict_checkpoint, train_ranker
from sparse_kd.teacher_inputs import TEACHER, teacher_features, teacher_spec
from sparse_kd.teacher_source import checked_source, finished_checkpoint, reuses_teacher, source_speed
from sparse_kd.text_stage import (distilled_uses_text, items_stay_sharded, text_embeddings, user_text_for,
                                  users_stay_sharded)

log = logging.getLogger(__name__)


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
    long_barrier()  # rank 0's writes take minutes at production sizes: not inside train.collective_timeout_s
    return ds


def uses_text(cfg: ExperimentConfig, variants: tuple[str, ...]) -> bool:
    """Whether training ``variants`` needs teacher text embeddings: a baseline-only run encodes
    and holds none."""
    return TEACHER in trained_variants(cfg, variants) or ("distilled" in variants and distilled_uses_text(cfg.distill))


def _variant_dir(cfg: ExperimentConfig, name: str) -> Path:
    return Path(cfg.output_dir) / name


def train_variant(
    cfg: ExperimentConfig, ds: RecDataset, spec: RankerSpec, env: DistEnv, seed: int, want_train_logits: bool = False
) -> RankerResult:
    """Train one ranker into ``output_dir/<spec.name>`` (every rank): refuse a folder trained with
    other settings (:func:`fingerprint`), write its model_meta.json, train (resuming if a
    checkpoint is there), log the result. Used by :func:`run_training` and the studies."""
    d = _variant_dir(cfg, spec.name)
    fp = variant_fingerprint(cfg, spec.name, spec.distill, seed)
    check_on_main(env, lambda: check_fingerprint(d, fp))  # rank 0 reads, every rank stops with the same error
    if env.is_main:
        num_emb = {f.name: f.num_embeddings for f in ds.features}
        write_model_meta(d, num_emb, spec.dense_dim, (spec.arch or arch_of(cfg.student)).to_dict(), fp)
    barrier()
    t0 = time.perf_counter()
    res = train_ranker(cfg, ds, spec, d, env, seed=seed, want_train_logits=want_train_logits)
    if env.is_main:
        log.info("[%s] trained in %.1fs (%.0f examples/s); test AUC %.4f, test_cold AUC %.4f",
                 spec.name, time.perf_counter() - t0, res.examples_per_s,
                 res.metrics["test"]["auc"], res.metrics["test_cold"]["auc"])
    return res


def variant_fingerprint(cfg: ExperimentConfig, name: str, distill: DistillConfig, seed: int) -> dict:
    """The settings that change what the ranker ``name``, trained with ``distill``, produces (not
    epochs: more epochs continue)."""
    train = {k: v for k, v in to_dict(cfg.train).items() if k not in ("epochs", "checkpoint_every", "keep_checkpoints",
             "log_every", "eval_batch_size", "collective_timeout_s", "mf_reference")}
    data = {k: v for k, v in to_dict(cfg.data).items() if k != "loader_workers"}  # how batches are built, not which
    teacher = name.startswith(TEACHER)  # the study's teacher candidates and ensemble members too
    # planner: memory caps, same training; dot_logit: off (added later: runs trained before it still
    # match), or a teacher's (its architecture is its own, sparse_kd.student.model.teacher_arch)
    student = {k: v for k, v in to_dict(cfg.student).items()
               if k != "planner" and not (k == "dot_logit" and (teacher or not v))}
    # a ranker without distillation (the baseline) does not depend on the distill settings
    dist = to_dict(distill) if distill.any_enabled else {}
    if dist:  # target text (the default, added later: older runs still match); layout: where targets are held, same loss
        dist["align"] = {k: v for k, v in dist["align"].items() if k != "layout" and (k, v) != ("target", "text")}
        _drop_unset_from_run(dist["teacher_ranker"])
    fp = {"data": data, "student": student, "train": train, "seed": seed, "distill": dist}
    if teacher or distill.any_enabled:
        fp["teacher"] = {k: v for k, v in to_dict(cfg.teacher).items() if k in ("model", "max_length")}
    if teacher:
        fp["teacher_ranker"] = {"user_text": cfg.distill.user_text, **to_dict(cfg.distill.teacher_ranker)}
        del fp["teacher_ranker"]["ensemble"]  # one member is one model whatever K (its seed tells them apart)
        _drop_unset_from_run(fp["teacher_ranker"])
        if not cfg.distill.teacher_ranker.history_attention.enabled:  # added later: runs trained before it still match
            del fp["teacher_ranker"]["history_attention"]
    return fp


def _drop_unset_from_run(tr: dict) -> None:
    if not tr.get("from_run"):  # added later: runs trained before it still match
        tr.pop("from_run", None)
    tr.pop("features_layout", None)  # where the features are held, not what the teacher computes


def spec_cost(cfg: ExperimentConfig, ds: RecDataset, spec: RankerSpec, copies: int = 1) -> dict:
    """Parameters and multiply-adds per example of ``spec``'s ranker (:mod:`sparse_kd.student.cost`) x ``copies``."""
    c = ranker_cost({f.name: f.num_embeddings for f in ds.features}, spec.dense_dim, spec.arch or arch_of(cfg.student),
                    spec.pair_feature)
    return {k: v * copies if k in ("params", "table_params", "dense_params", "macs_per_example") else v for k, v in c.items()}


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
    for k in range(1, cfg.distill.teacher_ranker.ensemble if TEACHER in fps else 1):  # an ensemble's other members
        fps[member_name(TEACHER, k)] = variant_fingerprint(cfg, member_name(TEACHER, k), DistillConfig(), member_seed(seed, k))
    for name, bcfg in (baseline_candidates(cfg).items() if "baseline" in fps else ()):  # the baseline's own search
        fps[name] = variant_fingerprint(bcfg, name, DistillConfig(), seed)
    check_run_folder(cfg, fps)
    if TEACHER in fps:  # another run's teacher: same data and text, finished
        teacher_source(cfg, seed)
    if uses_text(cfg, variants):  # a baseline-only run needs no teacher model
        resolve_model_path(cfg.teacher.model, allow_pickle_weights=cfg.teacher.allow_pickle_weights)


def check_on_main(env: DistEnv, check) -> None:
    """Run ``check()`` on rank 0 only and raise the refusal it raises on every rank, so that all
    ranks stop together and only rank 0 says why (refusals: StaleRunError, TeacherModelError, ConfigError)."""
    from sparse_kd.teacher.encoder import TeacherModelError

    kinds = {"StaleRunError": StaleRunError, "TeacherModelError": TeacherModelError, "ConfigError": ConfigError}
    refusal, failure = None, None
    if env.is_main:
        try:
            check()
        except (StaleRunError, TeacherModelError, ConfigError) as e:
            refusal = (next(k for k, t in kinds.items() if isinstance(e, t)), str(e))
        except Exception as e:  # not a refusal (a bug, an unreadable disk): the other ranks must not wait
            refusal, failure = ("failure", f"rank 0 failed before training: {type(e).__name__}: {e}"), e
    refusal = long_broadcast_object(refusal)
    if failure is not None:
        raise failure
    if refusal is not None:
        if refusal[0] == "failure":
            raise RuntimeError(refusal[1])
        err = kinds[refusal[0]](refusal[1])
        err.on_every_rank = True  # the CLI lets the ranks leave together, once rank 0 has said why
        raise err


def teacher_source(cfg: ExperimentConfig, seed: int) -> Optional[ExperimentConfig]:
    """The run whose teacher ranker ``cfg`` reuses, checked (:func:`~sparse_kd.teacher_source.checked_source`)."""
    return checked_source(cfg, seed, TEACHER)


def train_teacher(cfg, ds, user_text, item_text, env: DistEnv, seed: int, name: str = TEACHER,
                  source: Optional[ExperimentConfig] = None) -> tuple[RankerResult, RankerSpec]:
    """Train the teacher ranker ``name`` (every rank), with ``distill.teacher_ranker.ensemble`` K > 1 as
    K members combined (:mod:`sparse_kd.student.ensemble`). Returns (result, member 0's spec).

    With ``distill.teacher_ranker.from_run`` nothing is trained: the teacher another run trained is
    read from its folder (``source``, :func:`teacher_source`; looked up here when not given), each
    member evaluated from its final checkpoint."""
    src = source if source is not None or not reuses_teacher(cfg) else on_main(lambda: teacher_source(cfg, seed))
    tcfg = src or cfg
    if src is not None:
        name, seed = TEACHER, src.train.seed  # the source's teacher, with its own seed
    members, features = [], teacher_features(tcfg, ds, user_text, item_text, env.world_size)  # one copy for every member
    # the source recorded the whole teacher's speed; members train one after the other, so each
    # member's is K times it (what the ensemble's combination expects)
    speed = on_main(lambda: source_speed(src)) * tcfg.distill.teacher_ranker.ensemble if src is not None else 0.0
    for k in range(tcfg.distill.teacher_ranker.ensemble):
        spec = teacher_spec(tcfg, ds, user_text, item_text, name=member_name(name, k), features=features,
                            world_size=env.world_size)  # a fresh model each
        if src is None:
            res = train_variant(cfg, ds, spec, env, member_seed(seed, k), want_train_logits=True)
        else:
            res = _reused_member(src, ds, spec, env, member_seed(seed, k), speed)
        members.append((res, spec))
    if len(members) == 1:
        return members[0]
    return combine(name, members, ds), members[0][1]


def _reused_member(src: ExperimentConfig, ds: RecDataset, spec: RankerSpec, env: DistEnv, seed: int,
                   speed: float) -> RankerResult:
    """One member of a reused teacher, evaluated from the final checkpoint in the source folder (which
    must match the source's config: :func:`variant_fingerprint`); nothing there is written."""
    d = _variant_dir(src, spec.name)
    fp = variant_fingerprint(src, spec.name, DistillConfig(), seed)

    def final() -> Path:
        check_fingerprint(d, fp)
        return finished_checkpoint(src, spec.name)

    checkpoint = on_main(final)
    res = evaluate_checkpoint(src, ds, spec, checkpoint, env, seed, speed)
    if env.is_main:
        log.info("[%s] reused from %s (not trained here): test AUC %.4f, test_cold AUC %.4f", spec.name, checkpoint,
                 res.metrics["test"]["auc"], res.metrics["test_cold"]["auc"])
    return res


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
        members = teacher.members or [(teacher_ranker_spec, teacher.checkpoint)]  # an ensemble: its mean logit
        spec.kd_pool_logits = torch.stack([predict_checkpoint(cfg, ds, s, c, pool, env, seed) for s, c in members]).mean(0)
        if env.is_main:
            log.info("[%s] sampled-pair KD pool: %s", name, describe_pool(ds, pool))
    if dc.align.enabled and dc.align.target == "teacher":
        if teacher is None:
            raise ValueError(f"{name}: distill.align.target 'teacher' needs the trained teacher ranker's rows; "
                             "train it first (run_training does)")
        spec.user_text, spec.item_text = _teacher_rows(cfg, teacher)
    elif dc.align.enabled:
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
        texts = {f: user_text if f == "user_id" else item_text for f in tr.features}
        warm = {f: torch.from_numpy((user_counts if f == "user_id" else item_counts) > 0) for f in tr.features}
        maps = {}
        if tr.projection == "learned":
            if teacher is None:
                raise ValueError(f"{name}: distill.transfer.projection 'learned' needs the trained teacher ranker; "
                                 "train it first (run_training does)")
            maps = _learned_maps(cfg, ds, teacher, texts, warm)
        # users given by their click history live in the item-text space: project them on the
        # items' PCA basis, so seeded user . item products follow history . item similarity
        shared = resolve_mode(dc.user_text, ds) == "history"
        for f in tr.features:
            basis = item_text if (f == "user_id" and shared) else None
            # rows are computed when a rank writes its own shards: no rank holds (N, D) of them
            spec.init_rows[f] = transfer_map(texts[f], cfg.student.embedding_dim, tr.projection, tr.scale, maps.get(f),
                                             basis_text=basis)
    return spec


def _learned_maps(cfg: ExperimentConfig, ds: RecDataset, teacher: RankerResult, texts: dict, warm: dict) -> dict:
    """feature -> the ``learned`` transfer map, fitted on rank 0 from the teacher ranker's table of
    that feature alone (read from its checkpoint, verified once) and sent to every rank. Text rows
    split over the ranks are fitted where they lie, each rank reading the teacher's rows of its share (a collective)."""
    from sparse_kd.student.refit import read_table

    split = sorted(f for f in texts if getattr(texts[f], "sharded", False))
    path = on_main(lambda: _teacher_checkpoint(cfg, teacher))
    maps = on_main(lambda: {f: learned_map(texts[f], read_table(path, f), warm[f]) for f in texts if f not in split})
    for f in split:  # each rank reads the teacher's rows of the entities whose text it holds
        r0, r1 = fit_window(texts[f], warm[f])
        maps[f] = learned_map(texts[f], read_table(path, f, (r0, r1)), warm[f], r0)
    return maps


def _teacher_checkpoint(cfg: ExperimentConfig, teacher: RankerResult):
    """The teacher ranker's checkpoint (its result's, or the newest complete one), verified."""
    from sparse_kd import checkpoint as ckpt

    path = teacher.checkpoint or ckpt.latest(_variant_dir(cfg, TEACHER) / "checkpoints")
    if path is None:
        raise FileNotFoundError(f"{_variant_dir(cfg, TEACHER) / 'checkpoints'}: no complete checkpoint of the teacher ranker")
    ckpt.verify(path)
    return path


def _teacher_rows(cfg: ExperimentConfig, teacher: RankerResult) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher ranker's user_id and item_id rows (U, Dt), (I, Dt), read on rank 0 from its
    checkpoint (verified once) and sent to every rank: hint targets for ``distill.align``."""
    from sparse_kd.student.refit import read_table

    def read() -> tuple:
        path = _teacher_checkpoint(cfg, teacher)
        return read_table(path, "user_id"), read_table(path, "item_id")

    return on_main(read)


def needs_teacher_ranker(cfg: ExperimentConfig) -> bool:
    t = cfg.distill
    return (t.logit.enabled or t.pairs.enabled or (t.transfer.enabled and t.transfer.projection == "learned")
            or (t.align.enabled and t.align.target == "teacher"))


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
    check_shared_run_folder(cfg.output_dir)  # multi-node: every rank must see the folder rank 0 writes
    ds = prepare_data(cfg, env)
    user_text = item_text = t_spec = teacher = None
    # another run's teacher (distill.teacher_ranker.from_run), read once
    source = on_main(lambda: teacher_source(cfg, seed)) if TEACHER in trained_variants(cfg, variants) else None
    if uses_text(cfg, variants):  # a baseline-only run encodes and holds no text
        teachers = [source] if source is not None else []  # what a reused teacher reads too
        user_text, item_text = text_embeddings(cfg, ds, env, shard_users=users_stay_sharded(cfg, ds, env.world_size, teachers),
                                               shard_items=items_stay_sharded(cfg, ds, env.world_size, teachers))
        user_text = user_text_for(cfg, ds, user_text, item_text, env)
    results: dict[str, RankerResult] = {}
    costs: dict[str, dict] = {}  # what each ranker costs (parameters, multiply-adds per example)
    if TEACHER in trained_variants(cfg, variants):
        teacher, t_spec = train_teacher(cfg, ds, user_text, item_text, env, seed, source=source)
        results[TEACHER], costs[TEACHER] = teacher, spec_cost(cfg, ds, t_spec, len(teacher.members) or 1)
    if not ("distilled" in variants and distilled_uses_text(cfg.distill)):
        user_text = item_text = None  # the teacher ranker keeps only its PCA features of them
    if not ("distilled" in variants and cfg.distill.pairs.enabled):
        t_spec = None
    search = None
    if "baseline" in variants:
        b_spec = baseline_spec(ds)
        results["baseline"], costs["baseline"] = train_variant(cfg, ds, b_spec, env, seed), spec_cost(cfg, ds, b_spec)
        if cfg.study.baseline_search:  # its own training settings searched; the best on valid is the baseline
            found = {"baseline": results["baseline"]}
            for name, bcfg in baseline_candidates(cfg).items():
                found[name] = train_variant(bcfg, ds, baseline_spec(ds, name), env, seed)
            search = choose_baseline(cfg, {n: r.metrics for n, r in found.items()})
            results["baseline"] = found[search["chosen"]]
            if env.is_main:
                log.info("baseline chosen on valid AUC: %s (%s)", search["chosen"],
                         ", ".join(f"{n} {a:.4f}" for n, a in search["valid_auc"].items()))
    if "distilled" in variants:
        spec = distilled_spec(cfg, ds, user_text, item_text, teacher, teacher_ranker_spec=t_spec, env=env, seed=seed)
        results["distilled"], costs["distilled"] = train_variant(cfg, ds, spec, env, seed), spec_cost(cfg, ds, spec)
    metrics = {name: r.metrics for name, r in results.items()}
    if env.is_main:  # with train.mf_reference rank 0 also trains the outside reference: the others wait below
        write_run_report(cfg, ds, env.world_size, seed, results, costs, search)
    return long_broadcast_object(metrics)
