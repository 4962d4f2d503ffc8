"""On-disk cache of teacher embeddings, one safetensors file per (name, key).

Notation: N texts, H embedding size.

The key is a sha256 over the cache format version, the encoder's :meth:`identity` (hash of the
model's config, tokenizer and weight bytes; max_length, pooling, normalisation, precision path)
and the texts' content in order. The file ``<cache_dir>/<name>-<key[:16]>.safetensors`` holds
one tensor ``embeddings`` (N, H) float32 and metadata: format version, full key, sha256 of the
tensor bytes, N, H, model id and fingerprint, settings, texts' hash, creation time.

Safety:

- Writes are atomic: the bytes go to a unique temp file in the same folder (``.<file>.<pid>.<rand>.tmp``),
  are fsynced, then ``os.replace``d over the final name. A killed writer leaves at most a temp
  file, which is never read (and is removed after an hour by a later write); two processes
  writing the same key each replace the file with a complete one.
- Reads are verified: a file that does not parse, has another format version or key, the wrong
  shape, or whose tensor bytes do not match the stored sha256 (truncated, modified) is logged as
  a warning naming the file and recomputed, never returned.

Example::

    emb = encode_cached(TextEncoder("default"), item_texts, ".cache/teacher", "items")
    emb, report = encode_cached_with_report(encoder, item_texts, ".cache/teacher", "items")
    report.hit  # True on the second run: no model forward
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
TENSOR_NAME = "embeddings"
_STALE_TEMP_S = 3600.0


class Encoder(Protocol):
    """What the cache needs of an encoder (:class:`sparse_kd.teacher.encoder.TextEncoder`)."""

    def identity(self) -> dict[str, Any]: ...

    def encode(self, texts: Sequence[str]) -> torch.Tensor: ...


@dataclass(frozen=True)
class CacheReport:
    """What :func:`encode_cached_with_report` did.

    status: ``hit`` (read from disk, no forward), ``miss`` (no file: encoded and written) or
    ``invalid`` (a file was there but failed verification: encoded and rewritten; ``reason`` says why).
    """

    name: str
    path: Path
    key: str
    status: str
    num_texts: int
    seconds: float
    reason: str = ""

    @property
    def hit(self) -> bool:
        return self.status == "hit"


def texts_digest(texts: Sequence[str]) -> str:
    """sha256 over the texts in order (length-prefixed UTF-8, so boundaries are unambiguous)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def cache_key(identity: dict[str, Any], texts: Sequence[str]) -> str:
    """sha256 hex of the format version, the encoder identity and the texts (in order)."""
    payload = {"format_version": FORMAT_VERSION, "encoder": identity, "num_texts": len(texts),
               "texts_sha256": texts_digest(texts)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_path(cache_dir: str | Path, name: str, key: str) -> Path:
    """``<cache_dir>/<name>-<key[:16]>.safetensors``; ``name`` must be a plain file-name stem."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"cache name {name!r}: use letters, digits, '_', '.', '-' (it becomes a file name)")
    return Path(cache_dir) / f"{name}-{key[:16]}.safetensors"


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of the tensor's bytes, hashed a block at a time (no second copy of a large tensor)."""
    flat, h = t.detach().cpu().contiguous().reshape(-1), hashlib.sha256()
    step = 1 << 22
    for i in range(0, flat.numel(), step):
        h.update(flat[i : i + step].numpy().tobytes())
    return h.hexdigest()


def load_verified(path: Path, key: str, num_texts: int) -> tuple[torch.Tensor | None, str]:
    """(embeddings, "") if ``path`` is a complete, matching cache file, else (None, why not)."""
    from safetensors import safe_open

    if not path.is_file():
        return None, "no file"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format_version") != str(FORMAT_VERSION):
                return None, f"format version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
            if meta.get("key") != key:
                return None, "key in metadata does not match"
            if TENSOR_NAME not in f.keys():
                return None, f"no tensor {TENSOR_NAME!r}"
            emb = f.get_tensor(TENSOR_NAME)
    except Exception as e:  # safetensors raises several types on truncated / garbled files
        return None, f"unreadable ({type(e).__name__}: {e})"
    if emb.dtype != torch.float32 or emb.dim() != 2 or emb.shape[0] != num_texts:
        return None, f"tensor {tuple(emb.shape)} {emb.dtype}, expected ({num_texts}, H) float32"
    if meta.get("num_texts") != str(num_texts) or meta.get("dim") != str(emb.shape[1]):
        return None, "num_texts/dim in metadata do not match the tensor"
    if tensor_sha256(emb) != meta.get("sha256"):
        return None, "sha256 of the tensor bytes does not match the metadata (file modified or truncated)"
    return emb, ""


def write_atomic(path: Path, emb: torch.Tensor, metadata: dict[str, str]) -> None:
    """Write ``emb`` (N, H) to ``path`` via a fsynced temp file in the same folder and ``os.replace``,
    a block of rows at a time (:func:`write_blocks_atomic`: no bytes copy of the whole tensor; the
    sha256 in ``metadata`` is the one it hashes)."""
    emb = emb.detach().cpu()
    blocks = (emb[lo : lo + ROW_BLOCK] for lo in range(0, emb.shape[0], ROW_BLOCK))
    write_blocks_atomic(path, emb.shape[0], emb.shape[1], metadata, blocks)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); best effort elsewhere."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def write_blocks_atomic(path: Path, n: int, dim: int, metadata: dict[str, str], blocks: Iterable[torch.Tensor]) -> str:
    """Write an (n, dim) fp32 cache file from its row ``blocks`` (in order), never holding it whole,
    atomically as :func:`write_atomic`. The tensor's sha256 is hashed as the blocks pass and
    written into the header's fixed-width field at the end. Returns it."""
    meta = {**metadata, "sha256": "0" * 64}
    header = {"__metadata__": meta, TENSOR_NAME: {"dtype": "F32", "shape": [n, dim], "data_offsets": [0, 4 * n * dim]}}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    field = b'"sha256":"' + b"0" * 64
    if head.count(field) != 1:
        raise ValueError(f"cache metadata for {path}: the sha256 field must appear once")
    at = 8 + head.index(field) + len(field) - 64
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    digest, rows = hashlib.sha256(), 0
    try:
        with open(tmp, "wb") as f:
            f.write(len(head).to_bytes(8, "little") + head)
            for b in blocks:
                if b.dim() != 2 or b.shape[1] != dim:
                    raise ValueError(f"cache file {path}: a block of {tuple(b.shape)}, expected (rows, {dim})")
                data = b.float().contiguous().numpy().astype("<f4", copy=False).tobytes()
                digest.update(data)
                f.write(data)
                rows += b.shape[0]
            if rows != n:
                raise ValueError(f"cache file {path}: {rows} rows written, expected {n}")
            f.seek(at)
            f.write(digest.hexdigest().encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    _remove_stale_temps(path.parent)
    return digest.hexdigest()


def check_header(path: Path, key: str, num_texts: int) -> tuple[int | None, str, str]:
    """(H, the stored sha256, "") if ``path``'s header is a matching cache file's, else (None, "", why
    not). The tensor bytes are not read: :func:`read_rows` reads them, and the caller hashes them."""
    from safetensors import safe_open

    if not path.is_file():
        return None, "", "no file"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format_version") != str(FORMAT_VERSION):
                return None, "", f"format version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
            if meta.get("key") != key:
                return None, "", "key in metadata does not match"
            if TENSOR_NAME not in f.keys():
                return None, "", f"no tensor {TENSOR_NAME!r}"
            sl = f.get_slice(TENSOR_NAME)
            shape, dtype = sl.get_shape(), sl.get_dtype()
    except Exception as e:  # safetensors raises several types on truncated / garbled files
        return None, "", f"unreadable ({type(e).__name__}: {e})"
    if dtype != "F32" or len(shape) != 2 or shape[0] != num_texts:
        return None, "", f"tensor {tuple(shape)} {dtype}, expected ({num_texts}, H) F32"
    if meta.get("num_texts") != str(num_texts) or meta.get("dim") != str(shape[1]):
        return None, "", "num_texts/dim in metadata do not match the tensor"
    return int(shape[1]), meta.get("sha256", ""), ""


def read_rows(path: Path, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of a cache file's tensor, read from disk alone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_slice(TENSOR_NAME)[r0:r1]


ROW_BLOCK = 1 << 16  # rows written at a time by write_rows


def write_rows(f, rows: dict[str, Any]) -> None:
    """Write fp32 (N, H) ``rows`` as a safetensors file to the open binary file ``f``, a block of
    :data:`ROW_BLOCK` rows at a time: a source read lazily (``rows[lo:hi]``, ``rows.shape``, e.g.
    :class:`~sparse_kd.distill.history.HistoryRows`) is never held whole. ``safetensors.torch.load_file``
    reads it back."""
    header, offset = {}, 0
    for name, r in rows.items():
        n, h = (int(x) for x in r.shape)
        header[name] = {"dtype": "F32", "shape": [n, h], "data_offsets": [offset, offset + 4 * n * h]}
        offset += 4 * n * h
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    f.write(len(head).to_bytes(8, "little") + head)
    for name, r in rows.items():
        for lo in range(0, header[name]["shape"][0], ROW_BLOCK):
            f.write(r[lo : lo + ROW_BLOCK].float().contiguous().numpy().astype("<f4", copy=False).tobytes())


def _remove_stale_temps(folder: Path) -> None:
    """Delete temp files left by killed writers (older than an hour: never a live write)."""
    now = time.time()
    for p in folder.glob(".*.safetensors.*.tmp"):
        try:
            if now - p.stat().st_mtime > _STALE_TEMP_S:
                p.unlink()
        except OSError:
            pass


def _metadata(identity: dict[str, Any], key: str, texts: Sequence[str], dim: int) -> dict[str, str]:
    """The cache file's metadata, but its sha256: :func:`write_blocks_atomic` hashes the rows as it writes them."""
    meta = {
        "format_version": str(FORMAT_VERSION),
        "key": key,
        "num_texts": str(len(texts)),
        "dim": str(dim),
        "model": str(identity.get("model", "")),
        "model_fingerprint": str(identity.get("model_fingerprint", "")),
        "settings": json.dumps(identity, sort_keys=True),
        "texts_sha256": texts_digest(texts),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
    }
    return meta


def encode_cached_with_report(encoder: Encoder, texts: Sequence[str], cache_dir: str | Path,
                              name: str) -> tuple[torch.Tensor, CacheReport]:
    """Embeddings of ``texts`` (N, H) float32 from the cache, or encoded and cached; plus a report."""
    texts = list(texts)
    t0 = time.perf_counter()
    identity = encoder.identity()
    key = cache_key(identity, texts)
    path = cache_path(cache_dir, name, key)
    emb, why = load_verified(path, key, len(texts))
    if emb is not None:
        report = CacheReport(name, path, key, "hit", len(texts), time.perf_counter() - t0)
        logger.info("teacher cache hit: %s (%d texts) in %.2fs", path, len(texts), report.seconds)
        return emb, report
    status = "miss" if why == "no file" else "invalid"
    if status == "invalid":
        logger.warning("teacher cache file %s is invalid (%s): recomputing it", path, why)
    else:
        logger.info("teacher cache miss: encoding %d texts for %s", len(texts), path)
    emb = encoder.encode(texts).detach().to("cpu", torch.float32).contiguous()
    if emb.dim() != 2 or emb.shape[0] != len(texts):
        raise RuntimeError(f"encoder returned {tuple(emb.shape)} for {len(texts)} texts")
    write_atomic(path, emb, _metadata(identity, key, texts, emb.shape[1]))
    report = CacheReport(name, path, key, status, len(texts), time.perf_counter() - t0, "" if status == "miss" else why)
    logger.info("teacher cache wrote %s (%d x %d) in %.2fs", path, emb.shape[0], emb.shape[1], report.seconds)
    return emb, report


def encode_cached(encoder: Encoder, texts: Sequence[str], cache_dir: str | Path, name: str) -> torch.Tensor:
    """Embeddings of ``texts`` (N, H) float32, read from ``cache_dir`` when an identical run cached them."""
    return encode_cached_with_report(encoder, texts, cache_dir, name)[0]

