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
from typing import Any, Protocol, Sequence

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
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


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
    """Write ``emb`` to ``path`` via a fsynced temp file in the same folder and ``os.replace``."""
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    data = save({TENSOR_NAME: emb.contiguous()}, metadata=metadata)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (POSIX); best effort elsewhere
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    _remove_stale_temps(path.parent)


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


def _metadata(identity: dict[str, Any], key: str, emb: torch.Tensor, texts: Sequence[str]) -> dict[str, str]:
    return {
        "format_version": str(FORMAT_VERSION),
        "key": key,
        "sha256": tensor_sha256(emb),
        "num_texts": str(len(texts)),
        "dim": str(emb.shape[1]),
        "model": str(identity.get("model", "")),
        "model_fingerprint": str(identity.get("model_fingerprint", "")),
        "settings": json.dumps(identity, sort_keys=True),
        "texts_sha256": texts_digest(texts),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
    }


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
    write_atomic(path, emb, _metadata(identity, key, emb, texts))
    report = CacheReport(name, path, key, status, len(texts), time.perf_counter() - t0, "" if status == "miss" else why)
    logger.info("teacher cache wrote %s (%d x %d) in %.2fs", path, emb.shape[0], emb.shape[1], report.seconds)
    return emb, report


def encode_cached(encoder: Encoder, texts: Sequence[str], cache_dir: str | Path, name: str) -> torch.Tensor:
    """Embeddings of ``texts`` (N, H) float32, read from ``cache_dir`` when an identical run cached them."""
    return encode_cached_with_report(encoder, texts, cache_dir, name)[0]


def distinct(texts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct texts in first-seen order and, per text, its index among them (N,) int64."""
    index: dict[str, int] = {}
    inverse = torch.tensor([index.setdefault(t, len(index)) for t in texts], dtype=torch.int64)
    return list(index), inverse


def encode_across_ranks(encoder: Encoder, texts: Sequence[str], cache_dir: str | Path, name: str,
                        dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of the distinct ``texts`` (D, H) and each text's row (N,), on every rank.

    Collective (every rank calls it with the same texts). Identical texts (the empty text of every
    user without one included) are encoded once. Rank 0 alone reads and writes the cache
    (``cache_dir`` need not be shared); on a miss each rank encodes a contiguous share of the
    distinct texts and the rows are gathered on :func:`~sparse_kd.dist.long_group`, so ranks wait
    for the slowest share, not for rank 0 encoding everything. A rank that fails makes every rank
    raise. ``dim`` is H (what a rank with no share returns). One process: no collective.
    """
    import torch.distributed as dist

    from sparse_kd.dist import all_gather_rows, long_broadcast_object, long_group, raise_if_any, split_range

    uniq, inverse = distinct(texts)
    multi = dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if multi else (0, 1)
    t0 = time.perf_counter()
    hit, key, path, identity, err = None, "", None, {}, None
    if rank == 0:
        try:
            identity = encoder.identity()
            key = cache_key(identity, uniq)
            path = cache_path(cache_dir, name, key)
            hit, why = load_verified(path, key, len(uniq))
            if hit is None and why != "no file":
                logger.warning("teacher cache file %s is invalid (%s): recomputing it", path, why)
        except Exception as e:  # the other ranks wait for this answer: give them the error
            err = f"teacher cache lookup for {name} failed: {type(e).__name__}: {e}"
    raise_if_any(err)
    shape = long_broadcast_object(None if hit is None else tuple(hit.shape))
    if shape is not None:
        if multi:
            hit = hit if rank == 0 else torch.empty(shape)
            dist.broadcast(hit, src=0, group=long_group())
        if rank == 0:
            logger.info("teacher cache hit: %s (%d distinct of %d texts) in %.2fs", path, len(uniq), len(texts),
                        time.perf_counter() - t0)
        return hit, inverse
    lo, hi = split_range(len(uniq), rank, world)
    mine, err = None, None
    try:
        mine = encoder.encode(uniq[lo:hi]).detach().to("cpu", torch.float32).contiguous() if hi > lo else torch.zeros(0, dim)
        if mine.dim() != 2 or mine.shape != (hi - lo, dim):
            err = f"encoder returned {tuple(mine.shape)} for {hi - lo} texts of dim {dim}"
    except Exception as e:  # every rank must hear of it, or the others wait for this share for hours
        err = f"teacher encoding of {name} failed: {type(e).__name__}: {e}"
    raise_if_any(err)
    emb = all_gather_rows(mine, len(uniq))
    if rank == 0:
        write_atomic(path, emb, _metadata(identity, key, emb, uniq))
        logger.info("teacher encoded %d distinct of %d texts for %s on %d rank(s) in %.2fs", len(uniq), len(texts),
                    name, world, time.perf_counter() - t0)
    return emb, inverse
