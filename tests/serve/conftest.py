"""Small artifacts of one quickly trained tiny DLRM (built the way tests/compress/conftest.py builds
them); HTTP helpers are in serve_helpers.py."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]


def compress_fixtures():
    """tests/compress/conftest.py as a module (make_dataset, train_dlrm, H)."""
    spec = importlib.util.spec_from_file_location("_compress_fixtures", ROOT / "tests" / "compress" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@dataclass
class Artifacts:
    ds: Any
    a: Path  # int8 tables
    b: Path  # int4 tables, same model
    text_dim: int


def save(out: Path, model, ds, builder, dtype: str, text: dict, config: Optional[dict] = None) -> Path:
    from sparse_kd.compress import artifact as A
    from sparse_kd.compress.stage import _mappings, compress_model

    settings = {f.name: {"keep_ratio": 1.0, "dtype": dtype, "fill": "zero"} for f in ds.features}
    comp = compress_model(model, ds, settings, text=text)
    A.save_artifact(out, comp, _mappings(ds), {"user": builder.user_dense, "item": builder.item_dense},
                    config or {"dtype": dtype})
    return out


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Artifacts:
    fx = compress_fixtures()
    ds, text = fx.make_dataset(num_users=30, num_items=20, per_user=10)
    model, builder = fx.train_dlrm(ds, epochs=1)
    root = tmp_path_factory.mktemp("serve_art")
    return Artifacts(ds, save(root / "a", model, ds, builder, "int8", text), save(root / "b", model, ds, builder, "int4", text),
                     fx.H)
