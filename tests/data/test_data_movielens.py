"""The ML-100K adapter on a small generated fixture in the original file formats (never the real data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sparse_kd.config import DataConfig
from sparse_kd.data import DataError, load_dataset
from sparse_kd.data.movielens import DEFAULT_GENRES, age_bucket

N_USERS, N_ITEMS, N_RATINGS = 12, 30, 400


def make_fixture(root: Path, seed: int = 0) -> dict:
    """Write u.data/u.item/u.user/u.genre like the originals; return the ratings for checking."""
    rng = np.random.default_rng(seed)
    (root / "u.genre").write_bytes("".join(f"{g}|{i}\n" for i, g in enumerate(DEFAULT_GENRES)).encode() + b"\n")
    items = []
    for i in range(1, N_ITEMS + 1):
        flags = ["0"] * 19
        for g in rng.choice(19, size=rng.integers(1, 3), replace=False):
            flags[g] = "1"
        title = "Caf\u00e9 Society (1994)" if i == 1 else ("No Year Movie" if i == 2 else f"Movie {i} (19{60 + i % 40})")
        items.append("|".join([str(i), title, "01-Jan-1995", "", f"http://us.imdb.com/M/title-exact?{i}"] + flags))
    (root / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    occ = ["technician", "other", "writer", "none", "student"]
    users = [f"{u}|{[24, 53, 17, 60][u % 4]}|{'MF'[u % 2]}|{occ[u % 5]}|{'85711' if u % 3 else 'T8H1N'}" for u in range(1, N_USERS + 1)]
    (root / "u.user").write_text("\n".join(users) + "\n")
    u = rng.integers(1, N_USERS + 1, size=N_RATINGS)
    it = rng.integers(1, N_ITEMS + 1, size=N_RATINGS)
    r = rng.integers(1, 6, size=N_RATINGS)
    t = 880_000_000 + rng.integers(0, 1000, size=N_RATINGS)  # many ties
    (root / "u.data").write_text("".join(f"{a}\t{b}\t{c}\t{d}\n" for a, b, c, d in zip(u, it, r, t)))
    return {"user": u, "item": it, "rating": r, "ts": t}


def cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(source="movielens", path=str(root), **kw)


def test_protocol(tmp_path):
    raw = make_fixture(tmp_path)
    ds = load_dataset(cfg(tmp_path))
    rep = ds.report
    assert rep["rows_read"] == {"u.genre": 19, "u.item": N_ITEMS, "u.user": N_USERS, "u.data": N_RATINGS}
    assert rep["dropped"] == {"rating_3": int((raw["rating"] == 3).sum())}
    assert sum(len(sp) for sp in ds.splits.values()) == int((raw["rating"] != 3).sum())
    # cold items: 10% of items, split between valid_cold and test_cold, never in train/valid/test
    cold = set(ds.splits["test_cold"].item.tolist()) | set(ds.splits["valid_cold"].item.tolist())
    assert rep["split"]["cold_items"] == 3 and len(cold) <= 3
    assert (rep["split"]["valid_cold_items"], rep["split"]["test_cold_items"]) == (1, 2)
    for s in ("train", "valid", "test"):
        assert not cold & set(ds.splits[s].item.tolist())
    # split by time, 80/10/10; each split keeps file order
    t = {s: ds.splits[s].timestamp for s in ("train", "valid", "test")}
    assert t["train"].max() <= t["valid"].min() and t["valid"].max() <= t["test"].min()
    line_of = {(str(a), str(b), int(d)): k for k, (a, b, d) in enumerate(zip(raw["user"], raw["item"], raw["ts"]))}
    for sp in ds.splits.values():
        lines = [line_of[(ds.user_ids[u], ds.item_ids[i], int(ts))] for u, i, ts in zip(sp.user, sp.item, sp.timestamp)]
        assert lines == sorted(lines)
    n_warm = sum(len(ds.splits[s]) for s in ("train", "valid", "test"))
    assert abs(len(ds.splits["test"]) - 0.1 * n_warm) <= 1 and abs(len(ds.splits["valid"]) - 0.1 * n_warm) <= 1
    # labels: rating >= 4 -> 1, <= 2 -> 0, matched per (user, item, ts) row
    truth = {}
    for a, b, c, d in zip(raw["user"], raw["item"], raw["rating"], raw["ts"]):
        if c != 3:
            truth.setdefault((str(a), str(b), int(d)), set()).add(float(c >= 4))
    for sp in ds.splits.values():
        for u, i, lab, ts in zip(sp.user, sp.item, sp.label, sp.timestamp):
            assert float(lab) in truth[(ds.user_ids[u], ds.item_ids[i], int(ts))]


def test_text_and_features(tmp_path):
    make_fixture(tmp_path)
    ds = load_dataset(cfg(tmp_path))
    assert ds.item_ids[:3] == ["1", "2", "3"] and ds.user_ids[0] == "1"
    assert ds.item_text[0].startswith("Caf\u00e9 Society (1994). Genres: ")  # latin-1 decoded
    assert ds.item_text[1].startswith("No Year Movie (1995).")  # year from the release date
    assert ds.user_text[:5] == ["A 53-year-old female with an unlisted occupation.", "A 17-year-old male writer.",
                                "A 60-year-old female with no occupation.", "A 24-year-old male student.",
                                "A 53-year-old female technician."]
    assert ds.feature_names == ["user_id", "item_id", "gender", "age_bucket", "occupation", "zip_prefix", "genres"]
    assert [f.owner for f in ds.features] == ["user", "item", "user", "user", "user", "user", "item"]
    assert ds.feature("genres").lengths().max() == 2 and set(ds.feature("zip_prefix").vocab) == {"8", "T"}
    ab = ds.feature("age_bucket")
    assert ab.vocab[ab.values[ab.offsets[1]]] == "<18"


def test_age_buckets():
    assert [age_bucket(a) for a in (7, 18, 24, 25, 34, 35, 44, 45, 49, 50, 55, 56, 73)] == [
        "<18", "18-24", "18-24", "25-34", "25-34", "35-44", "35-44", "45-49", "45-49", "50-55", "50-55", "56+", "56+"]


def test_seeded_cold_items(tmp_path):
    make_fixture(tmp_path)
    a, b = load_dataset(cfg(tmp_path)), load_dataset(cfg(tmp_path))
    c = load_dataset(cfg(tmp_path, seed=5))
    assert np.array_equal(a.splits["test_cold"].item, b.splits["test_cold"].item)
    assert set(a.splits["test_cold"].item.tolist()) != set(c.splits["test_cold"].item.tolist())


@pytest.mark.parametrize(
    "file, line, append, column, words",
    [
        ("u.data", 401, "1\t2\t5\n", "timestamp", ["found 3"]),
        ("u.data", 401, "1\t2\tfive\t8\n", "rating", ["'five'"]),
        ("u.data", 401, "1\t2\t7\t8\n", "rating", ["not in 1..5"]),
        ("u.data", 401, "99\t2\t4\t8\n", "user", ["not in u.user"]),
        ("u.data", 401, "1\t999\t4\t8\n", "item", ["not in u.item"]),
        ("u.user", 13, "13|30|X|writer|12345\n", "gender", ["not M or F"]),
        ("u.user", 13, "13|thirty|M|writer|12345\n", "age", ["not a non-negative integer"]),
        ("u.user", 13, "1|30|M|writer|12345\n", "id", ["duplicate user id 1"]),
        ("u.item", 31, "31|X (1990)|01-Jan-1990||url|0\n", "Action", ["found 6"]),
        ("u.item", 31, "31|X (1990)|01-Jan-1990||url" + "|0" * 20 + "\n", "#25", ["found 25"]),
        ("u.item", 31, "31|X (1990)|01-Jan-1990||url" + "|2" * 19 + "\n", "unknown", ["not 0 or 1"]),
    ],
)
def test_malformed_lines(tmp_path, file, line, append, column, words):
    make_fixture(tmp_path)
    with open(tmp_path / file, "a", encoding="latin-1") as f:
        f.write(append)
    with pytest.raises(DataError) as ei:
        load_dataset(cfg(tmp_path))
    msg = str(ei.value)
    assert file in msg and f"line {line}," in msg and f"column '{column}'" in msg and "Fix:" in msg, msg
    for w in words:
        assert w in msg, msg


def test_missing_folder_and_file(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        load_dataset(cfg(tmp_path / "nope"))
    make_fixture(tmp_path)
    (tmp_path / "u.user").unlink()
    with pytest.raises(DataError, match="u.user: file not found"):
        load_dataset(cfg(tmp_path))


def test_blank_lines_are_skipped_and_counted(tmp_path):
    make_fixture(tmp_path)  # u.genre ends with one blank line, as the original does
    assert load_dataset(cfg(tmp_path)).report["blank_lines"] == 1
    data = (tmp_path / "u.data").read_text().splitlines(keepends=True)
    (tmp_path / "u.data").write_text("".join(data[:5]) + "\n  \n" + "".join(data[5:]) + "\r\n")
    ds = load_dataset(cfg(tmp_path))
    assert ds.report["blank_lines"] == 1 + 3 and ds.report["rows_read"]["u.data"] == N_RATINGS


def test_convert_to_parquet_equals_in_memory(tmp_path):
    from sparse_kd.data import convert

    make_fixture(tmp_path)
    c = cfg(tmp_path, shuffle_block_rows=50)
    convert(c, tmp_path / "conv")
    a, b = load_dataset(c), load_dataset(DataConfig(source="parquet", path=str(tmp_path / "conv"), shuffle_block_rows=50))
    assert a.item_text == b.item_text and a.feature_names == b.feature_names
    for s in a.splits:
        for k in ("user", "item", "label", "timestamp"):
            assert np.array_equal(getattr(a.splits[s], k), getattr(b.splits[s], k))
    assert b.report["split"] == a.report["split"] and b.report["dropped"] == a.report["dropped"]
