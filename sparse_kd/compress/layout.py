"""Row layout of served tables: hot rows first (``CompressConfig.row_order: frequency``).

Ids that a model reads most should sit together in memory. In a table of millions of rows whose
hot ids are spread over the whole id range (ids are assigned by arrival, not by popularity),
every lookup of a hot id touches its own cache line and its own 4 KiB page; stored hot-first,
the few thousand rows that take most reads share cache lines, pages and TLB entries.
``benchmarks/bench_lookup.py`` measures the effect (``--layout plain`` turns it off).

The order costs nothing at serving time: an id reaches a table through the entity bags
(``mappings.json``, which the server holds anyway) or through the pruned table's remap, and
either is rewritten once, here, to address the row's new place:

* a pruned table (it has a remap): its stored rows are permuted and the remap is composed with
  the permutation (ids the remap sends to no row stay -1);
* a table kept whole (no remap): the permutation becomes its remap, and the stage folds it into
  the entity bags (:func:`sparse_kd.compress.prune.fold_dataset`), so the model holds no remap.

Reads per stored row are the training reads (:class:`~.importance.RowImportance` ``freq``) of
the ids it serves (a cluster fill row serves many). Ties keep the stored order (a stable sort),
so rows nobody read stay in their original order at the end. The permutation is exact: every
(id -> row values) pair is unchanged, so scores are bit-identical to ``row_order: id``.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import numpy as np
import torch

from sparse_kd.compress.prune import PrunedTable

ROW_ORDERS = ("frequency", "id")


def row_reads(pt: PrunedTable, freq: np.ndarray) -> np.ndarray:
    """(R,) float64: training reads of each stored row of ``pt`` (``freq``: (N,) reads per id)."""
    freq = np.asarray(freq, dtype=np.float64)
    if freq.shape[0] != pt.num_original:
        raise ValueError(f"{pt.feature}: {freq.shape[0]} read counts for a table of {pt.num_original} ids")
    remap = pt.remap if pt.remap is not None else pt.folded
    if remap is None:
        return freq.copy()
    r = remap.cpu().numpy().astype(np.int64)
    ok = r >= 0
    return np.bincount(r[ok], weights=freq[ok], minlength=pt.num_rows).astype(np.float64)


def hot_first(reads: np.ndarray) -> np.ndarray:
    """order (R,) int64: stored row k of the new layout is old row order[k]; most reads first,
    ties in their old order."""
    return np.argsort(-np.asarray(reads, dtype=np.float64), kind="stable").astype(np.int64)


def reorder_table(pt: PrunedTable, freq: np.ndarray) -> tuple[PrunedTable, bool]:
    """``pt`` stored hot-first (module doc). Returns (the table, whether its remap is a new
    permutation that must be folded into the entity bags: a table that had no remap).

    A table whose remap is already folded (``pt.folded``) is refused: reorder before folding."""
    if pt.folded is not None:
        raise ValueError(f"{pt.feature}: reorder rows before folding the remap into the entity bags")
    order = hot_first(row_reads(pt, freq))
    if np.array_equal(order, np.arange(pt.num_rows)):
        return pt, False
    inv = np.empty_like(order)
    inv[order] = np.arange(order.shape[0], dtype=np.int64)
    weight = pt.weight[torch.from_numpy(order)].contiguous()
    if pt.remap is None:
        return dataclasses.replace(pt, weight=weight, remap=torch.from_numpy(inv.astype(np.int32))), True
    r = pt.remap.cpu().numpy().astype(np.int64)
    new = np.where(r >= 0, inv[np.maximum(r, 0)], -1).astype(np.int32)
    return dataclasses.replace(pt, weight=weight, remap=torch.from_numpy(new)), False


def reorder_tables(pruned: Mapping[str, PrunedTable], freqs: Mapping[str, np.ndarray],
                   order: str = "frequency") -> tuple[dict[str, PrunedTable], list[str]]:
    """Every table of ``pruned`` in ``order`` (``frequency``: hot-first; ``id``: unchanged).
    Returns (tables, features whose new remap is a pure permutation to fold into the bags)."""
    if order not in ROW_ORDERS:
        raise ValueError(f"row order {order!r} is not one of {', '.join(ROW_ORDERS)}")
    if order == "id":
        return dict(pruned), []
    out: dict[str, PrunedTable] = {}
    to_fold: list[str] = []
    for f, pt in pruned.items():
        freq: Optional[np.ndarray] = freqs.get(f)
        if freq is None:
            raise ValueError(f"no training read counts for table {f}")
        out[f], fold = reorder_table(pt, freq)
        if fold:
            to_fold.append(f)
    return out, to_fold
