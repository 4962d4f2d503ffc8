"""Small artifacts of one quickly trained tiny DLRM (built the way tests/compress/conftest.py builds
them); HTTP helpers are in serve_helpers.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from serve_helpers import compress_fixtures, save


@dataclass
class Artifacts:
    ds: Any
    a: Path  # int8 tables
    b: Path  # int4 tables, same model
    text_dim: int


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Artifacts:
    fx = compress_fixtures()
    ds, text = fx.make_dataset(num_users=30, num_items=20, per_user=10)
    model, builder = fx.train_dlrm(ds, epochs=1)
    root = tmp_path_factory.mktemp("serve_art")
    return Artifacts(ds, save(root / "a", model, ds, builder, "int8", text), save(root / "b", model, ds, builder, "int4", text),
                     fx.H)
