"""Quantize pruned tables onto FBGEMM's inference kernel and wrap the DLRM for serving.

Notation: B batch, F sparse features (one table each, named ``t_<feature>``), D embedding dim,
N original rows of a table, R stored rows, Dd dense input dim.

Pipeline (:func:`quantize_dlrm`): the trained fp32 DLRM gets a fresh float
``EmbeddingBagCollection`` holding each table's R stored rows (:class:`~.prune.PrunedTable`),
then ``torchrec.inference.modules.quantize_inference_model(per_table_weight_dtype=...)`` swaps it
for torchrec's quantized EBC, which packs every table (one dtype each: fp32, fp16, int8, int4,
int2) into one FBGEMM ``IntNBitTableBatchedEmbeddingBagsCodegen`` (TBE). The remaps are then
installed on that TBE (:func:`install_remaps`):

``array``  ``tbe.set_index_remappings_array``: an int32 array of N entries per pruned table.
``hash``   FBGEMM's open-addressing hash table (``pruned_hashmap_insert`` / ``pruned_hashmap_lookup``)
           in the TBE's ``index_remapping_hash_table`` buffers: 2 int32 per slot,
           ``round_up(M / 0.5, 32)`` slots per pruned table, M = ids that have a row (K for the
           ``zero`` fill, all N for ``mean``), so with ``zero`` it is smaller than the array below
           a keep ratio of about 1/4, and never with ``mean``. FBGEMM itself sizes the table from
           the stored rows R, which assumes one id per row: with ``mean`` (M = N > 2R) the
           insertion never terminates (measured: a hang); this module sizes it from M.
           FBGEMM's own CPU path (``set_index_remappings(..., use_array_for_index_remapping=False)``)
           keeps the map in a ``PrunedMapCPU`` script object, which TorchScript does not save: a
           reloaded model silently lost its remap (measured), so this module fills the buffer
           variant (FBGEMM's GPU layout, whose lookup also runs on CPU), which is saved.

Both give identical lookups. Tables kept whole get no remap. Dense layers stay fp32 unless
``dense_int8`` (``torch.ao.quantization.quantize_dynamic`` on every ``nn.Linear``; off by default:
the dense layers are small next to the tables; ``sparse-kd compress CONFIG compress.dense_int8=true``
reports its bytes and AUC).

Quantized rows (FBGEMM's layout): int8/int4/int2 rows carry an fp16 scale and bias (4 bytes)
before the packed codes; every row is padded to ``row_alignment`` bytes (16, torchrec's
default); each table starts on a 128-byte boundary. :func:`table_bytes` reads the real sizes
from the TBE's buffers. At D = 16 the 16-byte padding makes int8 rows as large as fp16 (32 bytes:
20 used) and int2 rows as large as int4 (16 bytes: 12 / 8 used); ``row_alignment=1`` gives
20 / 12 / 8 bytes and the CPU kernel's lookups are unchanged (tested exact against dequantized
rows for alignments 1, 4, 8, 16; GPU kernels want 16). ``sparse-kd compress`` prints the bytes
of every table.

:class:`ServingDLRM` is the model a serving process runs: ``forward(dense, values, lengths)``
with plain tensors (it builds the ``KeyedJaggedTensor`` inside, with int32 ids), returning
logits (B,). :func:`script_model` traces it with ``torchrec.fx.Tracer`` (the TBE stays a leaf)
and scripts it; the result saves and loads with ``torch.jit`` and needs only ``torch`` and
``fbgemm_gpu`` (for its operators) to run.
"""

# no "from __future__ import annotations": fx writes string annotations into the traced code, which TorchScript cannot read

import copy
from dataclasses import dataclass
from typing import Iterable, List, Mapping, Optional

import numpy as np
import torch
from torch import nn

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen
from torchrec.fx import Tracer
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


def table_name(feature: str) -> str:
    return f"t_{feature}"


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


# ------------------------------------------------------------------------------------------
# Remaps


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
    remaps = [None if r is None else r.to(i32).contiguous() for r in remaps]
    if kind == "array":
        tbe.set_index_remappings_array(remaps)
        return
    # hash: same construction as FBGEMM's set_index_remappings for devices, into buffers
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


# ------------------------------------------------------------------------------------------
# Building the quantized model


def _float_ebc(pruned: Mapping[str, PrunedTable], keys: List[str], dim: int) -> EmbeddingBagCollection:
    tables = [
        EmbeddingBagConfig(name=table_name(f), feature_names=[f], num_embeddings=pruned[f].num_rows,
                           embedding_dim=dim, pooling=PoolingType.SUM)
        for f in keys
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("cpu"))
    with torch.no_grad():
        for f in keys:
            ebc.embedding_bags[table_name(f)].weight.copy_(pruned[f].weight)
    return ebc


def _dense_int8(model: DLRM) -> None:
    for name in ("dense_arch", "over_arch"):
        sub = getattr(model, name)
        setattr(model, name, torch.ao.quantization.quantize_dynamic(sub, {nn.Linear}, dtype=torch.qint8))


def quantize_dlrm(
    model: DLRM,
    pruned: Mapping[str, PrunedTable],
    dtypes: Mapping[str, str],
    remap: str = "array",
    dense_int8: bool = False,
    row_alignment: int = ROW_ALIGNMENT,
) -> ServingDLRM:
    """The compressed serving model (eager) of a trained fp32 ``model``; ``model`` is not changed.

    pruned: feature -> PrunedTable for every table; dtypes: feature -> one of fp32/fp16/int8/int4/int2.
    """
    ebc = model.sparse_arch.embedding_bag_collection
    keys = [f for cfg in ebc.embedding_bag_configs() for f in cfg.feature_names]
    dim = ebc.embedding_bag_configs()[0].embedding_dim
    missing = [f for f in keys if f not in pruned or f not in dtypes]
    if missing:
        raise ValueError(f"no pruned table / dtype for features {missing}")
    for f in keys:
        if dtypes[f] not in DTYPES:
            raise ValueError(f"compress.dtype.{f}: {dtypes[f]!r} is not valid; expected one of {', '.join(DTYPES)}")
    m = copy.deepcopy(model).cpu().eval()
    m.sparse_arch.embedding_bag_collection = _float_ebc(pruned, keys, dim)
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
    dense_in = _dense_in(serving)
    with torch.no_grad():
        serving(torch.zeros(1, dense_in), torch.zeros(0, dtype=torch.int64), torch.zeros(f, dtype=torch.int32))


def _dense_in(serving: ServingDLRM) -> int:
    for m in serving.model.dense_arch.modules():
        if isinstance(m, nn.Linear) or hasattr(m, "in_features"):
            return int(m.in_features)
    raise ValueError("dense arch has no linear layer")


@dataclass
class QTable:
    """A quantized table as FBGEMM stores it: weight (R, packed bytes) uint8 codes,
    scale_bias (R, 4) uint8 (fp16 scale, fp16 bias) or None for fp32/fp16; remap (N,) or None."""

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
    rows = rows.detach().float().contiguous()
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


def extract_qtables(serving: nn.Module) -> dict[str, QTable]:
    """feature -> QTable copied out of the model's TBE (works on the eager and the scripted model)."""
    tbe = tbe_of(serving) if not isinstance(serving, torch.jit.ScriptModule) else _scripted_tbe(serving)
    specs = tbe.embedding_specs
    weights = tbe.split_embedding_weights()
    remaps = _remaps_from_tbe(tbe, [int(s[1]) for s in specs])
    out = {}
    for (name, _rows, dim, ty, _loc), (w, sb), r in zip(specs, weights, remaps):
        feat = name[2:] if name.startswith("t_") else name
        dt = _dtype_name(ty)
        out[feat] = QTable(feat, dt, int(dim), w.clone(), None if sb is None else sb.clone(), r)
    return out


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
        arr = tbe.index_remappings_array
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
            one = tbe.index_remapping_hash_table[off[i]: off[i + 1]]
            out.append(torch.ops.fbgemm.pruned_hashmap_lookup(ids, offsets, one, torch.tensor([0, one.shape[0]])).to(torch.int32))
        return out
    return [None] * t


def assemble_dlrm(
    skeleton: DLRM,
    qtables: Mapping[str, QTable],
    keys: List[str],
    remap: str = "array",
    row_alignment: int = ROW_ALIGNMENT,
) -> ServingDLRM:
    """A serving model from already-quantized tables (bytes copied unchanged) and a float DLRM
    ``skeleton`` whose dense layers are used as they are (fp32 or dynamically quantized).

    Used to append rows to a compressed model without re-quantizing the existing rows."""
    configs = []
    weights = {}
    for f in keys:
        q = qtables[f]
        c = EmbeddingBagConfig(name=table_name(f), feature_names=[f], num_embeddings=q.num_rows, embedding_dim=q.dim,
                               pooling=PoolingType.SUM, data_type=_NAME_TO_DATATYPE[q.dtype])
        configs.append(c)
        weights[table_name(f)] = (q.weight, q.scale_bias)
    qebc = QuantEmbeddingBagCollection(
        configs, is_weighted=False, device=torch.device("cpu"), output_dtype=torch.float,
        table_name_to_quantized_weights=weights, register_tbes=True, row_alignment=row_alignment,
        cache_features_order=True,
    )
    m = copy.deepcopy(skeleton).cpu().eval()
    m.sparse_arch.embedding_bag_collection = qebc
    install_remaps(tbe_of(m), [qtables[f].remap for f in keys], remap)
    for p in m.parameters():
        p.requires_grad_(False)
    serving = ServingDLRM(m, keys).eval()
    _warm_up(serving)
    return serving


def script_model(serving: ServingDLRM) -> torch.jit.ScriptModule:
    """TorchScript of the serving model: torchrec's fx Tracer (TBE kept as a leaf) + torch.jit.script."""
    graph = Tracer(leaf_modules=LEAF_MODULES).trace(serving)
    gm = torch.fx.GraphModule(serving, graph)
    return torch.jit.script(gm)


# ------------------------------------------------------------------------------------------
# Bytes


def table_bytes(module: nn.Module) -> dict[str, dict]:
    """Real storage per table of a compressed model (eager), read from the TBE's buffers.

    table -> {"dtype", "rows" (stored), "row_bytes" (incl. scale/bias and row padding),
    "weights" (rows x row_bytes, the table's slice of ``weights_host``), "padding" (bytes up to
    the next table's 128-byte aligned start), "remap" (its slice of the remap array or hash
    table), "total"}. Sum of weights + padding = ``weights_host`` bytes; sum of remap = the remap
    buffer bytes."""
    tbe = tbe_of(module)
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


def remap_buffer_bytes(module: nn.Module) -> int:
    """Bytes of the TBE's remap buffers (array or hash table, not their small offset arrays)."""
    tbe = tbe_of(module)
    a, h = tbe.index_remappings_array, tbe.index_remapping_hash_table
    return a.numel() * a.element_size() + h.numel() * h.element_size()


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
        if ".tbes." in k or "embedding_bag" in k:
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
