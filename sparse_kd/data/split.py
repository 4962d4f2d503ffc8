"""The split protocol shared by every loader, plus small helpers the loaders share.

Protocol (same for synthetic, MovieLens and the CSV format):

1. Cold items: ``round(cold_item_fraction * num_items)`` items (at most ``num_items - 1``), drawn
   uniformly from *all* items with ``numpy.random.default_rng(DataConfig.seed)``, are cold. Every
   interaction with a cold item goes to ``test_cold``; none appears in train/valid/test.
2. Temporal split of the rest: warm interactions are ordered by timestamp (one global order,
   ties kept in source order by a stable sort; a source without timestamps passes all zeros, so
   its file order is the time order). The first ``1 - valid_fraction - test_fraction`` form
   ``train``, the next ``valid_fraction`` ``valid``, the last ``test_fraction`` ``test``
   (sizes rounded to the nearest row, ``train`` gets the remainder).

Every split keeps time order. Shapes: N interactions in, each split (N_s,) arrays out.
"""

from __future__ import annotations

import numpy as np

from sparse_kd.config import DataConfig
from sparse_kd.data.schema import DataError, Interactions, SparseFeature


def choose_cold_items(num_items: int, cfg: DataConfig) -> np.ndarray:
    """Sorted (K,) int64 indices of the cold items, seeded by ``cfg.seed``."""
    k = int(round(cfg.cold_item_fraction * num_items))
    k = min(k, max(num_items - 1, 0))
    rng = np.random.default_rng(cfg.seed)
    return np.sort(rng.permutation(num_items)[:k]).astype(np.int64)


def split_interactions(
    user: np.ndarray,
    item: np.ndarray,
    label: np.ndarray,
    timestamp: np.ndarray | None,
    num_items: int,
    cfg: DataConfig,
) -> tuple[dict[str, Interactions], dict]:
    """Split N interactions (all (N,) arrays, source order) into train/valid/test/test_cold.

    ``timestamp=None`` means the source has none: file order is the time order and the stored
    timestamps are 0. Returns the splits and a report ``{"cold_items": K, "sizes": {...}}``.
    """
    user = np.asarray(user, dtype=np.int64)
    item = np.asarray(item, dtype=np.int64)
    label = np.asarray(label, dtype=np.float32)
    n = user.shape[0]
    ts = np.zeros(n, dtype=np.int64) if timestamp is None else np.asarray(timestamp, dtype=np.int64)
    if not item.shape == label.shape == ts.shape == (n,):
        raise DataError(f"interactions: user {user.shape}, item {item.shape}, label {label.shape} and timestamp "
                        f"{ts.shape} must all be ({n},)")
    everything = Interactions(user, item, label, ts)

    cold = choose_cold_items(num_items, cfg)
    is_cold_item = np.zeros(num_items, dtype=bool)
    is_cold_item[cold] = True
    cold_rows = is_cold_item[item] if n else np.zeros(0, dtype=bool)

    def in_time_order(rows: np.ndarray) -> np.ndarray:
        return rows[np.argsort(ts[rows], kind="stable")]

    warm = in_time_order(np.flatnonzero(~cold_rows))
    cold_idx = in_time_order(np.flatnonzero(cold_rows))
    nw = len(warm)
    n_test = min(int(round(nw * cfg.test_fraction)), nw)
    n_valid = min(int(round(nw * cfg.valid_fraction)), nw - n_test)
    n_train = nw - n_valid - n_test
    splits = {
        "train": everything.subset(warm[:n_train]),
        "valid": everything.subset(warm[n_train : n_train + n_valid]),
        "test": everything.subset(warm[n_train + n_valid :]),
        "test_cold": everything.subset(cold_idx),
    }
    report = {
        "cold_items": int(len(cold)),
        "time_order": "file order (no timestamps)" if timestamp is None else "timestamp, ties in source order",
        "sizes": {s: len(sp) for s, sp in splits.items()},
        "positive_rate": {s: round(float(sp.label.mean()), 4) if len(sp) else 0.0 for s, sp in splits.items()},
    }
    return splits, report


# --------------------------------------------------------------------------------------------
# Helpers shared by the loaders


def make_feature(name: str, owner: str, bags: list[list[str]]) -> SparseFeature:
    """CSR feature over len(bags) entities; vocab in order of first appearance.

    bags[e] is entity e's list of raw values (may be empty; duplicates are kept once).
    """
    index: dict[str, int] = {}
    offsets = np.zeros(len(bags) + 1, dtype=np.int64)
    values: list[int] = []
    for e, bag in enumerate(bags):
        seen: set[int] = set()
        for v in bag:
            j = index.setdefault(v, len(index))
            if j not in seen:
                seen.add(j)
                values.append(j)
        offsets[e + 1] = len(values)
    return SparseFeature(name, owner, list(index), offsets, np.asarray(values, dtype=np.int64))  # type: ignore[arg-type]


def id_feature(name: str, owner: str, ids: list[str]) -> SparseFeature:
    """The ``user_id`` / ``item_id`` feature: entity e has the single id e; vocab = raw ids."""
    n = len(ids)
    return SparseFeature(name, owner, list(ids), np.arange(n + 1, dtype=np.int64), np.arange(n, dtype=np.int64))  # type: ignore[arg-type]


def truncate_text(text: str, max_chars: int, report: dict) -> str:
    """Cut ``text`` to ``max_chars`` characters, counting it in ``report["truncated_texts"]``."""
    report.setdefault("truncated_texts", 0)
    if max_chars > 0 and len(text) > max_chars:
        report["truncated_texts"] += 1
        return text[:max_chars]
    return text
