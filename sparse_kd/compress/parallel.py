"""Run a quantized torchrec embedding-bag lookup on several CPU cores.

FBGEMM 1.8's CPU kernel for ``IntNBitTableBatchedEmbeddingBagsCodegen``
(``int_nbit_split_embedding_codegen_forward_*_cpu``) walks the tables one after the other on
the calling thread: a second intra-op thread buys nothing (only the output ``fill_(0)`` and
the array index remap use ``at::parallel_for``). This module cuts one lookup into work items
and runs them at once:

* ``tables`` split: contiguous groups of features, one kernel call per group, the groups
  balanced by an estimate of their cost (cache lines per row). The kernel reads the same
  ``weights_host`` buffer through sliced ``weights_offsets`` / ``D_offsets``: nothing is
  copied, and every output element is produced by the same FBGEMM routine on the same rows
  in the same order as the serial call, so the result is bit-identical.
* ``batch`` split (when there are fewer features than workers, or the groups would be
  lopsided): each worker takes a contiguous range of samples and calls the kernel once per
  feature on that feature's ids for those samples (a view) with rebased offsets; the
  shards' outputs are stacked.

Items are dispatched with ``torch.jit.fork`` / ``torch.jit.wait`` when scripted (TorchScript's
inter-op thread pool, ``torch.get_num_interop_threads()``) and with a Python thread pool in
eager mode (FBGEMM ops release the GIL; eager ``torch.jit.fork`` would run inline). The caller
thread always runs the first item itself. Each item also runs, on its own ids, the bounds
checks and the array index remap (pruning) that the TBE's own ``forward`` runs on the whole
batch (with the same rows and remap arrays, so the same result); only a hash-map remap, which
cannot be cut by feature, runs once before the split.

Usage::

    qebc = torchrec.quant.embedding_modules.EmbeddingBagCollection.from_float(ebc)
    pebc = ParallelQuantEmbeddingBagCollection(qebc, num_workers=2)
    kt = pebc(kjt)                      # same KeyedTensor as qebc(kjt)
    scripted = torch.jit.script(pebc)   # forks on the inter-op pool

    model = parallelize_quant_ebcs(quant_model, num_workers=2)   # swaps in place
    gm = torchrec.fx.symbolic_trace(model, leaf_modules=LEAF_MODULES)
    served = torch.jit.script(gm)

The number of workers is fixed per module (TorchScript cannot read ``torch.get_num_threads()``);
change it with :meth:`set_num_workers`, also on a scripted module. With 1 worker, or a batch
smaller than ``min_ids_per_worker`` ids per worker, the module calls the TBE unchanged.
"""

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

# fbgemm_gpu registers the torch.ops.fbgemm operators on import.
import fbgemm_gpu  # noqa: F401
from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
    BoundsCheckMode,
    PoolingMode,
)
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import (
    IntNBitTableBatchedEmbeddingBagsCodegen,
    rounded_row_size_in_bytes,
)
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

__all__ = [
    "LEAF_MODULES",
    "ParallelTBELookup",
    "ParallelQuantEmbeddingBagCollection",
    "parallelize_quant_ebcs",
    "plan_contiguous_groups",
]

#: Module class names to keep as leaves when FX-tracing a model that holds parallel lookups,
#: e.g. ``torchrec.fx.symbolic_trace(model, leaf_modules=LEAF_MODULES)``.
LEAF_MODULES: List[str] = ["IntNBitTableBatchedEmbeddingBagsCodegen", "ParallelTBELookup"]

_SPLITS = ("auto", "tables", "batch")

_POOL_LOCK = threading.Lock()
_POOL: Optional[ThreadPoolExecutor] = None
_POOL_SIZE = 0


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool with at least ``workers`` threads (eager-mode dispatch)."""
    global _POOL, _POOL_SIZE
    with _POOL_LOCK:
        if _POOL is None or _POOL_SIZE < workers:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sparse_kd_lookup")
            _POOL_SIZE = workers
        return _POOL


# FX leaves, as in torchrec.quant.embedding_modules (torch.fx.wrap patches the globals of the
# module that calls it, so torchrec's own wrapped helpers cannot be reused from here).
@torch.fx.wrap
def _kjt_keys(features: KeyedJaggedTensor) -> List[str]:
    return features.keys()


@torch.fx.wrap
def _permute_features(features: KeyedJaggedTensor, order: List[int]) -> KeyedJaggedTensor:
    if order == list(range(len(order))):
        return features.flatten_lengths()
    return features.permute(order)


@torch.fx.wrap
def _unwrap_kjt(features: KeyedJaggedTensor) -> Tuple[Tensor, Tensor]:
    indices = features.values()
    offsets = features.offsets()
    if features.device().type == "cpu":
        return indices, offsets.type(dtype=indices.dtype)
    return indices.int(), offsets.int()


@torch.fx.wrap
def _cat_pooled(embeddings: List[Tensor]) -> Tensor:
    return embeddings[0] if len(embeddings) == 1 else torch.cat(embeddings, dim=1)


def plan_contiguous_groups(costs: List[float], groups: int) -> List[int]:
    """Split ``costs`` into at most ``groups`` contiguous runs minimising the largest run sum.

    Returns the boundaries ``[0, ..., len(costs)]`` (exact dynamic programme; T is small).
    """
    n = len(costs)
    k = max(1, min(groups, n))
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[j][i]: minimal max-run over the first i items cut into j runs; cut[j][i]: last cut.
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            for p in range(j - 1, i):
                v = max(best[j - 1][p], prefix[i] - prefix[p])
                if v < best[j][i]:
                    best[j][i] = v
                    cut[j][i] = p
    bounds = [n]
    i = n
    for j in range(k, 0, -1):
        i = cut[j][i]
        bounds.append(i)
    return bounds[::-1]


class ParallelTBELookup(nn.Module):
    """One FBGEMM inference TBE's pooled lookup, split across ``num_workers`` threads.

    ``forward(indices, offsets, per_sample_weights=None)`` takes and returns exactly what
    ``tbe.forward`` does (``[B, total_D]``), bit-identical. The TBE stays a registered
    submodule (``self.tbe``) and is read at call time, so later
    ``set_index_remappings_array`` / ``set_index_remappings`` calls on it are honoured.

    Args:
        tbe: a CPU ``IntNBitTableBatchedEmbeddingBagsCodegen`` (pooling SUM or MEAN).
        num_workers: threads per lookup (default ``torch.get_num_threads()``).
        split: ``"tables"``, ``"batch"`` or ``"auto"`` (tables when the feature groups are
            balanced within ``balance_tolerance``, else batch).
        min_ids_per_worker: below this many ids per worker the lookup runs serially.
        feature_weights: relative ids per sample of each feature (default all 1), used only
            to balance the table groups.
    """

    def __init__(
        self,
        tbe: IntNBitTableBatchedEmbeddingBagsCodegen,
        num_workers: Optional[int] = None,
        split: str = "auto",
        min_ids_per_worker: int = 4096,
        feature_weights: Optional[List[float]] = None,
        balance_tolerance: float = 1.15,
    ) -> None:
        super().__init__()
        if split not in _SPLITS:
            raise ValueError(f"split: {split!r} is not valid; expected one of {', '.join(_SPLITS)}")
        self.tbe = tbe
        T = int(tbe.D_offsets.numel()) - 1
        self.num_features: int = T
        self.split: str = split
        self.min_ids_per_worker: int = int(min_ids_per_worker)
        self.balance_tolerance: float = float(balance_tolerance)
        # Parallel dispatch only where it is the plain CPU kernel; anything else (GPU, UVM
        # cache, no-bag) goes straight to the TBE.
        self.supported: bool = bool(
            tbe.use_cpu
            and int(tbe.pooling_mode) != int(PoolingMode.NONE)
            and tbe.lxu_cache_weights.numel() == 0
            and tbe.weights_host.numel() > 0
        )
        d_offsets = [int(x) for x in tbe.D_offsets.tolist()]
        self._d_offsets: List[int] = d_offsets
        w_offsets = [int(x) for x in tbe.weights_offsets.tolist()]
        row_bytes: List[int] = []
        ends: List[int] = []
        for t in range(T):
            _name, rows, dim, ty, _loc = tbe.embedding_specs[tbe.feature_table_map[t]]
            rb = rounded_row_size_in_bytes(dim, ty, tbe.row_alignment, tbe.scale_bias_size_in_bytes)
            row_bytes.append(int(rb))
            ends.append(w_offsets[t] + int(rows) * int(rb))
        self.row_bytes: List[int] = row_bytes
        # End (exclusive) of each feature's rows in weights_host: a group's kernel call sees
        # weights_host cut at its last table's end, so the kernel derives the same row
        # counts (and bounds) as in the serial call.
        self._weight_ends: List[int] = ends
        weights = feature_weights if feature_weights is not None else [1.0] * T
        if len(weights) != T:
            raise ValueError(f"feature_weights: expected {T} values (one per feature), got {len(weights)}")
        # Cost of one id: a fixed part plus the 64-byte cache lines its row spans.
        self._costs: List[float] = [float(w) * (1.0 + rb / 64.0) for w, rb in zip(weights, row_bytes)]
        # plans[k - 1]: boundaries of k contiguous feature groups, k = 1..T.
        self._plans: List[List[int]] = [plan_contiguous_groups(self._costs, k) for k in range(1, T + 1)]
        self._balanced: List[bool] = []
        total = sum(self._costs)
        for k in range(1, T + 1):
            b = self._plans[k - 1]
            worst = max(sum(self._costs[b[i]:b[i + 1]]) for i in range(len(b) - 1))
            self._balanced.append(len(b) - 1 == k and worst <= self.balance_tolerance * total / k)
        self._empty_locations = torch.empty(0, dtype=torch.int32)
        self.num_workers: int = 1
        self.set_num_workers(num_workers if num_workers is not None else torch.get_num_threads())

    @torch.jit.export
    def set_num_workers(self, num_workers: int) -> None:
        """Threads per lookup from now on (1: plain serial TBE call)."""
        self.num_workers = max(1, int(num_workers))

    @torch.jit.export
    def work_items(self, batch_size: int) -> List[List[int]]:
        """The ``[first feature, end feature, first sample, end sample]`` items of a lookup."""
        n = self.num_workers
        T = self.num_features
        use_tables = self.split == "tables" or (self.split == "auto" and n <= T and self._balanced[n - 1])
        items: List[List[int]] = []
        if use_tables:
            b = self._plans[min(n, T) - 1]
            for i in range(len(b) - 1):
                items.append([b[i], b[i + 1], 0, batch_size])
        else:
            shards = min(n, batch_size)
            for s in range(shards):
                b0 = (batch_size * s) // shards
                b1 = (batch_size * (s + 1)) // shards
                items.append([0, T, b0, b1])
        return items

    def _kernel(self, indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor], fa: int, fb: int) -> Tensor:
        """FBGEMM's pooled kernel on features [fa, fb): ``offsets`` are theirs, rebased to ``indices``."""
        tbe = self.tbe
        d0 = self._d_offsets[fa]
        end = self._weight_ends[fa]
        for t in range(fa + 1, fb):
            if self._weight_ends[t] > end:
                end = self._weight_ends[t]
        return torch.ops.fbgemm.int_nbit_split_embedding_codegen_lookup_function(
            dev_weights=tbe.weights_host[:end],
            uvm_weights=tbe.weights_uvm,
            weights_placements=tbe.weights_placements[fa:fb],
            weights_offsets=tbe.weights_offsets[fa:fb],
            weights_tys=tbe.weights_tys[fa:fb],
            D_offsets=tbe.D_offsets[fa : fb + 1] - d0,
            total_D=self._d_offsets[fb] - d0,
            max_int2_D=tbe.max_int2_D,
            max_int4_D=tbe.max_int4_D,
            max_int8_D=tbe.max_int8_D,
            max_float16_D=tbe.max_float16_D,
            max_float32_D=tbe.max_float32_D,
            indices=indices,
            offsets=offsets,
            pooling_mode=int(tbe.pooling_mode),
            indice_weights=per_sample_weights,
            output_dtype=tbe.output_dtype,
            lxu_cache_weights=tbe.lxu_cache_weights,
            lxu_cache_locations=self._empty_locations,
            row_alignment=tbe.row_alignment,
            max_float8_D=tbe.max_float8_D,
            fp8_exponent_bits=tbe.fp8_exponent_bits,
            fp8_exponent_bias=tbe.fp8_exponent_bias,
        )

    def _hash_remap(self) -> bool:
        """A hash-map remap cannot be cut by feature: it then runs once, before the split."""
        tbe = self.tbe
        return tbe.index_remapping_hash_table_cpu is not None or tbe.index_remapping_hash_table.numel() > 0

    def _prepare(
        self,
        indices: Tensor,
        offsets: Tensor,
        per_sample_weights: Optional[Tensor],
        fa: int,
        fb: int,
        whole: bool,
    ) -> Tensor:
        """Bounds checks and index remapping of features [fa, fb) exactly as
        ``IntNBitTableBatchedEmbeddingBagsCodegen._forward_impl`` does them for all features
        (``whole``: the full batch, hash remaps allowed)."""
        tbe = self.tbe
        check = tbe.bounds_check_mode_int != BoundsCheckMode.NONE.value
        has_array = tbe.index_remappings_array.numel() > 0
        if check and (has_array or (whole and self._hash_remap())):
            torch.ops.fbgemm.bounds_check_indices(
                tbe.original_rows_per_table[fa:fb],
                indices,
                offsets,
                tbe.bounds_check_mode_int,
                tbe.bounds_check_warning,
                per_sample_weights,
                bounds_check_version=tbe.bounds_check_version,
            )
        hash_cpu = tbe.index_remapping_hash_table_cpu
        if whole and hash_cpu is not None:
            indices = hash_cpu.lookup(indices, offsets)
        elif whole and tbe.index_remapping_hash_table.numel() > 0:
            indices = torch.ops.fbgemm.pruned_hashmap_lookup(
                indices, offsets, tbe.index_remapping_hash_table, tbe.index_remapping_hash_table_offsets
            )
        elif has_array:
            indices = torch.ops.fbgemm.pruned_array_lookup(
                indices, offsets, tbe.index_remappings_array, tbe.index_remappings_array_offsets[fa : fb + 1]
            )
        if check:
            torch.ops.fbgemm.bounds_check_indices(
                tbe.rows_per_table[fa:fb],
                indices,
                offsets,
                tbe.bounds_check_mode_int,
                tbe.bounds_check_warning,
                per_sample_weights,
                bounds_check_version=tbe.bounds_check_version,
            )
        return indices

    def _call(
        self,
        indices: Tensor,
        offsets: Tensor,
        per_sample_weights: Optional[Tensor],
        fa: int,
        fb: int,
        o0: int,
        o1: int,
        prepared: bool,
    ) -> Tensor:
        """Bags ``o0..o1`` of ``offsets`` (whole features fa..fb-1, or a run of bags of feature
        fa): cut their ids out (a view), rebase their offsets, check, remap and look them up."""
        off = offsets[o0 : o1 + 1]
        s = int(off[0])
        e = int(off[-1])
        idx = indices[s:e]
        off = off - s
        w: Optional[Tensor] = None
        if per_sample_weights is not None:
            w = per_sample_weights[s:e]
        if not prepared:
            idx = self._prepare(idx, off, w, fa, fb, False)
        return self._kernel(idx, off, w, fa, fb)

    def _run_item(
        self,
        indices: Tensor,
        offsets: Tensor,
        per_sample_weights: Optional[Tensor],
        item: List[int],
        batch_size: int,
        prepared: bool,
    ) -> Tensor:
        fa, fb, b0, b1 = item[0], item[1], item[2], item[3]
        B = batch_size
        if b0 == 0 and b1 == B:
            return self._call(indices, offsets, per_sample_weights, fa, fb, fa * B, fb * B, prepared)
        outs: List[Tensor] = []
        for t in range(fa, fb):
            outs.append(
                self._call(indices, offsets, per_sample_weights, t, t + 1, t * B + b0, t * B + b1, prepared)
            )
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    @torch.jit.unused
    def _dispatch_threads(
        self,
        indices: Tensor,
        offsets: Tensor,
        per_sample_weights: Optional[Tensor],
        items: List[List[int]],
        batch_size: int,
        prepared: bool,
    ) -> List[Tensor]:
        pool = _thread_pool(len(items) - 1)
        futures = [
            pool.submit(self._run_item, indices, offsets, per_sample_weights, item, batch_size, prepared)
            for item in items[1:]
        ]
        first = self._run_item(indices, offsets, per_sample_weights, items[0], batch_size, prepared)
        return [first] + [f.result() for f in futures]

    def forward(self, indices: Tensor, offsets: Tensor, per_sample_weights: Optional[Tensor] = None) -> Tensor:
        T = self.num_features
        n = self.num_workers
        if (
            n <= 1
            or not self.supported
            or indices.numel() < n * self.min_ids_per_worker
            or indices.device.type != "cpu"
            or offsets.device.type != "cpu"
        ):
            return self.tbe(indices, offsets, per_sample_weights)
        B = (offsets.numel() - 1) // T
        items = self.work_items(B)
        if len(items) <= 1:
            return self.tbe(indices, offsets, per_sample_weights)
        # Checks and array remaps run inside each item, on its own features; a hash remap first.
        prepared = self._hash_remap()
        if prepared:
            indices = self._prepare(indices, offsets, per_sample_weights, 0, T, True)
        if torch.jit.is_scripting():
            futures: List[torch.jit.Future[Tensor]] = []
            for i in range(1, len(items)):
                futures.append(
                    torch.jit.fork(self._run_item, indices, offsets, per_sample_weights, items[i], B, prepared)
                )
            outs: List[Tensor] = [self._run_item(indices, offsets, per_sample_weights, items[0], B, prepared)]
            for fut in futures:
                outs.append(torch.jit.wait(fut))
        else:
            outs = self._dispatch_threads(indices, offsets, per_sample_weights, items, B, prepared)
        if items[0][2] == 0 and items[0][3] == B:
            return torch.cat(outs, dim=1)  # feature groups side by side
        return torch.cat(outs, dim=0)  # sample shards stacked


class ParallelQuantEmbeddingBagCollection(nn.Module):
    """A quantized torchrec ``EmbeddingBagCollection`` whose TBE lookups run on several threads.

    ``forward(features: KeyedJaggedTensor) -> KeyedTensor`` returns the same keys, lengths and
    (bit-identical) values as ``qebc(features)``. The TBEs and their weights are shared with
    ``qebc``, not copied. Scriptable with ``torch.jit.script``; for FX tracing pass
    :data:`LEAF_MODULES` as leaf modules.
    """

    def __init__(
        self,
        qebc: QuantEmbeddingBagCollection,
        num_workers: Optional[int] = None,
        split: str = "auto",
        min_ids_per_worker: int = 4096,
    ) -> None:
        super().__init__()
        if not isinstance(qebc, QuantEmbeddingBagCollection):
            raise TypeError(
                f"expected a torchrec.quant.embedding_modules.EmbeddingBagCollection, got {type(qebc).__name__}"
            )
        self._is_weighted: bool = qebc.is_weighted()
        self._feature_names: List[str] = list(qebc._feature_names)
        self._feature_splits: List[int] = list(qebc._feature_splits)
        self._embedding_names: List[str] = list(qebc._embedding_names)
        self._length_per_key: List[int] = list(qebc._length_per_key)
        self._embedding_bag_configs = qebc.embedding_bag_configs()
        self._output_dtype = qebc.output_dtype()
        self.lookups = nn.ModuleList(
            [
                ParallelTBELookup(tbe, num_workers=num_workers, split=split, min_ids_per_worker=min_ids_per_worker)
                for tbe in qebc._emb_modules
            ]
        )

    @torch.jit.export
    def set_num_workers(self, num_workers: int) -> None:
        for lookup in self.lookups:
            lookup.set_num_workers(num_workers)

    @torch.jit.ignore
    def embedding_bag_configs(self):  # noqa: ANN201 - torchrec's config list
        return self._embedding_bag_configs

    @torch.jit.export
    def is_weighted(self) -> bool:
        return self._is_weighted

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        # Mirrors torchrec.quant.embedding_modules.EmbeddingBagCollection.forward (the FX-wrapped
        # helpers keep it traceable) with the TBE call replaced by the parallel lookup.
        kjt_keys = _kjt_keys(features)
        kjt_permute_order = [kjt_keys.index(k) for k in self._feature_names]
        kjt_permute = _permute_features(features, kjt_permute_order)
        kjts_per_key = kjt_permute.split(self._feature_splits)
        embeddings: List[Tensor] = []
        for i, lookup in enumerate(self.lookups):
            f = kjts_per_key[i]
            indices, offsets = _unwrap_kjt(f)
            embeddings.append(lookup(indices, offsets, f.weights() if self._is_weighted else None))
        return KeyedTensor(
            keys=self._embedding_names,
            values=_cat_pooled(embeddings),
            length_per_key=self._length_per_key,
        )


def parallelize_quant_ebcs(
    model: nn.Module,
    num_workers: Optional[int] = None,
    split: str = "auto",
    min_ids_per_worker: int = 4096,
) -> nn.Module:
    """Replace, in place, every quantized ``EmbeddingBagCollection`` inside ``model`` by a
    :class:`ParallelQuantEmbeddingBagCollection` (a quantized EBC passed as ``model`` itself is
    wrapped and returned). Returns ``model``."""

    def wrap(m: nn.Module) -> nn.Module:
        return ParallelQuantEmbeddingBagCollection(
            m, num_workers=num_workers, split=split, min_ids_per_worker=min_ids_per_worker
        )

    if type(model) is QuantEmbeddingBagCollection:
        return wrap(model)
    for name, child in list(model.named_children()):
        if type(child) is QuantEmbeddingBagCollection:
            setattr(model, name, wrap(child))
        else:
            parallelize_quant_ebcs(child, num_workers, split, min_ids_per_worker)
    return model
