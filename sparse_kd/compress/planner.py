"""Budget planner: per-table keep ratio and dtype that fit N MB of embedding storage with the least
loss of validation AUC.

Notation: F tables, O options per table (keep ratio x dtype), MB = 10^6 bytes.

1. Bytes of every option (table, keep ratio, dtype) are read from a real one-table module of
   the serving kernel built for it (rows incl. scale/bias and padding, and the remap):
   :func:`option_bytes`. Embedding storage = sum over tables.
   If even the smallest option of every table does not fit, :class:`BudgetError` names
   ``compress.budget_mb`` and the smallest feasible size, before anything is evaluated.
2. Sensitivity: each option is applied to ONE table while every other table stays fp32, and the
   validation AUC is measured. The table's rows are pruned (importance from the config) and
   quantized + dequantized with FBGEMM's own row-wise ops, then looked up by the fp32 model:
   FBGEMM's quantized lookup equals the sum of the dequantized rows exactly (tested), so this is
   the quantized model's AUC without building F x O quantized models.
3. Choice: loss(table, option) = valid AUC of the fp32 model - valid AUC with that option.
   Assuming losses add up across tables, the plan minimising the summed loss under the budget
   is found exactly (multiple-choice knapsack, by merging per-table Pareto fronts of
   (bytes, loss)); ties go to fewer bytes.
4. The caller (:func:`sparse_kd.compress.stage.compress_run`) builds the chosen plan for real,
   checks its bytes against the budget and measures its joint validation AUC.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from sparse_kd.compress import quantize as Q
from sparse_kd.compress.importance import RowImportance
from sparse_kd.compress.prune import PrunedTable, prune_table, select_rows
from sparse_kd.config import QUANT_DTYPES, ConfigError
from sparse_kd.data.batching import BatchBuilder
from sparse_kd.data.schema import RecDataset
from sparse_kd.metrics import fp32_forward, split_batches, split_metrics
from sparse_kd.report import markdown_table

log = logging.getLogger(__name__)

DEFAULT_KEEP_RATIOS = (1.0, 0.5, 0.25, 0.1)
MB = 1e6


class BudgetError(ConfigError):
    """compress.budget_mb is smaller than any plan."""


# ------------------------------------------------------------------------------------------
# Bytes of one option, from a real TBE


_BYTES_CACHE: dict[tuple, dict] = {}


def option_bytes(num_original: int, num_rows: int, dim: int, dtype: str, num_mapped: Optional[int], remap: str,
                 row_alignment: int = Q.ROW_ALIGNMENT, kernel: str = Q.KERNEL_CPU) -> dict:
    """Real bytes of a table with ``num_rows`` stored rows, read from a one-table module of the
    serving kernel (:func:`~.quantize.option_bytes`): {"weights", "padding", "remap", "total"}.
    num_mapped: ids (of ``num_original``) that have a row, None when the table is not pruned (no remap)."""
    key = (num_original, num_rows, dim, dtype, num_mapped, remap, row_alignment, kernel)
    if key not in _BYTES_CACHE:
        b = Q.option_bytes(num_original, num_rows, dim, dtype, num_mapped, remap, row_alignment, kernel)
        _BYTES_CACHE[key] = {k: b[k] for k in ("weights", "padding", "remap", "total")}
    return dict(_BYTES_CACHE[key])


def _stored_rows(n: int, kept: int, fill: str) -> int:
    if kept >= n:
        return n
    return {"zero": kept, "mean": kept + 1, "text": n}[fill]


def _mapped(n: int, kept: int, fill: str) -> Optional[int]:
    """Ids with a row in the remap, None when there is no remap (nothing pruned, or text fill in place)."""
    if kept >= n or fill == "text":
        return None
    return kept if fill == "zero" else n


# ------------------------------------------------------------------------------------------
# Plan


@dataclass
class Option:
    feature: str
    keep_ratio: float
    dtype: str
    rows: int
    bytes: int
    fp32_bytes: int = 0
    valid_auc: float = float("nan")
    loss: float = float("nan")


@dataclass
class Plan:
    """choices: feature -> Option; bytes: total embedding bytes (predicted from per-option TBEs)."""

    choices: dict[str, Option]
    budget_bytes: int
    base_valid_auc: float
    options: list[Option] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bytes(self) -> int:
        return sum(o.bytes for o in self.choices.values())

    @property
    def predicted_loss(self) -> float:
        return sum(o.loss for o in self.choices.values())

    def keep_ratios(self) -> dict[str, float]:
        return {f: o.keep_ratio for f, o in self.choices.items()}

    def dtypes(self) -> dict[str, str]:
        return {f: o.dtype for f, o in self.choices.items()}

    def table(self) -> str:
        rows = [[f, o.keep_ratio, o.dtype, o.rows, o.fp32_bytes, o.bytes, o.valid_auc, o.loss]
                for f, o in self.choices.items()]
        head = (f"budget {self.budget_bytes / MB:.6f} MB, plan {self.bytes / MB:.6f} MB, fp32 valid AUC "
                f"{self.base_valid_auc:.4f}, predicted AUC loss {self.predicted_loss:.4f} (sum of per-table losses; "
                "valid AUC per row = that table alone compressed)")
        return head + "\n" + markdown_table(
            ["feature", "keep", "dtype", "rows", "bytes fp32", "bytes", "valid AUC", "valid AUC loss"], rows)

    def to_dict(self) -> dict:
        return {
            "budget_bytes": self.budget_bytes,
            "plan_bytes": self.bytes,
            "base_valid_auc": self.base_valid_auc,
            "predicted_auc_loss": self.predicted_loss,
            "choices": {f: vars(o) for f, o in self.choices.items()},
            "sensitivity": [vars(o) for o in self.options],
            "seconds": round(self.seconds, 2),
        }


def choose(options: Mapping[str, Sequence[Option]], budget_bytes: int) -> dict[str, Option]:
    """Exact multiple-choice knapsack: one option per table, total bytes <= budget, least summed
    loss (ties: fewer bytes). Raises BudgetError when nothing fits."""
    smallest = sum(min(o.bytes for o in opts) for opts in options.values())
    if smallest > budget_bytes:
        raise BudgetError(
            f"compress.budget_mb={budget_bytes / MB:g} is smaller than any plan: the smallest feasible embedding "
            f"storage is {smallest / MB:.6f} MB ({smallest} bytes). Raise compress.budget_mb to at least "
            f"{np.ceil(smallest / MB * 1e6) / 1e6:.6f}."
        )
    states: list[tuple[int, float, tuple]] = [(0, 0.0, ())]  # (bytes, loss, choices)
    for f, opts in options.items():
        merged = [(b + o.bytes, l + o.loss, c + (o,)) for b, l, c in states for o in opts if b + o.bytes <= budget_bytes]
        merged.sort(key=lambda s: (s[0], s[1]))
        front: list[tuple[int, float, tuple]] = []
        for s in merged:  # keep the Pareto front: bytes up, loss strictly down
            if not front or s[1] < front[-1][1] - 1e-12:
                front.append(s)
        states = front
    best = min(states, key=lambda s: (s[1], s[0]))
    return {o.feature: o for o in best[2]}


def _with_rows(model, feature: str, rows: torch.Tensor):
    """Context: the fp32 model's table of ``feature`` temporarily holds ``rows`` (N, D)."""

    class _Ctx:
        def __enter__(self_):
            w = model.sparse_arch.embedding_bag_collection.embedding_bags[Q.table_name(feature)].weight
            self_.w, self_.saved = w, w.detach().clone()
            with torch.no_grad():
                w.copy_(rows)

        def __exit__(self_, *exc):
            with torch.no_grad():
                self_.w.copy_(self_.saved)

    return _Ctx()


def simulated_rows(pt: PrunedTable, dtype: str) -> torch.Tensor:
    """(N, D): what each original id's lookup returns after pruning + quantization (dequantized)."""
    w, sb = Q.quantize_rows(pt.weight, dtype)
    deq = Q.dequantize_rows(w, sb, dtype)
    if pt.remap is None:
        return deq
    out = torch.zeros(pt.num_original, deq.shape[1])
    ok = pt.remap >= 0
    out[ok] = deq[pt.remap[ok].long()]
    return out


def plan_budget(
    model,
    ds: RecDataset,
    builder: BatchBuilder,
    importances: Mapping[str, RowImportance],
    fills: Mapping[str, str],
    budget_mb: float,
    remap: str = "array",
    text: Optional[Mapping[str, torch.Tensor]] = None,
    keep_ratios: Iterable[float] = DEFAULT_KEEP_RATIOS,
    dtypes: Iterable[str] = QUANT_DTYPES,
    row_alignment: int = Q.ROW_ALIGNMENT,
    batch_size: int = 4096,
    kernel: str = Q.KERNEL_CPU,
) -> Plan:
    """Choose keep ratio and dtype per table for ``budget_mb`` MB (see the module doc)."""
    from sparse_kd.compress.importance import TEXT_FEATURES

    t0 = time.perf_counter()
    budget = int(math.floor(budget_mb * MB + 1e-6))  # MB = 10^6 bytes; tolerate float noise
    model = copy.deepcopy(model).eval()  # sensitivity swaps table rows in and out: never touch the caller's model
    ebc = model.sparse_arch.embedding_bag_collection
    weights = {f: ebc.embedding_bags[Q.table_name(f)].weight.detach() for c in ebc.embedding_bag_configs() for f in c.feature_names}
    dim = next(iter(weights.values())).shape[1]
    keep_ratios, dtypes = sorted(set(keep_ratios), reverse=True), list(dtypes)
    # 1. bytes of every option, and feasibility, before any evaluation
    options: dict[str, list[Option]] = {}
    kept_sets: dict[tuple[str, float], np.ndarray] = {}
    for f, w in weights.items():
        n = w.shape[0]
        fill = fills.get(f, "zero")
        if fill == "text" and (text is None or f not in TEXT_FEATURES):
            fill = "mean"
        opts = []
        for r in keep_ratios:
            kept = select_rows(importances[f], keep_ratio=r)
            if any(len(kept_sets[(f, r2)]) == len(kept) for r2 in keep_ratios if (f, r2) in kept_sets):
                continue  # same rows as a larger ratio (tiny tables)
            kept_sets[(f, r)] = kept
            rows = _stored_rows(n, len(kept), fill)
            for dt in dtypes:
                b = option_bytes(n, rows, dim, dt, _mapped(n, len(kept), fill), remap, row_alignment, kernel)
                opts.append(Option(f, r, dt, rows, b["total"], fp32_bytes=int(w.numel() * w.element_size())))
        options[f] = opts
    smallest = sum(min(o.bytes for o in opts) for opts in options.values())
    if smallest > budget:
        choose(options, budget)  # raises the BudgetError
    # 2. sensitivity, one table at a time
    valid = split_batches(ds, builder, "valid", batch_size)
    labels = torch.from_numpy(ds.splits["valid"].label)
    fwd = fp32_forward(model)
    base = split_metrics(fwd, valid, labels)["auc"]
    for f, opts in options.items():
        fill = fills.get(f, "zero")
        t = text[TEXT_FEATURES[f]] if (text is not None and f in TEXT_FEATURES) else None
        if fill == "text" and t is None:
            fill = "mean"
        pruned_cache: dict[float, PrunedTable] = {}
        for o in opts:
            if o.keep_ratio not in pruned_cache:
                pruned_cache[o.keep_ratio] = prune_table(f, weights[f], kept_sets[(f, o.keep_ratio)], fill, t,
                                                         fit_mask=importances[f].freq > 0)
            with _with_rows(model, f, simulated_rows(pruned_cache[o.keep_ratio], o.dtype)):
                o.valid_auc = split_metrics(fwd, valid, labels)["auc"]
            o.loss = base - o.valid_auc
    # 3. choice
    choices = choose(options, budget)
    plan = Plan(choices, budget, base, [o for opts in options.values() for o in opts], time.perf_counter() - t0)
    log.info("budget plan (%d options evaluated in %.1fs):\n%s", len(plan.options), plan.seconds, plan.table())
    return plan
