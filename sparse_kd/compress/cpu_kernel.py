"""Building the CPU serving model (:mod:`sparse_kd.serve.cpu_model`) from quantized rows, reading
its tables back, and counting their bytes.

Row layouts of :class:`~sparse_kd.serve.cpu_model.PackedTable`: int8 ``[D codes | fp32 scale |
fp32 bias]`` (the byte operator reads fp32 scale/bias; the fp16 ones are widened exactly),
int4 / int2 ``[D*bits/8 codes | fp16 scale | fp16 bias]`` (FBGEMM's fused layout as is), fp16 /
fp32 plain rows. A pruned table whose remap sends ids to no row gets one all-zero row.
"""

import copy
from typing import List, Mapping, Optional

import torch
from torch import nn
from torchrec.fx import Tracer
from torchrec.models.dlrm import DLRM, InteractionArch

from sparse_kd.compress.rows import BITS, QTable
from sparse_kd.serve.cpu_model import CpuServingDLRM, PackedTable, PooledInteraction, QuantizedLookup


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



def traced(module: nn.Module) -> torch.fx.GraphModule:
    return torch.fx.GraphModule(module, Tracer().trace(module))



def assemble_cpu(skeleton: DLRM, qtables: Mapping[str, QTable], keys: List[str]) -> CpuServingDLRM:
    m = copy.deepcopy(skeleton).cpu().eval()
    if not isinstance(m.inter_arch, InteractionArch) or m.inter_arch.F != len(keys):
        raise ValueError(f"the CPU serving model needs torchrec's InteractionArch over the {len(keys)} features, "
                         f"got {type(m.inter_arch).__name__}")
    lookup = QuantizedLookup([pack_table(qtables[f]) for f in keys])
    serving = CpuServingDLRM(traced(m.dense_arch), PooledInteraction(len(keys)), traced(m.over_arch), lookup, keys)
    for p in serving.parameters():
        p.requires_grad_(False)
    return serving.eval()



def cpu_table_bytes(table: nn.Module) -> dict:
    w, mp = table.weight, table.mapping
    row = int(w.shape[1]) * w.element_size()
    rows = int(w.shape[0]) - (1 if bool(table.zero_row) else 0)
    pad = row if bool(table.zero_row) else 0
    rbytes = mp.numel() * mp.element_size()
    return {"dtype": str(table.qtype), "rows": rows, "row_bytes": row, "weights": rows * row, "padding": pad,
            "remap": int(rbytes), "total": int(rows * row + pad + rbytes)}



def packed_tables(module: nn.Module) -> list:
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
    return cpu_table_bytes(pack_table(QTable("t", dtype, dim, codes, sb, r)))

