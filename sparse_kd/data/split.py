"""The split protocol shared by every loader and by ``sparse-kd data convert``, plus small helpers
the loaders share.

Protocol (same for synthetic, MovieLens, the CSV format and converted Parquet folders):

1. Cold items: ``round(cold_item_fraction * num_items)`` items (at most ``num_items - 1``), drawn
   uniformly from *all* items with ``numpy.random.default_rng(DataConfig.seed)``, are cold; the
   first ``floor(valid_cold_fraction * K)`` of them (in that draw's order) are the validation cold
   items, the rest the test cold items. Every interaction with a cold item goes to ``valid_cold``
   or ``test_cold``; none appears in train/valid/test. So every choice about cold items is made
   on ``valid_cold`` and ``test_cold`` is only reported.
2. The rest (warm interactions) is ranked by a split key and cut into ``train`` (first
   ``1 - valid_fraction - test_fraction``), ``valid`` and ``test`` (sizes rounded to the nearest
   row, ``train`` gets the remainder). ``DataConfig.split`` picks the key:

   * ``time`` -- the timestamp (a source without timestamps: its row order, i.e. file order);
   * ``random`` -- a 64-bit hash of (``DataConfig.seed``, row number): a seeded random split;
   * ``auto`` (default) -- ``time`` when the source has timestamps, else ``random``.

   Equal keys are broken by source order (as a stable sort would).

Each split keeps its rows in source order: membership is decided by the key, not the order
(training shuffles; evaluation does not depend on order). This is what lets a streaming
converter (``columnar.py``) produce the very same splits in bounded memory: the cut points are
exact order statistics found by a few histogram passes over the key column
(:func:`order_statistics`), and rows are then assigned chunk by chunk (:class:`SplitAssigner`).

Shapes: N interactions in, each split (N_s,) arrays out.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from sparse_kd.config import DataConfig
from sparse_kd.data.hashing import hash64, stream_key
from sparse_kd.data.interactions import TEST_COLD, TRAIN, VALID_COLD
from sparse_kd.data.schema import SPLITS, DataError, Interactions, SparseFeature

# --------------------------------------------------------------------------------------------
# Cold items


def choose_cold_items(num_items: int, cfg: DataConfig) -> np.ndarray:
    """Sorted (K,) int64 indices of all cold items, seeded by ``cfg.seed``."""
    v, t = split_cold_items(num_items, cfg)
    return np.sort(np.concatenate([v, t]))


def split_cold_items(num_items: int, cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Sorted int64 indices of the validation cold items and of the test cold items."""
    k = int(round(cfg.cold_item_fraction * num_items))
    k = min(k, max(num_items - 1, 0))
    order = np.random.default_rng(cfg.seed).permutation(num_items)[:k].astype(np.int64)
    kv = int(np.floor(cfg.valid_cold_fraction * k))
    return np.sort(order[:kv]), np.sort(order[kv:])


def item_codes(num_items: int, cfg: DataConfig) -> np.ndarray:
    """(I,) int8: TRAIN for warm items, VALID_COLD / TEST_COLD for cold ones."""
    codes = np.full(num_items, TRAIN, dtype=np.int8)
    v, t = split_cold_items(num_items, cfg)
    codes[v], codes[t] = VALID_COLD, TEST_COLD
    return codes


# --------------------------------------------------------------------------------------------
# Split keys and exact cut points in bounded memory


def split_mode(cfg: DataConfig, has_timestamps: bool) -> str:
    """``time`` or ``random`` (``auto`` resolved)."""
    if cfg.split == "auto":
        return "time" if has_timestamps else "random"
    return cfg.split


def split_keys(mode: str, row0: int, timestamp: np.ndarray | None, n: int, seed: int) -> np.ndarray:
    """(n,) uint64 order-preserving keys of rows ``row0 .. row0 + n - 1`` (source numbering)."""
    if mode == "random":
        return hash64(stream_key(seed, "split"), np.arange(row0, row0 + n, dtype=np.int64))
    if timestamp is None:  # file order
        return np.arange(row0, row0 + n, dtype=np.uint64)
    # int64 -> uint64 preserving order: flip the sign bit
    return np.asarray(timestamp, dtype=np.int64).view(np.uint64) ^ np.uint64(1 << 63)


_BINS = 1 << 16


def order_statistics(chunks: Callable[[], Iterable[np.ndarray]], ranks: list[int]) -> list[tuple[int, int]]:
    """Exact order statistics of a stream of uint64 keys in bounded memory.

    ``chunks()`` yields the keys (each a (M,) uint64 array) and may be called several times;
    ``ranks`` are 0-based. Returns ``(value, n_less)`` per rank: the rank-th smallest key and
    how many keys are smaller. A few passes: each narrows every rank's value range by 2^16 with
    a histogram, so memory is O(2^16) whatever the number of keys.
    """
    lo_all, hi_all, n = None, None, 0
    for c in chunks():
        if len(c):
            lo_all = int(c.min()) if lo_all is None else min(lo_all, int(c.min()))
            hi_all = int(c.max()) if hi_all is None else max(hi_all, int(c.max()))
            n += len(c)
    for r in ranks:
        assert 0 <= r < n, (r, n)
    state = [[lo_all, hi_all, None, r] for r in ranks]  # lo, hi, result, rank
    while any(s[2] is None for s in state):
        todo = [s for s in state if s[2] is None]
        widths = [-(-(s[1] - s[0] + 1) // _BINS) for s in todo]
        hists = [np.zeros(_BINS, dtype=np.int64) for _ in todo]
        below = [0 for _ in todo]
        for c in chunks():
            for j, (s, w) in enumerate(zip(todo, widths)):
                lo, hi = np.uint64(s[0]), np.uint64(s[1])
                below[j] += int(np.count_nonzero(c < lo))
                inside = c[(c >= lo) & (c <= hi)]
                hists[j] += np.bincount(((inside - lo) // np.uint64(w)).astype(np.int64), minlength=_BINS)[:_BINS]
        for j, (s, w) in enumerate(zip(todo, widths)):
            r = s[3]
            cum = below[j] + np.cumsum(hists[j])
            b = int(np.searchsorted(cum, r, side="right"))  # first bin whose cumulative count > r
            if w == 1:
                s[2] = (s[0] + b, int(cum[b - 1]) if b else below[j])
            else:
                s[0], s[1] = s[0] + b * w, min(s[1], s[0] + (b + 1) * w - 1)
    return [tuple(s[2]) for s in state]


class SplitAssigner:
    """Assigns warm rows to train/valid/test chunk by chunk, given the cut points.

    A cut at position p (0 < p < N warm rows) sends the p rows of smallest key (ties: source
    order) before it. ``cuts``: (value, n_less, p) per cut, from :func:`order_statistics`.
    """

    def __init__(self, n_warm: int, n_train: int, n_valid: int, cuts: list[tuple[int, int, int]]) -> None:
        self.n_warm, self.positions = n_warm, (n_train, n_train + n_valid)
        self.cuts = cuts  # [(value, n_less, p)] for the positions strictly inside (0, n_warm)
        self.seen_equal = [0 for _ in cuts]

    @classmethod
    def plan(cls, keys: Callable[[], Iterable[np.ndarray]], n_warm: int, cfg: DataConfig) -> "SplitAssigner":
        n_test = min(int(round(n_warm * cfg.test_fraction)), n_warm)
        n_valid = min(int(round(n_warm * cfg.valid_fraction)), n_warm - n_test)
        n_train = n_warm - n_valid - n_test
        inner = [p for p in (n_train, n_train + n_valid) if 0 < p < n_warm]
        stats = order_statistics(keys, inner) if inner else []
        return cls(n_warm, n_train, n_valid, [(v, less, p) for (v, less), p in zip(stats, inner)])

    def assign(self, key: np.ndarray) -> np.ndarray:
        """(M,) uint64 keys of the next warm rows (source order) -> (M,) int8 TRAIN/VALID/TEST."""
        code = np.zeros(len(key), dtype=np.int8)
        for p in self.positions:  # a cut at 0 sends every row after it; at n_warm, none
            if p == 0:
                code += 1
        for j, (v, less, p) in enumerate(self.cuts):
            vv = np.uint64(v)
            eq = key == vv
            # rank of each equal-key row among all equal-key rows so far (source order)
            rank = self.seen_equal[j] + np.cumsum(eq) - 1
            before = (key < vv) | (eq & (rank < p - less))
            self.seen_equal[j] += int(eq.sum())
            code += (~before).astype(np.int8)
        return code

    @property
    def sizes(self) -> tuple[int, int, int]:
        a, b = self.positions
        return a, b - a, self.n_warm - b


def split_interactions(
    user: np.ndarray,
    item: np.ndarray,
    label: np.ndarray,
    timestamp: np.ndarray | None,
    num_items: int,
    cfg: DataConfig,
) -> tuple[dict[str, Interactions], dict]:
    """Split N interactions (all (N,) arrays, source order) into the five splits of ``SPLITS``.

    ``timestamp=None`` means the source has none (stored timestamps are then 0). Returns the
    splits and a report ``{"cold_items": K, "split": mode, "sizes": {...}, ...}``.
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

    codes = item_codes(num_items, cfg)
    row_code = codes[item] if n else np.zeros(0, dtype=np.int8)
    warm = np.flatnonzero(row_code == TRAIN)
    mode = split_mode(cfg, timestamp is not None)
    keys = split_keys(mode, 0, timestamp, n, cfg.seed)[warm]
    assigner = SplitAssigner.plan(lambda: [keys], len(warm), cfg)
    row_code[warm] = assigner.assign(keys)
    splits = {s: everything.subset(np.flatnonzero(row_code == c)) for c, s in enumerate(SPLITS)}
    return splits, split_report(splits, codes, mode, timestamp is not None)


def split_report(splits: dict[str, Interactions], codes: np.ndarray, mode: str, has_timestamps: bool) -> dict:
    order = {"time": "timestamp, ties in source order" if has_timestamps else "file order (no timestamps)",
             "random": "seeded random (hash of data.seed and row number)"}[mode]
    return {
        "cold_items": int((codes != TRAIN).sum()),
        "valid_cold_items": int((codes == VALID_COLD).sum()),
        "test_cold_items": int((codes == TEST_COLD).sum()),
        "split": mode,
        "split_key": order,
        **size_report({s: len(sp) for s, sp in splits.items()}, {s: positives(sp.label) for s, sp in splits.items()}),
    }


def positives(label: np.ndarray) -> int:
    return int(np.count_nonzero(label > 0))


def size_report(sizes: dict[str, int], n_positive: dict[str, int]) -> dict:
    """``{"sizes": ..., "positive_rate": ...}`` of the report (rates from exact counts)."""
    return {"sizes": dict(sizes), "positive_rate": {s: round(n_positive[s] / n, 4) if n else 0.0 for s, n in sizes.items()}}


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
