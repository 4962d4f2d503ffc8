"""Reading one CSV file of the generic format as a stream of records in bounded memory.

:class:`RecordReader` decodes the file block by block, checks the header (required columns,
near-miss names) and the width of every record, and names the file, the 1-based line and the
column of every problem (:func:`fail`), with how to fix it. :mod:`.csv_format` builds datasets
on it; :mod:`.columnar` streams interactions through it.
"""

from __future__ import annotations

import csv
import difflib
import io
import itertools
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from sparse_kd.data.schema import DataError

CHUNK_ROWS = 1 << 18  # records (interactions) parsed per chunk
_BLOCK_BYTES = 1 << 24  # bytes decoded at a time


@dataclass
class Table:
    """A parsed CSV file: header (stripped names) and (line, fields) rows, all of header width."""

    path: Path
    columns: list[str]
    rows: list[tuple[int, list[str]]]
    blank_lines: int

    def col(self, name: str) -> int:
        return self.columns.index(name)


def fail(path: Path, line: int | None, column: str | int | None, problem: str, fix: str) -> DataError:
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
                    raise fail(path, 1, None, "the file is empty (no header line)", f"start the file with the header `{expected}`")
                raise fail(path, 1, None, "the file has no header line (only blank fields)", f"start the file with the header `{expected}`")
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
                raise fail(
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
        return fail(self.path, self._reader.line_num, column,
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
                raise fail(path, self.header_line, i + 1, f"empty column name in header {header}", "give every column a name")
            if header.index(name) != i:
                raise fail(path, self.header_line, name, f"duplicate column name in header {header}", "give every column a distinct name")
        missing = [r for r in required if r not in header]
        if missing:
            hints = []
            for m in missing:
                close = difflib.get_close_matches(m, [h.lower() for h in header], n=1, cutoff=0.6)
                if close:
                    hints.append(f"'{header[[h.lower() for h in header].index(close[0])]}' looks like '{m}'")
            hint = f" ({'; '.join(hints)})" if hints else ""
            raise fail(path, self.header_line, missing[0],
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
                raise fail(self.path, self.header_line + 1, None, "the file has a header but no data rows", "add at least one data row")
        finally:
            self.close()

    def _width_error(self, line: int, fields: list[str]) -> None:
        header, width = self.header, len(self.header or [])
        assert header is not None
        if len(fields) < width:
            raise fail(self.path, line, header[len(fields)],
                        f"found {len(fields)} fields, expected {width} ({','.join(header)}); column '{header[len(fields)]}' is missing",
                        "add the missing values (an empty value is written as nothing between two commas), "
                        'and quote values that contain commas or line breaks')
        raise fail(self.path, line, width + 1,
                    f"found {len(fields)} fields, expected {width} ({','.join(header)}); unexpected extra value {fields[width][:40]!r}",
                    'quote values that contain commas with double quotes ("a, b"), or add the column to the header')

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
            csv.field_size_limit(self._old_limit)


def read_table(path: Path, required: tuple[str, ...], expected: str) -> Table:
    """Parse ``path`` whole (entity files, which fit in memory)."""
    r = RecordReader(path, required, expected)
    rows = [rec for chunk in r.chunks() for rec in chunk]
    assert r.header is not None
    return Table(path, r.header, rows, r.blank_lines)
