"""The baseline's own search in a training run: ``study.baseline_search`` outside a study.

A distillation gain means something only against a baseline trained to its best (issue 21). A
distillation study searches the baseline's training settings per seed; ``sparse-kd train`` and
``sparse-kd pipeline`` do the same with the same key: besides ``baseline`` (the config's own
settings) each candidate (a list of ``train.*`` overrides) trains as ``baseline_search_<i>`` in
its own folder, and the one with the best valid AUC is reported as ``baseline`` (ties keep the
earlier one; test splits never choose). The teacher ranker and the distilled student keep the
config's ``train`` section: a setting that suits the baseline (e.g. weight decay strong enough to
silence its MLPs) may ruin a teacher that needs them.

Example (YAML)::

    study:
      baseline_search:
        - [train.weight_decay=0.1]
"""

from __future__ import annotations

import math
from typing import Mapping

from sparse_kd.config import ExperimentConfig, replace

DEFAULT = "baseline"


def baseline_candidates(cfg: ExperimentConfig) -> dict[str, ExperimentConfig]:
    """``baseline_search_<i>`` -> the config with that candidate's overrides, in order."""
    return {f"{DEFAULT}_search_{i}": replace(cfg, list(ovs)) for i, ovs in enumerate(cfg.study.baseline_search)}


def choose_baseline(cfg: ExperimentConfig, metrics: Mapping[str, dict]) -> dict:
    """The choice among ``baseline`` and its candidates (name -> split metrics): ``chosen`` (the best
    valid AUC; a ranker without one, e.g. stopped early, is never chosen), ``valid_auc`` per name
    and ``overrides`` per name (``baseline``: none)."""
    overrides = {DEFAULT: [], **{f"{DEFAULT}_search_{i}": list(ovs) for i, ovs in enumerate(cfg.study.baseline_search)}}

    def score(name: str) -> float:
        auc = metrics.get(name, {}).get("valid", {}).get("auc", float("nan"))
        return -math.inf if auc is None or math.isnan(auc) else float(auc)

    names = [n for n in overrides if n in metrics]
    chosen = max(names, key=lambda n: (score(n), -names.index(n)))
    return {"chosen": chosen, "valid_auc": {n: score(n) for n in names}, "overrides": {n: overrides[n] for n in names}}


def describe_choice(search: dict) -> str:
    """One line for the run's report: what the baseline row is."""
    parts = [f"{' '.join(search['overrides'][n]) or 'the config'} {search['valid_auc'][n]:.4f}" for n in search["valid_auc"]]
    chosen = " ".join(search["overrides"][search["chosen"]]) or "the config's settings"
    return (f"`baseline`: the best valid AUC of its training settings (study.baseline_search): {'; '.join(parts)}. "
            f"Chosen: {chosen}.")
