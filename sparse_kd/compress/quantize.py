"""Quantize pruned tables onto FBGEMM kernels and wrap the DLRM for serving: the entry points.

Notation: B batch, F sparse features (one table each, named ``t_<feature>``), D embedding dim,
N original rows of a table, R stored rows, Dd dense input dim.

Rows are quantized once, the way torchrec's ``quantize_state_dict`` does it
(:func:`quantize_rows`: FBGEMM's ``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf``, an fp16 scale
and bias per row for int8/int4/int2), into a :class:`QTable` per table. Two serving kernels take
these rows (``kernel``, recorded in the artifact; see :mod:`sparse_kd.serve.format`):

``torch_quantized`` (CPU serving, the default, ``compress.serve_device: cpu``)
    PyTorch's own quantized EmbeddingBag operators (FBGEMM's JIT CPU kernels, no ``fbgemm_gpu``
    at serving time): :mod:`sparse_kd.serve.cpu_model` runs them, :mod:`sparse_kd.compress.cpu_kernel`
    builds them.

``fbgemm_tbe`` (GPU serving, ``compress.serve_device: cuda``)
    torchrec's quantized EBC on one FBGEMM ``IntNBitTableBatchedEmbeddingBagsCodegen`` with array
    or hash remaps: :mod:`sparse_kd.compress.tbe`.

Dense layers stay fp32 unless ``dense_int8`` (``torch.ao.quantization.quantize_dynamic`` on every
``nn.Linear``; it saves little next to the tables at the demo's size and is off by default).

Serving models take plain tensors, ``forward(dense (B, Dd) float32, values (nnz,) int ids,
lengths (F * B,) int) -> logits (B,)``, lengths feature-major in :attr:`keys` order:
:class:`CpuServingDLRM` (its dense parts are fx-traced once, so it scripts directly) and
:class:`ServingDLRM` (TBE; :func:`script_model` traces it with ``torchrec.fx.Tracer`` keeping the
TBE a leaf). Both script with TorchScript, save and load with ``torch.jit``; the CPU one needs
only ``torch`` to run, the TBE one ``torch`` and ``fbgemm_gpu``. :func:`sparse_kd.compress.table_bytes.table_bytes` reads each
table's real storage from the model's buffers.
"""

# no "from __future__ import annotations": fx writes string annotations into the traced code, which TorchScript cannot read

import copy
from typing import List, Mapping, Optional

import torch
from torch import nn
from torchrec.fx import Tracer
from torchrec.models.dlrm import DLRM

from sparse_kd.compress.cpu_kernel import assemble_cpu, packed_tables, unpack_table
from sparse_kd.compress.kernel import kernel_for, kernel_of, require_device
from sparse_kd.compress.prune import PrunedTable
from sparse_kd.compress.rows import DTYPES, QTable, quantize_dense_layers
from sparse_kd.compress.tiers import is_tiered, parse_tiers, qtables_of
from sparse_kd.compress.tbe import (LEAF_MODULES, REMAP_KINDS, ROW_ALIGNMENT, assemble_tbe, dtype_name,
                                    quantize_tbe, remaps_from_tbe, scripted_tbe, tbe_of)
from sparse_kd.serve.cpu_model import CpuServingDLRM
from sparse_kd.serve.format import KERNEL_CPU, KERNEL_TBE


def quantize_dlrm(
    model: DLRM,
    pruned: Mapping[str, PrunedTable],
    dtypes: Mapping[str, str],
    remap: str = "array",
    dense_int8: bool = False,
    row_alignment: int = ROW_ALIGNMENT,
    serve_device: str = "cpu",
    kernel: Optional[str] = None,
    quantizer: str = "minmax",
) -> nn.Module:
    """The compressed serving model (eager) of a trained fp32 ``model``; ``model`` is not changed.

    pruned: feature -> PrunedTable for every table; dtypes: feature -> one of fp32/fp16/int8/int4/int2.
    serve_device: ``cpu`` (:class:`CpuServingDLRM`) or ``cuda`` (:class:`ServingDLRM` on the TBE);
    ``kernel="fbgemm_tbe"`` with ``serve_device="cpu"`` builds the TBE on CPU (to compare against).
    quantizer: ``minmax`` (FBGEMM's) or ``mse`` (per-row scale and bias fitted to squared error;
    the CPU kernel only).
    """
    ebc = model.sparse_arch.embedding_bag_collection
    keys = [f for cfg in ebc.embedding_bag_configs() for f in cfg.feature_names]
    missing = [f for f in keys if f not in pruned or f not in dtypes]
    if missing:
        raise ValueError(f"no pruned table / dtype for features {missing}")
    for f in keys:
        if is_tiered(dtypes[f]):
            parse_tiers(dtypes[f], f"compress.dtype.{f}")
        elif dtypes[f] not in DTYPES:
            raise ValueError(f"compress.dtype.{f}: {dtypes[f]!r} is not valid; expected one of {', '.join(DTYPES)}")
    if remap not in REMAP_KINDS:
        raise ValueError(f"compress.remap: {remap!r} is not valid; expected one of {', '.join(REMAP_KINDS)}")
    k = kernel_for(serve_device, kernel)
    require_device(serve_device)
    tiered = [f for f in keys if is_tiered(dtypes[f])]
    if k == KERNEL_TBE and quantizer != "minmax":
        raise ValueError(f"compress.quantizer: {quantizer!r} is built for the CPU kernel; the TBE quantizes its "
                         "rows itself (use compress.quantizer: minmax with serve_device: cuda)")
    if k == KERNEL_TBE and tiered:
        raise ValueError(f"compress.dtype: tiered tables ({', '.join(tiered)}) are served by the CPU kernel only; "
                         "use compress.serve_device: cpu, or one dtype per table for the GPU TBE")
    if k == KERNEL_TBE:
        return quantize_tbe(model, pruned, dtypes, keys, remap, dense_int8, row_alignment, torch.device(serve_device))
    if remap != "array":
        raise ValueError(f"compress.remap: {remap!r} needs the TBE (compress.serve_device: cuda); the CPU kernels "
                         "look pruned ids up in an array: use compress.remap: array")
    skeleton = copy.deepcopy(model).cpu().eval()
    if dense_int8:
        quantize_dense_layers(skeleton)
    return assemble_cpu(skeleton, qtables_of(pruned, dtypes, keys, quantizer), keys)



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
    require_device(device, "the artifact's serving device")
    if k == KERNEL_TBE:
        return assemble_tbe(skeleton, qtables, keys, remap, row_alignment, torch.device(device))
    return assemble_cpu(skeleton, qtables, keys)



def extract_qtables(serving: nn.Module) -> dict[str, QTable]:
    """feature -> QTable copied out of a serving model (either kernel, eager or scripted)."""
    if kernel_of(serving) == KERNEL_CPU:
        return {str(m.feature): unpack_table(m) for m in packed_tables(serving)}
    tbe = tbe_of(serving) if not isinstance(serving, torch.jit.ScriptModule) else scripted_tbe(serving)
    specs = tbe.embedding_specs
    weights = tbe.split_embedding_weights()
    remaps = remaps_from_tbe(tbe, [int(s[1]) for s in specs])
    out = {}
    for (name, _rows, dim, ty, _loc), (w, sb), r in zip(specs, weights, remaps):
        feat = name[2:] if name.startswith("t_") else name
        out[feat] = QTable(feat, dtype_name(ty), int(dim), w.cpu().clone(), None if sb is None else sb.cpu().clone(), r)
    return out



def script_model(serving: nn.Module) -> torch.jit.ScriptModule:
    """TorchScript of a serving model (the TBE one through torchrec's fx Tracer, TBE kept a leaf)."""
    if isinstance(serving, CpuServingDLRM):
        return torch.jit.script(serving)
    graph = Tracer(leaf_modules=LEAF_MODULES).trace(serving)
    gm = torch.fx.GraphModule(serving, graph)
    return torch.jit.script(gm)

