"""Budget planner: per-table keep ratio, dtype and fill that fit N MB of embedding storage with
the least loss of validation AUC, warm and cold.

Notation: F tables, O options per table (keep ratio x fill x dtype), MB = 10^6 bytes.

1. Options of a table: every keep ratio (rows by importance), and for a pruned table every
   candidate fill (``zero``; ``cluster`` at every cluster ratio; the fill the config names),
   each at every dtype, and at every precision-tier split of ``compress.planner_tiers``
   (:mod:`~.tiers`: the most-read stored rows in more bits). Bytes of every option are read from a real one-table module of the
   serving kernel built for it (rows incl. scale/bias and padding, and the remap; none when the
   remap is folded into the entity bags, :func:`sparse_kd.compress.prune.fold_remaps`):
   :func:`option_bytes`. Embedding storage = sum over tables. If even the smallest option of
   every table does not fit, :class:`BudgetError` names ``compress.budget_mb`` and the smallest
   feasible size, before anything is evaluated.
2. Sensitivity: each option is applied to ONE table while every other table stays fp32, and
   AUC is measured on ``valid`` and on ``valid_cold`` (interactions of items never seen in
   training; the planner never reads ``test`` or ``test_cold``). The table's rows are pruned
   and filled, quantized + dequantized with FBGEMM's own row-wise ops, then looked up by the
   fp32 model: the quantized lookup equals the sum of the dequantized rows (tested), so this is
   the quantized model's AUC without building F x O quantized models.
3. Choice: loss(table, option) = (valid AUC of the fp32 model - valid AUC with that option)
   + ``cold_weight`` x (the same on valid_cold; left out when the dataset has no valid_cold
   interactions). A negative loss (the option measured better than fp32) counts as 0: among
   hundreds of options some gain on validation by chance, and summing such gains over tables
   drives a plan to compress far past its budget on noise (``Option.measured_loss`` keeps the
   measured value). Noise: with ``confidence`` z > 0, each option's loss is the measured one
   plus z standard errors of it, estimated by a paired Poisson bootstrap of the validation rows
   (``bootstrap`` resamples, the same for every option and the fp32 model:
   :func:`sparse_kd.metrics.weighted_aucs`). An option that changes few predictions has a small
   error and one that changes many a large one, so among options within noise of each other
   the plan keeps more rows and bits instead of the one luckiest on validation.
   Assuming losses add up across tables, the plan minimising the summed loss
   under the budget is found exactly (multiple-choice knapsack over per-table Pareto fronts of
   (bytes, loss)); among plans of equal loss the largest is taken, i.e. a plan compresses
   beyond its budget only where that is measured to cost nothing more.
4. The caller (:func:`sparse_kd.compress.stage.compress_run`) builds the chosen plan for real,
   checks its bytes against the budget and measures its joint AUC on every split.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from sparse_kd.compress import rows as QR
from sparse_kd.compress import table_bytes as TB
from sparse_kd.compress import tbe as TBE
from sparse_kd.compress import tiers as TI
from sparse_kd.compress.layout import row_reads
from sparse_kd.serve.format import KERNEL_CPU
from sparse_kd.compress.importance import TEXT_FEATURES, RowImportance
from sparse_kd.compress.prune import (
    CLUSTER_FILLS,
    DEFAULT_CLUSTER_RATIO,
    PrunedTable,
    effective_fill,
    num_clusters,
    prune_table,
    select_rows,
)
from sparse_kd.config import QUANT_DTYPES, ConfigError
from sparse_kd.config.dtypes import is_tiered
from sparse_kd.data.batching import BatchBuilder
from sparse_kd.data.schema import RecDataset
from sparse_kd.metrics import auc, bootstrap_weights, fp32_forward, predict_split, split_batches, weighted_aucs
from sparse_kd.report import markdown_table

log = logging.getLogger(__name__)

DEFAULT_KEEP_RATIOS = (1.0, 0.75, 0.5, 0.3, 0.2, 0.1, 0.05)
DEFAULT_FILLS = ("zero", "cluster")
DEFAULT_CLUSTER_RATIOS = (0.02, 0.05, 0.1)
MB = 1e6
COLD_SPLIT = "valid_cold"


class BudgetError(ConfigError):
    """compress.budget_mb is smaller than any plan."""


# ------------------------------------------------------------------------------------------
# Bytes of one option, from a real one-table module


_BYTES_CACHE: dict[tuple, dict] = {}


def option_bytes(num_original: int, num_rows: int, dim: int, dtype: str, num_mapped: Optional[int], remap: str,
                 row_alignment: int = TBE.ROW_ALIGNMENT, kernel: str = KERNEL_CPU) -> dict:
    """Real bytes of a table with ``num_rows`` stored rows, read from a one-table module of the
    serving kernel (:func:`~.quantize.option_bytes`): {"weights", "padding", "remap", "total"}.
    num_mapped: ids (of ``num_original``) that have a row, None when the table is not pruned (no
    remap). ``remap="fold"``: the remap lives in the entity bags, the module holds none."""
    if remap == "fold":
        num_original, num_mapped, remap = num_rows, None, "array"
    key = (num_original, num_rows, dim, dtype, num_mapped, remap, row_alignment, kernel)
    if key not in _BYTES_CACHE:
        b = TB.option_bytes(num_original, num_rows, dim, dtype, num_mapped, remap, row_alignment, kernel)
        _BYTES_CACHE[key] = {k: b[k] for k in ("weights", "padding", "remap", "total")}
    return dict(_BYTES_CACHE[key])


def pruned_bytes(pt: PrunedTable, dtype: str, remap: str, row_alignment: int = TBE.ROW_ALIGNMENT,
                 kernel: str = KERNEL_CPU) -> dict:
    """:func:`option_bytes` of a pruned table served with ``remap`` (array, hash or fold)."""
    r = pt.remap if pt.remap is not None else pt.folded
    mapped = None if r is None else int((r >= 0).sum())
    return option_bytes(pt.num_original, pt.num_rows, int(pt.weight.shape[1]), dtype, mapped, remap, row_alignment, kernel)


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
    fill: str = "zero"
    cluster_ratio: float = 0.0
    clusters: int = 0
    valid_cold_auc: float = float("nan")
    measured_loss: float = float("nan")  # before the noise margin and clipping at 0
    loss_se: float = 0.0  # bootstrap standard error of measured_loss (``loss`` = max(measured + z * se, 0))


@dataclass
class Plan:
    """choices: feature -> Option; bytes: total embedding bytes (predicted from per-option modules)."""

    choices: dict[str, Option]
    budget_bytes: int
    base_valid_auc: float
    options: list[Option] = field(default_factory=list)
    seconds: float = 0.0
    base_valid_cold_auc: float = float("nan")
    cold_weight: float = 0.0
    remap: str = "array"

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

    def settings(self) -> dict[str, dict]:
        """feature -> {"keep_ratio", "dtype", "fill", "cluster_ratio"}, as :func:`~.prune.table_settings`."""
        return {f: {"keep_ratio": o.keep_ratio, "dtype": o.dtype, "fill": o.fill,
                    "cluster_ratio": o.cluster_ratio or DEFAULT_CLUSTER_RATIOS[0]} for f, o in self.choices.items()}

    def table(self) -> str:
        rows = [[f, o.keep_ratio, o.fill, o.clusters, o.dtype, o.rows, o.fp32_bytes, o.bytes, o.valid_auc,
                 o.valid_cold_auc, o.measured_loss, o.loss_se, o.loss] for f, o in self.choices.items()]
        head = (f"budget {self.budget_bytes / MB:.6f} MB, plan {self.bytes / MB:.6f} MB (remap {self.remap}), fp32 valid "
                f"AUC {self.base_valid_auc:.4f}, valid_cold AUC {self.base_valid_cold_auc:.4f}, predicted loss "
                f"{self.predicted_loss:.4f} (sum over tables of valid AUC loss + {self.cold_weight:g} x valid_cold AUC "
                "loss, each table alone compressed, plus the noise margin, gains counted as 0)")
        return head + "\n" + markdown_table(
            ["feature", "keep", "fill", "clusters", "dtype", "rows", "bytes fp32", "bytes", "valid AUC", "valid_cold AUC",
             "measured loss", "loss se", "loss"], rows)

    def to_dict(self) -> dict:
        return {
            "budget_bytes": self.budget_bytes,
            "plan_bytes": self.bytes,
            "remap": self.remap,
            "base_valid_auc": self.base_valid_auc,
            "base_valid_cold_auc": self.base_valid_cold_auc,
            "cold_weight": self.cold_weight,
            "predicted_auc_loss": self.predicted_loss,
            "choices": {f: vars(o) for f, o in self.choices.items()},
            "sensitivity": [vars(o) for o in self.options],
            "seconds": round(self.seconds, 2),
        }


def choose(options: Mapping[str, Sequence[Option]], budget_bytes: int, prefer_larger: bool = False) -> dict[str, Option]:
    """Exact multiple-choice knapsack: one option per table, total bytes <= budget, least summed
    loss; ties go to fewer bytes, or to more with ``prefer_larger``. Raises BudgetError when
    nothing fits."""
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
        for s in merged:  # the Pareto front: bytes up, loss down (strictly; with prefer_larger, or equal)
            if not front or s[1] < front[-1][1] - 1e-12 or (
                    prefer_larger and s[1] <= front[-1][1] + 1e-12 and s[0] > front[-1][0]):
                front.append(s)
        states = front
    least = min(s[1] for s in states)
    tied = [s for s in states if s[1] <= least + 1e-12]
    best = max(tied, key=lambda s: s[0]) if prefer_larger else min(tied, key=lambda s: s[0])
    return {o.feature: o for o in best[2]}


def _with_rows(model, feature: str, rows: torch.Tensor):
    """Context: the fp32 model's table of ``feature`` temporarily holds ``rows`` (N, D)."""

    class _Ctx:
        def __enter__(self_):
            w = model.sparse_arch.embedding_bag_collection.embedding_bags[QR.table_name(feature)].weight
            self_.w, self_.saved = w, w.detach().clone()
            with torch.no_grad():
                w.copy_(rows)

        def __exit__(self_, *exc):
            with torch.no_grad():
                self_.w.copy_(self_.saved)

    return _Ctx()


def simulated_rows(pt: PrunedTable, dtype: str, freq: Optional[np.ndarray] = None, quantizer: str = "minmax") -> torch.Tensor:
    """(N, D): what each original id's lookup returns after pruning + quantization (dequantized).
    A tiered dtype needs ``freq`` (reads per original id): stored rows get their tier by reads,
    as the stage stores them hot-first (:mod:`~.layout`)."""
    if is_tiered(dtype):
        if freq is None:
            raise ValueError(f"{pt.feature}: simulating precision tiers {dtype!r} needs the rows' read counts")
        deq = TI.simulate(pt.weight, dtype, row_reads(pt, freq), quantizer)
    else:
        w, sb = QR.quantize_rows(pt.weight, dtype, quantizer)
        deq = QR.dequantize_rows(w, sb, dtype)
    remap = pt.remap if pt.remap is not None else pt.folded
    if remap is None:
        return deq
    out = torch.zeros(pt.num_original, deq.shape[1])
    ok = remap >= 0
    out[ok] = deq[remap[ok].long()]
    return out


def _candidates(fill: str, cluster_ratio: float, fills: Sequence[str], cluster_ratios: Sequence[float]) -> list[tuple[str, float]]:
    """(fill, cluster ratio) pairs a pruned table may take: the planner's fills plus the configured one."""
    out: list[tuple[str, float]] = []
    for fl in dict.fromkeys([*fills, fill]):
        ratios = dict.fromkeys([*cluster_ratios, cluster_ratio]) if fl in CLUSTER_FILLS else [0.0]
        out.extend((fl, float(r)) for r in ratios)
    return out


@dataclass
class Sensitivity:
    """Every option of every table with its measured AUCs and loss (step 2), and its bytes under
    each remap kind measured (step 1); budgets and remap kinds are then chosen by :meth:`plan`
    without evaluating again (the lookups, hence the losses, do not depend on either)."""

    options: dict[str, list[Option]]
    bytes_by_remap: dict[int, dict[str, int]]  # id(option) -> remap kind -> bytes
    base_valid_auc: float
    base_valid_cold_auc: float
    cold_weight: float
    seconds: float

    def plan(self, budget_mb: float, remap: str = "array") -> Plan:
        """The exact best plan for ``budget_mb`` MB with ``remap`` (step 3)."""
        t0 = time.perf_counter()
        budget = int(math.floor(budget_mb * MB + 1e-6))  # MB = 10^6 bytes; tolerate float noise
        opts = {f: [dataclasses.replace(o, bytes=self.bytes_by_remap[id(o)][remap]) for o in os_]
                for f, os_ in self.options.items()}
        choices = choose(opts, budget, prefer_larger=True)
        plan = Plan(choices, budget, self.base_valid_auc, [o for os_ in opts.values() for o in os_],
                    self.seconds + time.perf_counter() - t0, self.base_valid_cold_auc, self.cold_weight, remap)
        log.info("budget plan (%d options evaluated in %.1fs):\n%s", len(plan.options), plan.seconds, plan.table())
        return plan


def _subsampled(ds: RecDataset, splits: Sequence[str], max_examples: int) -> RecDataset:
    """``ds`` with each of ``splits`` cut to a seeded random ``max_examples`` of its rows (0: all)."""
    if max_examples <= 0 or all(len(ds.splits[s]) <= max_examples for s in splits):
        return ds
    rng = np.random.default_rng(0)
    cut = {s: ds.splits[s].subset(np.sort(rng.choice(len(ds.splits[s]), max_examples, replace=False)))
           for s in splits if len(ds.splits[s]) > max_examples}
    log.info("planner: measuring on %s", ", ".join(f"{max_examples} of {len(ds.splits[s])} {s}" for s in cut))
    return dataclasses.replace(ds, splits={**ds.splits, **cut})


def sensitivity(
    model,
    ds: RecDataset,
    builder: BatchBuilder,
    importances: Mapping[str, RowImportance],
    settings: Mapping[str, dict],
    remaps: Sequence[str] = ("array",),
    text: Optional[Mapping[str, torch.Tensor]] = None,
    keep_ratios: Iterable[float] = DEFAULT_KEEP_RATIOS,
    dtypes: Iterable[str] = QUANT_DTYPES,
    fills: Sequence[str] = DEFAULT_FILLS,
    cluster_ratios: Sequence[float] = DEFAULT_CLUSTER_RATIOS,
    cold_weight: float = 0.5,
    row_alignment: int = TBE.ROW_ALIGNMENT,
    batch_size: int = 4096,
    kernel: str = KERNEL_CPU,
    budget_mb: Optional[float] = None,
    max_examples: int = 0,
    confidence: float = 1.0,
    bootstrap: int = 30,
    quantizer: str = "minmax",
) -> Sensitivity:
    """Steps 1 and 2 of the module doc: every option's bytes (for each of ``remaps``) and loss.

    settings: feature -> {"fill", "cluster_ratio", ...} from the config (:func:`~.prune.table_settings`):
    the configured fill and cluster ratio are candidates next to ``fills`` / ``cluster_ratios``.
    budget_mb: when given, a budget no plan fits (with ``remaps[0]``) raises :class:`BudgetError`
    before anything is evaluated. max_examples: > 0 measures each split on at most that many of
    its interactions (a seeded random subset, the same for every option), for large datasets.
    confidence / bootstrap: the noise margin of step 3 (z standard errors from ``bootstrap``
    Poisson resamples; 0: the measured loss alone).
    """
    t0 = time.perf_counter()
    model = copy.deepcopy(model).eval()  # sensitivity swaps table rows in and out: never touch the caller's model
    ebc = model.sparse_arch.embedding_bag_collection
    weights = {f: ebc.embedding_bags[QR.table_name(f)].weight.detach() for c in ebc.embedding_bag_configs() for f in c.feature_names}
    keep_ratios, dtypes = sorted(set(keep_ratios), reverse=True), list(dtypes)
    options: dict[str, list[Option]] = {}
    table_of: dict[int, PrunedTable] = {}  # id(option) -> its pruned table
    nbytes: dict[int, dict[str, int]] = {}
    for f, w in weights.items():
        n = w.shape[0]
        t = text[TEXT_FEATURES[f]] if (text is not None and f in TEXT_FEATURES) else None
        opts: list[Option] = []
        seen: set[tuple] = set()
        for r in keep_ratios:
            kept = select_rows(importances[f], keep_ratio=r)
            pairs = [("zero", 0.0)] if len(kept) == n else _candidates(
                settings[f].get("fill", "zero"), settings[f].get("cluster_ratio", DEFAULT_CLUSTER_RATIO), fills,
                cluster_ratios)
            for fl, cr in pairs:
                fl = effective_fill(f, fl, t is not None)[0]
                c = num_clusters(n, len(kept), cr) if fl in CLUSTER_FILLS else 0
                key = (len(kept), fl, c)
                if key in seen:
                    continue  # the same table as another ratio (tiny tables, or clusters capped)
                seen.add(key)
                pt = prune_table(f, w, kept, fl, t, fit_mask=importances[f].freq > 0, clusters=c,
                                 reads=importances[f].freq)
                for dt in dtypes:
                    b = {rk: pruned_bytes(pt, dt, rk, row_alignment, kernel)["total"] for rk in remaps}
                    o = Option(f, r, dt, pt.num_rows, b[remaps[0]], fp32_bytes=int(w.numel() * w.element_size()),
                               fill=fl, cluster_ratio=cr if c else 0.0, clusters=c)
                    opts.append(o)
                    table_of[id(o)], nbytes[id(o)] = pt, b
        options[f] = opts
    if budget_mb is not None:
        budget = int(math.floor(budget_mb * MB + 1e-6))
        if sum(min(o.bytes for o in opts) for opts in options.values()) > budget:
            choose(options, budget)  # raises the BudgetError
    fwd = fp32_forward(model)
    splits = ["valid"] + ([COLD_SPLIT] if COLD_SPLIT in ds.splits and len(ds.splits[COLD_SPLIT]) else [])
    ds = _subsampled(ds, splits, max_examples)
    batches = {s: split_batches(ds, builder, s, batch_size) for s in splits}
    labels = {s: torch.from_numpy(ds.splits[s].label) for s in splits}
    base_logits = {s: predict_split(fwd, batches[s]) for s in splits}
    base = {s: auc(base_logits[s], labels[s]) for s in splits}
    cold = COLD_SPLIT in base and not math.isnan(base[COLD_SPLIT])
    boot = ({s: bootstrap_weights(len(labels[s]), bootstrap, seed=i) for i, s in enumerate(splits)}
            if confidence > 0 and bootstrap >= 2 else None)
    base_b = {s: weighted_aucs(base_logits[s], labels[s], boot[s]) for s in splits} if boot else None
    if not cold:
        log.info("planner: no %s interactions; choosing on valid AUC alone", COLD_SPLIT)
    for f, opts in options.items():
        for o in opts:
            with _with_rows(model, f, simulated_rows(table_of[id(o)], o.dtype, importances[f].freq, quantizer)):
                logits = {s: predict_split(fwd, batches[s]) for s in splits}
            got = {s: auc(logits[s], labels[s]) for s in splits}
            o.valid_auc = got["valid"]
            o.measured_loss = base["valid"] - o.valid_auc
            if cold:
                o.valid_cold_auc = got[COLD_SPLIT]
                o.measured_loss += cold_weight * (base[COLD_SPLIT] - o.valid_cold_auc)
            if boot:  # paired: the same resamples for the fp32 model and this option
                lb = base_b["valid"] - weighted_aucs(logits["valid"], labels["valid"], boot["valid"])
                if cold:
                    lb = lb + cold_weight * (base_b[COLD_SPLIT] - weighted_aucs(logits[COLD_SPLIT], labels[COLD_SPLIT],
                                                                               boot[COLD_SPLIT]))
                o.loss_se = float(np.nanstd(lb, ddof=1))
            o.loss = max(o.measured_loss + confidence * o.loss_se, 0.0)
    return Sensitivity(options, nbytes, base["valid"], base.get(COLD_SPLIT, float("nan")), cold_weight if cold else 0.0,
                       time.perf_counter() - t0)


def plan_budget(
    model,
    ds: RecDataset,
    builder: BatchBuilder,
    importances: Mapping[str, RowImportance],
    settings: Mapping[str, dict],
    budget_mb: float,
    remap: str = "array",
    text: Optional[Mapping[str, torch.Tensor]] = None,
    keep_ratios: Iterable[float] = DEFAULT_KEEP_RATIOS,
    dtypes: Iterable[str] = QUANT_DTYPES,
    fills: Sequence[str] = DEFAULT_FILLS,
    cluster_ratios: Sequence[float] = DEFAULT_CLUSTER_RATIOS,
    cold_weight: float = 0.5,
    row_alignment: int = TBE.ROW_ALIGNMENT,
    batch_size: int = 4096,
    kernel: str = KERNEL_CPU,
    max_examples: int = 0,
    confidence: float = 1.0,
    bootstrap: int = 30,
    quantizer: str = "minmax",
) -> Plan:
    """Choose keep ratio, fill and dtype per table for ``budget_mb`` MB (see the module doc);
    :func:`sensitivity` then :meth:`Sensitivity.plan`. Infeasible budgets raise
    :class:`BudgetError` before anything is evaluated."""
    sens = sensitivity(model, ds, builder, importances, settings, (remap,), text, keep_ratios, dtypes, fills,
                       cluster_ratios, cold_weight, row_alignment, batch_size, kernel, budget_mb=budget_mb,
                       max_examples=max_examples, confidence=confidence, bootstrap=bootstrap, quantizer=quantizer)
    return sens.plan(budget_mb, remap)
