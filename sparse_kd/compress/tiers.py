"""Precision tiers inside one table: the hottest rows in more bits, the rest in fewer.

A tiered dtype is written where a dtype goes (``compress.dtype.<feature>``, the planner's
``compress.planner_tiers``) as ``"int8:0.05,int4:0.25,int2"``: the first 5% of the table's stored
rows in int8, the next 25% in int4, the rest in int2. Each part is an ordinary FBGEMM row-wise
quantized table (codes + fp16 scale and bias per row); the served table
(:class:`~sparse_kd.serve.cpu_model.TieredTable`) keeps the one remap the table already has (or
none, when it is folded into the entity bags) and finds a row's tier from its position alone.

Rows are stored hot-first (``compress.row_order: frequency``, :mod:`~.layout`: most training
reads first), so "the first 5% of stored rows" are the 5% read most; a tiered dtype needs that
order and is refused with ``row_order: id``. Tiers are served by the CPU kernel only; the GPU
TBE path (``serve_device: cuda``) refuses them.

Notation: R stored rows, D dim, T tiers.
"""

from __future__ import annotations

from typing import List, Mapping, Optional

import numpy as np
import torch

from sparse_kd.compress import rows as QR
from sparse_kd.compress.prune import PrunedTable
from sparse_kd.config.dtypes import Tier, is_tiered, parse_tiers


def tier_starts(tiers: list[Tier], num_rows: int) -> list[int]:
    """T + 1 row positions: tier t holds stored rows [starts[t], starts[t + 1])."""
    starts, acc = [0], 0.0
    for t in tiers[:-1]:
        acc += float(t.share or 0.0)
        starts.append(min(num_rows, int(round(acc * num_rows))))
    starts.append(num_rows)
    return starts


def quantize_tiered(feature: str, rows: torch.Tensor, spec: str, quantizer: str = "minmax") -> list[QR.QTable]:
    """Stored rows (R, D), hot-first -> one QTable per tier (no remap)."""
    s = tier_starts(parse_tiers(spec), int(rows.shape[0]))
    out = []
    for t, tier in enumerate(parse_tiers(spec)):
        w, sb = QR.quantize_rows(rows[s[t]: s[t + 1]], tier.dtype, quantizer)
        out.append(QR.QTable(feature, tier.dtype, int(rows.shape[1]), w, sb, None))
    return out


def row_tiers(dtype: str, num_rows: int, reads: Optional[np.ndarray] = None) -> tuple[list[str], torch.Tensor]:
    """(dtypes, which (R,) int64): the dtype of every stored row is ``dtypes[which[r]]``: one dtype,
    or its tier's. ``reads``: (R,) reads per stored row, to rank rows hot-first as the stage will
    store them (None: the stored order already is)."""
    if not is_tiered(dtype):
        return [dtype], torch.zeros(num_rows, dtype=torch.long)
    tiers = parse_tiers(dtype)
    s = tier_starts(tiers, num_rows)
    order = (torch.arange(num_rows) if reads is None else
             torch.from_numpy(np.argsort(-np.asarray(reads, dtype=np.float64), kind="stable")))
    which = torch.empty(num_rows, dtype=torch.long)
    for t in range(len(tiers)):
        which[order[s[t]: s[t + 1]]] = t
    return [t.dtype for t in tiers], which


def fake_quantize(rows: torch.Tensor, dtypes: list[str], which: torch.Tensor, quantizer: str = "minmax") -> torch.Tensor:
    """(K, D): each row quantized to ``dtypes[which[k]]`` and dequantized (rows are quantized one
    by one, so a row's result does not depend on the others)."""
    out = torch.empty(rows.shape, dtype=torch.float32)
    for k, dt in enumerate(dtypes):
        sel = (which == k).nonzero().squeeze(1)
        if sel.numel():
            w, sb = QR.quantize_rows(rows[sel], dt, quantizer)
            out[sel] = QR.dequantize_rows(w, sb, dt)
    return out


def simulate(rows: torch.Tensor, spec: str, reads: Optional[np.ndarray] = None, quantizer: str = "minmax") -> torch.Tensor:
    """(R, D): each stored row after its tier's quantization and dequantization (:func:`row_tiers`)."""
    return fake_quantize(rows, *row_tiers(spec, int(rows.shape[0]), reads), quantizer)


def qtable(feature: str, rows: torch.Tensor, dtype: str, remap: Optional[torch.Tensor],
           quantizer: str = "minmax") -> QR.QTable:
    """Stored rows (R, D) of one table in ``dtype`` (plain or tiered) -> its QTable."""
    r = None if remap is None else remap.to(torch.int32)
    if is_tiered(dtype):
        return QR.QTable(feature, dtype, int(rows.shape[1]), torch.empty(0, 0, dtype=torch.uint8), None, r,
                         quantize_tiered(feature, rows, dtype, quantizer))
    w, sb = QR.quantize_rows(rows, dtype, quantizer)
    return QR.QTable(feature, dtype, int(rows.shape[1]), w, sb, r)


def qtables_of(pruned: Mapping[str, PrunedTable], dtypes: Mapping[str, str], keys: List[str],
               quantizer: str = "minmax") -> dict[str, QR.QTable]:
    """feature -> QTable of every table in ``keys`` (its pruned rows in its dtype, plain or tiered)."""
    return {f: qtable(f, pruned[f].weight, dtypes[f], pruned[f].remap, quantizer) for f in keys}
