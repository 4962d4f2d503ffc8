"""The GPU serving kernel: the DLRM on torchrec's quantized EBC over one FBGEMM TBE, with remaps.

Notation: B batch, F sparse features, D embedding dim, N original rows, R stored rows.

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
"""

# no "from __future__ import annotations": fx writes string annotations into the traced code, which TorchScript cannot read

import copy
from typing import List, Mapping, Optional

import numpy as np
import torch
from torch import nn

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm: prune, hash remaps, TBE)
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen
from torchrec.inference.modules import quantize_inference_model
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import (
    MODULE_ATTR_ROW_ALIGNMENT_INT,
    EmbeddingBagCollection as QuantEmbeddingBagCollection,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from sparse_kd.compress.prune import PrunedTable
from sparse_kd.compress.rows import DTYPES, QTable, quantize_dense_layers, table_name

_SPARSE_TO_NAME = {SparseType.FP32.value: "fp32", SparseType.FP16.value: "fp16", SparseType.INT8.value: "int8",
                   SparseType.INT4.value: "int4", SparseType.INT2.value: "int2"}


_NAME_TO_DATATYPE = {"fp32": DataType.FP32, "fp16": DataType.FP16, "int8": DataType.INT8, "int4": DataType.INT4,
                     "int2": DataType.INT2}


REMAP_KINDS = ("array", "hash")


HASH_LOAD_FACTOR = 0.5


ROW_ALIGNMENT = 16


LEAF_MODULES = ["IntNBitTableBatchedEmbeddingBagsCodegen"]



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



def quantize_tbe(model: DLRM, pruned: Mapping[str, PrunedTable], dtypes: Mapping[str, str], keys: List[str],
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
        quantize_dense_layers(m)
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



def assemble_tbe(skeleton: DLRM, qtables: Mapping[str, QTable], keys: List[str], remap: str, row_alignment: int,
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



def scripted_tbe(sm: torch.jit.ScriptModule):
    for name, m in sm.named_modules():
        if m.original_name == "IntNBitTableBatchedEmbeddingBagsCodegen":
            return m
    raise ValueError("scripted model has no IntNBitTableBatchedEmbeddingBagsCodegen")



def dtype_name(ty) -> str:
    v = ty.value if hasattr(ty, "value") else int(ty)
    if isinstance(v, str):
        return _SPARSE_TO_NAME[v]
    return _SPARSE_TO_NAME[SparseType.from_int(v).value]



def remaps_from_tbe(tbe, rows: List[int]) -> List[Optional[torch.Tensor]]:
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



def tbe_table_bytes(tbe) -> dict[str, dict]:
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
            "dtype": dtype_name(ty),
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
    return tbe_table_bytes(tbe)["t"]

