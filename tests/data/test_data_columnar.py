"""Sharded Parquet data: ``sparse-kd data convert`` gives exactly what the in-memory loaders give
(splits, negatives, report), with the same errors; streamed training gives the same batches as
in-memory training for the same seed, resumes from any step, and its memory does not grow
with the data."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_kd.config import DataConfig, SyntheticConfig
from sparse_kd.data import DataError, convert, load_csv, load_dataset
from sparse_kd.data.batching import BatchBuilder, count_dense
from sparse_kd.data.schema import SPLITS
from sparse_kd.data.stream import train_source

BLOCK = dict(shuffle_block_rows=64, shuffle_window_blocks=3)


def write_explicit(root: Path, n_rows: int = 700, ts: bool = True, users: bool = True, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "items.csv").write_text("item_id,text,tags\n" + "".join(f" it{i} ,item {i},t{i % 4}|t{i % 7}\n" for i in range(45)))
    if users:
        (root / "users.csv").write_text("user_id,text,region\n" + "".join(f"u{u},user {u},r{u % 3}\n" for u in range(25)))
    head = "label,user_id,item_id" + (",timestamp" if ts else "")
    rows = [f"{rng.integers(2)},u{rng.integers(25)},it{rng.integers(45)}" + (f",{rng.integers(50)}" if ts else "") + "\n"
            for _ in range(n_rows)]
    (root / "interactions.csv").write_text(head + "\n" + "".join(rows))
    return root


def src_dir(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    return tmp_path / "src"


def both(src: Path, tmp: Path, chunk_rows: int = 97, **kw):
    """(in-memory dataset, converted dataset) of the same source and settings."""
    cfg = DataConfig(source="csv", path=str(src), **BLOCK, **kw)
    mem = load_dataset(cfg)
    convert(cfg, tmp / "conv", chunk_rows=chunk_rows)
    return mem, load_dataset(DataConfig(source="parquet", path=str(tmp / "conv"), **BLOCK, **kw))


def assert_same_data(a, b) -> None:
    assert a.user_ids == b.user_ids and a.item_ids == b.item_ids
    assert a.user_text == b.user_text and a.item_text == b.item_text
    assert a.feature_names == b.feature_names
    for fa, fb in zip(a.features, b.features):
        assert fa.vocab == fb.vocab and np.array_equal(fa.offsets, fb.offsets) and np.array_equal(fa.values, fb.values)
    for s in SPLITS:
        for k in ("user", "item", "label", "timestamp"):
            assert np.array_equal(getattr(a.splits[s], k), getattr(b.splits[s], k)), (s, k)
    ra, rb = dict(a.report), dict(b.report)
    for r in (ra, rb):
        r.pop("load_seconds", None)
    assert rb.pop("format")["source"] == "parquet"
    assert ra == rb
    sa, sb = a.summary(), b.summary()
    assert sb.pop("format").startswith("parquet") and sa == sb
    assert all(np.array_equal(x, y) for x, y in zip(a.train_counts(), b.train_counts()))
    assert a.implicit == b.implicit and a.negatives == b.negatives and (a.sampler is None) == (b.sampler is None)


@pytest.mark.parametrize("kind", ["time", "random_no_timestamps", "no_users_file"])
def test_convert_explicit_equals_in_memory(tmp_path, kind):
    src = write_explicit(src_dir(tmp_path), ts=kind == "time", users=kind != "no_users_file")
    mem, conv = both(src, tmp_path)
    assert_same_data(mem, conv)
    assert mem.report["split"]["split"] == ("time" if kind == "time" else "random")


@pytest.mark.parametrize("train_negatives", ["per_epoch", "fixed"])
def test_convert_implicit_equals_in_memory(tmp_path, implicit_folder, train_negatives):
    mem, conv = both(implicit_folder(src_dir(tmp_path), saturated_user=True), tmp_path, chunk_rows=50, negatives=2,
                     cold_item_fraction=0.2, train_negatives=train_negatives)
    assert_same_data(mem, conv)
    assert mem.implicit and sum(mem.report["feedback"]["positives_without_negatives"].values()) > 0
    m = json.loads((tmp_path / "conv" / "manifest.json").read_text())
    assert m["schema_version"] == 1 and m["implicit"] and m["splits"]["train"]["rows"] == len(mem.splits["train"])
    groups = [n for f in m["splits"]["train"]["files"] for n in f["row_groups"]]
    assert all(n == 64 for n in groups[:-1]) and sum(groups) == len(mem.splits["train"])


def test_convert_synthetic_equals_in_memory(tmp_path):
    cfg = DataConfig(synthetic=SyntheticConfig(num_users=50, num_items=30, interactions_per_user=12), **BLOCK)
    convert(cfg, tmp_path / "syn")
    conv = load_dataset(DataConfig(source="parquet", path=str(tmp_path / "syn"), **BLOCK))
    assert_same_data(load_dataset(cfg), conv)


BAD = [
    ("interactions.csv", "user_id,item_id,label\nu1,it1,1\nu2,it2,2\n"),  # label
    ("interactions.csv", "user_id,item_id,label\nu1,it1,1\nu2,nope,0\nu3,zz,1\n"),  # unknown items
    ("interactions.csv", "user_id,item_id,label\nu1,it1,1\nu2,\"it2\"x,0\n"),  # quoting
    ("interactions.csv", "user_id,item_id,label,timestamp\nu1,it1,1,5\nu1,it1,1,1.5\n"),  # timestamp
    ("interactions.csv", "user_id,item_id,label\nu1,it1,1\n\n,it1,1\n"),  # empty id after a blank line
    ("interactions.csv", b"user_id,item_id,label\nu1,it1,1\nu\xe9,it1,1\n"),  # not UTF-8
    ("interactions.csv", "user_id,item_id,label\n"),  # no rows
    ("items.csv", "item_id,text\nit1,ok\nit1,again\n"),  # duplicate id
]


@pytest.mark.parametrize("name,content", BAD)
def test_conversion_errors_are_the_loaders(tmp_path, name, content):
    src = write_explicit(src_dir(tmp_path))
    (src / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    cfg = DataConfig(source="csv", path=str(src))
    with pytest.raises(DataError) as mem:
        load_csv(cfg)
    with pytest.raises(DataError) as conv:
        convert(cfg, tmp_path / "out", chunk_rows=2)
    assert str(conv.value) == str(mem.value) and "Fix:" in str(mem.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))  # nothing half-written


def test_folder_bound_to_its_settings(tmp_path):
    src = write_explicit(tmp_path)
    convert(DataConfig(source="csv", path=str(src)), tmp_path / "conv")
    with pytest.raises(DataError) as ei:
        load_dataset(DataConfig(source="parquet", path=str(tmp_path / "conv"), seed=3))
    assert "data.seed=3 (converted with 0)" in str(ei.value) and "Fix:" in str(ei.value)
    with pytest.raises(DataError, match="not a converted folder"):
        load_dataset(DataConfig(source="parquet", path=str(src)))
    # converting again replaces the folder in one step
    convert(DataConfig(source="csv", path=str(src), seed=3), tmp_path / "conv")
    assert load_dataset(DataConfig(source="parquet", path=str(tmp_path / "conv"), seed=3)).manifest["data_config"]["seed"] == 3


def _batches(ds, cfg: DataConfig, world: int, rank: int, epoch: int = 1, start: int = 0):
    bb = BatchBuilder(ds, *count_dense(ds))
    src = train_source(ds, cfg)
    return list(src.batches(bb, 48, rank, world, epoch, seed=5, start_step=start))


def _same(x, y) -> bool:
    return (len(x) == len(y) and
            all(torch.equal(a.user, b.user) and torch.equal(a.item, b.item) and torch.equal(a.labels, b.labels)
                and torch.equal(a.dense_features, b.dense_features)
                and torch.equal(a.sparse_features.values(), b.sparse_features.values())
                and torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths()) for a, b in zip(x, y)))


@pytest.mark.parametrize("implicit", [False, True])
def test_streamed_batches_equal_in_memory(tmp_path, implicit_folder, implicit):
    src = implicit_folder(src_dir(tmp_path)) if implicit else write_explicit(src_dir(tmp_path))
    mem, conv = both(src, tmp_path, negatives=2, cold_item_fraction=0.2)
    for world in (1, 2):
        for rank in range(world):
            ref = _batches(mem, DataConfig(**BLOCK), world, rank)
            for workers in (0, 2):  # in the training process, or DataLoader workers
                got = _batches(conv, DataConfig(**BLOCK, loader_workers=workers), world, rank)
                assert len(ref) > 5 and _same(ref, got), (world, rank, workers)
    assert "train" not in conv.splits._cache  # streamed: the train split was never read whole


def test_streamed_resume_neither_repeats_nor_skips(tmp_path, implicit_folder):
    _, conv = both(implicit_folder(src_dir(tmp_path)), tmp_path, negatives=3)
    cfg = DataConfig(**BLOCK, loader_workers=2, negatives=3)
    full = _batches(conv, cfg, 2, 1)
    for start in (1, 7, len(full) - 1):
        assert _same(full[start:], _batches(conv, cfg, 2, 1, start=start))


def test_streaming_memory_does_not_grow_with_data(tmp_path):
    """Iterating an epoch holds one window: 8x the rows, about the same peak allocation."""
    peaks = []
    for n_rows in (4_000, 32_000):
        root = tmp_path / str(n_rows)
        root.mkdir()
        cfg = DataConfig(source="csv", path=str(write_explicit(root, n_rows=n_rows)), shuffle_block_rows=500,
                         shuffle_window_blocks=2)
        convert(cfg, root / "conv")
        ds = load_dataset(DataConfig(source="parquet", path=str(root / "conv"), shuffle_block_rows=500, shuffle_window_blocks=2))
        stream = train_source(ds, DataConfig(shuffle_block_rows=500, shuffle_window_blocks=2)).stream
        tracemalloc.start()
        n = sum(len(b) for b in stream.global_batches(0, 0, 100))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert n == (len(ds.splits["train"]) // 100) * 100
    assert peaks[1] < 1.5 * peaks[0], peaks


def test_cli_data_convert_then_summary(tmp_path, capsys):
    from sparse_kd.cli import main

    src = write_explicit(src_dir(tmp_path))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  source: csv\n  path: {src}\n")
    assert main(["data", "convert", str(cfg), "data.seed=2"]) == 2 and "--out" in capsys.readouterr().err
    assert main(["data", "convert", str(cfg), "data.seed=2", "--out", str(tmp_path / "pq")]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["splits"]["train"] > 0 and "data.source=parquet" in done["train with"]
    assert main(["data", str(cfg), "data.seed=2", "data.source=parquet", f"data.path={tmp_path / 'pq'}"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["summary"]["splits"]["train"]["n"] == done["splits"]["train"] and shown["summary"]["format"].startswith("parquet")
    # a mismatched setting is a clean CLI error naming the key
    assert main(["data", str(cfg), "data.source=parquet", f"data.path={tmp_path / 'pq'}"]) == 2
    assert "data.seed=0 (converted with 2)" in capsys.readouterr().err
