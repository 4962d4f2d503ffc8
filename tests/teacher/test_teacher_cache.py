"""Embedding cache: hits skip the model, keys follow inputs, bad files are recomputed, writers are safe."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_kd.config import TeacherConfig
from sparse_kd.teacher import encode_texts
from sparse_kd.teacher.cache import (
    FORMAT_VERSION, cache_key, encode_cached, encode_cached_with_report, load_verified, write_atomic,
)
from sparse_kd.teacher.encoder import TextEncoder

ROOT = Path(__file__).resolve().parents[2]


class CountingEncoder:
    """Wraps a TextEncoder and counts encode() calls."""

    def __init__(self, inner: TextEncoder) -> None:
        self.inner, self.calls = inner, 0

    def identity(self) -> dict:
        return self.inner.identity()

    def encode(self, texts: list[str]) -> torch.Tensor:
        self.calls += 1
        return self.inner.encode(texts)


@pytest.fixture()
def encoder(tiny_bert: Path) -> CountingEncoder:
    return CountingEncoder(TextEncoder(str(tiny_bert), precision="fp32", show_progress=False, device="cpu"))


def only_file(cache_dir: Path) -> Path:
    files = sorted(cache_dir.iterdir())
    assert len(files) == 1, files
    return files[0]


def test_second_call_is_a_hit_without_forward(encoder: CountingEncoder, texts: list[str], tmp_path: Path) -> None:
    first, r1 = encode_cached_with_report(encoder, texts, tmp_path, "items")
    second, r2 = encode_cached_with_report(encoder, texts, tmp_path, "items")
    assert (r1.status, r2.status, encoder.calls) == ("miss", "hit", 1)
    assert r2.hit and not r1.hit and r1.path == r2.path and r1.path.exists()
    assert torch.equal(first, second) and second.shape == (len(texts), 32)
    # a fresh encoder object (e.g. the next run) hits too and never loads the model
    fresh = TextEncoder(encoder.inner.model_name, precision="fp32", show_progress=False)
    torch.testing.assert_close(encode_cached(fresh, texts, tmp_path, "items"), first, atol=0, rtol=0)
    assert not fresh.is_loaded


def test_metadata(encoder: CountingEncoder, texts: list[str], tmp_path: Path) -> None:
    from safetensors import safe_open

    _, report = encode_cached_with_report(encoder, texts, tmp_path, "users")
    with safe_open(str(report.path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format_version"] == str(FORMAT_VERSION) and meta["key"] == report.key
    assert meta["num_texts"] == str(len(texts)) and meta["dim"] == "32"
    assert meta["model"] == encoder.inner.model_name and meta["model_fingerprint"] == encoder.inner.fingerprint
    assert json.loads(meta["settings"])["max_length"] == 64 and len(meta["sha256"]) == 64
    assert report.path.name.startswith("users-")


def test_key_changes_with_texts_model_and_settings(tiny_bert: Path, tmp_path: Path, texts: list[str],
                                                   bert_factory) -> None:
    base = TextEncoder(str(tiny_bert), precision="fp32").identity()
    k = cache_key(base, texts)
    assert cache_key(base, list(texts)) == k
    assert cache_key(base, texts[:-1]) != k
    assert cache_key(base, list(reversed(texts))) != k  # order matters
    assert cache_key(base, ["ab", "c"]) != cache_key(base, ["a", "bc"])  # text boundaries matter
    assert cache_key(base, texts[:-1] + [texts[-1] + " "]) != k
    for over in (dict(max_length=32), dict(normalize=False), dict(precision="bf16")):
        assert cache_key(TextEncoder(str(tiny_bert), **{"precision": "fp32", **over}).identity(), texts) != k, over
    # speed-only settings keep the key
    same = TextEncoder(str(tiny_bert), precision="fp32", batch_size=3, sort_by_length=False, num_threads=1)
    assert cache_key(same.identity(), texts) == k
    other = bert_factory(tmp_path / "other", seed=1)  # same architecture, other weights
    assert cache_key(TextEncoder(str(other), precision="fp32").identity(), texts) != k


def test_different_inputs_get_different_files(encoder: CountingEncoder, texts: list[str], tmp_path: Path) -> None:
    encode_cached(encoder, texts, tmp_path, "items")
    encode_cached(encoder, texts[:3], tmp_path, "items")
    assert encoder.calls == 2 and len(list(tmp_path.glob("items-*.safetensors"))) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "garbage", "old_version", "empty"])
def test_damaged_file_is_detected_and_recomputed(encoder: CountingEncoder, texts: list[str], tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture, damage: str) -> None:
    good, _ = encode_cached_with_report(encoder, texts, tmp_path, "items")
    path = only_file(tmp_path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) - 100])
    elif damage == "flip_byte":  # in the tensor data (the end of the file): parses, checksum fails
        path.write_bytes(data[:-5] + bytes([data[-5] ^ 0x01]) + data[-4:])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01not a safetensors file")
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        meta = {"format_version": "0", "key": "x"}
        write_atomic(path, good, meta)
    with caplog.at_level(logging.WARNING, logger="sparse_kd.teacher.cache"):
        again, report = encode_cached_with_report(encoder, texts, tmp_path, "items")
    assert report.status == "invalid" and encoder.calls == 2, report
    assert any(str(path) in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    torch.testing.assert_close(again, good, atol=0, rtol=0)
    emb, why = load_verified(path, report.key, len(texts))  # rewritten, valid again
    assert emb is not None and why == ""
    assert encode_cached_with_report(encoder, texts, tmp_path, "items")[1].hit


def test_killed_writer_leaves_no_file_that_is_read(encoder: CountingEncoder, texts: list[str], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # a writer dying between writing its temp file and the rename: simulated by a failing os.replace
    def die(*_a: object, **_k: object) -> None:
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(os, "replace", die)
    with pytest.raises(KeyboardInterrupt):
        encode_cached(encoder, texts, tmp_path, "items")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # temp file removed, no final file
    # a temp file left by a SIGKILLed writer is never taken for the cache file
    key = cache_key(encoder.identity(), texts)
    (tmp_path / f".items-{key[:16]}.safetensors.999.deadbeef.tmp").write_bytes(b"half a file")
    _, report = encode_cached_with_report(encoder, texts, tmp_path, "items")
    assert report.status == "miss" and encoder.calls == 2


class BigFakeEncoder:
    """No model: a fixed identity and a deterministic (N, 384) output, so a child process starts fast."""

    def identity(self) -> dict:
        return {"model": "fake", "model_fingerprint": "0" * 64, "max_length": 64, "pooling": "mean"}

    def encode(self, texts: list[str]) -> torch.Tensor:
        g = torch.Generator().manual_seed(len(texts))
        return torch.randn(len(texts), 384, generator=g)


def _concurrent_writer(cache_dir: str, texts: list[str], barrier: object, out: object) -> None:
    barrier.wait(timeout=120)  # both look up, miss, encode and write at the same moment
    emb, report = encode_cached_with_report(BigFakeEncoder(), texts, cache_dir, "items")
    out.put((report.status, emb.sum().item()))


@pytest.mark.slow
def test_concurrent_writers_end_with_one_valid_file(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    many = [f"text {i}" for i in range(40_000)]  # a 60 MB file, so the two writes overlap
    procs = [ctx.Process(target=_concurrent_writer, args=(str(tmp_path), many, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(status in ("miss", "hit") for status, _ in results), results
    assert results[0][1] == results[1][1]
    files = sorted(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors", files  # no temp files left behind
    emb, why = load_verified(files[0], cache_key(BigFakeEncoder().identity(), many), len(many))
    assert emb is not None, why
    torch.testing.assert_close(emb, BigFakeEncoder().encode(many), atol=0, rtol=0)


@pytest.mark.slow
def test_cache_hit_never_imports_transformers(tiny_bert: Path, texts: list[str], tmp_path: Path) -> None:
    cfg = TeacherConfig(model=str(tiny_bert), cache_dir=str(tmp_path), max_length=32)
    first = encode_texts(cfg, texts, "items", show_progress=False, precision="fp32")
    torch.save(first, tmp_path / "expected.pt")
    code = (
        "import sys, json, torch\n"
        "from sparse_kd.config import TeacherConfig\n"
        "from sparse_kd.teacher import encode_texts\n"
        f"cfg = TeacherConfig(model={str(tiny_bert)!r}, cache_dir={str(tmp_path)!r}, max_length=32)\n"
        f"emb = encode_texts(cfg, {texts!r}, 'items', show_progress=False, precision='fp32')\n"
        f"assert torch.equal(emb, torch.load({str(tmp_path / 'expected.pt')!r})), 'different embeddings'\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('transformers', 'tokenizers')]\n"
        "assert not bad, bad[:5]\n"
        "print('OK')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout + res.stderr


def test_encode_texts_uses_config_cache_dir(tiny_bert: Path, texts: list[str], tmp_path: Path) -> None:
    cfg = TeacherConfig(model=str(tiny_bert), cache_dir=str(tmp_path / "c"))
    a = encode_texts(cfg, texts, "items", show_progress=False)
    b = encode_texts(cfg, texts, "items", show_progress=False)
    assert torch.equal(a, b) and len(list((tmp_path / "c").glob("items-*.safetensors"))) == 1


def test_bad_cache_name(encoder: CountingEncoder, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cache name"):
        encode_cached(encoder, ["x"], tmp_path, "../escape")


def test_write_rows_streams_blocks_that_safetensors_reads_back(tmp_path, monkeypatch):
    import sparse_kd.teacher.cache as C
    from safetensors.torch import load_file

    class Lazy:  # a row source that refuses to be read whole
        shape = (5, 3)

        def __getitem__(self, idx):
            assert idx.stop - idx.start <= 2, idx
            return torch.arange(15, dtype=torch.float64).reshape(5, 3)[idx]

    monkeypatch.setattr(C, "ROW_BLOCK", 2)
    item = torch.randn(4, 3)
    with open(tmp_path / "t.safetensors", "wb") as f:
        C.write_rows(f, {"user": Lazy(), "item": item, "none": torch.zeros(0, 3)})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert back["user"].dtype == torch.float32 and back["none"].shape == (0, 3)
    torch.testing.assert_close(back["user"], torch.arange(15.0).reshape(5, 3), rtol=0, atol=0)
    torch.testing.assert_close(back["item"], item, rtol=0, atol=0)
