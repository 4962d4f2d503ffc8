"""The documented generic format: a folder of UTF-8 CSV files (Python ``csv`` dialect, ``,``-separated,
``"``-quoted; a leading UTF-8 BOM is ignored).

``interactions.csv`` (required)
    header ``user_id,item_id,label[,timestamp]`` in any column order. ``label`` is 0 or 1
    (``0.0``/``1.0`` accepted); ``timestamp`` an integer (any unit). Without a ``timestamp`` column,
    file order is time order and timestamps are stored as 0. Other columns are ignored and listed
    in ``report["ignored_columns"]``.
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
"""

from __future__ import annotations

import csv
import difflib
import io
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from sparse_kd.config import DataConfig
from sparse_kd.data.schema import DataError, RecDataset
from sparse_kd.data.split import id_feature, make_feature, split_interactions, truncate_text

INTERACTIONS, ITEMS, USERS = "interactions.csv", "items.csv", "users.csv"
_INT_RE = re.compile(r"[+-]?[0-9]+")
_I64 = (-(2**63), 2**63 - 1)
_SHOW = 5  # offending lines listed in an unknown-id error


@dataclass
class _Table:
    """A parsed CSV file: header (stripped names) and (line, fields) rows, all of header width."""

    path: Path
    columns: list[str]
    rows: list[tuple[int, list[str]]]
    blank_lines: int

    def col(self, name: str) -> int:
        return self.columns.index(name)


def _fail(path: Path, line: int | None, column: str | int | None, problem: str, fix: str) -> DataError:
    where = [str(path)]
    if line is not None:
        where.append(f"line {line}")
    if column is not None:
        where.append(f"column '{column}'" if isinstance(column, str) else f"column {column}")
    return DataError(f"{', '.join(where)}: {problem}. Fix: {fix}.")


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = data.rfind(b"\n", 0, e.start) + 1
        line = data.count(b"\n", 0, e.start) + 1
        column = data.count(b",", line_start, e.start) + 1  # field number, ignoring quoting
        raise _fail(
            path, line, column,
            f"byte offset {e.start} (byte 0x{data[e.start]:02x}) is not valid UTF-8 ({e.reason})",
            "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.csv > out.csv`)",
        ) from None
    return text[1:] if text.startswith("\ufeff") else text


def _quote_error_field(text: str, start_line: int) -> int | None:
    """1-based field of the record starting on ``start_line`` whose quoting is broken (None if not found)."""
    breaks = [m.end() for m in re.finditer(r"\r\n|\r|\n", text)]
    pos = 0 if start_line <= 1 else (breaks[start_line - 2] if start_line - 2 < len(breaks) else len(text))
    field, n = 1, len(text)
    while pos < n:
        if text[pos] == '"':  # quoted field: find the closing quote ("" is an escaped quote)
            pos += 1
            while True:
                q = text.find('"', pos)
                if q < 0:
                    return field  # end of data inside quotes
                if text.startswith('""', q):
                    pos = q + 2
                    continue
                pos = q + 1
                break
            if pos < n and text[pos] not in ",\r\n":
                return field  # text after the closing quote
        else:
            while pos < n and text[pos] not in ",\r\n":
                pos += 1
        if pos >= n or text[pos] in "\r\n":
            return None
        field, pos = field + 1, pos + 1
    return None


def _read_table(path: Path, required: tuple[str, ...], expected: str) -> _Table:
    """Parse ``path``; check the header has every ``required`` column (``expected`` shows the format)."""
    text = _decode(path)
    if not text.strip():
        raise _fail(path, 1, None, "the file is empty (no header line)", f"start the file with the header `{expected}`")
    old_limit = csv.field_size_limit()
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long texts are truncated later, not rejected
    try:
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        rows: list[tuple[int, list[str]]] = []
        header: list[str] | None = None
        header_line = 1
        blank = 0
        prev = 0
        try:
            for fields in reader:
                start, prev = prev + 1, reader.line_num
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    blank += 1
                    continue
                if header is None:
                    header, header_line = [f.strip() for f in fields], start
                else:
                    rows.append((start, fields))
        except csv.Error as e:
            field = _quote_error_field(text, prev + 1)
            column: str | int | None = field
            if field is not None and header is not None and field <= len(header):
                column = header[field - 1]
            raise _fail(path, reader.line_num, column, f"malformed CSV ({e}) in the record starting on line {prev + 1}",
                        'quote fields containing commas, quotes or line breaks with double quotes ("...") '
                        'and double any quote inside a quoted field ("")') from None
    finally:
        csv.field_size_limit(old_limit)
    if header is None:  # e.g. only quoted empty fields
        raise _fail(path, 1, None, "the file has no header line (only blank fields)", f"start the file with the header `{expected}`")
    for i, name in enumerate(header):
        if not name:
            raise _fail(path, header_line, i + 1, f"empty column name in header {header}", "give every column a name")
        if header.index(name) != i:
            raise _fail(path, header_line, name, f"duplicate column name in header {header}", "give every column a distinct name")
    missing = [r for r in required if r not in header]
    if missing:
        hints = []
        for m in missing:
            close = difflib.get_close_matches(m, [h.lower() for h in header], n=1, cutoff=0.6)
            if close:
                hints.append(f"'{header[[h.lower() for h in header].index(close[0])]}' looks like '{m}'")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise _fail(path, header_line, missing[0],
                    f"required column(s) {missing} not found; found columns {header}, expected {list(required)}{hint}",
                    f"make the header line `{expected}` (column names are case-sensitive)")
    if not rows:
        raise _fail(path, header_line + 1, None, "the file has a header but no data rows", "add at least one data row")
    width = len(header)
    for line, fields in rows:
        if len(fields) < width:
            raise _fail(path, line, header[len(fields)],
                        f"found {len(fields)} fields, expected {width} ({','.join(header)}); column '{header[len(fields)]}' is missing",
                        "add the missing values (an empty value is written as nothing between two commas), "
                        'and quote values that contain commas or line breaks')
        if len(fields) > width:
            raise _fail(path, line, width + 1,
                        f"found {len(fields)} fields, expected {width} ({','.join(header)}); unexpected extra value {fields[width][:40]!r}",
                        'quote values that contain commas with double quotes ("a, b"), or add the column to the header')
    return _Table(path, header, rows, blank)


def _parse_id(t: _Table, line: int, raw: str, column: str) -> str:
    v = raw.strip()
    if not v:
        raise _fail(t.path, line, column, f"empty {column}", f"give every row a non-empty {column}")
    return v


def _parse_label(t: _Table, line: int, raw: str) -> float:
    s = raw.strip()
    if not s:
        raise _fail(t.path, line, "label", "empty label", "write 1 (click / positive) or 0 (no click / negative)")
    try:
        v = float(s)
    except ValueError:
        v = None
    if v is None or math.isnan(v) or v not in (0.0, 1.0):
        what = "NaN label" if v is not None and math.isnan(v) else f"label {s[:40]!r} is not 0 or 1"
        raise _fail(t.path, line, "label", what, "labels must be 1 (click / positive) or 0 (no click / negative); "
                    "binarize ratings first (e.g. rating >= 4 -> 1)")
    return v


def _parse_timestamp(t: _Table, line: int, raw: str) -> int:
    s = raw.strip()
    if not _INT_RE.fullmatch(s) or not (_I64[0] <= int(s) <= _I64[1]):
        raise _fail(t.path, line, "timestamp", f"timestamp {s[:40]!r} is not an integer (64-bit)",
                    "write integer timestamps (e.g. Unix seconds), or drop the timestamp column to use file order")
    return int(s)


def _bag(cell: str) -> list[str]:
    return [p.strip() for p in cell.split("|") if p.strip()]


def _read_entities(path: Path, id_col: str, cfg: DataConfig, report: dict, text_required: bool):
    """items.csv / users.csv -> (ids, texts, {categorical column: bags}) in file order."""
    t = _read_table(path, (id_col, "text"), f"{id_col},text[,categorical columns...]")
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
            raise _fail(path, line, id_col, f"empty {id_col}", f"give every row a non-empty {id_col}")
        if eid in first_line:
            raise _fail(path, line, id_col, f"duplicate {id_col} {eid[:60]!r} (first defined on line {first_line[eid]})",
                        f"keep one row per {id_col}")
        first_line[eid] = line
        text = f[ct].strip()
        if not text:
            if text_required:
                raise _fail(path, line, "text", f"empty or whitespace-only text for {id_col} {eid[:60]!r}",
                            "give every item a short description (title, category, ...): the text teacher embeds it")
            report["empty_user_text"] = report.get("empty_user_text", 0) + 1
        ids.append(eid)
        texts.append(truncate_text(text, cfg.max_text_chars, report))
        for c in cats:
            bags[c].append(_bag(f[t.col(c)]))
    return ids, texts, bags


def load_csv(cfg: DataConfig, unknown_ids: Literal["error", "drop"] = "error") -> RecDataset:
    """Load the folder ``cfg.path`` (see the module docstring) and split it (``split.py`` protocol)."""
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found. Fix: set data.path to a folder containing "
                        f"{INTERACTIONS}, {ITEMS} and optionally {USERS}.")
    for name in (INTERACTIONS, ITEMS):
        if not (root / name).is_file():
            have = sorted(p.name for p in root.iterdir())[:20]
            raise DataError(f"{root / name}: required file not found (folder has {have}). "
                            f"Fix: add {name} (see sparse_kd/data/csv_format.py for the format).")
    report: dict = {"source": "csv", "path": str(root), "rows_read": {}, "dropped": {}, "truncated_texts": 0, "blank_lines": 0}

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

    t = _read_table(root / INTERACTIONS, ("user_id", "item_id", "label"), "user_id,item_id,label[,timestamp]")
    report["rows_read"][INTERACTIONS] = len(t.rows)
    report["blank_lines"] += t.blank_lines
    extra = [c for c in t.columns if c not in ("user_id", "item_id", "label", "timestamp")]
    if extra:
        report["ignored_columns"] = {INTERACTIONS: extra}
    has_ts = "timestamp" in t.columns
    item_index = {v: i for i, v in enumerate(item_ids)}
    user_index = {v: i for i, v in enumerate(user_ids)}
    raw_users: list[str] = []
    items: list[int] = []
    labels: list[float] = []
    stamps: list[int] = []
    unknown: dict[str, list[tuple[int, str]]] = {"item_id": [], "user_id": []}
    cu, ci, cl = t.col("user_id"), t.col("item_id"), t.col("label")
    ct = t.col("timestamp") if has_ts else -1
    for line, f in t.rows:
        u = _parse_id(t, line, f[cu], "user_id")
        i = _parse_id(t, line, f[ci], "item_id")
        lab = _parse_label(t, line, f[cl])
        ts = _parse_timestamp(t, line, f[ct]) if has_ts else 0
        bad = False
        if i not in item_index:
            unknown["item_id"].append((line, i))
            bad = True
        if have_users and u not in user_index:
            unknown["user_id"].append((line, u))
            bad = True
        if bad:
            continue
        raw_users.append(u)
        items.append(item_index[i])
        labels.append(lab)
        stamps.append(ts)
    for col, other in (("item_id", ITEMS), ("user_id", USERS)):
        bad_rows = unknown[col]
        if not bad_rows:
            continue
        if unknown_ids == "error":
            first = ", ".join(f"line {ln} ({v[:40]!r})" for ln, v in bad_rows[:_SHOW])
            raise _fail(t.path, bad_rows[0][0], col,
                        f"{len(bad_rows)} row(s) reference {col} values absent from {other}; first: {first}",
                        f"add the missing entries to {other}, remove those rows, or load with unknown_ids='drop'")
        report["dropped"][f"unknown_{col}"] = len(bad_rows)
    if not items:
        raise _fail(t.path, None, None, "no interactions left after dropping rows with unknown ids",
                    f"make the ids in {INTERACTIONS} match {ITEMS} / {USERS}")
    if not have_users:
        for u in raw_users:
            user_index.setdefault(u, len(user_index))
        user_ids = list(user_index)
        user_text = [""] * len(user_ids)
    users = np.asarray([user_index[u] for u in raw_users], dtype=np.int64)

    splits, split_report = split_interactions(
        users, np.asarray(items, dtype=np.int64), np.asarray(labels, dtype=np.float32),
        np.asarray(stamps, dtype=np.int64) if has_ts else None, len(item_ids), cfg)
    report["split"] = split_report
    features = [id_feature("user_id", "user", user_ids), id_feature("item_id", "item", item_ids)]
    features += [make_feature(c, "user", b) for c, b in user_bags.items()]
    features += [make_feature(c, "item", b) for c, b in item_bags.items()]
    return RecDataset(user_ids, item_ids, user_text, item_text, features, splits, report)
