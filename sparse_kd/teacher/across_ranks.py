"""Teacher encoding for a run over every rank: identical texts once, each rank a share, rank 0's cache.

Two forms, both collectives (every rank calls them with the same texts):

- :func:`encode_across_ranks`: every distinct row on every rank (items: I x H is what the
  history features and the attention read anyway);
- :func:`encode_sharded`: each rank keeps only its share, a :class:`~sparse_kd.teacher.sharded_rows.ShardedRows`
  (users' own texts, which grow with the user base; issue 20, 4b). Rank 0 streams the cache file
  from the shares on a miss, and streams each rank its share from the file on a hit, verifying the
  sha256 as the rows pass: no rank holds the whole matrix.

The cache (:mod:`sparse_kd.teacher.cache`) is read and written by rank 0 alone, so ``cache_dir``
need not be shared. Shares are :func:`~sparse_kd.dist.split_range` blocks of the distinct texts.
A rank that fails makes every rank raise.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import torch

from sparse_kd.dist import all_gather_rows, long_broadcast_object, long_group, raise_if_any, split_range
from sparse_kd.teacher.cache import (
    Encoder, _metadata, cache_key, cache_path, check_header, load_verified, read_rows, write_atomic, write_blocks_atomic,
)
from sparse_kd.teacher.sharded_rows import CHUNK, ShardedRows

logger = logging.getLogger(__name__)


def distinct(texts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct texts in first-seen order and, per text, its index among them (N,) int64."""
    index: dict[str, int] = {}
    inverse = torch.tensor([index.setdefault(t, len(index)) for t in texts], dtype=torch.int64)
    return list(index), inverse


def _world() -> tuple[bool, int, int]:
    import torch.distributed as dist

    multi = dist.is_initialized() and dist.get_world_size() > 1
    return multi, (dist.get_rank() if multi else 0), (dist.get_world_size() if multi else 1)


def _encode_share(encoder: Encoder, uniq: list[str], lo: int, hi: int, dim: int, name: str) -> torch.Tensor:
    """This rank's rows ``uniq[lo:hi]`` (every rank hears of a failure on any rank)."""
    mine, err = None, None
    try:
        mine = encoder.encode(uniq[lo:hi]).detach().to("cpu", torch.float32).contiguous() if hi > lo else torch.zeros(0, dim)
        if mine.dim() != 2 or mine.shape != (hi - lo, dim):
            err = f"encoder returned {tuple(mine.shape)} for {hi - lo} texts of dim {dim}"
    except Exception as e:  # every rank must hear of it, or the others wait for this share for hours
        err = f"teacher encoding of {name} failed: {type(e).__name__}: {e}"
    raise_if_any(err)
    return mine


def _lookup(encoder: Encoder, uniq: list[str], cache_dir, name: str, rank: int, probe) -> tuple:
    """Rank 0 looks the texts up in its cache: (identity, key, path, what ``probe(path, key, n)``
    found, its reason left out); the other ranks get empties. Every rank raises a lookup error."""
    identity, key, path, found, err = {}, "", None, (None, ""), None
    if rank == 0:
        try:
            identity = encoder.identity()
            key = cache_key(identity, uniq)
            path = cache_path(cache_dir, name, key)
            *found, why = probe(path, key, len(uniq))
            if found[0] is None and why != "no file":
                logger.warning("teacher cache file %s is invalid (%s): recomputing it", path, why)
        except Exception as e:  # the other ranks wait for this answer: give them the error
            err = f"teacher cache lookup for {name} failed: {type(e).__name__}: {e}"
    raise_if_any(err)
    return identity, key, path, tuple(found)


def encode_across_ranks(encoder: Encoder, texts: Sequence[str], cache_dir, name: str,
                        dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of the distinct ``texts`` (D, H) and each text's row (N,), on every rank.

    Identical texts (the empty text of every user without one included) are encoded once. On a
    miss each rank encodes a contiguous share and the rows are gathered on
    :func:`~sparse_kd.dist.long_group`, so ranks wait for the slowest share, not for rank 0
    encoding everything. ``dim`` is H (what a rank with no share returns). One process: no collective.
    """
    import torch.distributed as dist

    uniq, inverse = distinct(texts)
    multi, rank, world = _world()
    t0 = time.perf_counter()
    identity, key, path, (hit, *_) = _lookup(encoder, uniq, cache_dir, name, rank, load_verified)
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
    emb = all_gather_rows(_encode_share(encoder, uniq, lo, hi, dim, name), len(uniq))
    if rank == 0:
        write_atomic(path, emb, _metadata(identity, key, uniq, emb.shape[1]))
        logger.info("teacher encoded %d distinct of %d texts for %s on %d rank(s) in %.2fs", len(uniq), len(texts),
                    name, world, time.perf_counter() - t0)
    return emb, inverse


def encode_sharded(encoder: Encoder, texts: Sequence[str], cache_dir, name: str, dim: int) -> ShardedRows:
    """Embeddings of ``texts`` as a :class:`ShardedRows`: this rank holds only its share of the
    distinct rows (one process: all of them). Cache and failures as :func:`encode_across_ranks`."""
    uniq, inverse = distinct(texts)
    multi, rank, world = _world()
    t0 = time.perf_counter()
    lo, hi = split_range(len(uniq), rank, world)
    identity, key, path, (h, sha) = _lookup(encoder, uniq, cache_dir, name, rank, check_header)
    found = long_broadcast_object(h)  # H of a file whose header matches, or None
    if found is not None:
        local, ok = _scatter_file(path, len(uniq), found, lo, hi, sha, multi, world)
        if ok:
            if rank == 0:
                logger.info("teacher cache hit: %s (%d distinct of %d texts, each rank its share) in %.2fs", path,
                            len(uniq), len(texts), time.perf_counter() - t0)
            return ShardedRows(local, inverse, lo, len(uniq))
        if rank == 0:
            logger.warning("teacher cache file %s is invalid (sha256 of the tensor bytes does not match the metadata): "
                           "recomputing it", path)
    mine = _encode_share(encoder, uniq, lo, hi, dim, name)
    if rank == 0:
        blocks = _gather_blocks(mine, len(uniq), dim, world) if multi else [mine]
        write_blocks_atomic(path, len(uniq), dim, _metadata(identity, key, uniq, dim), blocks)
        logger.info("teacher encoded %d distinct of %d texts for %s on %d rank(s), each keeps its share, in %.2fs",
                    len(uniq), len(texts), name, world, time.perf_counter() - t0)
    elif multi:
        _send_blocks(mine)
    return ShardedRows(mine, inverse, lo, len(uniq))


def _gather_blocks(mine: torch.Tensor, n: int, dim: int, world: int):
    """On rank 0: every distinct row in order, CHUNK rows at a time (its own, then each rank's)."""
    import torch.distributed as dist

    yield from (mine[i : i + CHUNK] for i in range(0, mine.shape[0], CHUNK))
    for r in range(1, world):
        lo, hi = split_range(n, r, world)
        for b0 in range(lo, hi, CHUNK):
            buf = torch.empty(min(b0 + CHUNK, hi) - b0, dim)
            dist.recv(buf, src=r, group=long_group())
            yield buf


def _send_blocks(mine: torch.Tensor) -> None:
    import torch.distributed as dist

    for i in range(0, mine.shape[0], CHUNK):
        dist.send(mine[i : i + CHUNK].contiguous(), dst=0, group=long_group())


def _scatter_file(path, n: int, dim: int, lo: int, hi: int, sha: str, multi: bool, world: int) -> tuple[torch.Tensor, bool]:
    """Each rank's share of the cache file at ``path`` (read by rank 0, CHUNK rows at a time, sent
    to its rank), and whether the bytes match ``sha`` (rank 0 hashes them as they pass; every rank
    gets the verdict)."""
    import hashlib

    import torch.distributed as dist

    local = torch.empty(hi - lo, dim)
    rank = dist.get_rank() if multi else 0
    if rank == 0:
        digest = hashlib.sha256()
        for r in range(world):
            r_lo, r_hi = split_range(n, r, world)
            for b0 in range(r_lo, r_hi, CHUNK):
                b1 = min(b0 + CHUNK, r_hi)
                block = read_rows(path, b0, b1).float().contiguous()
                digest.update(block.numpy().astype("<f4", copy=False).tobytes())
                if r == 0:
                    local[b0 - lo : b1 - lo] = block
                else:
                    dist.send(block, dst=r, group=long_group())
        ok = digest.hexdigest() == sha
    else:
        for b0 in range(lo, hi, CHUNK):
            dist.recv(local[b0 - lo : min(b0 + CHUNK, hi) - lo], src=0, group=long_group())
        ok = None
    return local, bool(long_broadcast_object(ok) if multi else ok)
