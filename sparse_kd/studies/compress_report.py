"""The compression study's outputs: ``<stem>.csv`` / ``.json`` (one row per point), ``<stem>.md``
(readable table, per-plan table, targets) and ``<stem>.png`` (test and test_cold AUC against
embedding MB, one series per variant and fill, the plans as stars, the uncompressed students as
lines), and each series' Pareto front."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Sequence

from sparse_kd.config.dtypes import is_tiered
from sparse_kd.config import StudyConfig
from sparse_kd.metrics import EVAL_SPLITS
from sparse_kd.report import markdown_table

SPLITS = ("valid", "valid_cold", "test", "test_cold")
assert set(SPLITS) == set(EVAL_SPLITS)
FIELDS = (["variant", "kind", "fill", "keep_ratio", "dtype", "budget_ratio", "remap", "plan", "embedding_bytes",
           "embedding_mb", "ratio", "bytes_array", "bytes_fold", "ratio_array", "ratio_fold", "pareto"]
          + [f"{s}_{m}" for s in SPLITS for m in ("auc", "logloss")] + [f"d_{s}" for s in SPLITS]
          + ["fp32_test_auc", "seconds"])



def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """points (size, quality): True where no other point has size <= and quality >= with one strict."""
    out = []
    for k, (s, q) in enumerate(points):
        dominated = any(
            (s2 <= s and q2 >= q and (s2 < s or q2 > q)) for j, (s2, q2) in enumerate(points) if j != k
        )
        out.append(not dominated)
    return out



def mark_pareto(rows: list[dict]) -> None:
    """Set each row's ``pareto``: on its series' front of (embedding bytes, test AUC)."""
    for key in sorted({_series(r, rows) for r in rows}):
        mine = [r for r in rows if _series(r, rows) == key]
        for r, on in zip(mine, pareto_front([(r["embedding_bytes"], r["test_auc"]) for r in mine])):
            r["pareto"] = on



def _series(row: dict, rows: list[dict]) -> str:
    """Series name: the variant, plus the fill when several fills were swept, plus ``tiers`` for
    precision-tier points (plans: their own)."""
    if row["kind"].startswith("plan"):
        return f"{row['variant']}/{row['kind']}"
    several = len({r["fill"] for r in rows if r["kind"] == "grid"}) > 1
    name = f"{row['variant']}/{row['fill']}" if several else row["variant"]
    return f"{name}/tiers" if is_tiered(str(row["dtype"])) else name



def _fmt_keep(r: dict) -> str:
    return r["keep_ratio"] if isinstance(r["keep_ratio"], str) else f"{r['keep_ratio']:g}"



def study_table(rows: list[dict], seeds: bool = False) -> str:
    headers = ["variant", "fill", "keep", "dtype", "emb MB", "ratio", "ratio array", "ratio fold"] + \
        [f"{s} AUC" for s in SPLITS] + ["Δ valid", "Δ valid_cold", "Δ test", "Δ test_cold", "Pareto"]
    body = []
    for r in rows:
        fill = f"{r['kind']} {r['budget_ratio']:g}x {r['remap']}" if r["kind"].startswith("plan") else r["fill"]
        body.append([r["variant"], fill, _fmt_keep(r), r["dtype"], f"{r['embedding_mb']:.5f}", f"{r['ratio']:.2f}x",
                     f"{r['ratio_array']:.2f}x", f"{r['ratio_fold']:.2f}x"] + [r[f"{s}_auc"] for s in SPLITS]
                    + [f"{r[f'd_{s}']:+.4f}" + (f" ± {r[f'd_{s}_std']:.4f}" if seeds and f"d_{s}_std" in r else "")
                       for s in SPLITS] + ["*" if r["pareto"] else ""])
    return markdown_table(headers, body)



def _plans_table(rows: list[dict]) -> str:
    """Each plan of each run: what it chose and its changes on every split."""
    body = []
    for r in rows:
        if not r["kind"].startswith("plan"):
            continue
        for j, plan in enumerate(r.get("plans", [r["plan"]])):
            d = [r.get(f"d_{s}_runs", [r[f"d_{s}"]])[j] for s in SPLITS]
            body.append([f"{r['budget_ratio']:g}x {r['remap']}" + (" + finetune" if r["kind"] == "plan+ft" else ""), j,
                         *(f"{x:+.4f}" for x in d), plan])
    if not body:
        return ""
    return markdown_table(["plan", "run", *(f"Δ {s}" for s in SPLITS), "choice per table (keep+fill(clusters) dtype)"], body)



def write_study(rows: list[dict], out_dir: Path, run_dir: Path, variants, study_cfg: StudyConfig, base, pruned,
           stem: str = "compress_study", command: str = "", extra_md: str = "", n_runs: int = 1) -> None:
    with open(out_dir / f"{stem}.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in FIELDS})
    doc = {"run_dir": str(run_dir), "variants": list(variants), "keep_ratios": list(study_cfg.keep_ratios),
           "dtypes": list(study_cfg.dtypes), "budgets": list(study_cfg.compress_budgets),
           "remaps": list(study_cfg.compress_remaps), "pruned_features": pruned, "runs": n_runs,
           "base_compress": dataclasses.asdict(base) if base else None, "rows": rows}
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    table = study_table(rows, seeds=n_runs > 1)
    plans = _plans_table(rows)
    (out_dir / f"{stem}.md").write_text(
        "# Compression study: AUC vs embedding storage\n\n"
        + (f"Produced by `{command}`. " if command else "")
        + f"Run `{run_dir}` ({n_runs} run(s); numbers are means over runs). Grid points: dtype on every table, keep "
        f"ratio and fill on {', '.join(pruned)}; plan points: the budget planner, chosen on valid + valid_cold. Bytes "
        "read from the serving model's buffers (MB = 10^6 bytes); `ratio` as built, `ratio array` with an int32 remap "
        "per pruned table, `ratio fold` with the remaps folded into the entity bags (same lookups, same AUCs). "
        "Δ = compressed - uncompressed of the same variant and run (± spread over runs); * = on the series' Pareto "
        "front of (bytes, test AUC).\n\n"
        + (extra_md + "\n\n" if extra_md else "") + table + "\n"
        + ("\n## Plans\n\n" + plans + "\n" if plans else "")
    )
    print("\n" + table + "\n", flush=True)
    _plot(rows, out_dir / f"{stem}.png")



def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharex=True)
    names = list(dict.fromkeys(_series(r, rows) for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    for ax, split in zip(axes, ("test", "test_cold")):
        for k, name in enumerate(names):
            mine = [r for r in rows if _series(r, rows) == name]
            color = f"C{k}"
            if mine[0]["kind"].startswith("plan"):
                ax.scatter([r["embedding_mb"] for r in mine], [r[f"{split}_auc"] for r in mine], marker="*", s=160,
                           color=color, edgecolors="black", lw=0.6, zorder=5, label=name)
                for j, r in enumerate(mine):
                    ax.annotate(f"{r['budget_ratio']:g}x {r['remap']}", (r["embedding_mb"], r[f"{split}_auc"]),
                                fontsize=7, xytext=(5, 4 - 9 * (j % 2)), textcoords="offset points")
                continue
            ax.scatter([r["embedding_mb"] for r in mine], [r[f"{split}_auc"] for r in mine], color=color, s=18,
                       alpha=0.55, label=name)
            on = pareto_front([(r["embedding_bytes"], r[f"{split}_auc"]) for r in mine])  # this panel's front
            front = sorted((r for r, o in zip(mine, on) if o), key=lambda r: r["embedding_mb"])
            ax.plot([r["embedding_mb"] for r in front], [r[f"{split}_auc"] for r in front], color=color, lw=1.2,
                    drawstyle="steps-post")
        for j, v in enumerate(variants):
            ref = [r for r in rows if r["variant"] == v and r["kind"] == "grid" and r["keep_ratio"] == 1.0
                   and r["dtype"] == "fp32"]
            if ref:
                ax.axhline(ref[0][f"{split}_auc"], color="gray", ls=["--", ":", "-."][j % 3], lw=1,
                           label=f"{v} uncompressed")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("embedding storage (MB, serving buffers incl. remaps)")
        ax.set_ylabel(f"{split} AUC")
        ax.set_title(f"{split} AUC vs embedding MB (lines: each series' front on {split})")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

