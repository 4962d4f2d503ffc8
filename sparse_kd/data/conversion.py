"""``sparse-kd data convert``: a dataset to the sharded columnar folder of :mod:`.columnar`.

The CSV format is streamed in bounded memory (the same :class:`~.csv_format.InteractionChunks`
as the in-memory loader, split cut points as exact order statistics over a staging copy,
counter-based negatives); any in-memory source (MovieLens, synthetic) is written as it is.
The folder is written under a temporary name and swapped in whole: a failed conversion leaves
nothing half-written. See :mod:`.columnar` for the folder's layout and the memory it needs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sparse_kd import atomic
from sparse_kd.config import DataConfig, to_dict
from sparse_kd.data.negatives import NegativeSampler, eval_key, feedback_report
from sparse_kd.data.schema import SPLITS, DataError, Interactions, RecDataset
from sparse_kd.data.interactions import TRAIN
from sparse_kd.data.split import (SplitAssigner, item_codes, positives, size_report, split_keys, split_mode,
                                  split_report)
from sparse_kd.data.columnar import _SCHEMA, FILE_ROW_GROUPS, MANIFEST, SCHEMA_VERSION

log = logging.getLogger(__name__)


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
