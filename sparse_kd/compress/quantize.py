"""Quantize pruned tables onto FBGEMM kernels and wrap the DLRM for serving.

Notation: B batch, F sparse features (one table each, named ``t_<feature>``), D embedding dim,
N original rows of a table, R stored rows, Dd dense input dim.

Rows are quantized once, the way torchrec's ``quantize_state_dict`` does it
(:func:`quantize_rows`: FBGEMM's ``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf``, an fp16 scale
and bias per row for int8/int4/int2), into a :class:`QTable` per table. Two serving kernels take
these rows (``kernel``, recorded in the artifact; see :mod:`sparse_kd.serve.format`):

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

``fbgemm_tbe`` (GPU serving, ``compress.serve_device: cuda``)
    The trained fp32 DLRM gets a fresh float ``EmbeddingBagCollection`` with the R stored rows,
    then ``torchrec.inference.modules.quantize_inference_model(per_table_weight_dtype=...)``
    swaps it for torchrec's quantized EBC: one FBGEMM ``IntNBitTableBatchedEmbeddingBagsCodegen``
    (TBE) for every table, ``EmbeddingLocation.DEVICE`` on a GPU (``HOST`` on CPU, where it is
    only built to compare against: it is slower there than the kernels above). Remaps
    (:func:`install_remaps`): ``array`` (``set_index_remappings_array``, N int32 per pruned
    table) or ``hash`` (FBGEMM's open-addressing table in the TBE's
    ``index_remapping_hash_table`` buffers: 2 int32 per slot, ``round_up(M / 0.5, 32)`` slots,
    M = ids that have a row; FBGEMM sizes it from R, which never terminates when M > 2R with a
    ``mean`` fill, and its CPU ``PrunedMapCPU`` variant is not saved by TorchScript, so this
    module fills the buffer variant itself). Rows carry the fp16 scale/bias before the codes and
    are padded to ``row_alignment`` bytes (16: what the GPU kernels want); each table starts on
    a 128-byte boundary. Written for any device, but this project's machines have no GPU: the
    ``cuda`` path has only been run with its device set to ``cpu``.

Dense layers stay fp32 unless ``dense_int8`` (``torch.ao.quantization.quantize_dynamic`` on every
``nn.Linear``; it saves little next to the tables at the demo's size and is off by default).

Serving models take plain tensors, ``forward(dense (B, Dd) float32, values (nnz,) int ids,
lengths (F * B,) int) -> logits (B,)``, lengths feature-major in :attr:`keys` order:
:class:`CpuServingDLRM` (its dense parts are fx-traced once, so it scripts directly) and
:class:`ServingDLRM` (TBE; :func:`script_model` traces it with ``torchrec.fx.Tracer`` keeping the
TBE a leaf). Both script with TorchScript, save and load with ``torch.jit``; the CPU one needs
only ``torch`` to run, the TBE one ``torch`` and ``fbgemm_gpu``. :func:`table_bytes` reads each
table's real storage from the model's buffers.
"""

# no "from __future__ import annotations": fx writes string annotations into the traced code, which TorchScript cannot read

import copy
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm: row quantization, prune, TBE)
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen
from torchrec.fx import Tracer
from torchrec.inference.modules import quantize_inference_model
from torchrec.models.dlrm import DLRM, InteractionArch
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import (
    MODULE_ATTR_ROW_ALIGNMENT_INT,
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from sparse_kd.compress.prune import PrunedTable
from sparse_kd.serve.format import KERNEL_CPU, KERNEL_TBE, KERNELS

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "int8": torch.qint8,
    "int4": torch.quint4x2,
    "int2": torch.quint2x4,
}
BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "int2": 2}
_SPARSE_TO_NAME = {SparseType.FP32.value: "fp32", SparseType.FP16.value: "fp16", SparseType.INT8.value: "int8",
                   SparseType.INT4.value: "int4", SparseType.INT2.value: "int2"}
_NAME_TO_DATATYPE = {"fp32": DataType.FP32, "fp16": DataType.FP16, "int8": DataType.INT8, "int4": DataType.INT4,
                     "int2": DataType.INT2}
REMAP_KINDS = ("array", "hash")
HASH_LOAD_FACTOR = 0.5
ROW_ALIGNMENT = 16
LEAF_MODULES = ["IntNBitTableBatchedEmbeddingBagsCodegen"]
#: serve_device -> kernel
SERVE_DEVICE_KERNEL = {"cpu": KERNEL_CPU, "cuda": KERNEL_TBE}
#: below this many ids per worker a lookup runs its one-thread tables on the calling thread only
MIN_IDS_PER_WORKER = 4096


def table_name(feature: str) -> str:
    return f"t_{feature}"


def kernel_for(serve_device: str, kernel: Optional[str] = None) -> str:
    """The kernel for a serving device (``kernel`` overrides it, e.g. a CPU TBE to compare against)."""
    if serve_device not in SERVE_DEVICE_KERNEL:
        raise ValueError(f"compress.serve_device: {serve_device!r} is not valid; expected cpu or cuda")
    k = kernel or SERVE_DEVICE_KERNEL[serve_device]
    if k not in KERNELS:
        raise ValueError(f"kernel {k!r} is not valid; expected one of {', '.join(KERNELS)}")
    if k == KERNEL_CPU and serve_device != "cpu":
        raise ValueError(f"kernel {KERNEL_CPU} serves on cpu only, not {serve_device!r}")
    return k


# ------------------------------------------------------------------------------------------
# Quantized rows (both kernels)


@dataclass
class QTable:
    """A quantized table, kernel-independent: codes (R, D * bits / 8) uint8 (the raw bytes for
    fp32/fp16), scale_bias (R, 4) uint8 (fp16 scale, fp16 bias) or None for fp32/fp16; remap (N,)
    int32 original id -> stored row (-1: adds nothing) or None."""

    feature: str
    dtype: str
    dim: int
    weight: torch.Tensor
    scale_bias: Optional[torch.Tensor]
    remap: Optional[torch.Tensor]

    @property
    def num_rows(self) -> int:
        return int(self.weight.shape[0])


def quantize_rows(rows: torch.Tensor, dtype: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """fp32 rows (K, D) -> FBGEMM bytes, exactly as torchrec's ``quantize_state_dict`` makes them:
    (codes (K, D * bits / 8) uint8, scale_bias (K, 4) uint8 or None)."""
    rows = rows.detach().float().contiguous().cpu()
    if dtype == "fp32":
        return rows.view(torch.uint8).clone(), None
    if dtype == "fp16":
        return rows.half().view(torch.uint8).clone(), None
    q = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(rows, BITS[dtype])
    return q[:, :-4].contiguous(), q[:, -4:].contiguous()


def dequantize_rows(weight: torch.Tensor, scale_bias: Optional[torch.Tensor], dtype: str) -> torch.Tensor:
    """Inverse of :func:`quantize_rows`: FBGEMM bytes -> fp32 rows (K, D)."""
    weight = weight.contiguous()
    if dtype == "fp32":
        return weight.view(torch.float32).clone()
    if dtype == "fp16":
        return weight.view(torch.float16).float()
    if scale_bias is None:
        raise ValueError(f"dtype {dtype}: quantized rows need their scale_bias (K, 4) to be dequantized")
    fused = torch.cat([weight, scale_bias], dim=1).contiguous()
    return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(fused, BITS[dtype])


def qtables_of(pruned: Mapping[str, PrunedTable], dtypes: Mapping[str, str], keys: List[str]) -> dict[str, QTable]:
    out = {}
    for f in keys:
        w, sb = quantize_rows(pruned[f].weight, dtypes[f])
        r = pruned[f].remap
        out[f] = QTable(f, dtypes[f], int(pruned[f].weight.shape[1]), w, sb, None if r is None else r.to(torch.int32))
    return out


# ------------------------------------------------------------------------------------------
# CPU kernel: torch.ops.quantized / embedding_bag


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


def pack_table(q: QTable) -> PackedTable:
    """A :class:`PackedTable` holding the rows of ``q`` (int8 scale/bias widened to fp32, exactly);
    a pruned table whose remap sends ids to no row gets one all-zero row after its R rows (zero
    codes with zero scale and bias for int8/int4/int2: every operator reads it as 0)."""
    if q.dtype in ("fp32", "fp16"):
        w = q.weight.contiguous().view(torch.float32 if q.dtype == "fp32" else torch.float16).clone()
    elif q.scale_bias is None:
        raise ValueError(f"table {q.feature}: a {q.dtype} table needs its scale_bias (R, 4) to be packed")
    elif q.dtype == "int8":
        sb = q.scale_bias.contiguous().view(torch.float16).float()  # (R, 2): scale, bias
        w = torch.cat([q.weight, sb.contiguous().view(torch.uint8)], dim=1)
    else:
        w = torch.cat([q.weight, q.scale_bias], dim=1)
    mapping = None if q.remap is None else q.remap.to(torch.int32).clone()
    zero = mapping is not None and bool((mapping < 0).any())
    if zero:
        assert mapping is not None
        mapping[mapping < 0] = w.shape[0]
        w = torch.cat([w, torch.zeros(1, w.shape[1], dtype=w.dtype)])
    return PackedTable(q.feature, q.dtype, q.dim, w, mapping, zero)


def unpack_table(m: nn.Module) -> QTable:
    """Inverse of :func:`pack_table` (an eager or a scripted PackedTable)."""
    w, qtype = m.weight.detach().cpu(), str(m.qtype)
    remap = m.mapping.detach().cpu().to(torch.int32).clone() if bool(m.pruned) else None
    if bool(m.zero_row):
        w = w[:-1]
        assert remap is not None
        remap[remap == w.shape[0]] = -1
    if qtype in ("fp32", "fp16"):
        return QTable(str(m.feature), qtype, int(m.dim), w.contiguous().view(torch.uint8).clone(), None, remap)
    if qtype == "int8":
        sb = w[:, -8:].contiguous().view(torch.float32).half().view(torch.uint8)
        return QTable(str(m.feature), qtype, int(m.dim), w[:, :-8].contiguous().clone(), sb.contiguous(), remap)
    return QTable(str(m.feature), qtype, int(m.dim), w[:, :-4].contiguous().clone(), w[:, -4:].contiguous().clone(), remap)


class QuantizedLookup(nn.Module):
    """Sum-pooled lookups of F tables (:class:`PackedTable`, one per feature, all of dim D).

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

    def __init__(self, tables: List[PackedTable], num_workers: int = 1,
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


def _traced(module: nn.Module) -> torch.fx.GraphModule:
    return torch.fx.GraphModule(module, Tracer().trace(module))


def _assemble_cpu(skeleton: DLRM, qtables: Mapping[str, QTable], keys: List[str]) -> CpuServingDLRM:
    m = copy.deepcopy(skeleton).cpu().eval()
    if not isinstance(m.inter_arch, InteractionArch) or m.inter_arch.F != len(keys):
        raise ValueError(f"the CPU serving model needs torchrec's InteractionArch over the {len(keys)} features, "
                         f"got {type(m.inter_arch).__name__}")
    lookup = QuantizedLookup([pack_table(qtables[f]) for f in keys])
    serving = CpuServingDLRM(_traced(m.dense_arch), PooledInteraction(len(keys)), _traced(m.over_arch), lookup, keys)
    for p in serving.parameters():
        p.requires_grad_(False)
    return serving.eval()


def _cpu_table_bytes(table: nn.Module) -> dict:
    w, mp = table.weight, table.mapping
    row = int(w.shape[1]) * w.element_size()
    rows = int(w.shape[0]) - (1 if bool(table.zero_row) else 0)
    pad = row if bool(table.zero_row) else 0
    rbytes = mp.numel() * mp.element_size()
    return {"dtype": str(table.qtype), "rows": rows, "row_bytes": row, "weights": rows * row, "padding": pad,
            "remap": int(rbytes), "total": int(rows * row + pad + rbytes)}


def _packed_tables(module: nn.Module) -> list:
    if isinstance(module, torch.jit.ScriptModule):
        return [m for _, m in module.named_modules() if m.original_name == "PackedTable"]
    return [m for m in module.modules() if isinstance(m, PackedTable)]


def cpu_option_bytes(num_original: int, num_rows: int, dim: int, dtype: str, num_mapped: Optional[int]) -> dict:
    """Bytes of one table on the CPU kernel, read from a real :class:`PackedTable` with ``num_rows``
    stored rows; ``num_mapped`` ids (of ``num_original``) have a row, None: not pruned."""
    codes = torch.zeros(num_rows, dim * BITS[dtype] // 8, dtype=torch.uint8)
    sb = None if dtype in ("fp32", "fp16") else torch.zeros(num_rows, 4, dtype=torch.uint8)
    r = None
    if num_mapped is not None:
        r = torch.full((num_original,), -1, dtype=torch.int32)
        r[:num_mapped] = torch.arange(num_mapped, dtype=torch.int32) % num_rows
    return _cpu_table_bytes(pack_table(QTable("t", dtype, dim, codes, sb, r)))


# ------------------------------------------------------------------------------------------
# TBE kernel (GPU serving)


class ServingDLRM(nn.Module):
    """A DLRM over plain tensors: forward(dense (B, Dd) float32, values (nnz,) int ids,
    lengths (F * B,) int) -> logits (B,). ``lengths`` is feature-major (all B bags of the first
    key, then the next key), keys in :attr:`keys` order; ids are cast to int32."""

    def __init__(self, model: nn.Module, keys: List[str]) -> None:
        super().__init__()
        self.model = model
        self.keys: List[str] = list(keys)

    def forward(self, dense: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        kjt = KeyedJaggedTensor(keys=self.keys, values=values.to(torch.int32), lengths=lengths.to(torch.int32))
        return self.model(dense, kjt).reshape(-1)

    def embeddings(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The pooled embeddings (B, F, D) the model sees (eager only)."""
        kjt = KeyedJaggedTensor(keys=self.keys, values=values.to(torch.int32), lengths=lengths.to(torch.int32))
        d = quant_ebc_of(self)(kjt).to_dict()
        return torch.stack([d[k] for k in self.keys], dim=1)


def quant_ebc_of(module: nn.Module) -> QuantEmbeddingBagCollection:
    for m in module.modules():
        if isinstance(m, QuantEmbeddingBagCollection):
            return m
    raise ValueError("module has no quantized torchrec EmbeddingBagCollection")


def tbe_of(module: nn.Module) -> IntNBitTableBatchedEmbeddingBagsCodegen:
    """The (single) FBGEMM TBE: every table here is sum-pooled, so torchrec makes one."""
    tbes = [m for m in module.modules() if isinstance(m, IntNBitTableBatchedEmbeddingBagsCodegen)]
    if len(tbes) != 1:
        raise ValueError(f"expected one IntNBitTableBatchedEmbeddingBagsCodegen, found {len(tbes)}")
    return tbes[0]


def _round_up(a: int, b: int) -> int:
    return (a + b - 1) // b * b


def hash_capacity(num_mapped: int) -> int:
    """Slots of a table's remap hash: round_up(mapped ids / load factor, 32), as FBGEMM rounds."""
    return _round_up(max(1, int(num_mapped / HASH_LOAD_FACTOR)), 32)


def install_remaps(tbe: IntNBitTableBatchedEmbeddingBagsCodegen, remaps: List[Optional[torch.Tensor]], kind: str) -> None:
    """Install one remap per table (TBE table order; None = no pruning) as ``array`` or ``hash``.

    A remap maps an original id to a stored row, -1 for "zero vector"."""
    if kind not in REMAP_KINDS:
        raise ValueError(f"compress.remap: {kind!r} is not valid; expected one of {', '.join(REMAP_KINDS)}")
    specs = tbe.embedding_specs
    if len(remaps) != len(specs):
        raise ValueError(f"{len(remaps)} remaps for {len(specs)} tables: give one per table (None: not pruned)")
    dev = tbe.current_device
    i32 = torch.int32
    for t, (r, spec) in enumerate(zip(remaps, specs)):
        if r is not None and int(r.max()) >= spec[1]:
            raise ValueError(f"remap of {spec[0]} points at row {int(r.max())} but the table has {spec[1]} rows")
    # clear both kinds first
    tbe.index_remapping_hash_table_cpu = None
    tbe.index_remapping_hash_table = torch.empty(0, dtype=i32, device=dev)
    tbe.index_remapping_hash_table_offsets = torch.empty(0, dtype=torch.int64, device=dev)
    tbe.index_remappings_array = torch.empty(0, dtype=i32, device=dev)
    tbe.index_remappings_array_offsets = torch.empty(0, dtype=torch.int64, device=dev)
    if all(r is None for r in remaps):
        tbe.original_rows_per_table = torch.empty(0, dtype=torch.int64, device=dev)
        return
    remaps = [None if r is None else r.to(i32).contiguous().to(dev) for r in remaps]
    if kind == "array":
        tbe.set_index_remappings_array(remaps)
        return
    # hash: same construction as FBGEMM's set_index_remappings for devices, into buffers
    remaps = [None if r is None else r.cpu() for r in remaps]
    rows = [int(s[1]) for s in specs]
    # FBGEMM sizes the table from the stored rows, assuming one id per row; with a ``mean`` or
    # ``text`` fill many ids map to rows, and inserting more keys than slots never terminates
    # (measured: a hang). Size it from the ids that have a row instead.
    caps = [hash_capacity(int((r >= 0).sum())) if r is not None else 0 for r in remaps]
    table = torch.full((sum(caps), 2), -1, dtype=i32)
    table_offsets = torch.tensor([0] + list(np.cumsum(caps)), dtype=torch.int64)
    orig = [int(r.numel()) if r is not None else n for r, n in zip(remaps, rows)]
    keys = torch.cat([torch.arange(r.numel(), dtype=i32) if r is not None else torch.empty(0, dtype=i32) for r in remaps])
    vals = torch.cat([r if r is not None else torch.empty(0, dtype=i32) for r in remaps])
    seg = torch.tensor([0] + list(np.cumsum([r.numel() if r is not None else 0 for r in remaps])), dtype=i32)
    torch.ops.fbgemm.pruned_hashmap_insert(keys, vals, seg, table, table_offsets)
    tbe.index_remapping_hash_table = table.to(dev)
    tbe.index_remapping_hash_table_offsets = table_offsets.to(dev)
    tbe.original_rows_per_table = torch.tensor([orig[t] for t in tbe.feature_table_map], dtype=torch.int64, device=dev)


def remap_kind(tbe: IntNBitTableBatchedEmbeddingBagsCodegen) -> str:
    if tbe.index_remapping_hash_table.numel() > 0:
        return "hash"
    if tbe.index_remappings_array.numel() > 0:
        return "array"
    return "none"


def _float_ebc(pruned: Mapping[str, PrunedTable], keys: List[str], dim: int, device: torch.device) -> EmbeddingBagCollection:
    tables = [
        EmbeddingBagConfig(name=table_name(f), feature_names=[f], num_embeddings=pruned[f].num_rows,
                           embedding_dim=dim, pooling=PoolingType.SUM)
        for f in keys
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=device)
    with torch.no_grad():
        for f in keys:
            ebc.embedding_bags[table_name(f)].weight.copy_(pruned[f].weight)
    return ebc


def _dense_int8(model: DLRM) -> None:
    for name in ("dense_arch", "over_arch"):
        sub = getattr(model, name)
        setattr(model, name, torch.ao.quantization.quantize_dynamic(sub, {nn.Linear}, dtype=torch.qint8))


def _quantize_tbe(model: DLRM, pruned: Mapping[str, PrunedTable], dtypes: Mapping[str, str], keys: List[str],
                  remap: str, dense_int8: bool, row_alignment: int, device: torch.device) -> ServingDLRM:
    dim = model.sparse_arch.embedding_bag_collection.embedding_bag_configs()[0].embedding_dim
    m = copy.deepcopy(model).to(device).eval()
    m.sparse_arch.embedding_bag_collection = _float_ebc(pruned, keys, dim, device)
    setattr(m.sparse_arch.embedding_bag_collection, MODULE_ATTR_ROW_ALIGNMENT_INT, row_alignment)
    quantize_inference_model(
        m, per_table_weight_dtype={table_name(f): DTYPES[dtypes[f]] for f in keys}, output_dtype=torch.float
    )
    install_remaps(tbe_of(m), [pruned[f].remap for f in keys], remap)
    if dense_int8:
        _dense_int8(m)
    for p in m.parameters():
        p.requires_grad_(False)
    serving = ServingDLRM(m, keys).eval()
    _warm_up(serving)
    return serving


def _warm_up(serving: ServingDLRM) -> None:
    """One tiny forward: torchrec's quantized EBC caches its feature order on the first call,
    which must happen before fx tracing."""
    f = len(serving.keys)
    dev = next((b.device for b in serving.model.sparse_arch.buffers()), torch.device("cpu"))
    with torch.no_grad():
        serving(torch.zeros(1, _dense_in(serving), device=dev), torch.zeros(0, dtype=torch.int64, device=dev),
                torch.zeros(f, dtype=torch.int32, device=dev))


def _dense_in(serving: ServingDLRM) -> int:
    for m in serving.model.dense_arch.modules():
        if isinstance(m, nn.Linear) or hasattr(m, "in_features"):
            return int(m.in_features)
    raise ValueError("dense arch has no linear layer")


def _assemble_tbe(skeleton: DLRM, qtables: Mapping[str, QTable], keys: List[str], remap: str, row_alignment: int,
                  device: torch.device) -> ServingDLRM:
    configs = []
    weights = {}
    for f in keys:
        q = qtables[f]
        c = EmbeddingBagConfig(name=table_name(f), feature_names=[f], num_embeddings=q.num_rows, embedding_dim=q.dim,
                               pooling=PoolingType.SUM, data_type=_NAME_TO_DATATYPE[q.dtype])
        configs.append(c)
        weights[table_name(f)] = (q.weight.to(device), None if q.scale_bias is None else q.scale_bias.to(device))
    qebc = QuantEmbeddingBagCollection(
        configs, is_weighted=False, device=device, output_dtype=torch.float,
        table_name_to_quantized_weights=weights, register_tbes=True, row_alignment=row_alignment,
        cache_features_order=True,
    )
    m = copy.deepcopy(skeleton).to(device).eval()
    m.sparse_arch.embedding_bag_collection = qebc
    install_remaps(tbe_of(m), [qtables[f].remap for f in keys], remap)
    for p in m.parameters():
        p.requires_grad_(False)
    serving = ServingDLRM(m, keys).eval()
    _warm_up(serving)
    return serving


def _scripted_tbe(sm: torch.jit.ScriptModule):
    for name, m in sm.named_modules():
        if m.original_name == "IntNBitTableBatchedEmbeddingBagsCodegen":
            return m
    raise ValueError("scripted model has no IntNBitTableBatchedEmbeddingBagsCodegen")


def _dtype_name(ty) -> str:
    v = ty.value if hasattr(ty, "value") else int(ty)
    if isinstance(v, str):
        return _SPARSE_TO_NAME[v]
    return _SPARSE_TO_NAME[SparseType.from_int(v).value]


def _remaps_from_tbe(tbe, rows: List[int]) -> List[Optional[torch.Tensor]]:
    """The per-table remaps installed on a TBE (array or hash), as (N,) int32 or None."""
    t = len(rows)
    if tbe.index_remappings_array.numel() > 0:
        off = tbe.index_remappings_array_offsets.tolist()
        arr = tbe.index_remappings_array.cpu()
        return [arr[off[i]: off[i + 1]].to(torch.int32).clone() if off[i + 1] > off[i] else None for i in range(t)]
    if tbe.index_remapping_hash_table.numel() > 0:
        off = tbe.index_remapping_hash_table_offsets.tolist()
        orig = tbe.original_rows_per_table.tolist()
        out: List[Optional[torch.Tensor]] = []
        for i in range(t):
            if off[i + 1] == off[i]:
                out.append(None)
                continue
            n = int(orig[tbe.feature_table_map.index(i)])
            ids = torch.arange(n, dtype=torch.int32)
            offsets = torch.tensor([0, n], dtype=torch.int32)
            one = tbe.index_remapping_hash_table[off[i]: off[i + 1]].cpu()
            out.append(torch.ops.fbgemm.pruned_hashmap_lookup(ids, offsets, one, torch.tensor([0, one.shape[0]])).to(torch.int32))
        return out
    return [None] * t


def _tbe_table_bytes(tbe) -> dict[str, dict]:
    specs = tbe.embedding_specs
    views = tbe.split_embedding_weights_with_scale_bias(split_scale_bias_mode=0)
    host = tbe.weights_host if tbe.host_size > 0 else tbe.weights_dev
    starts = [int(o) for o in tbe.weights_physical_offsets] + [host.numel() * host.element_size()]
    out: dict[str, dict] = {}
    arr, arr_off = tbe.index_remappings_array, tbe.index_remappings_array_offsets.tolist()
    ht, ht_off = tbe.index_remapping_hash_table, tbe.index_remapping_hash_table_offsets.tolist()
    for t, ((name, rows, _dim, ty, _loc), (view, _, _)) in enumerate(zip(specs, views)):
        wbytes = view.numel() * view.element_size()
        span = starts[t + 1] - starts[t]
        if arr.numel() > 0:
            rbytes = (arr_off[t + 1] - arr_off[t]) * arr.element_size()
        elif ht.numel() > 0:
            rbytes = (ht_off[t + 1] - ht_off[t]) * ht.shape[1] * ht.element_size()
        else:
            rbytes = 0
        out[name] = {
            "dtype": _dtype_name(ty),
            "rows": int(rows),
            "row_bytes": int(view.shape[1]) if view.dim() == 2 else 0,
            "weights": int(wbytes),
            "padding": int(span - wbytes),
            "remap": int(rbytes),
            "total": int(span + rbytes),
        }
    return out


def tbe_option_bytes(num_original: int, num_rows: int, dim: int, dtype: str, num_mapped: Optional[int], remap: str,
                     row_alignment: int = ROW_ALIGNMENT) -> dict:
    """Bytes of one table on the TBE, read from a real one-table TBE (built on CPU: same layout)."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation

    tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
        [("t", num_rows, dim, SparseType(dtype), EmbeddingLocation.HOST)], device="cpu",
        row_alignment=row_alignment, output_dtype=SparseType.FP32,
    )
    tbe.initialize_weights()
    r = None
    if num_mapped is not None:
        r = torch.full((num_original,), -1, dtype=torch.int32)
        r[:num_mapped] = torch.arange(num_mapped, dtype=torch.int32) % num_rows
    install_remaps(tbe, [r], remap)
    return _tbe_table_bytes(tbe)["t"]


# ------------------------------------------------------------------------------------------
# Either kernel


def kernel_of(serving: nn.Module) -> str:
    """The kernel of an eager or scripted serving model."""
    if isinstance(serving, torch.jit.ScriptModule):
        return KERNEL_CPU if _packed_tables(serving) else KERNEL_TBE
    return KERNEL_CPU if isinstance(serving, CpuServingDLRM) else KERNEL_TBE


def quantize_dlrm(
    model: DLRM,
    pruned: Mapping[str, PrunedTable],
    dtypes: Mapping[str, str],
    remap: str = "array",
    dense_int8: bool = False,
    row_alignment: int = ROW_ALIGNMENT,
    serve_device: str = "cpu",
    kernel: Optional[str] = None,
) -> nn.Module:
    """The compressed serving model (eager) of a trained fp32 ``model``; ``model`` is not changed.

    pruned: feature -> PrunedTable for every table; dtypes: feature -> one of fp32/fp16/int8/int4/int2.
    serve_device: ``cpu`` (:class:`CpuServingDLRM`) or ``cuda`` (:class:`ServingDLRM` on the TBE);
    ``kernel="fbgemm_tbe"`` with ``serve_device="cpu"`` builds the TBE on CPU (to compare against).
    """
    ebc = model.sparse_arch.embedding_bag_collection
    keys = [f for cfg in ebc.embedding_bag_configs() for f in cfg.feature_names]
    missing = [f for f in keys if f not in pruned or f not in dtypes]
    if missing:
        raise ValueError(f"no pruned table / dtype for features {missing}")
    for f in keys:
        if dtypes[f] not in DTYPES:
            raise ValueError(f"compress.dtype.{f}: {dtypes[f]!r} is not valid; expected one of {', '.join(DTYPES)}")
    if remap not in REMAP_KINDS:
        raise ValueError(f"compress.remap: {remap!r} is not valid; expected one of {', '.join(REMAP_KINDS)}")
    k = kernel_for(serve_device, kernel)
    if k == KERNEL_TBE:
        return _quantize_tbe(model, pruned, dtypes, keys, remap, dense_int8, row_alignment, torch.device(serve_device))
    if remap != "array":
        raise ValueError(f"compress.remap: {remap!r} needs the TBE (compress.serve_device: cuda); the CPU kernels "
                         "look pruned ids up in an array: use compress.remap: array")
    skeleton = copy.deepcopy(model).cpu().eval()
    if dense_int8:
        _dense_int8(skeleton)
    return _assemble_cpu(skeleton, qtables_of(pruned, dtypes, keys), keys)


def assemble_dlrm(
    skeleton: DLRM,
    qtables: Mapping[str, QTable],
    keys: List[str],
    remap: str = "array",
    row_alignment: int = ROW_ALIGNMENT,
    kernel: str = KERNEL_CPU,
    device: str = "cpu",
) -> nn.Module:
    """A serving model from already-quantized tables (bytes copied unchanged) and a float DLRM
    ``skeleton`` whose dense layers are used as they are (fp32 or dynamically quantized).

    Used to append rows to a compressed model without re-quantizing the existing rows."""
    k = kernel_for(device, kernel)
    if k == KERNEL_TBE:
        return _assemble_tbe(skeleton, qtables, keys, remap, row_alignment, torch.device(device))
    return _assemble_cpu(skeleton, qtables, keys)


def extract_qtables(serving: nn.Module) -> dict[str, QTable]:
    """feature -> QTable copied out of a serving model (either kernel, eager or scripted)."""
    if kernel_of(serving) == KERNEL_CPU:
        return {str(m.feature): unpack_table(m) for m in _packed_tables(serving)}
    tbe = tbe_of(serving) if not isinstance(serving, torch.jit.ScriptModule) else _scripted_tbe(serving)
    specs = tbe.embedding_specs
    weights = tbe.split_embedding_weights()
    remaps = _remaps_from_tbe(tbe, [int(s[1]) for s in specs])
    out = {}
    for (name, _rows, dim, ty, _loc), (w, sb), r in zip(specs, weights, remaps):
        feat = name[2:] if name.startswith("t_") else name
        out[feat] = QTable(feat, _dtype_name(ty), int(dim), w.cpu().clone(), None if sb is None else sb.cpu().clone(), r)
    return out


def script_model(serving: nn.Module) -> torch.jit.ScriptModule:
    """TorchScript of a serving model (the TBE one through torchrec's fx Tracer, TBE kept a leaf)."""
    if isinstance(serving, CpuServingDLRM):
        return torch.jit.script(serving)
    graph = Tracer(leaf_modules=LEAF_MODULES).trace(serving)
    gm = torch.fx.GraphModule(serving, graph)
    return torch.jit.script(gm)


def table_bytes(module: nn.Module) -> dict[str, dict]:
    """Real storage per table of a compressed model (eager), read from its buffers.

    table -> {"dtype", "rows" (stored), "row_bytes" (incl. scale/bias and row padding),
    "weights" (rows x row_bytes), "padding" (TBE: bytes up to the next table's 128-byte aligned
    start; CPU kernel: the extra zero row of a pruned fp16/fp32 table), "remap" (the remap array
    or hash table slice), "total"}. Sums of weights + padding and of remap are the model's
    weight and remap buffer bytes."""
    if kernel_of(module) == KERNEL_CPU:
        return {table_name(str(m.feature)): _cpu_table_bytes(m) for m in _packed_tables(module)}
    return _tbe_table_bytes(tbe_of(module))


def option_bytes(num_original: int, num_rows: int, dim: int, dtype: str, num_mapped: Optional[int], remap: str,
                 row_alignment: int = ROW_ALIGNMENT, kernel: str = KERNEL_CPU) -> dict:
    """Real bytes of a table with ``num_rows`` stored rows on ``kernel``: the table_bytes dict."""
    if kernel == KERNEL_CPU:
        return cpu_option_bytes(num_original, num_rows, dim, dtype, num_mapped)
    return tbe_option_bytes(num_original, num_rows, dim, dtype, num_mapped, remap, row_alignment)


def remap_buffer_bytes(module: nn.Module) -> int:
    """Bytes of the remap buffers (array, hash table or mappings; not their small offset arrays)."""
    return sum(v["remap"] for v in table_bytes(module).values())


def float_table_bytes(model: nn.Module) -> dict[str, dict]:
    """Storage per table of an fp32 torchrec EBC (the trained model), same keys as :func:`table_bytes`."""
    out = {}
    for m in model.modules():
        if isinstance(m, EmbeddingBagCollection):
            for name, bag in m.embedding_bags.items():
                w = bag.weight
                b = w.numel() * w.element_size()
                out[name] = {"dtype": "fp32", "rows": int(w.shape[0]), "row_bytes": int(w.shape[1] * w.element_size()),
                             "weights": int(b), "padding": 0, "remap": 0, "total": int(b)}
    return out


def dense_bytes(module: nn.Module) -> int:
    """Bytes of the dense layers' parameters (packed int8 weights counted by their state)."""
    total = 0
    for k, v in module.state_dict().items():
        if ".tbes." in k or "embedding_bag" in k or k.startswith("lookup."):
            continue
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
        elif isinstance(v, tuple):  # packed params of dynamic int8 Linear: (weight, bias)
            for x in v:
                if isinstance(x, torch.Tensor):
                    total += (x.int_repr() if x.is_quantized else x).numel() * (1 if x.is_quantized else x.element_size())
    return total


def total_mb(per_table: Mapping[str, dict], keys: Iterable[str] = ("total",)) -> float:
    return sum(v[k] for v in per_table.values() for k in keys) / 1e6
