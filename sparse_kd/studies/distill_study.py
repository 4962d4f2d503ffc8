"""Distillation study: baseline vs each distillation method alone vs the combination vs the
student chosen on valid, over seeds.

``run_seed`` (SPMD, every rank) trains the teacher ranker once and then every variant of
``study.variants`` and every candidate of ``study.search`` into ``output_dir/seed_<s>/``;
``summarize`` (one process) reads the per-seed metrics and writes
``docs/distill_study_<name>.md`` / ``.json``: mean and spread per variant, per-seed deltas
against the baseline, and whether each target is met.

Seeds: study seed s sets both ``train.seed`` and ``data.seed`` to s (so the cold items, and
any seeded part of the split, change with the seed as well as the initialisation and order).

Variants: ``baseline`` (no distillation), ``logit`` / ``pairs`` / ``align`` / ``transfer`` (that
method alone, with its settings from the config), ``combined`` (every method enabled in the
config). ``chosen``: per seed, among ``combined`` and the ``study.search`` candidates (each a
list of ``distill.*`` overrides on top of the config), the one with the best selection score
on validation data only (with ``study.choose_among_variants``, the single-method variants
compete too): the mean AUC over the validation splits of ``study.select_on``
(default both of :data:`SELECT_SPLITS`) that the dataset has. Test splits are never looked at
to choose.

Outside reference (``study.mf_reference``, on by default): per seed, plain matrix factorisation
with biases on the same splits (:mod:`sparse_kd.mf_reference`, ``student.embedding_dim``
dims, its lr x weight_decay grid and best epoch chosen on valid), trained by rank 0 after the
rankers while the other ranks wait on the long-wait group (:func:`sparse_kd.dist.on_main`). It is
the row ``mf_reference`` of the quality table, and a target: the baseline at or above it on valid
and on test, every seed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np

from sparse_kd.atomic import write_text
from sparse_kd.config import DistillConfig, ExperimentConfig, replace, to_dict
from sparse_kd.dist import on_main
from sparse_kd.run_folder import check_shared_run_folder
from sparse_kd.student.ensemble import member_name, member_seed
from sparse_kd.metrics import EVAL_SPLITS as SPLITS

log = logging.getLogger(__name__)

METHODS = ("logit", "pairs", "align", "transfer")
SELECT_SPLITS = ("valid", "valid_cold")  # splits the choice is made on, where the dataset has them
# targets of the study (issue 10): chosen student against the baseline, on test and test_cold
# (issue 21: and the baseline at or above the MF reference on MF_TARGET_SPLITS, every seed)
MF_TARGET_SPLITS = ("valid", "test")
TARGET_TEST_GAIN = 0.005
TARGET_TEACHER_SHARE = 0.5
TARGET_COLD_GAIN = 0.03
TARGET_TEACHER_GAIN = 0.010  # issue 21: the teacher ranker's mean test gain over the baseline (ml-1m-text)


def variant_distill(cfg: ExperimentConfig, variant: str):
    """The ``distill`` section of one study variant."""
    d = cfg.distill
    off = dataclasses.replace(d, **{m: dataclasses.replace(getattr(d, m), enabled=False) for m in METHODS})
    if variant == "baseline":
        return off
    if variant == "combined":
        return d
    if variant in METHODS:
        return dataclasses.replace(off, **{variant: dataclasses.replace(getattr(d, variant), enabled=True)})
    raise ValueError(f"study.variants: unknown variant {variant!r}; expected baseline, {', '.join(METHODS)}, combined")


def baseline_candidate(cfg: ExperimentConfig, overrides) -> ExperimentConfig:
    """The config of one ``study.baseline_search`` candidate: its ``train.*`` overrides, and the
    baseline's distill section (every method off), whatever the config's own distill section says."""
    c = replace(cfg, list(overrides))
    return dataclasses.replace(c, distill=variant_distill(c, "baseline"))


def teacher_candidates(cfg: ExperimentConfig) -> dict[str, tuple[ExperimentConfig, list[str]]]:
    """The teacher ranker as configured and each ``study.teacher_search`` candidate (``train.*`` /
    ``distill.teacher_ranker.*`` overrides): name -> (config, overrides)."""
    from sparse_kd import pipeline as P

    out = {P.TEACHER: (cfg, [])}
    for i, ovs in enumerate(cfg.study.teacher_search):
        out[f"{P.TEACHER}_search_{i}"] = (replace(cfg, list(ovs)), list(ovs))
    return out


def candidates(cfg: ExperimentConfig) -> dict[str, tuple[ExperimentConfig, list[str]]]:
    """``combined`` and the ``study.search`` candidates: name -> (config, overrides); candidates
    whose distill settings equal an earlier one's are left out."""
    out = {"combined": (cfg, [])}
    seen = [to_dict(cfg.distill)]
    for i, ovs in enumerate(cfg.study.search):
        c = replace(cfg, list(ovs))
        if to_dict(c.distill) in seen:
            continue
        seen.append(to_dict(c.distill))
        out[f"search_{i}"] = (c, list(ovs))
    return out


def selection_score(metrics: dict, select_on: tuple[str, ...] = SELECT_SPLITS) -> float:
    """Mean AUC over the validation splits of ``select_on`` present (non-empty, defined) in ``metrics``."""
    bad = [s for s in select_on if s not in SELECT_SPLITS]
    if bad:
        raise ValueError(f"select_on: {bad} are not validation splits ({', '.join(SELECT_SPLITS)})")
    vals = [metrics[s]["auc"] for s in select_on if s in metrics and not math.isnan(metrics[s]["auc"])]
    return float(np.mean(vals)) if vals else float("nan")


def choice_scores(cfg: ExperimentConfig, metrics: dict, cands: dict[str, list[str]]
                  ) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Selection scores of everything ``chosen`` may be (``metrics``: name -> split metrics):
    the candidates (name -> overrides, ``combined`` first), then, with
    ``study.choose_among_variants``, each single-method variant of the study. Returns (scores,
    name -> overrides or a description)."""
    scores = {n: selection_score(metrics[n], cfg.study.select_on) for n in cands}
    overrides = dict(cands)
    if cfg.study.choose_among_variants:  # after the candidates: ties keep combined / the search
        for v in cfg.study.variants:
            if v in METHODS and v not in scores and v in metrics:
                scores[v] = selection_score(metrics[v], cfg.study.select_on)
                overrides[v] = [f"(study variant: {v} alone)"]
    return scores, overrides


def choose(scores: dict[str, float]) -> str:
    """The candidate with the highest score (ties: the earliest, i.e. ``combined`` first)."""
    best, best_s = None, -math.inf
    for name, s in scores.items():
        if not math.isnan(s) and s > best_s:
            best, best_s = name, s
    return best if best is not None else next(iter(scores))


def seed_config(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    return dataclasses.replace(cfg, output_dir=str(seed_dir(cfg, seed)), train=dataclasses.replace(cfg.train, seed=seed),
                               data=dataclasses.replace(cfg.data, seed=seed))


def seed_dir(cfg: ExperimentConfig, seed: int) -> Path:
    return Path(cfg.output_dir) / f"seed_{seed}"


def check_seed(cfg: ExperimentConfig, seed: int) -> None:
    """Raise StaleRunError, before anything is written, if ``seed_dir(cfg, seed)`` holds a study
    trained with other settings (see :mod:`sparse_kd.run_folder`): the teacher ranker, every
    variant and every search candidate."""
    from sparse_kd import pipeline as P

    cfg = seed_config(cfg, seed)
    fps = {v: P.variant_fingerprint(cfg, v, DistillConfig() if v in (P.TEACHER, "baseline") else variant_distill(cfg, v), seed)
           for v in (P.TEACHER, *cfg.study.variants)}
    for name, (ccfg, _) in candidates(cfg).items():
        fps.setdefault(name, P.variant_fingerprint(ccfg, name, ccfg.distill, seed))
    for i, ovs in enumerate(cfg.study.baseline_search):
        bcfg = baseline_candidate(cfg, ovs)
        fps[f"baseline_search_{i}"] = P.variant_fingerprint(bcfg, f"baseline_search_{i}", bcfg.distill, seed)
    for name, (tcfg, _) in teacher_candidates(cfg).items():  # every member of an ensemble teacher
        for k in range(tcfg.distill.teacher_ranker.ensemble):
            fps[member_name(name, k)] = P.variant_fingerprint(tcfg, member_name(name, k), DistillConfig(), member_seed(seed, k))
    P.check_run_folder(cfg, fps)
    P.teacher_source(cfg, seed)  # another run's teacher (distill.teacher_ranker.from_run): same data and text, finished


def run_seed(cfg: ExperimentConfig, seed: int) -> dict:
    """Train teacher ranker + every study variant + every search candidate for one seed.
    Returns {variant: metrics, ..., "search": {...}}."""
    from sparse_kd import pipeline as P
    from sparse_kd.dist import init_distributed

    study_cfg, cfg = cfg, seed_config(cfg, seed)
    env = init_distributed(cfg.train.backend, cfg.train.collective_timeout_s)
    P.check_on_main(env, lambda: check_seed(study_cfg, seed))
    check_shared_run_folder(cfg.output_dir)  # multi-node: every rank must see the folder rank 0 writes
    ds = P.prepare_data(cfg, env)
    source = on_main(lambda: P.teacher_source(cfg, seed))  # another run's teacher, read once (None: trained here)
    teachers = [t for t, _ in teacher_candidates(cfg).values()] + ([source] if source is not None else [])
    user_text, item_text = P.text_embeddings(cfg, ds, env, shard_users=P.users_stay_sharded(cfg, ds, env.world_size, teachers),
                                             shard_items=P.items_stay_sharded(cfg, ds, env.world_size, teachers))
    user_text = P.user_text_for(cfg, ds, user_text, item_text, env)
    out: dict = {}
    teacher, t_spec = train_teacher(cfg, ds, user_text, item_text, env, seed, out, source)
    speed = {P.TEACHER: teacher.examples_per_s}  # training examples/s of each ranker

    def train(vcfg: ExperimentConfig, name: str) -> dict:
        if not vcfg.distill.any_enabled:
            spec = P.baseline_spec(ds, name=name)
        else:
            spec = P.distilled_spec(vcfg, ds, user_text, item_text, teacher, name=name, teacher_ranker_spec=t_spec,
                                    env=env, seed=seed)
        res = P.train_variant(vcfg, ds, spec, env, seed)
        speed[name] = res.examples_per_s
        return res.metrics

    for v in cfg.study.variants:
        out[v] = train(dataclasses.replace(cfg, distill=variant_distill(cfg, v)), v)
    cands = candidates(cfg)
    for name, (ccfg, _) in cands.items():
        if name not in out:
            out[name] = train(ccfg, name)  # cfg is already this seed's, so each candidate is too
    scores, overrides = choice_scores(cfg, out, {n: ov for n, (_, ov) in cands.items()})
    chosen = choose(scores)
    out["chosen"] = out[chosen]
    if cfg.study.baseline_search and "baseline" in out:  # the baseline gets a search of its own
        b_cands = {"baseline_default": []}
        out["baseline_default"] = out["baseline"]
        for i, ovs in enumerate(cfg.study.baseline_search):
            out[f"baseline_search_{i}"] = train(baseline_candidate(cfg, ovs), f"baseline_search_{i}")
            b_cands[f"baseline_search_{i}"] = list(ovs)
        b_scores = {n: selection_score(out[n], tuple(cfg.study.select_on)) for n in b_cands}
        b_chosen = choose(b_scores)
        out["baseline"] = out[b_chosen]
        out["baseline_search"] = {"chosen": b_chosen, "scores": b_scores, "overrides": b_cands}
        if env.is_main:
            log.info("[seed %d] baseline chosen on validation: %s (scores %s)", seed, b_chosen,
                     {k: round(v, 4) for k, v in b_scores.items()})
    # what the teacher and the student cost (every student of the study has the baseline's architecture)
    copies = len(teacher.members) or 1  # an ensemble costs its members together
    out["cost"] = {P.TEACHER: {**P.spec_cost(cfg, ds, t_spec, copies), "train_examples_per_s": speed[P.TEACHER]},
                   "student": {**P.spec_cost(cfg, ds, P.baseline_spec(ds)), "train_examples_per_s": speed.get("baseline", 0.0)}}
    out["data_facts"] = data_facts(ds)
    out["search"] = {"chosen": chosen, "scores": scores, "overrides": overrides,
                     "select_on": [s for s in cfg.study.select_on if s in out[chosen]]}
    if cfg.study.mf_reference:
        out["mf_reference"] = on_main(lambda: mf_reference(cfg, ds, seed))  # every rank gets rank 0's result
    if env.is_main:
        log.info("[seed %d] chosen on validation: %s (scores %s)", seed, chosen, {k: round(v, 4) for k, v in scores.items()})
        write_text(Path(cfg.output_dir) / "study_metrics.json", json.dumps(out, indent=1))
    return out


def train_teacher(cfg: ExperimentConfig, ds, user_text, item_text, env, seed: int, out: dict, source=None):
    """Train the teacher ranker, and with ``study.teacher_search`` each candidate, into this
    seed's folder; the teacher the students learn from is the one with the best selection score
    on validation (as ``chosen`` is). Writes ``out[teacher_ranker]`` (the chosen one's metrics)
    and, with a search, ``out["teacher_search"]`` and each candidate's metrics. Returns (result,
    spec) of the chosen teacher."""
    from sparse_kd import pipeline as P

    cands = teacher_candidates(cfg)
    trained, overrides = {}, {}
    for name, (tcfg, ovs) in cands.items():  # a fresh spec each: its modules are trained
        trained[name] = P.train_teacher(tcfg, ds, user_text, item_text, env, seed, name=name, source=source)
        overrides[name] = ovs
    out[P.TEACHER] = trained[P.TEACHER][0].metrics
    if len(cands) == 1:
        _members(out, trained[P.TEACHER][0])
        return trained[P.TEACHER]
    scores = {n: selection_score(r.metrics, tuple(cfg.study.select_on)) for n, (r, _) in trained.items()}
    chosen = choose(scores)
    out["teacher_default"] = out[P.TEACHER]
    for n, (r, _) in trained.items():
        if n != P.TEACHER:
            out[n] = r.metrics
    out[P.TEACHER] = trained[chosen][0].metrics
    _members(out, trained[chosen][0])
    out["teacher_search"] = {"chosen": chosen, "scores": scores, "overrides": overrides}
    if env.is_main:
        log.info("[seed %d] teacher ranker chosen on validation: %s (scores %s)", seed, chosen,
                 {k: round(v, 4) for k, v in scores.items()})
    return trained[chosen]


def _members(out: dict, teacher) -> None:
    """An ensemble teacher's members' own metrics, in member order, as ``out["teacher_members"]``."""
    if teacher.member_metrics:
        out["teacher_members"] = teacher.member_metrics


def mf_reference(cfg: ExperimentConfig, ds, seed: int) -> dict:
    """The outside reference of one seed (:func:`sparse_kd.mf_reference.reference` with
    ``student.embedding_dim`` dims)."""
    from sparse_kd.mf_reference import reference

    return reference(ds, cfg.student.embedding_dim, seed, label=f"[seed {seed}] ")


def data_facts(ds) -> dict:
    """Share of each evaluation split's rows whose user, and whose item, has a training
    interaction (how much of a "warm" test is about users the students never trained on)."""
    user_counts, item_counts = ds.train_counts()
    out = {}
    for s in SPLITS:
        sp = ds.splits[s]
        if len(sp):
            out[s] = {"rows_with_trained_user": round(float((user_counts[sp.user] > 0).mean()), 4),
                      "rows_with_trained_item": round(float((item_counts[sp.item] > 0).mean()), 4)}
    return out


