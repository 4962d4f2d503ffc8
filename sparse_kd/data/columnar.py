"""Sharded columnar data (Parquet through pyarrow), for interactions that do not fit in memory.

``sparse-kd data convert CONFIG --out FOLDER`` turns the CSV format (:mod:`.csv_format`, streamed in
bounded memory) or any in-memory source (MovieLens, synthetic) into a folder; ``data.source:
parquet`` with ``data.path: FOLDER`` then trains from it, each rank streaming its part of every
global batch through DataLoader workers (:mod:`.stream`), while users, items and their features
stay in memory.

Folder (``SCHEMA_VERSION``):

``manifest.json``
    schema version, the data settings it was made with, users/items, the split sizes and files,
    the loader's report (rows read, dropped, split, feedback), and how the conversion went.
``entities/users.parquet``, ``entities/items.parquet``
    ``user_id``/``item_id`` (raw ids in index order) and ``text``.
``entities/features.json`` + ``features.npz``
    per sparse feature: owner and vocabulary; CSR ``offsets`` and ``values``.
``splits/<split>/part-NNNNN.parquet``
    ``user``, ``item`` (int64 indices), ``label`` (float32), ``timestamp`` (int64), in source
    order; row groups of exactly ``data.shuffle_block_rows`` rows (the last may be shorter), which
    are the blocks of the training order, ``FILE_ROW_GROUPS`` row groups per file.
``train_counts.npz``
    training interactions per user and per item (the default dense features).
``negatives/<pool>_{items,count,offsets,adj}.npy``
    implicit feedback only: the sampler's pools; ``adj`` is memory-mapped when training.

The splits, the sampled negatives and every check and message are those of the in-memory
loaders: the CSV is read by the same :class:`~.csv_format.InteractionChunks`, split cut points
are exact order statistics over a staging copy (:mod:`.split`), negatives are counter-based
(:mod:`.negatives`). So the in-memory path and the streamed one give the same batches.

Memory while converting CSV: one chunk of parsed rows, one row group per split, the entity
tables and the id dictionaries (users and items fit in memory; interactions need not). Implicit
feedback additionally holds every positive's (user, item) while the sampler is built (16 bytes
per positive) and its sorted keys (8 bytes per positive). Training holds one shuffle window per
process whatever the number of interactions; evaluation reads each evaluated split whole.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sparse_kd import atomic
from sparse_kd.config import DataConfig, to_dict
from sparse_kd.data.negatives import NegativeSampler, Pool, eval_key, feedback_report
from sparse_kd.data.schema import SPLITS, DataError, Interactions, RecDataset, SparseFeature, feedback_summary
from sparse_kd.data.interactions import TRAIN
from sparse_kd.data.split import (SplitAssigner, item_codes, positives, size_report, split_keys, split_mode,
                                  split_report)
from sparse_kd.data.stream import Rows, TrainSource, TrainStream

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FILE_ROW_GROUPS = 64
MANIFEST = "manifest.json"
_SCHEMA = pa.schema([("user", pa.int64()), ("item", pa.int64()), ("label", pa.float32()), ("timestamp", pa.int64())])
# data settings a converted folder is bound to (training with other values would mean other data)
_BOUND = ("seed", "split", "cold_item_fraction", "valid_cold_fraction", "valid_fraction", "test_fraction",
          "max_text_chars", "shuffle_block_rows")
_BOUND_IMPLICIT = ("negatives", "train_negatives")


# ------------------------------------------------------------------------------------------ writing


class _SplitWriter:
    """Appends rows to one split's files in row groups of exactly ``block_rows`` rows."""

    def __init__(self, folder: Path, block_rows: int, count_fn=None) -> None:
        self.folder, self.block_rows, self.count_fn = folder, block_rows, count_fn
        folder.mkdir(parents=True, exist_ok=True)
        self.parts: list[Interactions] = []
        self.buffered = 0
        self.files: list[dict] = []
        self.rows_with_negatives: list[int] = []
        self.rows = 0
        self.n_positive = 0
        self._writer: Optional[pq.ParquetWriter] = None

    def append(self, rows: Interactions) -> None:
        if not len(rows):
            return
        self.parts.append(rows)
        self.buffered += len(rows)
        while self.buffered >= self.block_rows:
            self._flush(self.block_rows)

    def _flush(self, n: int) -> None:
        allrows = _concat(self.parts)
        group, rest = allrows.subset(slice(0, n)), allrows.subset(slice(n, len(allrows)))
        self.parts, self.buffered = ([rest] if len(rest) else []), len(rest)
        if self._writer is None or len(self.files[-1]["row_groups"]) >= FILE_ROW_GROUPS:
            self._close_file()
            name = f"part-{len(self.files):05d}.parquet"
            self._writer = pq.ParquetWriter(str(self.folder / name), _SCHEMA)
            self.files.append({"path": f"{self.folder.name}/{name}", "row_groups": []})
        table = pa.table({"user": group.user, "item": group.item, "label": group.label, "timestamp": group.timestamp},
                         schema=_SCHEMA)
        self._writer.write_table(table, row_group_size=n)
        self.files[-1]["row_groups"].append(n)
        if self.count_fn is not None:
            self.rows_with_negatives.append(int(self.count_fn(group)))
        self.rows += n
        self.n_positive += positives(group.label)

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> dict:
        if self.buffered:
            self._flush(self.buffered)
        self._close_file()
        out = {"rows": self.rows, "positives": self.n_positive, "files": self.files}
        if self.count_fn is not None:
            out["rows_with_negatives"] = self.rows_with_negatives
        return out


def _concat(parts: list[Interactions]) -> Interactions:
    if len(parts) == 1:
        return parts[0]
    return Interactions(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("user", "item", "label", "timestamp")))


def _write_entities(root: Path, ds_like) -> None:
    ent = root / "entities"
    ent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"user_id": pa.array(ds_like.user_ids, pa.string()), "text": pa.array(ds_like.user_text, pa.string())}),
                   str(ent / "users.parquet"))
    pq.write_table(pa.table({"item_id": pa.array(ds_like.item_ids, pa.string()), "text": pa.array(ds_like.item_text, pa.string())}),
                   str(ent / "items.parquet"))
    feats = ds_like.features
    (ent / "features.json").write_text(json.dumps([{"name": f.name, "owner": f.owner, "vocab": f.vocab} for f in feats]))
    arrays = {}
    for k, f in enumerate(feats):
        arrays[f"offsets_{k}"], arrays[f"values_{k}"] = f.offsets, f.values
    np.savez(ent / "features.npz", **arrays)


def _write_pools(root: Path, sampler: NegativeSampler) -> None:
    d = root / "negatives"
    d.mkdir(parents=True, exist_ok=True)
    for name, pool in sampler.pools.items():
        for part in ("items", "count", "offsets", "adj"):
            np.save(d / f"{name}_{part}.npy", getattr(pool, part))


class _Staging:
    """Parsed interactions (ids mapped) in a Parquet file, re-read by the split passes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._w: Optional[pq.ParquetWriter] = pq.ParquetWriter(str(path), _SCHEMA)
        self.rows = 0

    def append(self, user, item, label, stamp) -> None:
        assert self._w is not None
        self._w.write_table(pa.table({"user": user, "item": item, "label": label, "timestamp": stamp}, schema=_SCHEMA))
        self.rows += len(user)

    def close(self) -> None:
        if self._w is not None:
            self._w.close()
            self._w = None

    def chunks(self, columns: list[str], batch_rows: int) -> Iterator[tuple[int, dict]]:
        """(first row number, {column: numpy}) in source order."""
        row0 = 0
        for b in pq.ParquetFile(str(self.path)).iter_batches(batch_size=batch_rows, columns=columns):
            cols = {c: b.column(c).to_numpy() for c in columns}
            yield row0, cols
            row0 += b.num_rows


def convert(cfg: DataConfig, out: str | Path, chunk_rows: int = 1 << 20, unknown_ids: str = "error") -> dict:
    """Convert ``cfg``'s source into a columnar folder ``out`` (written aside, then renamed into
    place). Returns the manifest."""
    out = Path(out)
    if cfg.source == "parquet":
        raise DataError(f"data.source is already parquet ({cfg.path}). Fix: convert a csv, movielens or synthetic source.")
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise DataError(f"{out}: exists and is not a converted folder (no {MANIFEST}). Fix: choose another --out, or remove it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # a conversion killed before its rename
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        if cfg.source == "csv":
            manifest = _convert_csv(cfg, tmp, chunk_rows, unknown_ids)
        else:
            from sparse_kd.data import load_dataset

            manifest = _write_dataset(load_dataset(cfg), cfg, tmp)
        manifest["conversion"] = {"seconds": round(time.perf_counter() - t0, 3), "chunk_rows": chunk_rows,
                                  "source": {"source": cfg.source, "path": cfg.path}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        atomic.swap_in_dir(tmp, out, out.parent / f".{out.name}.old-{os.getpid()}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _manifest(cfg: DataConfig, num_users: int, num_items: int, implicit: bool, negatives: int, report: dict,
              splits: dict) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "format": "sparse_kd columnar interactions (sparse_kd/data/columnar.py)",
        "data_config": to_dict(cfg),
        "num_users": num_users,
        "num_items": num_items,
        "implicit": implicit,
        "negatives": negatives if implicit else 0,
        "block_rows": cfg.shuffle_block_rows,
        "splits": splits,
        "report": report,
    }


def _write_dataset(ds: RecDataset, cfg: DataConfig, root: Path) -> dict:
    """An in-memory dataset (small sources) -> folder."""
    _write_entities(root, ds)
    pool = ds.sampler.pool("train") if ds.sampler is not None else None
    splits = {}
    for name in SPLITS:
        fn = (lambda g: int((pool.available(g.user) > 0).sum())) if (name == "train" and pool is not None) else None
        w = _SplitWriter(root / "splits" / name, cfg.shuffle_block_rows, fn)
        w.append(ds.splits[name])
        splits[name] = w.close()
    uc, ic = ds.train_counts()
    np.savez(root / "train_counts.npz", user=uc, item=ic)
    if ds.sampler is not None:
        _write_pools(root, ds.sampler)
    return _manifest(cfg, ds.num_users, ds.num_items, ds.implicit, ds.negatives, ds.report, splits)


def _convert_csv(cfg: DataConfig, root: Path, chunk_rows: int, unknown_ids: str) -> dict:
    """The CSV format -> folder, in bounded memory (see the module docstring)."""
    from sparse_kd.data.csv_format import InteractionChunks, check_folder, new_report, read_entities

    src = Path(cfg.path)
    check_folder(src)
    report = new_report(src)
    ent = read_entities(src, cfg, report)
    # pass 1: parse, check and map ids into a staging file
    staging = _Staging(root / "_staging.parquet")
    chunks = InteractionChunks(src, ent, report, chunk_rows=min(chunk_rows, 1 << 18))
    try:
        for user, item, label, stamp in chunks:
            staging.append(user, item, label, stamp)
    finally:
        staging.close()
    chunks.finish(unknown_ids)  # type: ignore[arg-type]
    num_users, num_items = len(ent.user_ids), len(ent.item_ids)
    codes = item_codes(num_items, cfg)
    mode = split_mode(cfg, chunks.has_ts)
    ts_cols = ["item", "timestamp"]

    def warm_keys() -> Iterator[np.ndarray]:
        for row0, c in staging.chunks(ts_cols, chunk_rows):
            warm = codes[c["item"]] == TRAIN
            yield split_keys(mode, row0, c["timestamp"] if chunks.has_ts else None, len(warm), cfg.seed)[warm]

    n_warm = sum(len(k) for k in warm_keys())
    assigner = SplitAssigner.plan(warm_keys, n_warm, cfg)  # pass 2: exact cut points
    implicit = not chunks.has_label
    sampler = None
    if implicit:  # every positive, for the exclusion sets (16 bytes per positive while building)
        cols = [c for _, c in staging.chunks(["user", "item"], chunk_rows)]
        pu = np.concatenate([c["user"] for c in cols])
        pi = np.concatenate([c["item"] for c in cols])
        del cols
        sampler = NegativeSampler.build(codes, num_users, pu, pi, cfg.negatives)
        del pu, pi
    train_pool = sampler.pool("train") if (sampler is not None and cfg.train_negatives == "per_epoch") else None
    writers = {name: _SplitWriter(root / "splits" / name, cfg.shuffle_block_rows,
                                  (lambda g: int((train_pool.available(g.user) > 0).sum())) if name == "train" and train_pool else None)
               for name in SPLITS}
    first = {name: 0 for name in SPLITS}
    uc = np.zeros(num_users, dtype=np.int64)
    ic = np.zeros(num_items, dtype=np.int64)
    without = {name: 0 for name in SPLITS}
    # pass 3: assign rows to splits, add negatives, write row groups
    for row0, c in staging.chunks(["user", "item", "label", "timestamp"], chunk_rows):
        everything = Interactions(c["user"], c["item"], c["label"], c["timestamp"])
        code = codes[c["item"]].copy()
        warm = np.flatnonzero(code == TRAIN)
        code[warm] = assigner.assign(split_keys(mode, row0, c["timestamp"] if chunks.has_ts else None, len(code), cfg.seed)[warm])
        for k, name in enumerate(SPLITS):
            part = everything.subset(np.flatnonzero(code == k))
            if not len(part):
                continue
            if name == "train":  # positives only when implicit: sampled negatives are not part of the log
                uc += np.bincount(part.user, minlength=num_users)
                ic += np.bincount(part.item, minlength=num_items)
            if sampler is not None:
                without[name] += int((sampler.pool(name).available(part.user) == 0).sum())
                if not (name == "train" and cfg.train_negatives == "per_epoch"):
                    pos_n = len(part)
                    part = sampler.expand(name, part, first[name], eval_key(cfg.seed, name))
                    first[name] += pos_n
            writers[name].append(part)
    splits = {name: w.close() for name, w in writers.items()}
    (root / "_staging.parquet").unlink()
    report["split"] = {**split_report({}, codes, mode, chunks.has_ts),
                       **size_report({n: s["rows"] for n, s in splits.items()}, {n: s["positives"] for n, s in splits.items()})}
    if implicit:
        assert sampler is not None
        report["feedback"] = feedback_report(cfg.negatives, cfg.train_negatives, without,
                                             {n: p.size for n, p in sampler.pools.items()})
        _write_pools(root, sampler)
    ent_ds = RecDataset(ent.user_ids, ent.item_ids, ent.user_text, ent.item_text, ent.features(), {})
    _write_entities(root, ent_ds)
    np.savez(root / "train_counts.npz", user=uc, item=ic)
    return _manifest(cfg, num_users, num_items, implicit, cfg.negatives, report, splits)


# ------------------------------------------------------------------------------------------ reading


def _read_split(root: Path, meta: dict) -> Interactions:
    if not meta["files"]:
        return Interactions.empty()
    t = pa.concat_tables([pq.read_table(str(root / "splits" / f["path"])) for f in meta["files"]])
    return Interactions(t.column("user").to_numpy(), t.column("item").to_numpy(), t.column("label").to_numpy(),
                        t.column("timestamp").to_numpy())


class LazySplits(Mapping):
    """The splits of a converted folder, each read whole on first access (evaluation, logit KD);
    training streams the train split instead (:meth:`ColumnarDataset.train_stream`)."""

    def __init__(self, root: Path, meta: dict) -> None:
        self.root, self.meta = root, meta
        self._cache: dict[str, Interactions] = {}

    def __getitem__(self, name: str) -> Interactions:
        if name not in self.meta:
            raise KeyError(name)
        if name not in self._cache:
            self._cache[name] = _read_split(self.root, self.meta[name])
        return self._cache[name]

    def __iter__(self):
        return iter(SPLITS)

    def __len__(self) -> int:
        return len(SPLITS)


class ParquetBlocks:
    """Blocks (row groups) of a converted train split, read on demand; one open file per process."""

    def __init__(self, root: Path, meta: dict, block_rows: int) -> None:
        self.root, self.num_rows, self.block_rows = root, int(meta["rows"]), block_rows
        self.index = [(f["path"], g) for f in meta["files"] for g in range(len(f["row_groups"]))]
        sizes = [n for f in meta["files"] for n in f["row_groups"]]
        if any(n != block_rows for n in sizes[:-1]) or sum(sizes) != self.num_rows:
            raise DataError(f"{root}: train row groups {sizes[:5]}... do not match shuffle_block_rows={block_rows}. "
                            "Fix: convert the data again.")
        self._open: dict = {}

    def _file(self, path: str) -> pq.ParquetFile:
        key = (os.getpid(), path)  # DataLoader workers are forked: never share a reader
        if key not in self._open:
            self._open = {k: v for k, v in self._open.items() if k[0] == os.getpid()}
            self._open[key] = pq.ParquetFile(str(self.root / "splits" / path))
        return self._open[key]

    def block(self, b: int) -> Rows:
        path, g = self.index[b]
        t = self._file(path).read_row_group(g, columns=["user", "item", "label"], use_threads=False)
        lo = b * self.block_rows
        return Rows(t.column("user").to_numpy(), t.column("item").to_numpy(), t.column("label").to_numpy(),
                    np.arange(lo, lo + t.num_rows, dtype=np.int64))

    def __getstate__(self):  # picklable for spawned workers: drop open files
        d = dict(self.__dict__)
        d["_open"] = {}
        return d


def _load_pool(root: Path, name: str) -> Pool:
    d = root / "negatives"
    return Pool(np.load(d / f"{name}_items.npy"), np.load(d / f"{name}_count.npy"), np.load(d / f"{name}_offsets.npy"),
                np.load(d / f"{name}_adj.npy", mmap_mode="r"))


@dataclass
class ColumnarDataset(RecDataset):
    """A converted folder: entities in memory, splits on disk (see :class:`LazySplits`)."""

    root: Path = Path(".")
    manifest: dict = field(default_factory=dict)

    def __post_init__(self) -> None:  # splits are all present (lazily)
        pass

    def train_counts(self) -> tuple[np.ndarray, np.ndarray]:
        z = np.load(self.root / "train_counts.npz")
        return z["user"], z["item"]

    def validate(self) -> None:
        assert len(self.user_text) == self.num_users == self.manifest["num_users"]
        assert len(self.item_text) == self.num_items == self.manifest["num_items"]
        for f in self.features:
            f.validate(self.num_users if f.owner == "user" else self.num_items)

    def summary(self) -> dict:
        sp = self.manifest["splits"]
        out = {
            "users": self.num_users,
            "items": self.num_items,
            "features": {f.name: f.num_embeddings for f in self.features},
            "splits": {s: {"n": m["rows"], "positives": round(m["positives"] / m["rows"], 4) if m["rows"] else 0.0}
                       for s, m in sp.items()},
            "format": f"parquet (streamed): {self.root}",
        }
        if self.implicit:
            out["feedback"] = feedback_summary(self.report, self.negatives)
        return out

    def train_stream(self, data_cfg: DataConfig) -> TrainSource:
        meta = self.manifest["splits"]["train"]
        blocks = ParquetBlocks(self.root, meta, int(self.manifest["block_rows"]))
        negatives = (self.sampler.pool("train"), self.negatives) if self.sampler is not None else None
        rwn = np.asarray(meta["rows_with_negatives"], dtype=np.int64) if negatives is not None else None
        workers = data_cfg.loader_workers
        if workers < 0:
            # auto: a worker process beside each rank only pays where the rank leaves cores idle (a GPU
            # step); on CPU training the cores are the step's, and the worker's decode plus the batch
            # handoff cost more than building inline (benchmarks/bench_data.py, 2 ranks on 2 cores:
            # streamed / in-memory examples/s 0.58x with 1 worker per rank, 1.001x with 0; docs/BENCHMARKS.md §5)
            import torch

            workers = 1 if torch.cuda.is_available() else 0
        return TrainSource(TrainStream(blocks, data_cfg.shuffle_window_blocks, negatives, rwn), workers=workers)


def load_columnar(cfg: DataConfig) -> ColumnarDataset:
    """Open a folder written by :func:`convert` (``data.source: parquet``, ``data.path``)."""
    root = Path(cfg.path)
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise DataError(f"{root}: not a converted folder ({MANIFEST} not found). "
                        "Fix: run `sparse-kd data convert CONFIG --out FOLDER` and point data.path at FOLDER.")
    try:
        m = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{mpath}: not valid JSON ({e}). Fix: convert the data again.") from None
    if m.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{mpath}: schema_version {m.get('schema_version')!r}, this code reads {SCHEMA_VERSION}. "
                        "Fix: convert the data again with this version.")
    made = m["data_config"]
    keys = _BOUND + (_BOUND_IMPLICIT if m["implicit"] else ())
    changed = [k for k in keys if made.get(k) != getattr(cfg, k)]
    if changed:
        diffs = ", ".join(f"data.{k}={getattr(cfg, k)!r} (converted with {made.get(k)!r})" for k in changed)
        raise DataError(f"{root}: {diffs}; a converted folder's splits and blocks are fixed by these settings. "
                        f"Fix: use the values it was converted with, or convert again with the new ones.")
    ent = root / "entities"
    users = pq.read_table(str(ent / "users.parquet"))
    items = pq.read_table(str(ent / "items.parquet"))
    fmeta = json.loads((ent / "features.json").read_text())
    arrays = np.load(ent / "features.npz")
    feats = [SparseFeature(f["name"], f["owner"], f["vocab"], arrays[f"offsets_{k}"], arrays[f"values_{k}"])
             for k, f in enumerate(fmeta)]
    report = dict(m["report"])
    report["format"] = {"source": "parquet", "path": str(root), "converted_from": m.get("conversion", {}).get("source")}
    ds = ColumnarDataset(users.column("user_id").to_pylist(), items.column("item_id").to_pylist(),
                         users.column("text").to_pylist(), items.column("text").to_pylist(), feats,
                         LazySplits(root, m["splits"]), report, implicit=bool(m["implicit"]),  # type: ignore[arg-type]
                         negatives=int(m["negatives"]), root=root, manifest=m)
    if m["implicit"] and made.get("train_negatives") == "per_epoch":
        ds.sampler = NegativeSampler({"warm": _load_pool(root, "warm")}, int(m["negatives"]))
    return ds


__all__ = ["convert", "load_columnar", "ColumnarDataset", "ParquetBlocks", "SCHEMA_VERSION"]
