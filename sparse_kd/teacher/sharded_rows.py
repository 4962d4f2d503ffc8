"""Teacher rows split over the ranks: each rank holds one contiguous block of the distinct rows.

Users with their own texts have about as many distinct rows as users (1M users x 384 fp32 is
1.5 GB). Gathered, every rank would hold all of them (issue 20, 4b). A :class:`ShardedRows`
keeps on each rank only the block that rank encoded (:func:`~sparse_kd.dist.split_range` of the
distinct rows, the same split as the encoder's shares) and the (N,) index of each row's distinct
row. Its consumers work on the blocks and exchange small results:

- the teacher ranker's PCA features (:func:`~sparse_kd.distill.transfer.pca_reduce`): mean and
  covariance summed over the blocks, each block projected to k dims where it lies, the (D, k)
  projections gathered (k = 32: 12x less than the rows);
- rank 0's ``data/text_embeddings.safetensors``: a block of rows at a time, each row sent by the
  rank that holds it (:func:`write_rows_collective`, through ``localize``);
- the student's own shards (alignment targets in a row_wise table, PCA weight transfer): each
  rank asks for the row ranges of its table shards and gets them in one all-to-all
  (:meth:`ShardedRows.localize` -> :class:`LocalRows`).

Every method that talks to other ranks is a collective: every rank calls it, in the same order.
Reading rows by index (``rows[i]``) is refused with a message, so a consumer that needs the whole
matrix fails at once instead of silently reading one rank's block; it calls :meth:`gather`.

Example (every rank)::

    rows = ShardedRows(my_block, index, lo, n_distinct)
    z = pca_reduce(rows, 32)                  # (N, 32) on every rank
    write_rows_collective(opener, {"user": rows, "item": item_rows})
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from sparse_kd.dist import all_gather_rows, long_all_gather_object, long_group, split_range

CHUNK = 1 << 16  # rows handled at a time (reductions, projections, file blocks)
MIN_ROUND = 1024  # rows per rank in one localize round, at least


class ShardedRowsError(TypeError):
    """A consumer read sharded rows as if it held them all."""


class LocalRows:
    """The rows of a few row ranges of an (N, H) matrix, held by this rank: ``rows[r0:r1]`` (and
    ``rows[r0:r1, c0:c1]``) inside one of them; anything else is refused with the ranges named.

    Args:
        ranges: [(r0, r1), ...] disjoint row ranges.
        blocks: the (r1 - r0, H) rows of each range.
        shape: (N, H) of the whole matrix.
    """

    def __init__(self, ranges: list[tuple[int, int]], blocks: list[torch.Tensor], shape: tuple[int, int]) -> None:
        self.ranges, self.blocks, self.shape = [tuple(r) for r in ranges], blocks, tuple(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        rows, cols = idx if isinstance(idx, tuple) else (idx, slice(None))
        if isinstance(rows, slice) and rows.step in (None, 1):
            lo, hi, _ = rows.indices(self.shape[0])
            for (r0, r1), block in zip(self.ranges, self.blocks):
                if r0 <= lo and hi <= r1:
                    return block[lo - r0 : hi - r0][:, cols]
        raise ShardedRowsError(f"rows {idx} are not held by this rank: it holds row ranges {self.ranges} of "
                               f"{self.shape[0]} (the ranges it asked for with ShardedRows.localize)")


class ShardedRows:
    """Rows (N, H) = ``distinct[index[i]]`` where this rank holds only ``distinct[lo:hi]``.

    Args:
        local: (hi - lo, H) this rank's block of the distinct rows.
        index: (N,) int64, each row's distinct row (the same on every rank).
        lo: the first distinct row of ``local``.
        n_distinct: D, the number of distinct rows over all ranks.
    """

    sharded = True  # what consumers look for (a row source of this rank alone has no such flag)

    def __init__(self, local: torch.Tensor, index: torch.Tensor, lo: int, n_distinct: int) -> None:
        if local.dim() != 2:
            raise ValueError(f"ShardedRows: local block must be (rows, H), got {tuple(local.shape)}")
        self.local, self.index, self.lo, self.n_distinct = local, index.long(), int(lo), int(n_distinct)

    @property
    def hi(self) -> int:
        return self.lo + self.local.shape[0]

    @property
    def dim(self) -> int:
        return int(self.local.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.index.shape[0]), self.dim)

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def _refuse(self, *_: Any) -> torch.Tensor:
        raise ShardedRowsError(
            f"these {self.shape[0]} x {self.dim} teacher rows are split over the ranks (this rank holds distinct "
            f"rows {self.lo}:{self.hi} of {self.n_distinct}); read them with a collective (pca_reduce, "
            "write_rows_collective) or gather() them on every rank")

    __getitem__ = _refuse
    materialize = _refuse

    def local_counts(self) -> torch.Tensor:
        """(hi - lo,) int64: how many of the N rows are each of this rank's distinct rows."""
        return torch.bincount(self.index, minlength=self.n_distinct)[self.lo : self.hi]

    def gather(self) -> torch.Tensor:
        """Collective: every distinct row (D, H) on every rank (what the unsharded path holds)."""
        return all_gather_rows(self.local, self.n_distinct)

    def full(self) -> torch.Tensor:
        """Collective: the whole (N, H) on every rank (replicated alignment targets need it)."""
        return self.gather().index_select(0, self.index)

    def owner(self, distinct_ids: torch.Tensor) -> torch.Tensor:
        """The rank that holds each distinct row (the :func:`~sparse_kd.dist.split_range` blocks)."""
        world = _world_size()
        ends = torch.tensor([split_range(self.n_distinct, r, world)[1] for r in range(world)])
        return torch.searchsorted(ends, distinct_ids, right=True)

    def mapped(self, fn: Callable[[torch.Tensor], torch.Tensor], out_dim: int) -> "ShardedRows":
        """``fn`` applied to this rank's block where it lies (CHUNK rows at a time): the same split,
        e.g. D-dim projections to send instead of H-dim rows."""
        out = torch.empty(self.local.shape[0], out_dim)
        for lo in range(0, self.local.shape[0], CHUNK):
            out[lo : lo + CHUNK] = fn(self.local[lo : lo + CHUNK])
        return ShardedRows(out, self.index, self.lo, self.n_distinct)

    def localize(self, ranges: list[tuple[int, int]], into: Optional[list[torch.Tensor]] = None) -> LocalRows:
        """Collective: the rows of this rank's ``ranges`` (e.g. its shards of a row_wise table), from
        the ranks that hold them, by ``all_to_all_single`` in rounds of at most CHUNK / W rows per
        rank: each rank receives exactly its ranges' rows, straight into its result, and no rank
        holds more than a round's rows beside it. Ranks ask for different ranges (none: []).

        ``into``: CPU float32 tensors (r1 - r0, H), one per range, to receive the rows in place of
        a new result (e.g. the shards of a frozen target table): no second copy of them."""
        import torch.distributed as dist

        keep = [k for k, (a, b) in enumerate(ranges) if b > a]
        ranges = [(int(ranges[k][0]), int(ranges[k][1])) for k in keep]
        into = None if into is None else [into[k] for k in keep]
        g = long_group()
        asked = long_all_gather_object(ranges) if g is not None else [ranges]
        pos = [torch.cat([torch.arange(a, b) for a, b in rs]) if rs else torch.zeros(0, dtype=torch.int64) for rs in asked]
        rank = dist.get_rank() if g is not None else 0
        one = into is not None and len(into) == 1  # one range (a row_wise shard): received where it belongs
        out = into[0] if one else torch.empty(int(pos[rank].shape[0]), self.dim)
        if g is None:
            out.copy_(self.local.index_select(0, self.index[pos[0]] - self.lo))
        else:
            self._exchange(pos, rank, out, g)
        blocks, at = [], 0
        for a, b in ranges:
            blocks.append(out[at : at + b - a])
            at += b - a
        if into is not None and not one:
            for dst, block in zip(into, blocks):
                dst.copy_(block)
            blocks = into
        return LocalRows(ranges, blocks, self.shape)

    def _exchange(self, pos: list[torch.Tensor], rank: int, out: torch.Tensor, group) -> None:
        """:meth:`localize`'s all-to-all rounds: rank d asks for rows ``pos[d]``; this rank's arrive in ``out``."""
        import torch.distributed as dist

        world = len(pos)
        step = max(MIN_ROUND, CHUNK // world)
        for r0 in range(0, max(int(p.shape[0]) for p in pos), step):
            sel, send_counts = [], []
            for d in range(world):  # the rows of rank d's round that this rank holds, in position order
                ids = self.index[pos[d][r0 : r0 + step]]
                ids = ids[(ids >= self.lo) & (ids < self.hi)]
                sel.append(ids - self.lo)
                send_counts.append(int(ids.shape[0]))
            src = self.owner(self.index[pos[rank][r0 : r0 + step]])  # who sends each of my rows this round
            got = torch.empty(int(src.shape[0]), self.dim)
            dist.all_to_all_single(got, self.local.index_select(0, torch.cat(sel)),
                                   torch.bincount(src, minlength=world).tolist(), send_counts, group=group)
            out[r0 + torch.argsort(src, stable=True)] = got  # sources in rank order, each in position order


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


class _RowsOn:
    """What the writing rank hands :func:`~sparse_kd.teacher.cache.write_rows`: ``rows[r0:r1]``
    fetched from the ranks that hold them by :meth:`ShardedRows.localize` (the other ranks ask for
    nothing, block by block)."""

    def __init__(self, rows: ShardedRows) -> None:
        self.rows, self.shape = rows, rows.shape

    def __getitem__(self, idx: slice) -> torch.Tensor:
        r0, r1 = idx.start, min(idx.stop, self.shape[0])
        return self.rows.localize([(r0, r1)])[r0:r1]


def write_rows_collective(open_file: Callable[[], Any], rows: dict[str, Any], dst: int = 0) -> None:
    """Collective: rank ``dst`` writes ``rows`` (name -> (N, H) source, :class:`ShardedRows` among
    them) as one safetensors file through ``open_file()`` (a context manager giving a binary file,
    e.g. an atomic replace), a block at a time; the other ranks send the sharded rows they hold.
    Rows that are not sharded are read on ``dst`` alone."""
    import torch.distributed as dist

    from sparse_kd.teacher.cache import ROW_BLOCK, write_rows

    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == dst:
        with open_file() as f:
            write_rows(f, {k: _RowsOn(r) if isinstance(r, ShardedRows) else r for k, r in rows.items()})
        return
    for r in rows.values():
        if isinstance(r, ShardedRows):
            for _ in range(0, r.shape[0], ROW_BLOCK):
                r.localize([])  # the writer asks for this block
