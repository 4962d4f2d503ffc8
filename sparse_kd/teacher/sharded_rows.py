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
  rank that holds it (:func:`write_rows_collective`).

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

from sparse_kd.dist import all_gather_rows, long_group

CHUNK = 1 << 16  # rows handled at a time (reductions, projections, file blocks)


class ShardedRowsError(TypeError):
    """A consumer read sharded rows as if it held them all."""


class ShardedRows:
    """Rows (N, H) = ``distinct[index[i]]`` where this rank holds only ``distinct[lo:hi]``.

    Args:
        local: (hi - lo, H) this rank's block of the distinct rows.
        index: (N,) int64, each row's distinct row (the same on every rank).
        lo: the first distinct row of ``local``.
        n_distinct: D, the number of distinct rows over all ranks.
    """

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

    def map_gather(self, fn: Callable[[torch.Tensor], torch.Tensor], out_dim: int) -> torch.Tensor:
        """Collective: ``fn`` applied to this rank's block, CHUNK rows at a time, and the (D, out_dim)
        results gathered on every rank."""
        mine = torch.empty(self.local.shape[0], out_dim)
        for lo in range(0, self.local.shape[0], CHUNK):
            mine[lo : lo + CHUNK] = fn(self.local[lo : lo + CHUNK])
        return all_gather_rows(mine, self.n_distinct)

    def block_on(self, r0: int, r1: int, dst: int = 0) -> Optional[torch.Tensor]:
        """Collective: rows ``r0:r1`` (of the N) on rank ``dst``, None elsewhere. Each rank fills the
        rows it holds and the blocks are summed on ``dst``: exactly one rank holds each row, so the
        sum is that row, bit for bit (the sign of a zero aside)."""
        import torch.distributed as dist

        want = self.index[r0:r1]
        buf = torch.zeros(want.shape[0], self.dim)
        mine = (want >= self.lo) & (want < self.hi)
        buf[mine] = self.local.index_select(0, want[mine] - self.lo)
        g = long_group()
        if g is None:
            return buf
        dist.reduce(buf, dst=dst, op=dist.ReduceOp.SUM, group=g)
        return buf if dist.get_rank() == dst else None


class _RowsOn:
    """What the writing rank hands :func:`~sparse_kd.teacher.cache.write_rows`: ``rows[r0:r1]``
    fetched from the ranks that hold them (the other ranks call :meth:`ShardedRows.block_on` for
    the same blocks)."""

    def __init__(self, rows: ShardedRows, dst: int) -> None:
        self.rows, self.dst, self.shape = rows, dst, rows.shape

    def __getitem__(self, idx: slice) -> torch.Tensor:
        r0, r1 = idx.start, min(idx.stop, self.shape[0])
        return self.rows.block_on(r0, r1, self.dst)


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
            write_rows(f, {k: _RowsOn(r, dst) if isinstance(r, ShardedRows) else r for k, r in rows.items()})
        return
    for r in rows.values():
        if isinstance(r, ShardedRows):
            for r0 in range(0, r.shape[0], ROW_BLOCK):
                r.block_on(r0, min(r0 + ROW_BLOCK, r.shape[0]), dst)

