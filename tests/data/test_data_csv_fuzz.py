"""Property-based fuzzing of the CSV loader: any input gives a valid RecDataset or a DataError, nothing else;
well-formed input round-trips exactly."""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_kd.config import DataConfig
from sparse_kd.data import SPLITS, DataError, load_csv

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MAX_CHARS = 16
CHARS = st.characters(blacklist_categories=("Cs",))
CELL = st.lists(st.sampled_from(list('ab01 ,|"\n\r\t\x00é\ufeff-.') + ["NaN", "1.0", "12", "A1", "B7", "u"]),
                max_size=6).map("".join)


def _load(files: dict[str, bytes], **kw):
    """Load the files; return the dataset (checked) or None on DataError. Any other exception fails."""
    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            Path(d, name).write_bytes(data)
        try:
            ds = load_csv(DataConfig(source="csv", path=d, max_text_chars=MAX_CHARS), **kw)
        except DataError as e:
            assert "Fix:" in str(e)
            return None
    ds.validate()
    assert set(ds.splits) == set(SPLITS) and sum(len(sp) for sp in ds.splits.values()) >= 1
    for sp in ds.splits.values():
        assert sp.user.dtype == np.int64 and sp.item.dtype == np.int64 and sp.label.dtype == np.float32
        assert set(np.unique(sp.label).tolist()) <= {0.0, 1.0}
    assert all(len(t) <= MAX_CHARS for t in ds.item_text + ds.user_text)
    assert all(t.strip() for t in ds.item_text)
    return ds


def _csv(rows) -> bytes:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue().encode("utf-8")


def _raw(rows) -> bytes:  # unquoted: commas, quotes and newlines break the structure
    return "\n".join(",".join(r) for r in rows).encode("utf-8")


@st.composite
def valid_folder(draw):
    """A well-formed folder plus what the loader must return for it."""
    ident = st.text(CHARS, min_size=1, max_size=6).map(str.strip).filter(bool)
    text = st.text(CHARS, min_size=1, max_size=30).filter(lambda t: t.strip())
    tag = st.text(CHARS.filter(lambda c: c != "|"), min_size=1, max_size=4).map(str.strip).filter(bool)
    items = draw(st.lists(st.tuples(ident, text, st.lists(tag, max_size=3)), min_size=1, max_size=6,
                          unique_by=lambda r: r[0]))
    users = draw(st.none() | st.lists(st.tuples(ident, st.text(CHARS, max_size=10)), min_size=1, max_size=4,
                                      unique_by=lambda r: r[0]))
    user_pool = [u for u, _ in users] if users else draw(st.lists(ident, min_size=1, max_size=4))
    inter = draw(st.lists(st.tuples(st.sampled_from(user_pool), st.sampled_from([i for i, _, _ in items]),
                                    st.sampled_from(["0", "1"]), st.integers(-(2**63), 2**63 - 1)), min_size=1, max_size=12))
    files = {
        "items.csv": _csv([["item_id", "text", "tag"]] + [[i, t, "|".join(g)] for i, t, g in items]),
        "interactions.csv": _csv([["user_id", "item_id", "label", "timestamp"]] + [[u, i, l, str(ts)] for u, i, l, ts in inter]),
    }
    if users is not None:
        files["users.csv"] = _csv([["user_id", "text"]] + [list(r) for r in users])
    return files, items, users, inter


@FUZZ
@given(valid_folder())
def test_valid_roundtrip(folder):
    files, items, users, inter = folder
    ds = _load(files)
    assert ds is not None
    assert ds.item_ids == [i for i, _, _ in items]
    assert ds.item_text == [t.strip()[:MAX_CHARS] for _, t, _ in items]
    tag = ds.feature("tag")
    for e, (_, _, g) in enumerate(items):
        bag = [tag.vocab[v] for v in tag.values[tag.offsets[e] : tag.offsets[e + 1]]]
        assert bag == list(dict.fromkeys(g))
    if users is not None:
        assert ds.user_ids == [u for u, _ in users]
    else:
        assert ds.user_ids == list(dict.fromkeys(u for u, _, _, _ in inter))
    got = sorted((ds.user_ids[u], ds.item_ids[i], float(l), int(t)) for sp in ds.splits.values()
                 for u, i, l, t in zip(sp.user, sp.item, sp.label, sp.timestamp))
    assert got == sorted((u, i, float(l), ts) for u, i, l, ts in inter)


@FUZZ
@given(valid_folder(), st.sampled_from(["items.csv", "interactions.csv", "users.csv"]),
       st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, 10**6), st.binary(min_size=1, max_size=3)),
                min_size=1, max_size=3))
def test_mutated_valid_input(folder, which, mutations):
    files = dict(folder[0])
    data = bytearray(files.get(which, b"user_id,text\nu,x\n"))
    for op, pos, payload in mutations:
        pos %= len(data) + 1
        if op == "insert":
            data[pos:pos] = payload
        elif op == "delete":
            del data[pos : pos + len(payload)]
        elif pos < len(data):
            data[pos] = payload[0]
    files[which] = bytes(data)
    _load(files)


@FUZZ
@given(
    item_rows=st.lists(st.tuples(st.sampled_from(["A1", "B7", " A1", "", "u"]), CELL, CELL), max_size=4),
    inter_rows=st.lists(st.tuples(st.sampled_from(["u", " u", ""]), st.sampled_from(["A1", "B7", "ZZ", ""]),
                                  st.sampled_from(["0", "1", " 1", "1.0", "2", "", "nan", "inf", "x"]),
                                  st.sampled_from(["1", "-3", "1.5", "", "99999999999999999999"]) | CELL), max_size=6),
    user_rows=st.none() | st.lists(st.tuples(st.sampled_from(["u", "v", ""]), CELL), max_size=3),
    quoted=st.booleans(),
    drop=st.booleans(),
)
def test_adversarial_cells(item_rows, inter_rows, user_rows, quoted, drop):
    enc = _csv if quoted else _raw
    files = {
        "items.csv": enc([["item_id", "text", "tag"]] + [list(r) for r in item_rows]),
        "interactions.csv": enc([["user_id", "item_id", "label", "timestamp"]] + [list(r) for r in inter_rows]),
    }
    if user_rows is not None:
        files["users.csv"] = enc([["user_id", "text"]] + [list(r) for r in user_rows])
    _load(files, unknown_ids="drop" if drop else "error")


@FUZZ
@given(which=st.sampled_from(["items.csv", "interactions.csv", "users.csv"]), data=st.binary(max_size=64),
       keep_header=st.booleans())
def test_random_bytes(which, data, keep_header):
    files = {
        "items.csv": b"item_id,text,tag\nA1,first,x|y\nB7,second,\n",
        "interactions.csv": b"user_id,item_id,label,timestamp\nu,A1,1,3\nv,B7,0,2\n",
    }
    header = {"items.csv": b"item_id,text,tag\n", "interactions.csv": b"user_id,item_id,label,timestamp\n",
              "users.csv": b"user_id,text\n"}[which]
    files[which] = (header if keep_header else b"") + data
    _load(files)
