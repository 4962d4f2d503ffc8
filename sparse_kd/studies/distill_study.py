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
with biases on the same splits (:mod:`sparse_kd.studies.mf_reference`, ``student.embedding_dim``
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
from sparse_kd.metrics import EVAL_SPLITS as SPLITS
from sparse_kd.report import markdown_table

log = logging.getLogger(__name__)

METHODS = ("logit", "pairs", "align", "transfer")
SELECT_SPLITS = ("valid", "valid_cold")  # splits the choice is made on, where the dataset has them
# targets of the study (issue 10): chosen student against the baseline, on test and test_cold
# (issue 21: and the baseline at or above the MF reference on MF_TARGET_SPLITS, every seed)
MF_TARGET_SPLITS = ("valid", "test")
TARGET_TEST_GAIN = 0.005
TARGET_TEACHER_SHARE = 0.5
TARGET_COLD_GAIN = 0.03


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
    P.check_run_folder(cfg, fps)


def run_seed(cfg: ExperimentConfig, seed: int) -> dict:
    """Train teacher ranker + every study variant + every search candidate for one seed.
    Returns {variant: metrics, ..., "search": {...}}."""
    from sparse_kd import pipeline as P
    from sparse_kd.dist import init_distributed

    study_cfg, cfg = cfg, seed_config(cfg, seed)
    env = init_distributed(cfg.train.backend, cfg.train.collective_timeout_s)
    P.check_on_main(env, lambda: check_seed(study_cfg, seed))
    ds = P.prepare_data(cfg, env)
    user_text, item_text = P.text_embeddings(cfg, ds, env)
    user_text = P.user_text_for(cfg, ds, user_text, item_text, env)
    t_spec = P.teacher_spec(cfg, ds, user_text, item_text)
    teacher = P.train_variant(cfg, ds, t_spec, env, seed, want_train_logits=True)
    out: dict = {P.TEACHER: teacher.metrics}

    def train(vcfg: ExperimentConfig, name: str) -> dict:
        if not vcfg.distill.any_enabled:
            spec = P.baseline_spec(ds, name=name)
        else:
            spec = P.distilled_spec(vcfg, ds, user_text, item_text, teacher, name=name, teacher_ranker_spec=t_spec,
                                    env=env, seed=seed)
        return P.train_variant(vcfg, ds, spec, env, seed).metrics

    for v in cfg.study.variants:
        out[v] = train(dataclasses.replace(cfg, distill=variant_distill(cfg, v)), v)
    cands = candidates(cfg)
    for name, (ccfg, _) in cands.items():
        if name not in out:
            out[name] = train(ccfg, name)  # cfg is already this seed's, so each candidate is too
    scores, overrides = choice_scores(cfg, out, {n: ov for n, (_, ov) in cands.items()})
    chosen = choose(scores)
    out["chosen"] = out[chosen]
    out["data_facts"] = data_facts(ds)
    out["search"] = {"chosen": chosen, "scores": scores, "overrides": overrides,
                     "select_on": [s for s in cfg.study.select_on if s in out[chosen]]}
    if cfg.study.mf_reference:
        from sparse_kd.dist import on_main

        out["mf_reference"] = on_main(lambda: mf_reference(cfg, ds, seed))  # every rank gets rank 0's result
    if env.is_main:
        log.info("[seed %d] chosen on validation: %s (scores %s)", seed, chosen, {k: round(v, 4) for k, v in scores.items()})
        write_text(Path(cfg.output_dir) / "study_metrics.json", json.dumps(out, indent=1))
    return out


def mf_reference(cfg: ExperimentConfig, ds, seed: int) -> dict:
    """The outside reference of one seed (:func:`sparse_kd.studies.mf_reference.tuned_mf` with
    ``student.embedding_dim`` dims): its split metrics at the chosen setting's best epoch, the
    settings and the grid's valid scores. {"error": message} if it fails: a reference never costs
    the seed's trained rankers."""
    from sparse_kd.studies.mf_reference import tuned_mf

    try:
        r = tuned_mf(ds, dim=cfg.student.embedding_dim, seed=seed)
    except Exception as e:  # noqa: BLE001 (reported in study_metrics.json and the summary)
        log.exception("[seed %d] MF reference failed", seed)
        return {"error": f"{type(e).__name__}: {e}"}
    log.info("[seed %d] MF reference (lr %g, weight_decay %g, best epoch %d of %d, %.0fs): valid AUC %.4f, test AUC %.4f",
             seed, r["settings"]["lr"], r["settings"]["weight_decay"], r["best_epoch"], r["epochs"], r["seconds"],
             r["valid"]["auc"], r["test"]["auc"])
    return r


def mf_target(per_seed: dict) -> dict:
    """Whether the baseline is at or above ``mf_reference`` on every split of
    :data:`MF_TARGET_SPLITS`, every seed (NaN never is): per seed {split: {"baseline", "mf"}}."""
    per, below = {}, []
    for s, m in per_seed.items():
        per[s] = {sp: {"baseline": m["baseline"][sp]["auc"], "mf": m["mf_reference"][sp]["auc"]} for sp in MF_TARGET_SPLITS}
        if not all(v["baseline"] >= v["mf"] for v in per[s].values()):
            below.append(s)
    return {"per_seed": per, "seeds_below": below, "met": not below}


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


def targets(per_seed: dict, student: str = "chosen") -> dict:
    """Whether ``student`` meets the study's targets against the baseline (means over seeds)."""
    seeds = list(per_seed)

    def mean(v: str, sp: str) -> float:
        return float(np.mean([per_seed[s][v][sp]["auc"] for s in seeds]))

    base, stu, tea = mean("baseline", "test"), mean(student, "test"), mean("teacher_ranker", "test")
    need_test = base + max(TARGET_TEST_GAIN, TARGET_TEACHER_SHARE * (tea - base))
    cold_base, cold_stu = mean("baseline", "test_cold"), mean(student, "test_cold")
    below = [s for s in seeds if per_seed[s][student]["test"]["auc"] < per_seed[s]["baseline"]["test"]["auc"]]
    return {
        "test": {"student": stu, "baseline": base, "teacher_ranker": tea, "needed": need_test, "met": stu >= need_test},
        "test_cold": {"student": cold_stu, "baseline": cold_base, "needed": cold_base + TARGET_COLD_GAIN,
                      "met": cold_stu >= cold_base + TARGET_COLD_GAIN},
        "no_seed_below_baseline": {"seeds_below": below, "met": not below},
    }


def mf_note(mf: dict) -> str:
    """The paragraph under the quality table on the ``mf_reference`` row: what it is, and per seed
    its chosen setting (or why it is missing)."""
    parts = []
    for s, m in mf.items():
        if not m:
            parts.append(f"seed {s}: not run")
        elif "error" in m:
            parts.append(f"seed {s}: failed ({m['error']})")
        else:
            st = m["settings"]
            parts.append(f"seed {s}: lr {st['lr']:g}, weight_decay {st['weight_decay']:g}, best epoch {m['best_epoch']} "
                         f"of {m['epochs']}" + ("" if m.get("stopped_early", True) else " (epoch cap reached)"))
    dims = next((m["settings"]["dim"] for m in mf.values() if m and "settings" in m), "?")
    return ("`mf_reference`: not this project's model: plain matrix factorisation with user, item and global "
            f"biases ({dims} dims, binary cross-entropy, lazy Adam; learning rate × weight decay grid and best epoch "
            "chosen on valid) on the same splits and negatives (`sparse_kd/studies/mf_reference.py`). Cold items keep "
            "their random initial rows, so its cold AUC is about 0.5 by construction. " + "; ".join(parts) + ".")


def summarize(cfg: ExperimentConfig, docs: Path) -> dict:
    """Mean, std, min per variant and split over seeds, per-seed deltas, targets ->
    docs/distill_study_<name>.{md,json}."""
    per_seed = {}
    for s in cfg.study.seeds:
        f = seed_dir(cfg, s) / "study_metrics.json"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: seed {s} has not been run")
        per_seed[s] = json.loads(f.read_text())
    search = {s: per_seed[s].pop("search", None) for s in per_seed}
    facts = {s: per_seed[s].pop("data_facts", None) for s in per_seed}
    mf = {s: per_seed[s].pop("mf_reference", None) for s in per_seed}
    mf_ok = all(m and all(sp in m for sp in MF_TARGET_SPLITS) for m in mf.values())
    if mf_ok:  # a row of the quality table (split metrics only; the detail stays in doc["mf_reference"])
        for s in per_seed:
            per_seed[s]["mf_reference"] = {sp: mf[s][sp] for sp in SPLITS if sp in mf[s]}
    variants = [v for v in per_seed[cfg.study.seeds[0]] if all(v in per_seed[s] for s in per_seed)]
    splits = [sp for sp in SPLITS if all(sp in per_seed[s][v] for s in per_seed for v in variants)]
    summary = {}
    for v in variants:
        summary[v] = {}
        for sp in splits:
            a = np.array([per_seed[s][v][sp]["auc"] for s in per_seed])
            summary[v][sp] = {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                              "min": float(a.min()), "per_seed": a.tolist()}
    base = summary.get("baseline")
    rows = []
    for v in variants:
        r = [v]
        for sp in splits:
            m = summary[v][sp]
            r.append(f"{m['mean']:.4f} ± {m['std']:.4f}")
        if base:
            r.append(f"{summary[v]['test']['mean'] - base['test']['mean']:+.4f}")
            r.append(f"{summary[v]['test_cold']['mean'] - base['test_cold']['mean']:+.4f}")
            wins = sum(per_seed[s][v]["test"]["auc"] >= per_seed[s]["baseline"]["test"]["auc"] for s in per_seed)
            r.append(f"{wins}/{len(per_seed)}")
        rows.append(r)
    headers = ["variant"] + [f"{sp} AUC (mean ± std)" for sp in splits]
    if base:
        headers += ["Δ test vs baseline", "Δ test_cold vs baseline", "seeds ≥ baseline (test)"]
    table = markdown_table(headers, rows)

    sections = [table]
    doc: dict = {"seeds": list(per_seed), "summary": summary, "per_seed": per_seed, "search": search, "data_facts": facts,
                 "mf_reference": mf}
    if any(mf.values()):
        sections.append(mf_note(mf))
    mf_line = ""
    if mf_ok and base:
        doc["mf_target"] = mt = mf_target(per_seed)
        mf_line = (f"- baseline ≥ MF reference on {' and '.join(MF_TARGET_SPLITS)}, every seed: "
                   + "; ".join(f"seed {s} " + ", ".join(f"{sp} {v['baseline']:.4f} vs {v['mf']:.4f}" for sp, v in d.items())
                               for s, d in mt["per_seed"].items())
                   + f": {'**met**' if mt['met'] else '**not met**'}"
                   + (f" (seeds below: {mt['seeds_below']})" if mt["seeds_below"] else ""))
    if all(facts.values()):
        share = {sp: np.mean([facts[s][sp]["rows_with_trained_user"] for s in per_seed]) for sp in facts[next(iter(facts))]}
        sections.append("Rows whose user has a training interaction (mean over seeds): "
                        + ", ".join(f"{sp} {v:.0%}" for sp, v in share.items()) + ".")
    if base and "chosen" in summary and "teacher_ranker" in summary:
        seed_rows = []
        for s in per_seed:
            b = per_seed[s]["baseline"]
            d = lambda v, sp: per_seed[s][v][sp]["auc"] - b[sp]["auc"]  # noqa: E731
            seed_rows.append([str(s), (search[s] or {}).get("chosen", "combined"),
                              f"{d('teacher_ranker', 'test'):+.4f}", f"{d('chosen', 'test'):+.4f}",
                              f"{d('teacher_ranker', 'test_cold'):+.4f}", f"{d('chosen', 'test_cold'):+.4f}"])
        sections.append("Per seed, against that seed's baseline (`chosen`: the candidate picked on validation):\n\n"
                        + markdown_table(["seed", "chosen", "Δ test teacher_ranker", "Δ test chosen",
                                          "Δ test_cold teacher_ranker", "Δ test_cold chosen"], seed_rows))
        if any(search.values()):
            names = list(next(v for v in search.values() if v)["overrides"])
            cand_rows = [[n, " ".join(next(v for v in search.values() if v)["overrides"][n]) or "(the config as is)"]
                         + [f"{search[s]['scores'].get(n, float('nan')):.4f}" if search[s] else "" for s in per_seed]
                         for n in names]
            select_on = next(v for v in search.values() if v)["select_on"]
            sections.append(f"Search candidates and their selection score per seed (mean AUC on {', '.join(select_on)}):\n\n"
                            + markdown_table(["candidate", "overrides"] + [f"seed {s}" for s in per_seed], cand_rows))
        t = targets(per_seed)
        doc["targets"] = t
        yes = lambda ok: "**met**" if ok else "**not met**"  # noqa: E731
        sections.append(
            "Targets (chosen student against the baseline, means over seeds):\n\n"
            f"- test AUC ≥ baseline + max({TARGET_TEST_GAIN}, {TARGET_TEACHER_SHARE} × (teacher ranker − baseline)): "
            f"{t['test']['student']:.4f} vs needed {t['test']['needed']:.4f} "
            f"(baseline {t['test']['baseline']:.4f}, teacher ranker {t['test']['teacher_ranker']:.4f}): {yes(t['test']['met'])}\n"
            f"- test_cold AUC ≥ baseline + {TARGET_COLD_GAIN}: {t['test_cold']['student']:.4f} vs needed "
            f"{t['test_cold']['needed']:.4f}: {yes(t['test_cold']['met'])}\n"
            f"- no seed with the student's test AUC below its baseline's: seeds below: "
            f"{t['no_seed_below_baseline']['seeds_below'] or 'none'}: {yes(t['no_seed_below_baseline']['met'])}"
            + (f"\n{mf_line}" if mf_line else "")
        )
    elif mf_line:
        sections.append("Targets:\n\n" + mf_line)
    docs.mkdir(parents=True, exist_ok=True)
    stem = f"distill_study_{cfg.name}"
    write_text(docs / f"{stem}.json", json.dumps(doc, indent=1))
    import sys

    command = "sparse-kd " + " ".join(a for a in sys.argv[1:] if not a.startswith("--seed"))
    write_text(docs / f"{stem}.md",
           f"# Distillation study: {cfg.name}\n\nProduced by `{command}`. Seeds: {list(per_seed)} (each sets "
           f"train.seed and data.seed); {cfg.nproc} process(es); data: {cfg.data.source}. AUC per split, mean ± std "
           f"over seeds; Δ columns against the baseline's mean. Every choice (best epoch, search candidate) is made "
           f"on validation splits only.\n\n" + "\n\n".join(sections) + "\n")
    print("\n" + "\n\n".join(sections) + "\n")
    return summary

