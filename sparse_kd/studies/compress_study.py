"""Compression study: AUC (valid, valid_cold, test, test_cold) against embedding storage, per
trained variant, over seeds whose data split differs.

Points of one run (:func:`run_compress_study`), every one compressed for real on the serving
kernel and evaluated on every split:

* grid: every (fill, keep ratio, dtype) of ``StudyConfig.compress_fills x keep_ratios x dtypes``,
  dtype on every table, keep ratio and fill on ``prune_features`` (default ``user_id`` and
  ``item_id``, the only large tables); a keep ratio of 1 is the same model for every fill and is
  built once. Importance, cluster ratio and remap kind come from the run's ``compress`` section.
* plan: for the last variant (the distilled student), one budget plan per ratio of
  ``StudyConfig.compress_budgets`` (embedding storage = fp32 bytes / ratio) and remap kind of
  ``StudyConfig.compress_remaps``, chosen by :mod:`sparse_kd.compress.planner` on valid and
  valid_cold only, among the study's dtypes and the planner's keep ratios, fills and cluster
  ratios; its sensitivity is measured once per run and shared by every budget.

Bytes are read from the compressed model's buffers (MB = 10^6 bytes). Every row carries its bytes
both ways, with an int32 array remap per pruned table (``bytes_array``) and with the remaps
folded into the entity bags (``bytes_fold``): the lookups, hence the AUCs, are the same.
Every AUC is also given as a change against the same run's uncompressed model of that variant
(``d_<split>``): compressed - uncompressed, negative = a loss.

Over seeds (:func:`run_compress_study_seeds`): each seed is a run folder ``output_dir/seed_<s>``
whose ``data.seed`` must be ``s`` (the cold items and the split change with the seed, not only
the training seed); rows are averaged over seeds (``*_std``: spread of the per-seed changes).
The targets table chooses, among the points that are small enough, the one with the best mean
validation objective (d_valid + ``compress.cold_weight`` x d_valid_cold) and reports its test
and test_cold changes: test data never chooses anything.

Writes ``<stem>.csv`` / ``.json`` / ``.md`` / ``.png`` (:mod:`.compress_report`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from sparse_kd.config import CompressConfig, ConfigError, StudyConfig
from sparse_kd.studies.compress_report import SPLITS, mark_pareto, write_study
from sparse_kd.report import markdown_table

log = logging.getLogger(__name__)


def _row(variant: str, kind: str, fill: str, keep, dtype: str, comp, metrics: dict, fp32: dict, t0: float,
         bytes_array: int, bytes_fold: int, budget_ratio: float = 0.0, remap: str = "", plan: str = "") -> dict:
    fp = comp.fp32_bytes
    return {
        "variant": variant, "kind": kind, "fill": fill, "keep_ratio": keep, "dtype": dtype,
        "budget_ratio": float(budget_ratio), "remap": remap, "plan": plan,
        "embedding_bytes": comp.embedding_bytes, "embedding_mb": comp.embedding_bytes / 1e6,
        "ratio": fp / max(1, comp.embedding_bytes), "bytes_array": int(bytes_array), "bytes_fold": int(bytes_fold),
        "ratio_array": fp / max(1, bytes_array), "ratio_fold": fp / max(1, bytes_fold), "pareto": False,
        **{f"{s}_{k}": metrics[s][k] for s in SPLITS for k in ("auc", "logloss")},
        **{f"d_{s}": metrics[s]["auc"] - fp32[s]["auc"] for s in SPLITS},
        "fp32_test_auc": fp32["test"]["auc"], "seconds": round(time.perf_counter() - t0, 2),
    }


def _both_bytes(comp, remap: str, row_alignment: int, kernel: str) -> tuple[int, int]:
    """(embedding bytes with array remaps, with folded remaps) of a compressed model."""
    from sparse_kd.compress.planner import option_bytes

    out = []
    for rk in ("array", "fold"):
        total = 0
        for name, t in comp.tables.items():
            r = comp.remaps.get(name)
            # a table with nothing to remap holds no remap either way (its hot-first permutation, if any, is
            # folded into the entity bags: sparse_kd/compress/layout.py)
            mapped = None if r is None or t.get("permutation_only") else int((r >= 0).sum())
            total += option_bytes(t["rows_original"], t["rows_stored"], comp.model_info["embedding_dim"], t["dtype"],
                                  mapped, rk, row_alignment, kernel)["total"]
        out.append(total)
    if remap in ("array", "fold"):
        assert out[0 if remap == "array" else 1] == comp.embedding_bytes, (out, comp.embedding_bytes)
    return out[0], out[1]


def _plan_summary(settings: dict, comp) -> str:
    """One line per plan: feature keep/fill(clusters)/dtype, e.g. ``item_id 0.05+cluster(84) int2``."""
    parts = []
    for name, t in comp.tables.items():
        s = settings[t["feature"]]
        keep = f"{s['keep_ratio']:g}"
        if t["rows_kept"] < t["rows_original"]:
            keep += f"+{t['fill']}" + (f"({t['clusters']})" if t.get("clusters") else "")
        parts.append(f"{t['feature']} {keep} {t['dtype']}")
    return "; ".join(parts)


def run_compress_study(
    run_dir: Path,
    variants: Sequence[str],
    study_cfg: StudyConfig,
    out_dir: Path,
    base: Optional[CompressConfig] = None,
    prune_features: Optional[Sequence[str]] = ("user_id", "item_id"),
    fills: Optional[Sequence[str]] = None,
) -> list[dict]:
    """Grid (and plan) points of one run folder for each variant; write CSV / JSON / MD / PNG;
    return the rows (see the module doc)."""
    from sparse_kd.compress import kernel as K
    from sparse_kd.compress.importance import table_importance
    from sparse_kd.compress.planner import sensitivity
    from sparse_kd.compress.prune import table_settings
    from sparse_kd.compress.stage import (compress_model, finetune_and_choose, load_run, model_weights, serving_builder,
                                          serving_dataset)
    from sparse_kd.metrics import evaluate, fp32_forward, serving_forward
    from sparse_kd.student.export import load_dlrm

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    inp = None
    pruned_here: list[str] = []
    for vi, variant in enumerate(variants):
        if inp is None:
            inp = load_run(run_dir, variant)
            model = inp.model
        else:
            model = load_dlrm(run_dir / variant)
        cfg0 = base if base is not None else inp.cfg.compress
        if cfg0.importance == "distill" and inp.text is None:
            cfg0 = dataclasses.replace(cfg0, importance="frequency")
        kernel = K.kernel_for(cfg0.serve_device)
        weights = model_weights(model)
        pruned_here = list(weights) if prune_features is None else [f for f in prune_features if f in weights]
        imps = table_importance(cfg0.importance, weights, inp.ds, inp.text)
        fp32 = evaluate(fp32_forward(model), inp.ds, inp.builder)
        log.info("[%s] fp32 test AUC %.4f, test_cold AUC %.4f", variant, fp32["test"]["auc"], fp32["test_cold"]["auc"])

        def measure(settings: dict, remap: str):
            comp = compress_model(model, inp.ds, settings, cfg0.importance, remap, inp.text, imps, cfg0.dense_int8,
                                  cfg0.row_alignment, cfg0.serve_device, row_order=cfg0.row_order,
                                  quantizer=cfg0.quantizer)
            m = evaluate(serving_forward(comp.serving), serving_dataset(inp.ds, comp),
                         serving_builder(inp.ds, comp, inp.builder))
            return comp, m, _both_bytes(comp, remap, cfg0.row_alignment, kernel)

        for fi, fill in enumerate(fills or [cfg0.default_pruned_fill]):
            for r in study_cfg.keep_ratios:
                if r >= 1.0 and fi > 0:
                    continue  # nothing pruned: the same model as the first fill's
                for dt in study_cfg.dtypes:
                    t0 = time.perf_counter()
                    cfg = dataclasses.replace(cfg0, default_dtype=dt, default_pruned_fill=fill, budget_mb=0.0)
                    settings = table_settings(cfg, list(weights))
                    for f in pruned_here:
                        settings[f]["keep_ratio"] = float(r)
                    comp, m, (ba, bf) = measure(settings, cfg0.remap)
                    rows.append(_row(variant, "grid", fill, float(r), dt, comp, m, fp32, t0, ba, bf, remap=cfg0.remap))
                    log.info("[%s/%s] keep %.2f %s: %.2fx, test %+.4f, test_cold %+.4f", variant, fill, r, dt,
                             rows[-1]["ratio"], rows[-1]["d_test"], rows[-1]["d_test_cold"])
        if vi == len(variants) - 1 and study_cfg.compress_budgets:
            t0 = time.perf_counter()
            sens = sensitivity(model, inp.ds, inp.builder, imps, table_settings(cfg0, list(weights)),
                               tuple(study_cfg.compress_remaps), inp.text,
                               dtypes=tuple(dict.fromkeys(tuple(study_cfg.dtypes) + tuple(cfg0.planner_tiers))),
                               cold_weight=cfg0.cold_weight, row_alignment=cfg0.row_alignment, kernel=kernel,
                               max_examples=cfg0.planner_max_examples, confidence=cfg0.planner_confidence,
                               bootstrap=cfg0.planner_bootstrap, quantizer=cfg0.quantizer)
            log.info("[%s] planner sensitivity: %d options in %.0fs", variant,
                     sum(len(o) for o in sens.options.values()), time.perf_counter() - t0)
            fp32_bytes = sum(int(w.numel() * w.element_size()) for w in weights.values())
            for ratio in study_cfg.compress_budgets:
                for remap in study_cfg.compress_remaps:
                    t0 = time.perf_counter()
                    plan = sens.plan(fp32_bytes / ratio / 1e6, remap)
                    settings = plan.settings()
                    comp, m, (ba, bf) = measure(settings, remap)
                    rows.append(_row(variant, "plan", "plan", "plan", "plan", comp, m, fp32, t0, ba, bf, ratio, remap,
                                     _plan_summary(settings, comp)))
                    log.info("[%s] plan %gx %s: %.2fx, test %+.4f, test_cold %+.4f (%s)", variant, ratio, remap,
                             rows[-1]["ratio"], rows[-1]["d_test"], rows[-1]["d_test_cold"], rows[-1]["plan"])
                    if cfg0.finetune.enabled:  # the same plan, distilled after compression (compress.finetune)
                        t0 = time.perf_counter()
                        _, _, rec = finetune_and_choose(model, inp.ds, inp.builder, settings, imps, inp.text,
                                                        dataclasses.replace(cfg0, remap=remap), comp, m, cfg0.dense_int8)
                        rows.append(_row(variant, "plan+ft", "plan", "plan", "plan", comp, rec["metrics_with"], fp32, t0,
                                         ba, bf, ratio, remap, _plan_summary(settings, comp)
                                         + ("" if rec["kept"] else " (not kept on valid)")))
                        log.info("[%s] plan %gx %s + finetune: test %+.4f, test_cold %+.4f; valid score %.4f -> %.4f",
                                 variant, ratio, remap, rows[-1]["d_test"], rows[-1]["d_test_cold"],
                                 rec["valid_score_before"], rec["valid_score_after"])
    mark_pareto(rows)
    write_study(rows, out_dir, run_dir, variants, study_cfg, base, pruned_here)
    return rows


# ------------------------------------------------------------------------------------------
# Over seeds


def check_seed_runs(cfg) -> list[tuple[int, Path]]:
    """(seed, run folder) of every seed of ``study.seeds`` that has a folder; each must have been
    trained with ``data.seed`` = its seed (else its cold items and split are those of another
    seed, and seeds would not vary the data)."""
    from sparse_kd.config import load_config
    from sparse_kd.studies.distill_study import seed_dir

    out = []
    for s in cfg.study.seeds:
        d = seed_dir(cfg, s)
        if not d.is_dir():
            continue
        got = load_config(d / "config.yaml").data.seed
        if got != s:
            raise ConfigError(
                f"{d / 'config.yaml'}: data.seed is {got} but this folder is seed {s}: the study's seeds must vary the "
                f"data split too. Retrain it with data.seed={s} (`sparse-kd study distill CONFIG data.seed={s} "
                f"--seed {s}`), or leave seed {s} out of study.seeds.")
        out.append((s, d))
    return out


def _key(r: dict) -> tuple:
    return (r["variant"], r["kind"], r["fill"], str(r["keep_ratio"]), r["dtype"], r["budget_ratio"], r["remap"])


def average_runs(per_run: list[list[dict]]) -> list[dict]:
    """One row per point: means over runs of bytes, ratios and metrics; ``*_std`` the spread of
    AUCs and of their changes (ddof 1; 0 for one run)."""
    rows = []
    for first in per_run[0]:
        same = [next(r for r in rr if _key(r) == _key(first)) for rr in per_run]
        row = dict(first)
        num = ["embedding_bytes", "embedding_mb", "ratio", "bytes_array", "bytes_fold", "ratio_array", "ratio_fold",
               "fp32_test_auc"] + [f"{s}_{m}" for s in SPLITS for m in ("auc", "logloss")] + [f"d_{s}" for s in SPLITS]
        for k in num:
            vals = np.array([r[k] for r in same], dtype=float)
            row[k] = float(vals.mean())
            if k.endswith("auc") or k.startswith("d_"):
                row[f"{k}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
            if k.startswith("d_"):
                row[f"{k}_runs"] = vals.tolist()
        row["seeds"] = len(same)
        if first["kind"].startswith("plan"):
            row["plans"] = [r["plan"] for r in same]
        rows.append(row)
    return rows


def run_compress_study_seeds(cfg, docs: Path) -> list[dict]:
    """The compression study over every seed of a distillation study (``output_dir/seed_<s>``), or
    over ``output_dir`` itself for a single run; writes ``compress_study_<name>.*`` into ``docs``
    with the targets table (:func:`targets`)."""
    import sys

    from sparse_kd.config import load_config

    out = Path(cfg.output_dir)
    runs = [d for _, d in check_seed_runs(cfg)] or [out]
    made = []
    for run in runs:
        rc = load_config(run / "config.yaml")
        made.append(f"`{run}` (data.seed {rc.data.seed}, train.seed {rc.train.seed}, {rc.nproc} process(es))")
    per_run = []
    for run in runs:
        sub = run / "compress_study"
        sub.mkdir(parents=True, exist_ok=True)
        per_run.append(run_compress_study(run, cfg.study.compress_variants, cfg.study, sub, base=cfg.compress,
                                          fills=list(cfg.study.compress_fills)))
    rows = average_runs(per_run)
    mark_pareto(rows)
    docs.mkdir(parents=True, exist_ok=True)
    command = "sparse-kd " + " ".join(sys.argv[1:])
    tmd = "Trained runs: " + ", ".join(made) + ".\n\n" + targets(rows, cfg.study.compress_variants[-1],
                                                                  cfg.compress.cold_weight, len(runs))
    write_study(rows, docs, out, cfg.study.compress_variants, cfg.study, cfg.compress, ["user_id", "item_id"],
           f"compress_study_{cfg.name}", command, tmd, len(runs))
    print("\n" + tmd + "\n", flush=True)
    return rows


TARGETS = (  # (name, minimum ratio, test drop limit, test_cold drop limit or None)
    (">= 10x smaller", 10.0, 0.001, 0.005),
    (">= 30x smaller", 30.0, 0.003, None),
)


def _objective(r: dict, cold_weight: float) -> float:
    cold = r["d_valid_cold"] if not math.isnan(r["d_valid_cold"]) else 0.0
    return r["d_valid"] + cold_weight * cold


def targets(rows: list[dict], variant: str, cold_weight: float, n_runs: int) -> str:
    """The issue's targets against the uncompressed ``variant`` of the same run (mean changes).

    int8 / int4 everywhere: the grid point at keep 1. ``>= Nx``: among every (point, remap
    accounting) whose mean ratio is at least N (grid points count under both accountings, plans
    under their own), the one with the best validation objective; its test / test_cold changes
    decide. One line per accounting (array remaps, folded remaps)."""
    mine = [r for r in rows if r["variant"] == variant]
    lines = []

    def fmt(r: dict) -> str:
        return f"test {r['d_test']:+.4f} ± {r.get('d_test_std', 0.0):.4f}, test_cold {r['d_test_cold']:+.4f} ± {r.get('d_test_cold_std', 0.0):.4f}"

    for dt in ("int8", "int4"):
        r = next((r for r in mine if r["kind"] == "grid" and r["keep_ratio"] == 1.0 and r["dtype"] == dt), None)
        if r is None:
            continue
        ok = r["d_test"] >= -0.001
        lines.append([f"{dt} everywhere: test AUC drop <= 0.001", f"{r['ratio']:.2f}x", fmt(r), "met" if ok else "missed"])
    for name, min_ratio, test_lim, cold_lim in TARGETS:
        for acc in ("array", "fold"):
            cands = []
            for r in mine:
                if r["kind"].startswith("plan") and r["remap"] != acc:
                    continue
                ratio = r["ratio"] if r["kind"].startswith("plan") else r[f"ratio_{acc}"]
                if ratio >= min_ratio:
                    cands.append((r, ratio))
            goal = f"{name} ({acc} remaps): test drop <= {test_lim}" + (f", test_cold drop <= {cold_lim}" if cold_lim else "")
            if not cands:
                lines.append([goal, "-", f"no point reaches {min_ratio:g}x", "missed"])
                continue
            r, ratio = max(cands, key=lambda c: (_objective(c[0], cold_weight), c[1]))
            ok = r["d_test"] >= -test_lim and (cold_lim is None or r["d_test_cold"] >= -cold_lim)
            what = (f"{r['kind']} {r['budget_ratio']:g}x" if r["kind"].startswith("plan") else
                    f"{r['fill']} keep {r['keep_ratio']:g} {r['dtype']}")
            lines.append([goal, f"{ratio:.2f}x ({what})", fmt(r), "met" if ok else "missed"])
    for r in mine:  # does validation predict test? (the planner chooses on validation)
        if not r["kind"].startswith("plan"):
            continue
        gap = r["d_test"] - r["d_valid"]
        lines.append([f"{r['kind']} {r['budget_ratio']:g}x ({r['remap']} remaps): mean Δtest within 0.002 of mean "
                      f"Δvalid", f"{r['ratio']:.2f}x", f"valid {r['d_valid']:+.4f}, test {r['d_test']:+.4f} "
                      f"(gap {gap:+.4f})", "met" if abs(gap) <= 0.002 else "missed"])
    head = (f"## Targets\n\nMeans over {n_runs} run(s) of each point's change against the uncompressed `{variant}` "
            f"of the same run. Points at a size are chosen by the validation objective Δvalid + {cold_weight:g} x "
            "Δvalid_cold (never by test).\n\n")
    return head + markdown_table(["target", "chosen point", "Δ AUC (mean ± std over runs)", "status"], lines)
