"""Shared helpers of the data tests: small generated data in the real formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


def write_implicit(root: Path, n_users: int = 30, n_items: int = 40, n_rows: int = 900, seed: int = 0,
                   header: str = "user_id,item_id", saturated_user: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    (root / "items.csv").write_text("item_id,text,genres\n" + "".join(f"m{i},Movie {i} about things,g{i % 3}|g{i % 5}\n"
                                                                      for i in range(n_items)))
    rows = [f"u{rng.integers(n_users)},m{rng.integers(n_items)}\n" for _ in range(n_rows)]
    if saturated_user:  # one user with a positive on every item
        rows += [f"ufan,m{i}\n" for i in range(n_items)]
    (root / "interactions.csv").write_text(header + "\n" + "".join(rows))
    return root


@pytest.fixture
def implicit_folder():
    """``implicit_folder(root, **kw)`` writes an implicit-feedback CSV folder (no label, no timestamp)."""
    return write_implicit
