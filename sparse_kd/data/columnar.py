"""Sharded columnar data (Parquet through pyarrow), for interactions that do not fit in memory.

``sparse-kd data convert CONFIG --out FOLDER`` (:mod:`.conversion`) turns the CSV format (:mod:`.csv_format`, streamed in
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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sparse_kd.config import DataConfig
from sparse_kd.data.negatives import NegativeSampler, Pool
from sparse_kd.data.schema import SPLITS, DataError, Interactions, RecDataset, SparseFeature, feedback_summary
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
        t = self._file(path).read_row_group(g, columns=["user", "item", "label", "timestamp"], use_threads=False)
        lo = b * self.block_rows
        return Rows(t.column("user").to_numpy(), t.column("item").to_numpy(), t.column("label").to_numpy(),
                    np.arange(lo, lo + t.num_rows, dtype=np.int64), t.column("timestamp").to_numpy())

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


__all__ = ["load_columnar", "ColumnarDataset", "ParquetBlocks", "SCHEMA_VERSION"]
