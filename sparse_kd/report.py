"""Readable result tables (markdown, which also reads well in a terminal)."""

from __future__ import annotations

import math
from typing import Iterable, Sequence


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:.4f}"
        return str(v)

    rows = [[fmt(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def metrics_table(metrics: dict, splits: Sequence[str] = ("valid", "test", "valid_cold", "test_cold")) -> str:
    """metrics: {variant: {split: {"auc", "logloss", "n"}}} -> one row per variant (splits no
    variant has are left out)."""
    splits = [s for s in splits if any(s in m for m in metrics.values())]
    headers = ["variant"] + [f"{s} AUC" for s in splits] + [f"{s} logloss" for s in splits]
    rows = []
    for name, m in metrics.items():
        rows.append([name] + [m[s]["auc"] for s in splits] + [m[s]["logloss"] for s in splits])
    return markdown_table(headers, rows)
