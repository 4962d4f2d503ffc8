"""Comparing two runs' metrics in the multi-rank tests."""

from __future__ import annotations

import math


def assert_close_metrics(a: dict, b: dict, tol: float) -> None:
    """AUC and log loss of ``valid``, ``test`` and ``test_cold`` within ``tol`` of each other."""
    for split in ("valid", "test", "test_cold"):
        for k in ("auc", "logloss"):
            x, y = a[split][k], b[split][k]
            assert math.isclose(x, y, abs_tol=tol), (split, k, x, y)
