"""The distillation study's summary over seeds: the quality table (mean ± std per variant and
split, deltas against the baseline), the outside reference, the search candidates, the cost of
teacher and student side by side, and the targets -> ``docs/distill_study_<name>.{md,json}``.
Reads the per-seed ``study_metrics.json`` that :func:`sparse_kd.studies.distill_study.run_seed`
writes; chooses nothing (every choice was made on validation splits when the seed ran).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from sparse_kd.atomic import write_text
from sparse_kd.config import ExperimentConfig
from sparse_kd.metrics import EVAL_SPLITS as SPLITS
from sparse_kd.report import markdown_table
from sparse_kd.studies.distill_study import (MF_TARGET_SPLITS, TARGET_COLD_GAIN, TARGET_TEACHER_GAIN, TARGET_TEACHER_SHARE,
                                             TARGET_TEST_GAIN, seed_dir)


def targets(per_seed: dict, student: str = "chosen") -> dict:
    """Whether ``student`` meets the study's targets against the baseline (means over seeds)."""
    seeds = list(per_seed)

    def mean(v: str, sp: str) -> float:
        return float(np.mean([per_seed[s][v][sp]["auc"] for s in seeds]))

    base, stu, tea = mean("baseline", "test"), mean(student, "test"), mean("teacher_ranker", "test")
    need_test = base + max(TARGET_TEST_GAIN, TARGET_TEACHER_SHARE * (tea - base))
    cold_base, cold_stu = mean("baseline", "test_cold"), mean(student, "test_cold")
    below = [s for s in seeds if per_seed[s][student]["test"]["auc"] < per_seed[s]["baseline"]["test"]["auc"]]
    t_below = [s for s in seeds if per_seed[s]["teacher_ranker"]["test"]["auc"] <= per_seed[s]["baseline"]["test"]["auc"]]
    return {
        "teacher": {"gain": tea - base, "needed": TARGET_TEACHER_GAIN, "met": tea - base >= TARGET_TEACHER_GAIN,
                    "seeds_not_above": t_below, "above_every_seed": not t_below},
        "test": {"student": stu, "baseline": base, "teacher_ranker": tea, "needed": need_test, "met": stu >= need_test},
        "test_cold": {"student": cold_stu, "baseline": cold_base, "needed": cold_base + TARGET_COLD_GAIN,
                      "met": cold_stu >= cold_base + TARGET_COLD_GAIN},
        "no_seed_below_baseline": {"seeds_below": below, "met": not below},
    }



def mf_target(per_seed: dict) -> dict:
    """Whether the baseline is at or above ``mf_reference`` on every split of
    :data:`MF_TARGET_SPLITS`, every seed (NaN never is): per seed {split: {"baseline", "mf"}}."""
    per, below = {}, []
    for s, m in per_seed.items():
        per[s] = {sp: {"baseline": m["baseline"][sp]["auc"], "mf": m["mf_reference"][sp]["auc"]} for sp in MF_TARGET_SPLITS}
        if not all(v["baseline"] >= v["mf"] for v in per[s].values()):
            below.append(s)
    return {"per_seed": per, "seeds_below": below, "met": not below}



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
            "chosen on valid) on the same splits and negatives (`sparse_kd/mf_reference.py`). Cold items keep "
            "their random initial rows, so its cold AUC is about 0.5 by construction. " + "; ".join(parts) + ".")



def summarize(cfg: ExperimentConfig, docs: Path, from_records: bool = False) -> dict:
    """Mean, std, min per variant and split over seeds, per-seed deltas, targets ->
    docs/distill_study_<name>.{md,json}. ``from_records``: made by ``--report-only`` from the seeds'
    ``study_metrics.json`` (the page says so: the seeds may have run one by one)."""
    per_seed = {}
    for s in cfg.study.seeds:
        f = seed_dir(cfg, s) / "study_metrics.json"
        if not f.is_file():
            raise FileNotFoundError(f"{f}: seed {s} has not been run")
        per_seed[s] = json.loads(f.read_text())
    search = {s: per_seed[s].pop("search", None) for s in per_seed}
    facts = {s: per_seed[s].pop("data_facts", None) for s in per_seed}
    mf = {s: per_seed[s].pop("mf_reference", None) for s in per_seed}
    b_search = {s: per_seed[s].pop("baseline_search", None) for s in per_seed}
    t_search = {s: per_seed[s].pop("teacher_search", None) for s in per_seed}
    costs = {s: per_seed[s].pop("cost", None) for s in per_seed}
    members = {s: per_seed[s].pop("teacher_members", None) for s in per_seed}  # an ensemble teacher's, each alone
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
                 "mf_reference": mf, "baseline_search": b_search, "teacher_search": t_search, "cost": costs,
                 "teacher_members": members}
    if any(b_search.values()):
        sections.append(baseline_search_note(b_search))
    if any(t_search.values()):
        sections.append(baseline_search_note(t_search, "teacher ranker", "its training settings and architecture"))
    if all(members.values()) and "teacher_ranker" in summary:
        sections.append(members_note(members, summary["teacher_ranker"]["test"]["mean"]))
    cost = next((c for c in costs.values() if c), None)
    if cost:
        sections.append(cost_note(cost))
    if base and "chosen" in summary and "teacher_ranker" in summary:
        doc["transferability"] = tr = transferability(summary)
        sections.append(f"Transferability on test, (chosen − baseline) / (teacher ranker − baseline): {tr['text']}.")
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
            f"- teacher ranker test AUC ≥ baseline + {TARGET_TEACHER_GAIN}: {t['teacher']['gain']:+.4f}: "
            f"{yes(t['teacher']['met'])}; above the baseline on every seed: seeds not above: "
            f"{t['teacher']['seeds_not_above'] or 'none'}: {yes(t['teacher']['above_every_seed'])}\n"
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

    command = "sparse-kd " + " ".join(a for a in sys.argv[1:] if not a.startswith(("--seed", "--report-only")))
    origin = " (this page: `--report-only`, from each seed's `study_metrics.json`)" if from_records else ""
    write_text(docs / f"{stem}.md",
           f"# Distillation study: {cfg.name}\n\nProduced by `{command}`{origin}. Seeds: {list(per_seed)} (each sets "
           f"train.seed and data.seed); {cfg.nproc} process(es); data: {cfg.data.source}. AUC per split, mean ± std "
           f"over seeds; Δ columns against the baseline's mean. Every choice (best epoch, search candidate) is made "
           f"on validation splits only.\n\n" + "\n\n".join(sections) + "\n")
    print("\n" + "\n\n".join(sections) + "\n")
    return summary


def baseline_search_note(b_search: dict, who: str = "baseline", what: str = "its training settings") -> str:
    """Which settings the baseline (or the teacher ranker) was given, per seed, and their validation scores."""
    first = next(v for v in b_search.values() if v)
    rows = [[n, " ".join(ovs) or "(the config as is)"]
            + [f"{b_search[s]['scores'].get(n, float('nan')):.4f}" + (" *" if b_search[s]["chosen"] == n else "")
               if b_search[s] else "" for s in b_search]
            for n, ovs in first["overrides"].items()]
    return (f"The {who}'s own search ({what}, chosen per seed on validation as `chosen` is; "
            f"* = the {who} reported above):\n\n"
            + markdown_table(["candidate", "overrides"] + [f"seed {s}" for s in b_search], rows))


def members_note(members: dict, ensemble_test: float) -> str:
    """One line: an ensemble teacher's members alone (test AUC over members and seeds) against the ensemble."""
    aucs = [m["test"]["auc"] for ms in members.values() for m in ms if "test" in m]
    k = {len(ms) for ms in members.values()}
    return (f"Teacher ranker members ({'/'.join(map(str, sorted(k)))} per seed), each alone: test AUC mean "
            f"{np.mean(aucs):.4f} (min {min(aucs):.4f}, max {max(aucs):.4f}); their mean logit, the teacher: "
            f"{ensemble_test:.4f}.")


def cost_note(cost: dict) -> str:
    """Teacher ranker and student side by side: parameters, fp32 bytes (what serving the model
    uncompressed holds), multiply-adds per example and training examples/s (the first seed's; a
    study run before it was recorded shows n/a)."""
    t, s = cost["teacher_ranker"], cost["student"]

    def speed(c: dict) -> str:
        v = c.get("train_examples_per_s")
        return f"{v:,.0f}" if v else "n/a"

    rows = [[name, c["embedding_dim"], f"{c['params']:,}", f"{c['table_params']:,}", f"{c['dense_params']:,}",
             f"{4 * c['params'] / 1e6:.2f}", f"{c['macs_per_example']:,}", speed(c)]
            for name, c in (("teacher ranker", t), ("student (every variant)", s))]
    return ("Cost (parameters and multiply-adds per example, `sparse_kd/student/cost.py`; fp32 bytes are what the "
            "model holds served uncompressed; the served student needs none of the teacher; training examples/s on "
            f"this study's machine): the teacher ranker is {t['params'] / max(1, s['params']):.1f}x the student in "
            f"parameters and {t['macs_per_example'] / max(1, s['macs_per_example']):.1f}x in multiply-adds.\n\n"
            + markdown_table(["ranker", "D", "params", "table params", "dense params", "fp32 MB", "MACs / example",
                              "train examples/s"], rows))


def transferability(summary: dict) -> dict:
    """(chosen − baseline) / (teacher ranker − baseline) on mean test AUC: the share of the teacher's
    gain the student keeps. Undefined when the teacher is not above the baseline, on the mean or on
    any seed (a ratio over a gain within seed noise says nothing: +0.0011 once gave "258%")."""
    b, t, c = (summary[v]["test"]["mean"] for v in ("baseline", "teacher_ranker", "chosen"))
    gap = t - b
    per_seed = [ts - bs for ts, bs in zip(summary["teacher_ranker"]["test"].get("per_seed", []),
                                          summary["baseline"]["test"].get("per_seed", []))]
    out = {"value": None, "teacher_gain": gap, "student_gain": c - b, "teacher_gain_per_seed": per_seed}
    if gap <= 0:
        return {**out, "text": f"undefined: the teacher ranker is not above the baseline ({gap:+.4f}; the student {c - b:+.4f})"}
    if any(d <= 0 for d in per_seed):
        return {**out, "text": f"undefined: the teacher ranker is not above the baseline on every seed (mean {gap:+.4f}; "
                               f"per seed {', '.join(f'{d:+.4f}' for d in per_seed)}; the student {c - b:+.4f})"}
    return {**out, "value": (c - b) / gap, "text": f"{(c - b) / gap:.0%} (teacher {gap:+.4f}, student {c - b:+.4f})"}
