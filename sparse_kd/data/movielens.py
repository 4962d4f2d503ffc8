"""Adapter for the original MovieLens-100K files (a folder with ``u.data``, ``u.item``, ``u.user``
and, optionally, ``u.genre``; read as latin-1, as distributed).

Files: ``u.data`` tab- (or whitespace-) separated ``user item rating timestamp``; ``u.item`` ``|``-separated
``id|title|release date|video release date|IMDb URL|19 genre flags``; ``u.user`` ``|``-separated
``id|age|gender|occupation|zip``; ``u.genre`` ``name|index`` (the standard 19 names are used when it
is absent). Entity indices follow file order of u.user / u.item; raw ids are the numeric strings.

Text (for the teacher):
    item: title (with the release year appended when the title has none) and genres, e.g.
    ``"Toy Story (1995). Genres: Animation, Children's, Comedy."``
    user: age, gender and occupation, e.g. ``"A 24-year-old male technician."``

Sparse features, in order: ``user_id``, ``item_id`` (one id each), ``gender``, ``age_bucket``
(<18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+), ``occupation``, ``zip_prefix`` (first character of
the zip code) owned by users, and ``genres`` (multi-hot) owned by items.

Protocol (fixed):
    * rating >= 4 is a click (label 1), rating <= 2 a non-click (label 0); rating 3 is dropped and
      counted in ``report["dropped"]["rating_3"]``;
    * ``DataConfig.cold_item_fraction`` of the items (seeded by ``DataConfig.seed``) are cold: all
      their interactions form ``test_cold`` and none is in train/valid/test;
    * the rest is split by timestamp (one global order, ties kept in file order by a stable sort)
      into train/valid/test with ``valid_fraction`` / ``test_fraction`` (80/10/10 by default).
    See :mod:`sparse_kd.data.split`.

Malformed lines are a :class:`DataError` naming the file, the 1-based line and the field.
Blank (or whitespace-only) lines are skipped and counted in ``report["blank_lines"]``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from sparse_kd.config import DataConfig
from sparse_kd.data.schema import DataError, RecDataset
from sparse_kd.data.split import id_feature, make_feature, split_interactions, truncate_text

DEFAULT_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                  "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
                  "Thriller", "War", "Western"]
AGE_BUCKETS = ((18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55"))
_OCCUPATION_TEXT = {"other": "with an unlisted occupation", "none": "with no occupation",
                    "healthcare": "healthcare worker", "entertainment": "entertainment worker",
                    "marketing": "marketing professional", "retired": "retiree"}
_GENDER_TEXT = {"M": "male", "F": "female"}
_DATA_FIELDS = ("user", "item", "rating", "timestamp")
_ITEM_FIELDS = ("id", "title", "release date", "video release date", "IMDb URL")
_USER_FIELDS = ("id", "age", "gender", "occupation", "zip")


def age_bucket(age: int) -> str:
    for upper, name in AGE_BUCKETS:
        if age < upper:
            return name
    return "56+"


def _err(path: Path, line: int, field: str, problem: str, fix: str) -> DataError:
    return DataError(f"{path}, line {line}, column '{field}': {problem}. Fix: {fix}.")


def _lines(path: Path, report: dict):
    """(1-based line number, stripped line) for every non-blank line of a latin-1 file; blank
    lines are counted in ``report["blank_lines"]``."""
    if not path.is_file():
        raise DataError(f"{path}: file not found. Fix: point data.path at the unpacked ml-100k folder "
                        "(it must contain u.data, u.item and u.user).")
    lines = path.read_bytes().decode("latin-1").split("\n")
    if lines[-1] == "":  # the newline that ends the last line
        lines.pop()
    out = [(i + 1, ln.rstrip("\r")) for i, ln in enumerate(lines) if ln.strip()]
    report["blank_lines"] += len(lines) - len(out)
    return out


def _split(path: Path, line: int, raw: str, sep: str | None, names: tuple[str, ...], n: int) -> list[str]:
    parts = raw.split(sep)
    if len(parts) != n:
        sep_name = "whitespace" if sep is None else repr(sep)
        raise _err(path, line, names[min(len(parts), len(names) - 1)] if len(parts) < n else f"#{n + 1}",
                   f"found {len(parts)} {sep_name}-separated fields, expected {n} ({', '.join(names)}...)",
                   "restore the original file from the MovieLens-100K archive")
    return parts


def _int(path: Path, line: int, field: str, s: str) -> int:
    s = s.strip()
    if not re.fullmatch(r"[0-9]{1,18}", s):
        raise _err(path, line, field, f"{s[:40]!r} is not a non-negative integer",
                   "restore the original file from the MovieLens-100K archive")
    return int(s)


def _read_genres(root: Path, report: dict) -> tuple[list[str], int]:
    path = root / "u.genre"
    if not path.is_file():
        return list(DEFAULT_GENRES), 0
    by_index: dict[int, str] = {}
    rows = _lines(path, report)
    for line, raw in rows:
        name, idx = _split(path, line, raw, "|", ("name", "index"), 2)
        by_index[_int(path, line, "index", idx)] = name.strip()
    if sorted(by_index) != list(range(len(by_index))):
        raise DataError(f"{path}: genre indices {sorted(by_index)} are not 0..{len(by_index) - 1}. "
                        "Fix: restore the original u.genre.")
    return [by_index[i] for i in range(len(by_index))], len(rows)


def _item_text(title: str, date: str, genres: list[str]) -> str:
    title = title.strip() or "Untitled movie"
    year = re.search(r"([0-9]{4})\s*$", date.strip())
    if year and not re.search(r"\([0-9]{4}\)\s*$", title):
        title = f"{title} ({year.group(1)})"
    return f"{title}. Genres: {', '.join(genres)}." if genres else f"{title}."


def _user_text(age: int, gender: str, occupation: str) -> str:
    occ = _OCCUPATION_TEXT.get(occupation, occupation) or "with no listed occupation"
    return f"A {age}-year-old {_GENDER_TEXT.get(gender, 'person')} {occ}."


def load_movielens(cfg: DataConfig) -> RecDataset:
    """Load ML-100K from ``cfg.path`` and split it by the protocol in the module docstring."""
    root = Path(cfg.path)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found. Fix: set data.path to the unpacked ml-100k folder.")
    report: dict = {"source": "movielens", "path": str(root), "rows_read": {}, "dropped": {}, "truncated_texts": 0,
                    "blank_lines": 0}
    genre_names, n_genre_rows = _read_genres(root, report)
    report["rows_read"]["u.genre"] = n_genre_rows
    ng = len(genre_names)

    path = root / "u.item"
    item_ids: list[str] = []
    item_text: list[str] = []
    genre_bags: list[list[str]] = []
    first: dict[str, int] = {}
    rows = _lines(path, report)
    for line, raw in rows:
        f = _split(path, line, raw, "|", _ITEM_FIELDS + tuple(genre_names), 5 + ng)
        iid = str(_int(path, line, "id", f[0]))
        if iid in first:
            raise _err(path, line, "id", f"duplicate item id {iid} (first on line {first[iid]})", "keep one line per item")
        first[iid] = line
        flags = f[5:]
        for g, v in zip(genre_names, flags):
            if v.strip() not in ("0", "1"):
                raise _err(path, line, g, f"genre flag {v[:20]!r} is not 0 or 1", "restore the original u.item")
        genres = [g for g, v in zip(genre_names, flags) if v.strip() == "1"]
        item_ids.append(iid)
        item_text.append(truncate_text(_item_text(f[1], f[2], genres), cfg.max_text_chars, report))
        genre_bags.append(genres)
    report["rows_read"]["u.item"] = len(rows)

    path = root / "u.user"
    user_ids: list[str] = []
    user_text: list[str] = []
    ucats: dict[str, list[list[str]]] = {"gender": [], "age_bucket": [], "occupation": [], "zip_prefix": []}
    first = {}
    rows = _lines(path, report)
    for line, raw in rows:
        f = _split(path, line, raw, "|", _USER_FIELDS, 5)
        uid = str(_int(path, line, "id", f[0]))
        if uid in first:
            raise _err(path, line, "id", f"duplicate user id {uid} (first on line {first[uid]})", "keep one line per user")
        first[uid] = line
        age = _int(path, line, "age", f[1])
        gender, occ, zipc = f[2].strip(), f[3].strip(), f[4].strip()
        if gender not in _GENDER_TEXT:
            raise _err(path, line, "gender", f"gender {gender[:20]!r} is not M or F", "restore the original u.user")
        user_ids.append(uid)
        user_text.append(truncate_text(_user_text(age, gender, occ), cfg.max_text_chars, report))
        ucats["gender"].append([gender])
        ucats["age_bucket"].append([age_bucket(age)])
        ucats["occupation"].append([occ] if occ else [])
        ucats["zip_prefix"].append([zipc[0].upper()] if zipc else [])
    report["rows_read"]["u.user"] = len(rows)

    path = root / "u.data"
    rows = _lines(path, report)
    report["rows_read"]["u.data"] = len(rows)
    arr = np.zeros((len(rows), 4), dtype=np.int64)
    uidx = {u: i for i, u in enumerate(user_ids)}
    iidx = {it: i for i, it in enumerate(item_ids)}
    for r, (line, raw) in enumerate(rows):
        f = _split(path, line, raw, None, _DATA_FIELDS, 4)
        u, it, rating, ts = (_int(path, line, n, v) for n, v in zip(_DATA_FIELDS, f))
        if not 1 <= rating <= 5:
            raise _err(path, line, "rating", f"rating {rating} is not in 1..5", "restore the original u.data")
        if str(u) not in uidx:
            raise _err(path, line, "user", f"user {u} is not in u.user", "use the u.user from the same archive")
        if str(it) not in iidx:
            raise _err(path, line, "item", f"item {it} is not in u.item", "use the u.item from the same archive")
        arr[r] = (uidx[str(u)], iidx[str(it)], rating, ts)
    keep = arr[:, 2] != 3
    report["dropped"]["rating_3"] = int((~keep).sum())
    arr = arr[keep]
    splits, split_report = split_interactions(arr[:, 0], arr[:, 1], (arr[:, 2] >= 4).astype(np.float32), arr[:, 3],
                                              len(item_ids), cfg)
    report["split"] = split_report
    features = [id_feature("user_id", "user", user_ids), id_feature("item_id", "item", item_ids)]
    features += [make_feature(n, "user", b) for n, b in ucats.items()]
    features.append(make_feature("genres", "item", genre_bags))
    return RecDataset(user_ids, item_ids, user_text, item_text, features, splits, report)
