"""Data loading: :func:`load_dataset` turns a :class:`~sparse_kd.config.DataConfig` into a validated
:class:`RecDataset` (users, items, text, sparse features, train/valid/test/valid_cold/test_cold splits).

Sources: ``synthetic`` (:mod:`.synthetic`), ``movielens`` (ML-100K, :mod:`.movielens`), ``csv``
(the documented generic format, :mod:`.csv_format`; without a label column the feedback is
implicit and negatives are sampled, :mod:`.negatives`) and ``parquet`` (a folder written by
:func:`convert`, streamed during training, :mod:`.columnar`). All share the split protocol of
:mod:`.split`. Training order: :mod:`.stream`. ``dataset.report`` holds rows read per file
(``rows_read``), everything dropped with its reason (``dropped``, e.g. ``{"rating_3": 27145}``),
``truncated_texts``, the split sizes (``split``) and, for implicit data, ``feedback``.
"""

from __future__ import annotations

import time

from sparse_kd.config import DataConfig
from sparse_kd.data.csv_format import load_csv
from sparse_kd.data.movielens import load_movielens
from sparse_kd.data.schema import SPLITS, DataError, Interactions, RecDataset, SparseFeature
from sparse_kd.data.split import split_interactions
from sparse_kd.data.synthetic import load_synthetic

__all__ = ["SPLITS", "DataError", "Interactions", "RecDataset", "SparseFeature", "convert", "load_columnar",
           "load_dataset", "load_csv", "load_movielens", "load_synthetic", "split_interactions"]



def load_columnar(cfg: DataConfig) -> RecDataset:
    """A folder written by :func:`convert` (pyarrow and torch are imported only here)."""
    from sparse_kd.data.columnar import load_columnar as load

    return load(cfg)


def convert(cfg: DataConfig, out, **kw) -> dict:
    """``sparse-kd data convert``: see :func:`sparse_kd.data.conversion.convert`."""
    from sparse_kd.data.conversion import convert as conv

    return conv(cfg, out, **kw)


_LOADERS = {"synthetic": load_synthetic, "movielens": load_movielens, "csv": load_csv, "parquet": load_columnar}


def load_dataset(cfg: DataConfig) -> RecDataset:
    """Load ``cfg.source`` (from ``cfg.path`` unless synthetic), validate it and return it."""
    if cfg.source not in _LOADERS:
        raise DataError(f"data.source={cfg.source!r} is not known. Fix: use one of {', '.join(_LOADERS)}.")
    if cfg.source != "synthetic" and not cfg.path:
        raise DataError(f"data.path is empty. Fix: set data.path to the {cfg.source} data folder.")
    t0 = time.perf_counter()
    ds = _LOADERS[cfg.source](cfg)
    ds.validate()
    ds.report["load_seconds"] = round(time.perf_counter() - t0, 3)
    return ds
