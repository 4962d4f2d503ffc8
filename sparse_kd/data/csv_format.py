"""The documented generic format: a folder of UTF-8 CSV files (Python ``csv`` dialect, ``,``-separated,
``"``-quoted; a leading UTF-8 BOM is ignored).

``interactions.csv`` (required)
    header ``user_id,item_id[,label][,timestamp]`` in any column order. ``label`` is 0 or 1
    (``0.0``/``1.0`` accepted); ``timestamp`` an integer (any unit). Other columns are ignored and
    listed in ``report["ignored_columns"]``.

    **Without a ``label`` column the feedback is implicit**: every row is a positive, and
    ``DataConfig.negatives`` negatives per positive are sampled (:mod:`.negatives`: seeded, never
    an item the user has a positive with; fixed per split for evaluation; training negatives
    resampled every epoch or fixed, ``DataConfig.train_negatives``). ``report["feedback"]`` and
    the summary say so. A column whose name looks like ``label`` (e.g. ``Label``, ``lable``) is an
    error rather than silently implicit data.

    Without a ``timestamp`` column the split is a seeded random one (``DataConfig.split: auto``);
    ``split: time`` then uses file order as time order. Timestamps are stored as 0.
``items.csv`` (required)
    header ``item_id,text[,categorical columns...]``. Text (surrounding whitespace stripped) must be
    non-empty.
``users.csv`` (optional)
    header ``user_id,text[,categorical columns...]``. Empty user text is allowed (counted in
    ``report["empty_user_text"]``). **If users.csv is absent**, the users are the distinct
    ``user_id`` values of interactions.csv (order of first appearance), each with text ``""``.

IDs are arbitrary strings (surrounding whitespace stripped), mapped to contiguous indices in order
of first appearance in items.csv / users.csv. Every categorical column becomes a
:class:`SparseFeature` named after the column, owned by the file's entity; a cell may hold several
values separated by ``|`` (multi-hot; values stripped, empty parts and repeats dropped); an empty
cell is an empty bag. Feature order: ``user_id``, ``item_id``, user categorical columns, item
categorical columns (file column order). Texts longer than ``DataConfig.max_text_chars`` are cut and
counted in ``report["truncated_texts"]``; wholly blank lines are skipped and counted in
``report["blank_lines"]``.

Interactions naming an item absent from items.csv (or a user absent from users.csv) are a
:class:`DataError` by default (``unknown_ids="error"``); ``unknown_ids="drop"`` drops them and counts
them in ``report["dropped"]``. Every other problem is a :class:`DataError` naming the file, the
1-based line (header = line 1), the column and how to fix it.

Files are read as a stream of records in bounded memory (:class:`~sparse_kd.data.csv_reader.RecordReader`), and
interactions.csv is parsed chunk by chunk (:class:`InteractionChunks`): the in-memory loader here
and the streaming converter (``sparse-kd data convert``, :mod:`.columnar`) share every check and
message.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import numpy as np

from sparse_kd.config import DataConfig
from sparse_kd.data.csv_reader import CHUNK_ROWS, RecordReader, fail, read_table
from sparse_kd.data.schema import DataError, RecDataset
from sparse_kd.data.split import (id_feature, item_codes, make_feature, positives, size_report, split_interactions,
                                  truncate_text)

INTERACTIONS, ITEMS, USERS = "interactions.csv", "items.csv", "users.csv"
_INT_RE = re.compile(r"[+-]?[0-9]+")
_I64 = (-(2**63), 2**63 - 1)
_SHOW = 5  # offending lines listed in an unknown-id error
_LABELS = {"1": 1.0, "0": 0.0, "1.0": 1.0, "0.0": 0.0}


def _parse_id(path: Path, line: int, raw: str, column: str) -> str:
    v = raw.strip()
    if not v:
        raise fail(path, line, column, f"empty {column}", f"give every row a non-empty {column}")
    return v


def _parse_label(path: Path, line: int, raw: str) -> float:
    s = raw.strip()
    if not s:
        raise fail(path, line, "label", "empty label", "write 1 (click / positive) or 0 (no click / negative)")
    try:
        v = float(s)
    except ValueError:
        v = None
    if v is None or math.isnan(v) or v not in (0.0, 1.0):
        what = "NaN label" if v is not None and math.isnan(v) else f"label {s[:40]!r} is not 0 or 1"
        raise fail(path, line, "label", what, "labels must be 1 (click / positive) or 0 (no click / negative); "
                    "binarize ratings first (e.g. rating >= 4 -> 1)")
    return v


def _parse_timestamp(path: Path, line: int, raw: str) -> int:
    s = raw.strip()
    if not _INT_RE.fullmatch(s) or not (_I64[0] <= int(s) <= _I64[1]):
        raise fail(path, line, "timestamp", f"timestamp {s[:40]!r} is not an integer (64-bit)",
                    "write integer timestamps (e.g. Unix seconds), or drop the timestamp column to use file order")
    return int(s)


def _bag(cell: str) -> list[str]:
    return [p.strip() for p in cell.split("|") if p.strip()]


def _read_entities(path: Path, id_col: str, cfg: DataConfig, report: dict, text_required: bool):
    """items.csv / users.csv -> (ids, texts, {categorical column: bags}) in file order."""
    t = read_table(path, (id_col, "text"), f"{id_col},text[,categorical columns...]")
    report["rows_read"][path.name] = len(t.rows)
    report["blank_lines"] += t.blank_lines
    cats = [c for c in t.columns if c not in (id_col, "text")]
    ids: list[str] = []
    first_line: dict[str, int] = {}
    texts: list[str] = []
    bags: dict[str, list[list[str]]] = {c: [] for c in cats}
    ci, ct = t.col(id_col), t.col("text")
    for line, f in t.rows:
        eid = f[ci].strip()
        if not eid:
            raise fail(path, line, id_col, f"empty {id_col}", f"give every row a non-empty {id_col}")
        if eid in first_line:
            raise fail(path, line, id_col, f"duplicate {id_col} {eid[:60]!r} (first defined on line {first_line[eid]})",
                        f"keep one row per {id_col}")
        first_line[eid] = line
        text = f[ct].strip()
        if not text:
            if text_required:
                raise fail(path, line, "text", f"empty or whitespace-only text for {id_col} {eid[:60]!r}",
                            "give every item a short description (title, category, ...): the text teacher embeds it")
            report["empty_user_text"] = report.get("empty_user_text", 0) + 1
        ids.append(eid)
        texts.append(truncate_text(text, cfg.max_text_chars, report))
        for c in cats:
            bags[c].append(_bag(f[t.col(c)]))
    return ids, texts, bags


@dataclass
class Entities:
    """What items.csv and users.csv define (users may be discovered from interactions.csv)."""

    item_ids: list[str]
    item_text: list[str]
    item_bags: dict[str, list[list[str]]]
    user_ids: list[str]
    user_text: list[str]
    user_bags: dict[str, list[list[str]]]
    have_users: bool

    def features(self):
        feats = [id_feature("user_id", "user", self.user_ids), id_feature("item_id", "item", self.item_ids)]
        feats += [make_feature(c, "user", b) for c, b in self.user_bags.items()]
        feats += [make_feature(c, "item", b) for c, b in self.item_bags.items()]
        return feats


def check_folder(root: Path) -> None:
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found. Fix: set data.path to a folder containing "
                        f"{INTERACTIONS}, {ITEMS} and optionally {USERS}.")
    for name in (INTERACTIONS, ITEMS):
        if not (root / name).is_file():
            have = sorted(p.name for p in root.iterdir())[:20]
            raise DataError(f"{root / name}: required file not found (folder has {have}). "
                            f"Fix: add {name} (see sparse_kd/data/csv_format.py for the format).")


def read_entities(root: Path, cfg: DataConfig, report: dict) -> Entities:
    item_ids, item_text, item_bags = _read_entities(root / ITEMS, "item_id", cfg, report, text_required=True)
    have_users = (root / USERS).is_file()
    if have_users:
        user_ids, user_text, user_bags = _read_entities(root / USERS, "user_id", cfg, report, text_required=False)
    else:
        user_ids, user_text, user_bags = [], [], {}
        report["users"] = f"{USERS} absent: users are the distinct user_id values of {INTERACTIONS}, with empty text"
    clash = sorted(set(user_bags) & set(item_bags)) + sorted({"item_id"} & set(user_bags)) + sorted({"user_id"} & set(item_bags))
    if clash:
        raise DataError(f"{root}: categorical column {clash[0]!r} appears in both {USERS} and {ITEMS} (or clashes with an id "
                        f"feature); feature names must be unique. Fix: rename it in one file (e.g. user_{clash[0]}).")
    return Entities(item_ids, item_text, item_bags, user_ids, user_text, user_bags, have_users)


class InteractionChunks:
    """interactions.csv parsed chunk by chunk into index arrays (bounded memory).

    Iterating yields ``(user, item, label, timestamp)``: (M,) int64, int64, float32, int64 arrays
    of the next rows that reference known ids (source order; labels 1 when implicit, timestamps 0
    when absent). Users are added to ``entities`` in order of first appearance when users.csv is
    absent. :meth:`finish` then raises for unknown ids (``unknown_ids="error"``) or counts them in
    ``report["dropped"]``.
    """

    def __init__(self, root: Path, entities: Entities, report: dict, chunk_rows: int = CHUNK_ROWS) -> None:
        self.path, self.ent, self.report, self.chunk_rows = root / INTERACTIONS, entities, report, chunk_rows
        self.reader = RecordReader(self.path, ("user_id", "item_id"), "user_id,item_id[,label][,timestamp]")
        cols = self.reader.header or []
        self.has_label, self.has_ts = "label" in cols, "timestamp" in cols
        extra = [c for c in cols if c not in ("user_id", "item_id", "label", "timestamp")]
        for want, present in (("label", self.has_label), ("timestamp", self.has_ts)):
            close = difflib.get_close_matches(want, [c.lower() for c in extra], n=1, cutoff=0.75)
            if not present and close:
                name = extra[[c.lower() for c in extra].index(close[0])]
                self.reader.close()
                meaning = "the data would be read as implicit feedback (positives only)" if want == "label" else \
                    "the split would not be by time"
                raise fail(self.path, self.reader.header_line, name,
                            f"column '{name}' looks like '{want}' but is not named so; {meaning}",
                            f"rename it to '{want}' (names are case-sensitive), or rename it to something else if it is not a {want}")
        if extra:
            report.setdefault("ignored_columns", {})[INTERACTIONS] = extra
        self.item_index = {v: i for i, v in enumerate(entities.item_ids)}
        self.user_index = {v: i for i, v in enumerate(entities.user_ids)}
        self.unknown: dict[str, list[tuple[int, str]]] = {"item_id": [], "user_id": []}
        self.unknown_count = {"item_id": 0, "user_id": 0}
        self.rows_kept = 0

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        for rows in self.reader.chunks(self.chunk_rows):
            arrays = self._fast(rows)
            if arrays is None:  # something to report, drop or strip in this chunk: row by row
                arrays = self._slow(rows)
            self.rows_kept += len(arrays[0])
            yield arrays
        self.report["rows_read"][INTERACTIONS] = self.reader.rows_read
        self.report["blank_lines"] += self.reader.blank_lines

    def _columns(self) -> tuple[int, int, int, int]:
        r = self.reader
        return (r.col("user_id"), r.col("item_id"), r.col("label") if self.has_label else -1,
                r.col("timestamp") if self.has_ts else -1)

    def _fast(self, rows: list[tuple[int, list[str]]]):
        """Column by column, for chunks where every value is clean and every id known; else None."""
        cu, ci, cl, ct = self._columns()
        iget = self.item_index.get
        items = [iget(f[ci]) for _, f in rows]
        if None in items:
            return None
        m = len(rows)
        label = np.ones(m, dtype=np.float32)
        if cl >= 0:
            lget = _LABELS.get
            labels = [lget(f[cl]) for _, f in rows]
            if None in labels:
                return None
            label = np.asarray(labels, dtype=np.float32)
        stamp = np.zeros(m, dtype=np.int64)
        if ct >= 0:
            raw = [f[ct] for _, f in rows]
            if not all(len(x) < 19 and x.isdigit() and x.isascii() for x in raw):
                return None
            stamp = np.asarray([int(x) for x in raw], dtype=np.int64)
        uget = self.user_index.get
        users = [uget(f[cu]) for _, f in rows]
        if None in users:
            if self.ent.have_users:
                return None
            for k, (line, f) in enumerate(rows):  # discover users in order of first appearance
                if users[k] is None:
                    users[k] = self._new_user(_parse_id(self.path, line, f[cu], "user_id"))
        return np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64), label, stamp

    def _new_user(self, u: str) -> int:
        uu = self.user_index.get(u)
        if uu is None:
            uu = self.user_index[u] = len(self.user_index)
            self.ent.user_ids.append(u)
            self.ent.user_text.append("")
        return uu

    def _slow(self, rows: list[tuple[int, list[str]]]):
        """Row by row, every check in the order of the columns, with the exact error of the first bad row."""
        path, have_users = self.path, self.ent.have_users
        cu, ci, cl, ct = self._columns()
        item_index, user_index = self.item_index, self.user_index
        users: list[int] = []
        items: list[int] = []
        labels: list[float] = []
        stamps: list[int] = []
        for line, f in rows:
            u = _parse_id(path, line, f[cu], "user_id")
            i = _parse_id(path, line, f[ci], "item_id")
            lab = _parse_label(path, line, f[cl]) if cl >= 0 else 1.0
            ts = _parse_timestamp(path, line, f[ct]) if ct >= 0 else 0
            ii = item_index.get(i)
            uu = user_index.get(u)
            if ii is None or (have_users and uu is None):
                if ii is None:
                    self._unknown("item_id", line, i)
                if have_users and uu is None:
                    self._unknown("user_id", line, u)
                continue
            users.append(uu if uu is not None else self._new_user(u))
            items.append(ii)
            labels.append(lab)
            stamps.append(ts)
        return (np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64),
                np.asarray(labels, dtype=np.float32), np.asarray(stamps, dtype=np.int64))

    def _unknown(self, col: str, line: int, value: str) -> None:
        self.unknown_count[col] += 1
        if len(self.unknown[col]) < _SHOW:
            self.unknown[col].append((line, value))

    def finish(self, unknown_ids: Literal["error", "drop"]) -> None:
        for col, other in (("item_id", ITEMS), ("user_id", USERS)):
            n = self.unknown_count[col]
            if not n:
                continue
            if unknown_ids == "error":
                first = ", ".join(f"line {ln} ({v[:40]!r})" for ln, v in self.unknown[col])
                raise fail(self.path, self.unknown[col][0][0], col,
                            f"{n} row(s) reference {col} values absent from {other}; first: {first}",
                            f"add the missing entries to {other}, remove those rows, or load with unknown_ids='drop'")
            self.report["dropped"][f"unknown_{col}"] = n
        if not self.rows_kept:
            raise fail(self.path, None, None, "no interactions left after dropping rows with unknown ids",
                        f"make the ids in {INTERACTIONS} match {ITEMS} / {USERS}")


def new_report(root: Path) -> dict:
    return {"source": "csv", "path": str(root), "rows_read": {}, "dropped": {}, "truncated_texts": 0, "blank_lines": 0}


def load_csv(cfg: DataConfig, unknown_ids: Literal["error", "drop"] = "error") -> RecDataset:
    """Load the folder ``cfg.path`` (see the module docstring) and split it (``split.py`` protocol)."""
    from sparse_kd.data.negatives import add_negatives

    root = Path(cfg.path)
    check_folder(root)
    report = new_report(root)
    ent = read_entities(root, cfg, report)
    chunks = InteractionChunks(root, ent, report)
    parts = list(chunks)
    chunks.finish(unknown_ids)
    user, item, label, stamp = (np.concatenate([p[k] for p in parts]) for k in range(4))
    del parts
    splits, split_report = split_interactions(user, item, label, stamp if chunks.has_ts else None, len(ent.item_ids), cfg)
    report["split"] = split_report
    ds = RecDataset(ent.user_ids, ent.item_ids, ent.user_text, ent.item_text, ent.features(), splits, report)
    if not chunks.has_label:
        codes = item_codes(len(ent.item_ids), cfg)
        ds.splits, sampler, report["feedback"] = add_negatives(splits, codes, ds.num_users, cfg.negatives, cfg.seed,
                                                               cfg.train_negatives)
        ds.implicit, ds.negatives = True, cfg.negatives
        ds.sampler = sampler if cfg.train_negatives == "per_epoch" else None
        report["split"].update(size_report({s: len(sp) for s, sp in ds.splits.items()},
                                           {s: positives(sp.label) for s, sp in ds.splits.items()}))
    return ds
