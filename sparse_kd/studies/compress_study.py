"""Compression study: test AUC vs embedding storage, keep ratio x dtype, for each trained variant.

For every variant (e.g. ``baseline`` and ``distilled``) of a run folder and every
(keep ratio, dtype) in ``StudyConfig.keep_ratios x StudyConfig.dtypes``, the variant is compressed
in memory and evaluated on valid, test and test_cold:

* dtype: every table (``default_dtype``); keep ratio: the tables in ``prune_features`` (default
  ``user_id`` and ``item_id``, the only large ones; pruning a table of a few rows saves at most
  a 128-byte cache line and costs accuracy; ``None`` prunes every table);
* importance, remap kind and fill come from the run's ``compress`` section (or ``base``);
  ``fills`` sweeps several fills (one series per variant and fill).

Embedding bytes are read from the compressed model's FBGEMM buffers (MB = 10^6 bytes).

Writes to ``out_dir``: ``compress_study.csv`` and ``.json`` (one row per variant x fill x point),
``compress_study.md`` (readable table) and ``compress_study.png``: test AUC vs embedding MB, one
series per variant (and fill), the Pareto front (no other point of the series is both smaller
and better) drawn as a step line and its points circled.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

from sparse_kd.config import CompressConfig, StudyConfig
from sparse_kd.metrics import EVAL_SPLITS as SPLITS
from sparse_kd.report import markdown_table

log = logging.getLogger(__name__)
FIELDS = ["variant", "fill", "keep_ratio", "dtype", "embedding_bytes", "embedding_mb", "ratio", "pareto"] + [
    f"{s}_{m}" for s in SPLITS for m in ("auc", "logloss")
] + ["fp32_test_auc", "seconds"]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """points (size, quality): True where no other point has size <= and quality >= with one strict."""
    out = []
    for k, (s, q) in enumerate(points):
        dominated = any(
            (s2 <= s and q2 >= q and (s2 < s or q2 > q)) for j, (s2, q2) in enumerate(points) if j != k
        )
        out.append(not dominated)
    return out


def run_compress_study(
    run_dir: Path,
    variants: Sequence[str],
    study_cfg: StudyConfig,
    out_dir: Path,
    base: Optional[CompressConfig] = None,
    prune_features: Optional[Sequence[str]] = ("user_id", "item_id"),
    fills: Optional[Sequence[str]] = None,
) -> list[dict]:
    """Sweep keep ratio x dtype (x fill) for each variant; write CSV / JSON / MD / PNG; return the rows."""
    from sparse_kd.compress.importance import table_importance
    from sparse_kd.compress.prune import table_settings
    from sparse_kd.compress.stage import compress_model, load_run, model_weights
    from sparse_kd.metrics import evaluate, fp32_forward, serving_forward
    from sparse_kd.student.export import load_dlrm

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    inp = None
    for variant in variants:
        if inp is None:
            inp = load_run(run_dir, variant)
            model = inp.model
        else:
            model = load_dlrm(run_dir / variant)
        base_cfg = base if base is not None else inp.cfg.compress
        if base_cfg.importance == "distill" and inp.text is None:
            base_cfg = dataclasses.replace(base_cfg, importance="frequency")
        weights = model_weights(model)
        pruned_here = list(weights) if prune_features is None else [f for f in prune_features if f in weights]
        imps = table_importance(base_cfg.importance, weights, inp.ds, inp.text)
        fp32 = evaluate(fp32_forward(model), inp.ds, inp.builder)
        log.info("[%s] fp32 test AUC %.4f", variant, fp32["test"]["auc"])
        for fill in (fills or [base_cfg.default_pruned_fill]):
            for r in study_cfg.keep_ratios:
                for dt in study_cfg.dtypes:
                    t0 = time.perf_counter()
                    cfg = dataclasses.replace(base_cfg, default_dtype=dt, default_pruned_fill=fill, budget_mb=0.0)
                    settings = table_settings(cfg, list(weights))
                    for f in pruned_here:
                        settings[f]["keep_ratio"] = float(r)
                    comp = compress_model(model, inp.ds, settings, cfg.importance, cfg.remap, inp.text, imps,
                                          cfg.dense_int8, cfg.row_alignment, cfg.serve_device)
                    m = evaluate(serving_forward(comp.serving), inp.ds, inp.builder)
                    row = {
                        "variant": variant, "fill": fill, "keep_ratio": float(r), "dtype": dt,
                        "embedding_bytes": comp.embedding_bytes, "embedding_mb": comp.embedding_bytes / 1e6,
                        "ratio": comp.fp32_bytes / max(1, comp.embedding_bytes), "pareto": False,
                        **{f"{s}_{k}": m[s][k] for s in SPLITS for k in ("auc", "logloss")},
                        "fp32_test_auc": fp32["test"]["auc"], "seconds": round(time.perf_counter() - t0, 2),
                    }
                    rows.append(row)
                    log.info("[%s/%s] keep %.2f %s: %.4f MB, test AUC %.4f", variant, fill, r, dt, row["embedding_mb"],
                             row["test_auc"])
                    del comp
    _mark_pareto(rows)
    _write(rows, out_dir, run_dir, variants, study_cfg, base, pruned_here)
    return rows


def _mark_pareto(rows: list[dict]) -> None:
    """Set each row's ``pareto``: on its series' front of (embedding bytes, test AUC)."""
    for key in sorted({_series(r, rows) for r in rows}):
        mine = [r for r in rows if _series(r, rows) == key]
        for r, on in zip(mine, pareto_front([(r["embedding_bytes"], r["test_auc"]) for r in mine])):
            r["pareto"] = on


def _series(row: dict, rows: list[dict]) -> str:
    """Series name: the variant, plus the fill when several fills were swept."""
    several = len({r["fill"] for r in rows}) > 1
    return f"{row['variant']}/{row['fill']}" if several else row["variant"]


def _write(rows: list[dict], out_dir: Path, run_dir: Path, variants, study_cfg: StudyConfig, base, pruned,
           stem: str = "compress_study", command: str = "") -> None:
    with open(out_dir / f"{stem}.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in FIELDS})
    doc = {"run_dir": str(run_dir), "variants": list(variants), "keep_ratios": list(study_cfg.keep_ratios),
           "dtypes": list(study_cfg.dtypes), "pruned_features": pruned,
           "base_compress": dataclasses.asdict(base) if base else None, "rows": rows}
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    table = markdown_table(
        ["variant", "fill", "keep", "dtype", "emb MB", "ratio", "valid AUC", "test AUC", "test_cold AUC", "Pareto"],
        [[r["variant"], r["fill"], r["keep_ratio"], r["dtype"], f"{r['embedding_mb']:.5f}", f"{r['ratio']:.2f}x", r["valid_auc"],
          r["test_auc"], r["test_cold_auc"], "*" if r["pareto"] else ""] for r in rows],
    )
    (out_dir / f"{stem}.md").write_text(
        "# Compression study: test AUC vs embedding storage\n\n"
        + (f"Produced by `{command}`. " if command else "")
        + f"Run `{run_dir}`; dtype applied to every table, keep ratio to {', '.join(pruned)}; bytes read from FBGEMM "
        "buffers (MB = 10^6 bytes); * = on the series' Pareto front.\n\n" + table + "\n"
    )
    print("\n" + table + "\n", flush=True)
    _plot(rows, out_dir / f"{stem}.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    names = list(dict.fromkeys(_series(r, rows) for r in rows))
    for k, variant in enumerate(names):
        mine = [r for r in rows if _series(r, rows) == variant]
        color = f"C{k}"
        ax.scatter([r["embedding_mb"] for r in mine], [r["test_auc"] for r in mine], color=color, s=22, alpha=0.6,
                   label=f"{variant}")
        front = sorted((r for r in mine if r["pareto"]), key=lambda r: r["embedding_mb"])
        ax.plot([r["embedding_mb"] for r in front], [r["test_auc"] for r in front], color=color, lw=1.5,
                drawstyle="steps-post", label=f"{variant} Pareto front")
        ax.scatter([r["embedding_mb"] for r in front], [r["test_auc"] for r in front], facecolors="none",
                   edgecolors=color, s=90, lw=1.5)
        for r in front:
            ax.annotate(f"{r['keep_ratio']:g}/{r['dtype']}", (r["embedding_mb"], r["test_auc"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("embedding storage (MB, real FBGEMM bytes incl. remaps)")
    ax.set_ylabel("test AUC")
    ax.set_title("Compression: test AUC vs embedding MB (keep ratio / dtype)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_compress_study_seeds(cfg, docs: Path) -> list[dict]:
    """The compression study over every seed of a distillation study (``output_dir/seed_<s>``), or
    over ``output_dir`` itself for a single run; rows are averaged over seeds (``*_std`` added).

    Also writes ``compress_targets.md``: each target of the compression issue against the mean
    uncompressed student of the last variant (the distilled one) and the uncompressed baseline.
    """
    import numpy as np

    from sparse_kd.studies.distill_study import seed_dir

    out = Path(cfg.output_dir)
    runs = [seed_dir(cfg, s) for s in cfg.study.seeds if seed_dir(cfg, s).is_dir()] or [out]
    per_run = []
    for run in runs:
        sub = run / "compress_study"
        sub.mkdir(parents=True, exist_ok=True)
        per_run.append(run_compress_study(run, cfg.study.compress_variants, cfg.study, sub, base=cfg.compress,
                                          fills=list(cfg.study.compress_fills)))
    keyf = lambda r: (r["variant"], r["fill"], r["keep_ratio"], r["dtype"])  # noqa: E731
    rows = []
    for base_row in per_run[0]:
        same = [next(r for r in rows_ if keyf(r) == keyf(base_row)) for rows_ in per_run]
        row = dict(base_row)
        for k in ["embedding_bytes", "embedding_mb", "ratio", "fp32_test_auc"] + [f"{s}_{m}" for s in SPLITS for m in ("auc", "logloss")]:
            vals = np.array([r[k] for r in same], dtype=float)
            row[k] = float(vals.mean())
            if k.endswith("auc"):
                row[f"{k}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        row["seeds"] = len(same)
        rows.append(row)
    _mark_pareto(rows)
    docs.mkdir(parents=True, exist_ok=True)
    import sys

    command = "sparse-kd " + " ".join(sys.argv[1:])
    stem = f"compress_study_{cfg.name}"
    _write(rows, docs, out, cfg.study.compress_variants, cfg.study, cfg.compress, ["user_id", "item_id"], stem, command)
    _targets(rows, per_run, cfg, docs, len(runs), f"compress_targets_{cfg.name}", command)
    return rows


def _targets(rows: list[dict], per_run: list[list[dict]], cfg, docs: Path, n_runs: int, stem: str, command: str) -> None:
    """compress_targets.md: int8 / int4 drops and the >= 10x point, against the fp32 students."""
    import numpy as np

    distilled, baseline = cfg.study.compress_variants[-1], cfg.study.compress_variants[0]
    fp32 = lambda v, split: float(np.mean([next(r for r in rr if r["variant"] == v and r["dtype"] == "fp32"  # noqa: E731
                                                  and r["keep_ratio"] == 1.0)[f"{split}_auc"] for rr in per_run]))
    ref_test, base_cold = fp32(distilled, "test"), fp32(baseline, "test_cold")
    mine = [r for r in rows if r["variant"] == distilled]
    get = lambda dt: next((r for r in mine if r["dtype"] == dt and r["keep_ratio"] == 1.0), None)  # noqa: E731
    lines = []
    for dt, limit in (("int8", 0.0005), ("int4", 0.001)):
        r = get(dt)
        if r:
            drop = ref_test - r["test_auc"]
            lines.append([f"{dt} everywhere: test AUC drop <= {limit}", f"{drop:+.4f} ({r['ratio']:.2f}x smaller)",
                          "met" if drop <= limit else "missed"])
    ok10 = [r for r in mine if r["ratio"] >= 10.0]
    best = max(ok10, key=lambda r: r["test_auc"]) if ok10 else None
    if best:
        drop = ref_test - best["test_auc"]
        cold_ok = best["test_cold_auc"] >= base_cold
        lines.append([">= 10x smaller: test AUC drop <= 0.002", f"{drop:+.4f} at keep {best['keep_ratio']:g} {best['dtype']} "
                      f"({best['ratio']:.1f}x, fill {best['fill']})", "met" if drop <= 0.002 else "missed"])
        lines.append([">= 10x smaller: test_cold AUC >= uncompressed baseline", f"{best['test_cold_auc']:.4f} vs {base_cold:.4f}",
                      "met" if cold_ok else "missed"])
    else:
        lines.append([">= 10x smaller", "no swept point reaches 10x", "missed"])
    table = markdown_table(["target (mean over runs)", "measured", "status"], lines)
    (docs / f"{stem}.md").write_text(
        f"# Compression targets\n\nProduced by `{command}`. {n_runs} run(s); reference: uncompressed {distilled}, test AUC {ref_test:.4f}; "
        f"uncompressed {baseline} test_cold AUC {base_cold:.4f}.\n\n{table}\n"
    )
    print("\n" + table + "\n", flush=True)
