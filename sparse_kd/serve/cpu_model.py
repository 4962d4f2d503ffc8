"""The CPU serving model: the DLRM on PyTorch's quantized EmbeddingBag operators.

Notation: B batch, F sparse features (one table each), D embedding dim, N original rows of a
table, R stored rows, Dd dense input dim.

``torch_quantized`` (CPU serving, the default, ``compress.serve_device: cpu``)
    PyTorch's own quantized EmbeddingBag operators, which run FBGEMM's JIT-generated CPU kernels
    (``EmbeddingSpMDM``) and need no ``fbgemm_gpu`` at serving time:
    ``torch.ops.quantized.embedding_bag_{byte,4bit,2bit}_rowwise_offsets`` for int8/int4/int2,
    ``torch.nn.functional.embedding_bag`` on the fp32 / fp16 weight for fp32/fp16.
    Row layouts (:class:`PackedTable`): int8 ``[D codes | fp32 scale | fp32 bias]`` (the byte
    operator reads fp32 scale/bias; the fp16 ones are widened exactly, so the dequantized values
    equal the TBE's), int4 / int2 ``[D*bits/8 codes | fp16 scale | fp16 bias]`` (FBGEMM's fused
    layout as is), fp16 / fp32 plain rows, no alignment padding. A pruned table's remap (int32, N
    entries) sends each id to its stored row; ids with no row (-1) go to one extra all-zero row
    (counted as the table's ``padding``), and the remapped ids go to the same dense operators
    (faster than the operators' ``compressed_indices_mapping``, see :class:`PackedTable`). The
    fp16 operator returns its pooled sums rounded to fp16 (they are accumulated in fp32); every
    other dtype returns fp32 sums.
    Threads (:class:`QuantizedLookup`): a batch is cut into ``num_workers`` contiguous runs of
    samples dispatched with ``torch.jit.fork`` (TorchScript's inter-op pool), each operator on
    one thread (torch's intra-op threads at 1). Each bag is summed by the same kernel over the
    same rows in the same order either way: results are bit-identical for any number of
    workers. Ids are read as int32 (the predictor passes them so; int64 ids are cast per run).
    ``remap: hash`` is not available here (the operators take an array).

The modules here need only ``torch`` to run (no ``fbgemm_gpu``, no torchrec): a serving process
loads them scripted from an artifact (:mod:`sparse_kd.serve.predictor`).
:mod:`sparse_kd.compress.cpu_kernel` builds them from quantized rows.
"""

# no "from __future__ import annotations": TorchScript reads these annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

#: below this many ids per worker a lookup runs its one-thread tables on the calling thread only
MIN_IDS_PER_WORKER = 4096



class PackedTable(nn.Module):
    """One table for PyTorch's quantized EmbeddingBag operators (see the module doc).

    ``forward(ids (n,) int32 or int64, offsets (b + 1,) same dtype) -> (b, D) float32``: sum-pooled
    bags. weight: int8 (R [+ 1], D + 8) uint8, int4/int2 (R [+ 1], D * bits / 8 + 4) uint8,
    fp16/fp32 (R [+ 1], D). mapping: (N,) int32, empty when the table is not pruned, else the
    stored row of each id, with -1 (no row) replaced by one extra all-zero row R (``zero_row``).
    A pruned table's ids go through the mapping (``index_select``) and then the dense operator:
    faster than the operators' own ``compressed_indices_mapping`` path
    (``embedding_bag_*_rowwise_offsets(pruned_weights=True)``; ``benchmarks/bench_lookup_paths.py``
    measures both), with bit-identical sums.
    """

    def __init__(self, feature: str, qtype: str, dim: int, weight: Tensor, mapping: Optional[Tensor],
                 zero_row: bool = False) -> None:
        super().__init__()
        self.feature: str = feature
        self.qtype: str = qtype
        self.dim: int = int(dim)
        self.pruned: bool = mapping is not None
        self.zero_row: bool = bool(zero_row)
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("mapping", mapping.to(torch.int32).contiguous() if mapping is not None
                             else torch.empty(0, dtype=torch.int32))

    def forward(self, ids: Tensor, offsets: Tensor) -> Tensor:
        if self.pruned:
            ids = self.mapping.index_select(0, ids).to(offsets.dtype)
        if self.qtype == "int8":
            return torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
                self.weight, ids, offsets, False, 0, False, None, None, True)
        if self.qtype == "int4":
            return torch.ops.quantized.embedding_bag_4bit_rowwise_offsets(
                self.weight, ids, offsets, False, 0, False, None, None, True)
        if self.qtype == "int2":
            return torch.ops.quantized.embedding_bag_2bit_rowwise_offsets(
                self.weight, ids, offsets, False, 0, False, None, None, True)
        out = torch.nn.functional.embedding_bag(ids, self.weight, offsets, mode="sum", include_last_offset=True)
        return out.float()



class TieredTable(nn.Module):
    """One table stored in precision tiers (:mod:`sparse_kd.compress.tiers`): stored rows
    [starts[t], starts[t + 1]) in tier t, each tier a :class:`PackedTable` of its own dtype, the
    most-read rows first. ``forward`` as :class:`PackedTable`'s. mapping: (N,) int32 (empty when
    the table is not pruned), id -> stored row, -1 (no row) replaced by R (``zero_row``).

    Tier 0 holds the most-read rows, so most ids land there: its kernel reads every id with the
    bags' own offsets, rows of colder tiers clamped onto one all-zero row after its rows. The
    other ids are gathered once (in order, each bag's bounds among them by binary search), and
    each colder tier reads all of them, its rows sitting between two all-zero rows (local 0 and
    n_t + 1): stored row r is read at ``clamp(r - starts[t] + 1, 0, n_t + 1)``, so rows of other
    tiers, and R, add nothing. The tiers' sums are added. A 4- or 2-bit kernel spends about as long
    on a cached zero row as on a real one, hence tier 0 alone reads every id and the colder tiers
    only the colder ids (docs/BENCHMARKS.md, section 1b)."""

    def __init__(self, feature: str, qtype: str, dim: int, tiers: List[PackedTable], starts: List[int],
                 mapping: Optional[Tensor], zero_row: bool = False) -> None:
        super().__init__()
        if len(starts) != len(tiers) + 1 or len(tiers) < 2:
            raise ValueError(f"table {feature}: {len(tiers)} tiers (>= 2) need {len(tiers) + 1} row starts, got {starts}")
        self.feature: str = feature
        self.qtype: str = qtype
        self.dim: int = int(dim)
        self.pruned: bool = mapping is not None
        self.zero_row: bool = bool(zero_row)
        self.starts: List[int] = [int(x) for x in starts]
        self.tiers = nn.ModuleList(tiers)
        self.register_buffer("mapping", mapping.to(torch.int32).contiguous() if mapping is not None
                             else torch.empty(0, dtype=torch.int32))

    def forward(self, ids: Tensor, offsets: Tensor) -> Tensor:
        rows = self.mapping.index_select(0, ids) if self.pruned else ids.to(torch.int32)
        first = self.starts[1]
        # tier 0 (the hot rows, most ids): every id, the colder ones on its zero row
        out = self.tiers[0](rows.clamp(max=first).to(offsets.dtype), offsets)
        cold = rows >= first
        keep = cold.nonzero().squeeze(1)
        if keep.numel() == 0:
            return out
        # the colder tiers read only the colder ids (gathered in order; a bag's bounds among them:
        # how many of them come before its bounds), each on its own rows between its two zero rows
        cold_offsets = torch.searchsorted(keep, offsets.to(keep.dtype)).to(offsets.dtype)
        cold_rows = rows.index_select(0, keep)
        for t, table in enumerate(self.tiers):
            if t > 0:
                n = self.starts[t + 1] - self.starts[t]
                local = (cold_rows - (self.starts[t] - 1)).clamp_(0, n + 1)
                out.add_(table(local.to(offsets.dtype), cold_offsets))
        return out



class QuantizedLookup(nn.Module):
    """Sum-pooled lookups of F tables (:class:`PackedTable` or :class:`TieredTable`, one per
    feature, all of dim D).

    ``forward(values (nnz,) int ids, lengths (F * B,) int) -> (B, F, D) float32``; ``lengths`` is
    feature-major (all B bags of the first table, then the next). With ``num_workers`` > 1 and at
    least ``min_ids_per_worker`` ids per worker, the batch is cut into ``num_workers`` contiguous
    runs of samples; every run but the first is forked onto TorchScript's inter-op pool and the
    calling thread takes the first. Each run looks up all tables and stacks their results into
    its rows of the output (on one thread, :meth:`pooled` returns the tables' results unstacked). Ids should arrive as int32 (the kernels read half the index bytes;
    :class:`sparse_kd.serve.Predictor` keeps a CPU artifact's entity bags as int32); int64 ids are
    cast per run, an extra pass over the ids and a fresh buffer on every call. Each bag
    is summed by the same kernel over the same rows in the same order whatever the split: results
    are bit-identical for any number of workers.

    Threads: call it with torch's intra-op threads at 1 when ``num_workers`` > 1 (``sparse-kd
    serve`` does), from the first call on: the first fork creates TorchScript's inter-op pool,
    whose threads keep the intra-op thread count of that moment (``at::init_num_threads``), and a
    forked run on a pool made under 2 threads starts an OpenMP team of its own, which contends
    with the calling thread for the cores (``benchmarks/bench_lookup.py`` makes its pool under 1
    thread, as the service does). Measured on 2 cores (``benchmarks/bench_lookup_paths.py``): forked int4 runs
    slow down by half when the caller has 2 intra-op threads (an OpenMP team spinning between
    parallel ops takes the core a forked run needs). The int8 operator can split bags across
    intra-op threads itself (an all-int8 lookup measured faster that way in the same run), but
    the int4 and int2 operators cannot, and a lookup of mixed dtypes (what the budget planner
    builds) cannot use both settings at once. ``num_workers`` is fixed per module (TorchScript cannot read
    ``torch.get_num_threads()``): :meth:`set_num_workers`, also on the scripted module.
    """

    def __init__(self, tables: List[nn.Module], num_workers: int = 1,
                 min_ids_per_worker: int = MIN_IDS_PER_WORKER) -> None:
        super().__init__()
        if not tables:
            raise ValueError("QuantizedLookup needs at least one table")
        dims = {t.dim for t in tables}
        if len(dims) != 1:
            raise ValueError(f"every table must have the same dim, got {sorted(dims)}")
        self.tables = nn.ModuleList(tables)
        self.num_tables: int = len(tables)
        self.dim: int = tables[0].dim
        self.min_ids_per_worker: int = int(min_ids_per_worker)
        self.num_workers: int = 1
        self.set_num_workers(num_workers)

    @torch.jit.export
    def set_num_workers(self, num_workers: int) -> None:
        """Threads per lookup from now on (1: no forks)."""
        self.num_workers = max(1, int(num_workers))

    def _tables(self, ids: Tensor, offsets: Tensor, batch: int, b0: int, b1: int) -> List[Tensor]:
        """Bags b0..b1 of every table: one (b1 - b0, D) tensor per table."""
        pooled: List[Tensor] = []
        for t, table in enumerate(self.tables):
            o = offsets[t * batch + b0: t * batch + b1 + 1]
            s = int(o[0])
            e = int(o[-1])
            pooled.append(table(ids[s:e].to(torch.int32), o - s))
        return pooled

    def _lookup(self, ids: Tensor, offsets: Tensor, out: Tensor, batch: int, b0: int, b1: int) -> int:
        """Bags b0..b1 of every table into out[b0:b1]."""
        if b1 <= b0:
            return 0
        # one stack into this run's rows (contiguous) after all tables, not a strided copy of each
        # table's result as it comes: one pass over the output, after the operators
        torch.stack(self._tables(ids, offsets, batch, b0, b1), 1, out=out[b0:b1])
        return 0

    def _run(self, values: Tensor, lengths: Tensor) -> Tuple[List[Tensor], Optional[Tensor]]:
        """(one (B, D) tensor per table, None) when one thread looks the batch up; ([], the
        (B, F, D) output) when forked runs wrote their rows of it."""
        f = self.num_tables
        batch = lengths.numel() // f
        if batch == 0:
            return [], torch.empty(0, f, self.dim, dtype=torch.float32, device=values.device)
        # int32 like the ids (a request batch holds far fewer than 2**31 ids): no cast per table
        offsets = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=values.device)
        offsets[1:] = torch.cumsum(lengths, 0, dtype=torch.int32)
        shards = 1
        if self.num_workers > 1:
            shards = min(self.num_workers, batch, values.numel() // self.min_ids_per_worker)
        if shards <= 1:
            return self._tables(values, offsets, batch, 0, batch), None
        out = torch.empty(batch, f, self.dim, dtype=torch.float32, device=values.device)
        futures: List[torch.jit.Future[int]] = []
        for k in range(1, shards):
            futures.append(torch.jit.fork(self._lookup, values, offsets, out, batch, batch * k // shards,
                                          batch * (k + 1) // shards))
        self._lookup(values, offsets, out, batch, 0, batch // shards)
        for fut in futures:
            torch.jit.wait(fut)
        return [], out

    @torch.jit.export
    def pooled(self, values: Tensor, lengths: Tensor) -> List[Tensor]:
        """The pooled bags as one (B, D) tensor per table, with no copy into a (B, F, D) tensor
        when one thread looks the batch up (views of that tensor when forked runs wrote it): what
        :class:`PooledInteraction` stacks together with the dense features."""
        per_table, out = self._run(values, lengths)
        if out is not None:
            return list(out.unbind(1))
        return per_table

    def forward(self, values: Tensor, lengths: Tensor) -> Tensor:
        per_table, out = self._run(values, lengths)
        if out is not None:
            return out
        return torch.stack(per_table, 1)



class PooledInteraction(nn.Module):
    """torchrec's ``InteractionArch`` (DLRM's pairwise dot products) on the lookup's per-table
    results: ``forward(dense (B, D), pooled [F x (B, D)]) -> (B, D + F + F choose 2)``, the dense
    features followed by the upper triangle (row by row, diagonal excluded) of the (F + 1) x (F + 1)
    Gram matrix of [dense, table 1, ..., table F]. The same operators on the same values as
    torchrec's (``bmm`` of the stacked rows with their transpose), so the result is bit-identical;
    the stack takes the tables' results as they come, where torchrec's ``cat`` needs them stacked
    into one (B, F, D) tensor first (one copy of every pooled row fewer per call)."""

    def __init__(self, num_sparse_features: int) -> None:
        super().__init__()
        n = int(num_sparse_features) + 1
        tri = torch.triu_indices(n, n, offset=1)
        self.register_buffer("flat_index", (tri[0] * n + tri[1]).contiguous())

    def forward(self, dense: Tensor, pooled: List[Tensor]) -> Tensor:
        rows = [dense]
        rows.extend(pooled)
        combined = torch.stack(rows, 1)  # (B, F + 1, D)
        gram = torch.bmm(combined, torch.transpose(combined, 1, 2))
        return torch.cat([dense, gram.flatten(1).index_select(1, self.flat_index)], 1)



class CpuServingDLRM(nn.Module):
    """The DLRM on :class:`QuantizedLookup`: forward(dense (B, Dd) float32, values (nnz,) int ids,
    lengths (F * B,) int) -> logits (B,), the same computation as torchrec's ``DLRM.forward``
    (dense arch, pooled embeddings, pairwise interactions, over arch). The dense and over archs
    are fx-traced copies of the trained model's, so the module scripts as it is; the interaction
    is :class:`PooledInteraction` (torchrec's, on the lookup's per-table results)."""

    def __init__(self, dense_arch: nn.Module, inter_arch: PooledInteraction, over_arch: nn.Module,
                 lookup: QuantizedLookup, keys: List[str]) -> None:
        super().__init__()
        self.dense_arch = dense_arch
        self.inter_arch = inter_arch
        self.over_arch = over_arch
        self.lookup = lookup
        self.keys: List[str] = list(keys)

    def forward(self, dense: Tensor, values: Tensor, lengths: Tensor) -> Tensor:
        embedded_dense = self.dense_arch(dense)
        pooled = self.lookup.pooled(values, lengths)
        return self.over_arch(self.inter_arch(embedded_dense, pooled)).reshape(-1)

    @torch.jit.export
    def embeddings(self, values: Tensor, lengths: Tensor) -> Tensor:
        """The pooled embeddings (B, F, D) the model sees."""
        return self.lookup(values, lengths)

    @torch.jit.export
    def set_num_workers(self, num_workers: int) -> None:
        self.lookup.set_num_workers(num_workers)

