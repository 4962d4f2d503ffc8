"""Distillation study: baseline vs each distillation method alone vs the combination, over seeds.

``run_seed`` (SPMD, every rank) trains the teacher ranker once and then every variant of
``study.variants`` into ``output_dir/seed_<s>/``; ``summarize`` (one process) reads the
per-seed metrics and writes ``distill_study.md`` / ``.json`` with mean and spread per variant.

Variants: ``baseline`` (no distillation), ``logit`` / ``align`` / ``transfer`` (that method
alone, with its settings from the config), ``combined`` (every method enabled in the config).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from sparse_kd.config import DistillConfig, ExperimentConfig
from sparse_kd.metrics import EVAL_SPLITS as SPLITS
from sparse_kd.report import markdown_table

log = logging.getLogger(__name__)


def variant_distill(cfg: ExperimentConfig, variant: str) -> DistillConfig:
    d = cfg.distill
    off = DistillConfig(
        logit=dataclasses.replace(d.logit, enabled=False),
        align=dataclasses.replace(d.align, enabled=False),
        transfer=dataclasses.replace(d.transfer, enabled=False),
    )
    if variant == "baseline":
        return off
    if variant == "combined":
        return d
    if variant in ("logit", "align", "transfer"):
        return dataclasses.replace(off, **{variant: dataclasses.replace(getattr(d, variant), enabled=True)})
    raise ValueError(f"study.variants: unknown variant {variant!r}; expected baseline, logit, align, transfer, combined")


def seed_dir(cfg: ExperimentConfig, seed: int) -> Path:
    return Path(cfg.output_dir) / f"seed_{seed}"


def _seed_config(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    return dataclasses.replace(cfg, output_dir=str(seed_dir(cfg, seed)), train=dataclasses.replace(cfg.train, seed=seed))


def check_seed(cfg: ExperimentConfig, seed: int) -> None:
    """Raise StaleRunError, before anything is written, if ``seed_dir(cfg, seed)`` holds a study
    trained with other settings (see :mod:`sparse_kd.run_folder`)."""
    from sparse_kd import pipeline as P

    cfg = _seed_config(cfg, seed)
    fps = {v: P.variant_fingerprint(cfg, v, DistillConfig() if v in (P.TEACHER, "baseline") else variant_distill(cfg, v), seed)
           for v in (P.TEACHER, *cfg.study.variants)}
    P.check_run_folder(cfg, fps)


def run_seed(cfg: ExperimentConfig, seed: int) -> dict:
    """Train teacher ranker + every study variant for one seed. Returns {variant: metrics}."""
    from sparse_kd import pipeline as P
    from sparse_kd.dist import init_distributed

    study_cfg, cfg = cfg, _seed_config(cfg, seed)
    env = init_distributed(cfg.train.backend, cfg.train.collective_timeout_s)
    P.check_on_main(env, lambda: check_seed(study_cfg, seed))
    ds = P.prepare_data(cfg, env)
    user_text, item_text = P.text_embeddings(cfg, ds, env)
    teacher = P.train_variant(cfg, ds, P.teacher_spec(cfg, ds, user_text, item_text), env, seed, want_train_logits=True)
    metrics = {P.TEACHER: teacher.metrics}
    for v in cfg.study.variants:
        vcfg = dataclasses.replace(cfg, distill=variant_distill(cfg, v))
        if v == "baseline":
            spec = P.baseline_spec(ds)
        else:
            spec = P.distilled_spec(vcfg, ds, user_text, item_text, teacher, name=v)
        metrics[v] = P.train_variant(vcfg, ds, spec, env, seed).metrics
    if env.is_main:
        (Path(cfg.output_dir) / "study_metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


def summarize(cfg: ExperimentConfig, docs: Path) -> dict:
    """Mean, std, min per variant and split over seeds -> docs/distill_study.{md,json}."""
    per_seed = {}
    for s in cfg.study.seeds:
        f = seed_dir(cfg, s) / "study_metrics.json"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: seed {s} has not been run")
        per_seed[s] = json.loads(f.read_text())
    variants = list(next(iter(per_seed.values())).keys())
    summary = {}
    for v in variants:
        summary[v] = {}
        for sp in SPLITS:
            a = np.array([per_seed[s][v][sp]["auc"] for s in per_seed])
            summary[v][sp] = {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                              "min": float(a.min()), "per_seed": a.tolist()}
    base = summary.get("baseline")
    rows = []
    for v in variants:
        r = [v]
        for sp in SPLITS:
            m = summary[v][sp]
            r.append(f"{m['mean']:.4f} ± {m['std']:.4f}")
        if base:
            r.append(f"{summary[v]['test']['mean'] - base['test']['mean']:+.4f}")
            r.append(f"{summary[v]['test_cold']['mean'] - base['test_cold']['mean']:+.4f}")
            wins = sum(per_seed[s][v]["test"]["auc"] >= per_seed[s]["baseline"]["test"]["auc"] for s in per_seed)
            r.append(f"{wins}/{len(per_seed)}")
        rows.append(r)
    headers = ["variant"] + [f"{sp} AUC (mean ± std)" for sp in SPLITS]
    if base:
        headers += ["Δ test vs baseline", "Δ test_cold vs baseline", "seeds ≥ baseline (test)"]
    table = markdown_table(headers, rows)
    docs.mkdir(parents=True, exist_ok=True)
    stem = f"distill_study_{cfg.name}"
    (docs / f"{stem}.json").write_text(json.dumps({"seeds": list(per_seed), "summary": summary, "per_seed": per_seed}, indent=1))
    import sys

    command = "sparse-kd " + " ".join(a for a in sys.argv[1:] if not a.startswith("--seed"))
    (docs / f"{stem}.md").write_text(
        f"# Distillation study: {cfg.name}\n\nProduced by `{command}`. Seeds: {list(per_seed)}; "
        f"{cfg.nproc} process(es); data: {cfg.data.source}. AUC per split, mean ± std over seeds; "
        f"Δ columns against the baseline's mean.\n\n{table}\n"
    )
    print("\n" + table + "\n")
    return summary
