"""Embedding-table initialisation that does not depend on how the tables are sharded.

Notation: N rows of a table, D embedding dim.

Every table starts as U(-1/sqrt(N), 1/sqrt(N)) (torchrec's default bound), drawn in fixed chunks
of :data:`INIT_CHUNK` rows, each chunk from its own seed (a hash of run seed, table and chunk).
Any shard of a table (table-, row- or column-wise, on any number of ranks) therefore holds the
same values whichever rank builds it, and a 1-process run starts from the same weights as an
N-process one. Weight transfer then overwrites chosen rows (:func:`write_tables`).
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.distributed as dist

from sparse_kd.checkpoint import frozen
from sparse_kd.student.model import feature_of

INIT_CHUNK = 1 << 16


def _chunk_seed(seed: int, table: str, chunk: int) -> int:
    h = hashlib.sha256(f"{seed}/{table}/{chunk}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def init_rows_block(seed: int, table: str, num_rows: int, dim: int, row0: int, nrows: int) -> torch.Tensor:
    """Rows [row0, row0 + nrows) (nrows, dim) of a table's default init, U(-1/sqrt(N), 1/sqrt(N)).

    Generated chunk by chunk (:data:`INIT_CHUNK` rows, each from its own seed), so any slice of
    the table gets the same values whoever builds it.
    """
    bound = 1.0 / math.sqrt(num_rows)
    out = torch.empty(nrows, dim)
    r = row0
    while r < row0 + nrows:
        c = r // INIT_CHUNK
        c_lo, c_hi = c * INIT_CHUNK, min((c + 1) * INIT_CHUNK, num_rows)
        g = torch.Generator().manual_seed(_chunk_seed(seed, table, c))
        block = torch.empty(c_hi - c_lo, dim).uniform_(-bound, bound, generator=g)
        lo, hi = r, min(row0 + nrows, c_hi)
        out[lo - row0 : hi - row0] = block[lo - c_lo : hi - c_lo]
        r = hi
    return out


def local_tables(state: dict):
    """Yield (table, shards, (N, D), sharded) for every embedding table of a (sharded or plain)
    model's state dict: shards is this rank's [((row offset, col offset), tensor)], the tensors
    views of the live weights; sharded is False for a table every rank holds whole. The frozen
    alignment targets (:func:`sparse_kd.checkpoint.frozen`) are not ID tables: left out."""
    for key, value in state.items():
        if "embedding_bags" not in key or not key.endswith(".weight") or frozen(key):
            continue
        table = key.split(".")[-2]
        if hasattr(value, "local_shards"):  # ShardedTensor
            shards = [(tuple(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
            yield table, shards, tuple(value.size()), True
        else:  # data_parallel / unsharded: every rank holds the whole table
            yield table, [((0, 0), value)], tuple(value.shape), False


@torch.no_grad()
def write_tables(dmp: torch.nn.Module, seed: int, init_rows: dict[str, torch.Tensor], reinit: bool = True) -> dict[str, int]:
    """Set every embedding table (each rank its local shards) to the sharding-independent init
    (unless ``reinit`` is False), then overwrite rows from ``init_rows`` (feature -> (N, D),
    NaN rows skipped).

    Returns feature -> number of rows written from ``init_rows`` (summed over ranks; collective
    when the process group has more than one rank).
    """
    written: dict[str, int] = {}
    sd = dmp.state_dict()
    for table, shards, (full_rows, full_dim), sharded in local_tables(sd):
        feat = feature_of(table)
        seeded = init_rows.get(feat)
        if seeded is None and not reinit:
            continue
        # count each row once: first column shard; replicated tables on rank 0 only
        replica = not sharded and dist.is_initialized() and dist.get_rank() > 0
        n_written = 0
        for (r0, c0), t in shards:
            n, d = t.shape
            # one init chunk of rows at a time: a temporary as large as the shard would add the
            # largest table to peak memory
            lo = 0
            while lo < n:
                hi = min(n, ((r0 + lo) // INIT_CHUNK + 1) * INIT_CHUNK - r0)
                if reinit:
                    block = init_rows_block(seed, table, full_rows, full_dim, r0 + lo, hi - lo)[:, c0 : c0 + d]
                else:
                    block = t[lo:hi].detach().cpu()  # rows are assembled on the host, then copied back
                if seeded is not None:
                    src = seeded[r0 + lo : r0 + hi, c0 : c0 + d].float()
                    ok = ~torch.isnan(src).any(dim=1)
                    block[ok] = src[ok]
                    n_written += int(ok.sum()) if c0 == 0 and not replica else 0
                t[lo:hi].copy_(block)  # onto the shard's device (a CUDA shard included)
                lo = hi
        if seeded is not None:
            written[feat] = n_written
    dmp.load_state_dict(sd, strict=False)
    if written and dist.is_initialized() and dist.get_world_size() > 1:
        counts = torch.tensor([written[f] for f in sorted(written)], dtype=torch.int64)
        dist.all_reduce(counts)  # CPU tensor: the gloo side of a cpu:gloo,cuda:nccl group
        written = dict(zip(sorted(written), counts.tolist()))
    return written


def shard_row_ranges(state: dict) -> dict[str, list[tuple[int, int]]]:
    """table -> the row ranges [(r0, r1), ...] of this rank's shards (the whole table where every
    rank holds it; none where another rank does), for every embedding table of a state dict,
    the frozen alignment targets included."""
    out: dict[str, list[tuple[int, int]]] = {}
    for key, value in state.items():
        if "embedding_bags" not in key or not key.endswith(".weight"):
            continue
        if hasattr(value, "local_shards"):
            spans = {(s.metadata.shard_offsets[0], s.metadata.shard_offsets[0] + s.metadata.shard_sizes[0])
                     for s in value.local_shards()}
        else:
            spans = {(0, value.shape[0])}
        out[key.split(".")[-2]] = sorted(spans)
    return out


def localize_sources(dmp: torch.nn.Module, sources: dict, table_of) -> dict:
    """feature -> source, where each source split over the ranks (``source.sharded``: the users' own
    text rows, or a projection of them) becomes the rows of this rank's shards of the feature's
    table ``table_of(feature)`` (:meth:`~sparse_kd.teacher.sharded_rows.ShardedRows.localize`).

    A collective where any source is sharded: every rank calls it with the same features (a rank
    with no shard of a table asks for no rows)."""
    if not any(getattr(s, "sharded", False) for s in sources.values()):
        return sources
    ranges = shard_row_ranges(dmp.state_dict())
    return {f: s.localize(ranges.get(table_of(f), [])) if getattr(s, "sharded", False) else s
            for f, s in sorted(sources.items())}
