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

Files are read as a stream of records in bounded memory (:class:`RecordReader`), and
interactions.csv is parsed chunk by chunk (:class:`InteractionChunks`): the in-memory loader here
and the streaming converter (``sparse-kd data convert``, :mod:`.columnar`) share every check and
message.
"""

from __future__ import annotations

import csv
import difflib
import io
import itertools
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np

from sparse_kd.config import DataConfig
from sparse_kd.data.schema import DataError, RecDataset
from sparse_kd.data.split import (id_feature, item_codes, make_feature, positives, size_report, split_interactions,
                                  truncate_text)

INTERACTIONS, ITEMS, USERS = "interactions.csv", "items.csv", "users.csv"
_INT_RE = re.compile(r"[+-]?[0-9]+")
_I64 = (-(2**63), 2**63 - 1)
_SHOW = 5  # offending lines listed in an unknown-id error
_LABELS = {"1": 1.0, "0": 0.0, "1.0": 1.0, "0.0": 0.0}
CHUNK_ROWS = 1 << 18  # interactions parsed per chunk
_BLOCK_BYTES = 1 << 24  # bytes decoded at a time


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


class RecordReader:
    """The records of one CSV file, streamed in bounded memory, with the format's checks.

    The header is read and checked on construction (every ``required`` column present;
    ``expected`` shows the format in messages); :meth:`chunks` then yields lists of
    ``(line, fields)`` records of header width. Bytes are decoded in blocks that end at a line
    break, so a UTF-8 error names its absolute byte offset and line.
    """

    def __init__(self, path: Path, required: tuple[str, ...], expected: str, block_bytes: int = _BLOCK_BYTES) -> None:
        self.path, self.expected, self.block_bytes = path, expected, block_bytes
        self.blank_lines = 0
        self.rows_read = 0
        self._nonblank = False
        self._f = open(path, "rb")
        self._old_limit = csv.field_size_limit()
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long texts are truncated later, not rejected
        try:
            self._reader = csv.reader(self._lines(), strict=True)
            self._prev = 0  # line number where the last record ended
            self.header: list[str] | None = None
            self.header_line = 1
            first = self._next_record()
            if first is None:
                if not self._nonblank:
                    raise _fail(path, 1, None, "the file is empty (no header line)", f"start the file with the header `{expected}`")
                raise _fail(path, 1, None, "the file has no header line (only blank fields)", f"start the file with the header `{expected}`")
            self.header_line, fields = first
            self.header = [f.strip() for f in fields]
            self._check_header(required)
        except BaseException:
            self.close()
            raise

    # -- decoding and records

    def _blocks(self) -> Iterator[io.StringIO]:
        """Decoded blocks of whole lines (as line iterators); counts bytes and lines for errors."""
        offset, line0, carry, first = 0, 0, b"", True
        while True:
            data = self._f.read(self.block_bytes)
            buf = carry + data
            if not buf:
                return
            cut = buf.rfind(b"\n") + 1 if data else len(buf)
            if cut == 0:  # no line break yet: read on
                carry = buf
                continue
            block, carry = buf[:cut], buf[cut:]
            try:
                text = block.decode("utf-8")
            except UnicodeDecodeError as e:
                line_start = block.rfind(b"\n", 0, e.start) + 1
                line = line0 + block.count(b"\n", 0, e.start) + 1
                column = block.count(b",", line_start, e.start) + 1  # field number, ignoring quoting
                raise _fail(
                    self.path, line, column,
                    f"byte offset {offset + e.start} (byte 0x{block[e.start]:02x}) is not valid UTF-8 ({e.reason})",
                    "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 in.csv > out.csv`)",
                ) from None
            if first and text.startswith("\ufeff"):
                text = text[1:]
            first = False
            self._nonblank = self._nonblank or bool(text.strip())
            offset += len(block)
            line0 += block.count(b"\n")
            yield io.StringIO(text, newline="")

    def _lines(self) -> Iterator[str]:
        return itertools.chain.from_iterable(self._blocks())

    def _record_text(self, first: int, last: int) -> str:
        """Lines ``first .. last`` (1-based, as the csv reader counts them) of the file, for a message."""
        out: list[str] = []
        with open(self.path, "rb") as f:
            for n, ln in enumerate(io.TextIOWrapper(f, encoding="utf-8-sig", errors="replace", newline=""), start=1):
                if n > last:
                    break
                if n >= first:
                    out.append(ln)
        return "".join(out)

    def _csv_error(self, e: csv.Error) -> DataError:
        field = _quote_error_field(self._record_text(self._prev + 1, self._reader.line_num), 1)
        column: str | int | None = field
        if field is not None and self.header is not None and field <= len(self.header):
            column = self.header[field - 1]
        return _fail(self.path, self._reader.line_num, column,
                     f"malformed CSV ({e}) in the record starting on line {self._prev + 1}",
                     'quote fields containing commas, quotes or line breaks with double quotes ("...") '
                     'and double any quote inside a quoted field ("")')

    def _next_record(self) -> Optional[tuple[int, list[str]]]:
        """The next non-blank record as (first line, fields), or None at the end."""
        while True:
            try:
                fields = next(self._reader)
            except StopIteration:
                return None
            except csv.Error as e:
                raise self._csv_error(e) from None
            start, self._prev = self._prev + 1, self._reader.line_num
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                self.blank_lines += 1
                continue
            return start, fields

    def _check_header(self, required: tuple[str, ...]) -> None:
        header, path = self.header, self.path
        assert header is not None
        for i, name in enumerate(header):
            if not name:
                raise _fail(path, self.header_line, i + 1, f"empty column name in header {header}", "give every column a name")
            if header.index(name) != i:
                raise _fail(path, self.header_line, name, f"duplicate column name in header {header}", "give every column a distinct name")
        missing = [r for r in required if r not in header]
        if missing:
            hints = []
            for m in missing:
                close = difflib.get_close_matches(m, [h.lower() for h in header], n=1, cutoff=0.6)
                if close:
                    hints.append(f"'{header[[h.lower() for h in header].index(close[0])]}' looks like '{m}'")
            hint = f" ({'; '.join(hints)})" if hints else ""
            raise _fail(path, self.header_line, missing[0],
                        f"required column(s) {missing} not found; found columns {header}, expected {list(required)}{hint}",
                        f"make the header line `{self.expected}` (column names are case-sensitive)")

    def col(self, name: str) -> int:
        assert self.header is not None
        return self.header.index(name)

    def chunks(self, max_rows: int = CHUNK_ROWS) -> Iterator[list[tuple[int, list[str]]]]:
        """Lists of at most ``max_rows`` (line, fields) records; raises on a record of the wrong width
        and, at the end, on a file without data rows."""
        header = self.header
        assert header is not None
        width = len(header)
        reader = self._reader
        try:
            out: list[tuple[int, list[str]]] = []
            prev = self._prev
            while True:
                try:  # the hot loop: one record per iteration, no call per record
                    for fields in reader:
                        start, prev = prev + 1, reader.line_num
                        if len(fields) != width:
                            if not fields or (len(fields) == 1 and not fields[0].strip()):
                                self.blank_lines += 1
                                continue
                            self._prev = prev
                            self._width_error(start, fields)
                        out.append((start, fields))
                        if len(out) >= max_rows:
                            break
                    else:
                        break
                except csv.Error as e:
                    self._prev = prev
                    raise self._csv_error(e) from None
                self.rows_read += len(out)
                yield out
                out = []
            self._prev = prev
            self.rows_read += len(out)
            if out:
                yield out
            if self.rows_read == 0:
                raise _fail(self.path, self.header_line + 1, None, "the file has a header but no data rows", "add at least one data row")
        finally:
            self.close()

    def _width_error(self, line: int, fields: list[str]) -> None:
        header, width = self.header, len(self.header or [])
        assert header is not None
        if len(fields) < width:
            raise _fail(self.path, line, header[len(fields)],
                        f"found {len(fields)} fields, expected {width} ({','.join(header)}); column '{header[len(fields)]}' is missing",
                        "add the missing values (an empty value is written as nothing between two commas), "
                        'and quote values that contain commas or line breaks')
        raise _fail(self.path, line, width + 1,
                    f"found {len(fields)} fields, expected {width} ({','.join(header)}); unexpected extra value {fields[width][:40]!r}",
                    'quote values that contain commas with double quotes ("a, b"), or add the column to the header')

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
            csv.field_size_limit(self._old_limit)


def _read_table(path: Path, required: tuple[str, ...], expected: str) -> _Table:
    """Parse ``path`` whole (entity files, which fit in memory)."""
    r = RecordReader(path, required, expected)
    rows = [rec for chunk in r.chunks() for rec in chunk]
    assert r.header is not None
    return _Table(path, r.header, rows, r.blank_lines)


def _parse_id(path: Path, line: int, raw: str, column: str) -> str:
    v = raw.strip()
    if not v:
        raise _fail(path, line, column, f"empty {column}", f"give every row a non-empty {column}")
    return v


def _parse_label(path: Path, line: int, raw: str) -> float:
    s = raw.strip()
    if not s:
        raise _fail(path, line, "label", "empty label", "write 1 (click / positive) or 0 (no click / negative)")
    try:
        v = float(s)
    except ValueError:
        v = None
    if v is None or math.isnan(v) or v not in (0.0, 1.0):
        what = "NaN label" if v is not None and math.isnan(v) else f"label {s[:40]!r} is not 0 or 1"
        raise _fail(path, line, "label", what, "labels must be 1 (click / positive) or 0 (no click / negative); "
                    "binarize ratings first (e.g. rating >= 4 -> 1)")
    return v


def _parse_timestamp(path: Path, line: int, raw: str) -> int:
    s = raw.strip()
    if not _INT_RE.fullmatch(s) or not (_I64[0] <= int(s) <= _I64[1]):
        raise _fail(path, line, "timestamp", f"timestamp {s[:40]!r} is not an integer (64-bit)",
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
                raise _fail(self.path, self.reader.header_line, name,
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
                raise _fail(self.path, self.unknown[col][0][0], col,
                            f"{n} row(s) reference {col} values absent from {other}; first: {first}",
                            f"add the missing entries to {other}, remove those rows, or load with unknown_ids='drop'")
            self.report["dropped"][f"unknown_{col}"] = n
        if not self.rows_kept:
            raise _fail(self.path, None, None, "no interactions left after dropping rows with unknown ids",
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
