"""The generic CSV format: parsing, id mapping, multi-hot, optional users.csv and every bad-input case."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from sparse_kd.config import DataConfig
from sparse_kd.data import DataError, load_csv, load_dataset

ITEMS = "item_id,text,genre,format\nB7,\"A book, about cats\",animals|pets,book\nA1,Jazz night,,film\nC3,Space docs,science,film\n"
USERS = "user_id,text,region\nalice,Likes cats,north\nbob,,south\n"
INTER = "user_id,item_id,label,timestamp\nalice,B7,1,30\nbob,A1,0,10\nalice,C3,1,20\nbob,B7,1,40\n"


def write(root: Path, **files: str | bytes) -> Path:
    for name, content in files.items():
        p = root / f"{name}.csv"
        p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return root


def cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(source="csv", path=str(root), cold_item_fraction=kw.pop("cold_item_fraction", 0.0), **kw)


def load_err(root: Path, **kw) -> str:
    with pytest.raises(DataError) as ei:
        load_csv(cfg(root), **kw)
    return str(ei.value)


def assert_names(msg: str, file: str, line: int | None, column: str | int | None) -> None:
    assert file in msg, msg
    if line is not None:
        assert re.search(rf"\bline {line}\b", msg), msg
    if column is not None:
        col = f"column '{column}'" if isinstance(column, str) else f"column {column}"
        assert col in msg, msg
    assert "Fix:" in msg, msg


# ------------------------------------------------------------------------------------------ parsing


def test_full_format(tmp_path):
    ds = load_dataset(cfg(write(tmp_path, items=ITEMS, users=USERS, interactions=INTER)))
    assert ds.item_ids == ["B7", "A1", "C3"] and ds.user_ids == ["alice", "bob"]
    assert ds.item_text[0] == "A book, about cats" and ds.user_text == ["Likes cats", ""]
    assert ds.feature_names == ["user_id", "item_id", "region", "genre", "format"]
    assert [f.owner for f in ds.features] == ["user", "item", "user", "item", "item"]
    g = ds.feature("genre")
    assert g.vocab == ["animals", "pets", "science"]
    assert g.offsets.tolist() == [0, 2, 2, 3] and g.values.tolist() == [0, 1, 2]  # multi-hot, empty bag
    assert ds.feature("item_id").vocab == ["B7", "A1", "C3"] and ds.feature("item_id").values.tolist() == [0, 1, 2]
    tr = ds.splits["train"]
    # 4 rows, 80/10/10 -> round(0.4)=0 valid/test; a split keeps source order (membership is by time)
    assert tr.timestamp.tolist() == [30, 10, 20, 40]
    assert tr.user.tolist() == [0, 1, 0, 1] and tr.item.tolist() == [0, 1, 2, 0]
    assert tr.label.dtype == np.float32 and tr.user.dtype == np.int64 and tr.label.tolist() == [1, 0, 1, 1]
    assert not ds.implicit and "feedback" not in ds.report
    assert ds.report["rows_read"] == {"items.csv": 3, "users.csv": 2, "interactions.csv": 4}
    assert ds.report["empty_user_text"] == 1


def test_users_optional_and_file_order(tmp_path):
    inter = "item_id,label,user_id\nA1,1,zed\nB7,0,amy\nC3,1,zed\n"  # any column order, no timestamp
    ds = load_dataset(cfg(write(tmp_path, items=ITEMS, interactions=inter)))
    assert ds.user_ids == ["zed", "amy"] and ds.user_text == ["", ""]
    assert ds.feature_names == ["user_id", "item_id", "genre", "format"]
    tr = ds.splits["train"]
    assert tr.item.tolist() == [1, 0, 2] and tr.timestamp.tolist() == [0, 0, 0]  # file order kept
    assert "users.csv absent" in ds.report["users"]


def test_bom_quotes_blank_lines_and_ignored_columns(tmp_path):
    items = "\ufeffitem_id,text\r\nA1,\"multi\nline text\"\r\n\r\nB7,plain\r\n"
    inter = "user_id,item_id,label,extra\nu,A1,1.0,x\n\nu,B7,0,y\n"
    ds = load_csv(cfg(write(tmp_path, items=items, interactions=inter)))
    assert ds.item_text == ["multi\nline text", "plain"]
    assert ds.report["blank_lines"] == 2 and ds.report["ignored_columns"] == {"interactions.csv": ["extra"]}


def test_long_text_truncated_and_counted(tmp_path):
    items = "item_id,text\nA1," + "x" * 300_000 + "\nB7,short\n"
    ds = load_csv(cfg(write(tmp_path, items=items, interactions="user_id,item_id,label\nu,A1,1\n"), max_text_chars=100))
    assert len(ds.item_text[0]) == 100 and ds.item_text[1] == "short"
    assert ds.report["truncated_texts"] == 1


def test_cold_items_and_temporal_split(tmp_path):
    n_items = 20
    items = "item_id,text\n" + "".join(f"it{i},item number {i}\n" for i in range(n_items))
    rng = np.random.default_rng(0)
    rows = [f"u{rng.integers(5)},it{rng.integers(n_items)},{rng.integers(2)},{rng.integers(1000)}\n" for _ in range(300)]
    ds = load_csv(cfg(write(tmp_path, items=items, interactions="user_id,item_id,label,timestamp\n" + "".join(rows)),
                      cold_item_fraction=0.1))
    vcold, tcold = (set(ds.splits[s].item.tolist()) for s in ("valid_cold", "test_cold"))
    cold = vcold | tcold
    assert ds.report["split"]["cold_items"] == 2 and cold <= set(range(n_items))
    assert ds.report["split"]["valid_cold_items"] == ds.report["split"]["test_cold_items"] == 1 and not vcold & tcold
    for s in ("train", "valid", "test"):
        assert not cold & set(ds.splits[s].item.tolist())
    assert sum(len(sp) for sp in ds.splits.values()) == 300
    t = {s: ds.splits[s].timestamp for s in ("train", "valid", "test")}
    assert t["train"].max() <= t["valid"].min() and t["valid"].max() <= t["test"].min()
    n_cold = len(ds.splits["test_cold"]) + len(ds.splits["valid_cold"])
    assert abs(len(ds.splits["valid"]) - 0.1 * (300 - n_cold)) <= 1


# ------------------------------------------------------------------------------------ bad input

GOOD_ITEMS = "item_id,text\nA1,first\nB7,second\n"
GOOD_INTER = "user_id,item_id,label\nu,A1,1\n"


@pytest.mark.parametrize(
    "files, file, line, column, words",
    [
        ({"interactions": "userid,item_id,label\nu,A1,1\n"}, "interactions.csv", 1, "user_id", ["'userid' looks like", "expected"]),
        ({"items": "id,text\nA1,x\n"}, "items.csv", 1, "item_id", ["found columns ['id', 'text']"]),
        ({"users": "user_id,description\nu,x\n"}, "users.csv", 1, "text", ["expected ['user_id', 'text']"]),
        ({"interactions": "user_id,item_id,label\nu,A1\n"}, "interactions.csv", 2, "label", ["found 2 fields, expected 3"]),
        ({"interactions": "user_id,item_id,label\nu,A1,1\nu,B7,1,9\n"}, "interactions.csv", 3, 4, ["found 4 fields"]),
        ({"interactions": "user_id,item_id,label\nu,A1,1\nu,B7,2\n"}, "interactions.csv", 3, "label", ["'2' is not 0 or 1"]),
        ({"interactions": "user_id,item_id,label\nu,A1,NaN\n"}, "interactions.csv", 2, "label", ["NaN label"]),
        ({"interactions": "user_id,item_id,label\nu,A1, \n"}, "interactions.csv", 2, "label", ["empty label"]),
        ({"interactions": "user_id,item_id,label\nu,A1,yes\n"}, "interactions.csv", 2, "label", ["not 0 or 1"]),
        ({"interactions": "user_id,item_id,label,timestamp\nu,A1,1,5\nu,A1,1,1.5\n"}, "interactions.csv", 3, "timestamp", ["not an integer"]),
        ({"interactions": "user_id,item_id,label,timestamp\nu,A1,1,\n"}, "interactions.csv", 2, "timestamp", ["not an integer"]),
        ({"interactions": "user_id,item_id,label,timestamp\nu,A1,1,99999999999999999999\n"}, "interactions.csv", 2, "timestamp", ["64-bit"]),
        ({"interactions": "user_id,item_id,label\n,A1,1\n"}, "interactions.csv", 2, "user_id", ["empty user_id"]),
        ({"items": "item_id,text\nA1,ok\nB7,   \n"}, "items.csv", 3, "text", ["whitespace-only text"]),
        ({"items": "item_id,text\nA1,ok\nB7,\n"}, "items.csv", 3, "text", ["empty"]),
        ({"items": "item_id,text\nA1,ok\nB7,x\nA1,again\n"}, "items.csv", 4, "item_id", ["duplicate item_id 'A1'", "line 2"]),
        ({"users": "user_id,text\nu,a\nu,b\n"}, "users.csv", 3, "user_id", ["duplicate user_id 'u'"]),
        ({"items": ""}, "items.csv", 1, None, ["empty"]),
        ({"interactions": "\n  \n"}, "interactions.csv", 1, None, ["empty"]),
        ({"interactions": '""\n" "\n'}, "interactions.csv", 1, None, ["no header line"]),
        ({"interactions": "user_id,item_id,label\n"}, "interactions.csv", 2, None, ["no data rows"]),
        ({"users": "user_id,text\n"}, "users.csv", 2, None, ["no data rows"]),
        ({"items": 'item_id,text\nA1,ok\nB7,"unclosed\n'}, "items.csv", 3, "text", ["malformed CSV", "end of data"]),
        ({"items": 'item_id,text\nA1,"ab"c,d\nB7,x\n'}, "items.csv", 2, "text", ["malformed CSV"]),
        ({"items": 'item_id,text,g\n"A""1",x,"a\nb"c\n'}, "items.csv", 3, "g", ["starting on line 2"]),
        ({"items": "item_id,text,\nA1,x,y\n"}, "items.csv", 1, 3, ["empty column name"]),
        ({"items": "item_id,text,text\nA1,x,y\n"}, "items.csv", 1, "text", ["duplicate column"]),
        ({"users": "user_id,text,item_id\nu,a,b\n"}, "users.csv", None, None, ["'item_id'", "rename"]),
    ],
)
def test_bad_input(tmp_path, files, file, line, column, words):
    base = {"items": GOOD_ITEMS, "interactions": GOOD_INTER}
    base.update(files)
    msg = load_err(write(tmp_path, **base))
    if file == "users.csv" and line is None:  # folder-level clash message
        assert str(tmp_path) in msg and "Fix:" in msg
    else:
        assert_names(msg, file, line, column)
    for w in words:
        assert w in msg, msg


def test_non_utf8_names_byte_offset(tmp_path):
    prefix = "item_id,text\nA1,ok\nB7,Caf".encode()
    items = prefix + b"\xe9 noir\n"
    msg = load_err(write(tmp_path, items=items, interactions=GOOD_INTER))
    assert_names(msg, "items.csv", 3, 2)
    assert f"byte offset {len(prefix)}" in msg and "0xe9" in msg and "iconv" in msg


def test_unknown_ids_error_then_drop(tmp_path):
    inter = "user_id,item_id,label\nu,A1,1\nu,ZZ,1\nu,B7,0\nv,YY,0\n" + "w,QQ,1\n" * 6
    root = write(tmp_path, items=GOOD_ITEMS, interactions=inter)
    msg = load_err(root)
    assert_names(msg, "interactions.csv", 3, "item_id")
    assert "8 row(s) reference item_id values absent" in msg and "line 3 ('ZZ')" in msg and "line 5 ('YY')" in msg and "items.csv" in msg
    assert "line 10" not in msg  # only the first few are listed
    ds = load_csv(cfg(root), unknown_ids="drop")
    assert ds.report["dropped"] == {"unknown_item_id": 8} and len(ds.splits["train"]) + len(ds.splits["test"]) + len(ds.splits["valid"]) == 2


def test_unknown_user_when_users_present(tmp_path):
    root = write(tmp_path, items=GOOD_ITEMS, users="user_id,text\nu,hi\n", interactions="user_id,item_id,label\nu,A1,1\nx,B7,0\n")
    msg = load_err(root)
    assert_names(msg, "interactions.csv", 3, "user_id")
    assert "absent from users.csv" in msg


def test_missing_files(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        load_csv(cfg(tmp_path / "nope"))
    write(tmp_path, items=GOOD_ITEMS)
    with pytest.raises(DataError, match="interactions.csv: required file not found"):
        load_csv(cfg(tmp_path))


def test_field_size_limit_restored(tmp_path):
    import csv

    before = csv.field_size_limit()
    load_csv(cfg(write(tmp_path, items=GOOD_ITEMS, interactions=GOOD_INTER)))
    assert csv.field_size_limit() == before
