"""What a training run reports: ``metrics.json`` and ``metrics.md`` in the run folder, and the
same tables on stdout (rank 0 only).

The quality table has a row per trained ranker and, with ``train.mf_reference``, a row that is
not this project's model: plain matrix factorisation with biases, tuned and stopped on valid, on
the same splits (:mod:`sparse_kd.mf_reference`). It shows whether the baseline was trained to a
level an outside model reaches, before anyone reads a distillation gain off the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from sparse_kd import atomic
from sparse_kd.baseline_search import describe_choice
from sparse_kd.config import ExperimentConfig, to_dict
from sparse_kd.data.schema import RecDataset
from sparse_kd.mf_reference import reference
from sparse_kd.report import metrics_table
from sparse_kd.student.cost import cost_table
from sparse_kd.student.spec import RankerResult

REFERENCE = "mf_reference"


def reference_note(ref: dict, dim: int) -> str:
    """One line under the table saying what the reference row is (or why it is missing)."""
    if "error" in ref:
        return f"`{REFERENCE}` failed ({ref['error']}); the rankers above are unaffected."
    s = ref["settings"]
    return (f"`{REFERENCE}`: not this project's model: matrix factorisation with user, item and global biases, "
            f"{dim} dims, lr {s['lr']:g} and weight_decay {s['weight_decay']:g} chosen on valid AUC, best epoch "
            f"{ref['best_epoch']} of {ref['epochs']}, on the same splits. A ranker below it on valid was not trained "
            "to its best.")


def write_run_report(cfg: ExperimentConfig, ds: RecDataset, world_size: int, seed: int,
                     results: dict[str, RankerResult], costs: dict[str, dict],
                     baseline_search: Optional[dict] = None) -> Optional[dict]:
    """Write ``metrics.json`` / ``metrics.md`` for the rankers in ``results`` and print the tables.
    With ``train.mf_reference`` first trains the reference (single process, this rank). Returns
    the reference's result, or None. ``baseline_search``: how ``baseline`` was chosen
    (:func:`~sparse_kd.baseline_search.choose_baseline`), written and said under the table."""
    metrics = {name: r.metrics for name, r in results.items()}
    ref = reference(ds, cfg.student.embedding_dim, seed) if cfg.train.mf_reference else None
    doc = {
        "config": to_dict(cfg),
        "seed": seed,
        "world_size": world_size,
        "data": ds.summary(),
        "data_report": ds.report,
        "metrics": metrics,
        "examples_per_s": {n: r.examples_per_s for n, r in results.items()},
        "cost": costs,
        "history": {n: r.history for n, r in results.items()},
    }
    if baseline_search is not None:
        doc["baseline_search"] = baseline_search
    shown = dict(metrics)
    if ref is not None:
        doc[REFERENCE] = ref
        if "error" not in ref:
            # its split metrics, on the splits the rankers were evaluated on (metrics_table orders them)
            shown[REFERENCE] = {s: ref[s] for s in {s for m in metrics.values() for s in m} if s in ref}
    out = Path(cfg.output_dir)
    atomic.write_text(out / "metrics.json", json.dumps(doc, indent=1))
    text = metrics_table(shown)
    if baseline_search is not None:
        text += "\n\n" + describe_choice(baseline_search)
    if ref is not None:
        text += "\n\n" + reference_note(ref, cfg.student.embedding_dim)
    text += "\n\nCost (the served student needs none of the teacher):\n\n" + cost_table(
        costs, doc["examples_per_s"], "distilled" if "distilled" in costs else "baseline")
    atomic.write_text(out / "metrics.md", text + "\n")
    print("\n" + text + "\n", flush=True)
    return ref

