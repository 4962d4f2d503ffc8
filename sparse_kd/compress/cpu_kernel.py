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
from sparse_kd.compress.tiers import is_tiered, qtable
from sparse_kd.serve.cpu_model import CpuServingDLRM, PackedTable, PooledInteraction, QuantizedLookup, TieredTable


def _zero_row(w: torch.Tensor) -> torch.Tensor:
    return torch.cat([w, torch.zeros(1, w.shape[1], dtype=w.dtype)])


def pack_tiered(q: QTable) -> TieredTable:
    """A :class:`TieredTable` of a tiered ``q``: a :class:`PackedTable` per tier (no remap) whose
    rows sit between two all-zero rows (tier 0: one, after its rows), and the remap on the tiered
    table (ids mapped to no row go to R, which every tier reads as a zero row)."""
    assert q.parts is not None
    tiers = []
    starts = [0]
    for k, p in enumerate(q.parts):
        t = pack_table(p)
        w = _zero_row(t.weight) if k == 0 else torch.cat([torch.zeros_like(t.weight[:1]), _zero_row(t.weight)])
        tiers.append(PackedTable(t.feature, t.qtype, t.dim, w, None))
        starts.append(starts[-1] + p.num_rows)
    mapping = None if q.remap is None else q.remap.to(torch.int32).clone()
    zero = mapping is not None and bool((mapping < 0).any())
    if zero:
        assert mapping is not None
        mapping[mapping < 0] = starts[-1]
    return TieredTable(q.feature, q.dtype, q.dim, tiers, starts, mapping, zero)


def pack_table(q: QTable) -> nn.Module:
    """A :class:`PackedTable` holding the rows of ``q`` (int8 scale/bias widened to fp32, exactly);
    a pruned table whose remap sends ids to no row gets one all-zero row after its R rows (zero
    codes with zero scale and bias for int8/int4/int2: every operator reads it as 0). A tiered
    ``q`` gives a :class:`TieredTable` (:func:`pack_tiered`)."""
    if q.parts is not None:
        return pack_tiered(q)
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
        w = _zero_row(w)
    return PackedTable(q.feature, q.dtype, q.dim, w, mapping, zero)



def _is_tiered(m: nn.Module) -> bool:
    return hasattr(m, "starts")


def unpack_table(m: nn.Module) -> QTable:
    """Inverse of :func:`pack_table` (an eager or a scripted PackedTable or TieredTable)."""
    if _is_tiered(m):
        parts = [unpack_table(t) for _, t in m.tiers.named_children()]
        remap = m.mapping.detach().cpu().to(torch.int32).clone() if bool(m.pruned) else None
        for k, p in enumerate(parts):  # drop the all-zero rows around each tier's rows
            lo = 0 if k == 0 else 1
            p.weight = p.weight[lo:-1].clone()
            p.scale_bias = None if p.scale_bias is None else p.scale_bias[lo:-1].clone()
        if bool(m.zero_row):
            assert remap is not None
            remap[remap == int(m.starts[-1])] = -1
        for p in parts:
            p.feature = str(m.feature)
        return QTable(str(m.feature), str(m.qtype), int(m.dim), torch.empty(0, 0, dtype=torch.uint8), None, remap, parts)
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
    if _is_tiered(table):
        parts = [cpu_table_bytes(t) for _, t in table.tiers.named_children()]
        mp = table.mapping
        rbytes = int(mp.numel() * mp.element_size())
        zeros = [1 if k == 0 else 2 for k in range(len(parts))]  # all-zero rows around each tier's rows
        rows = sum(p["rows"] for p in parts) - sum(zeros)
        weights = sum(p["weights"] - z * p["row_bytes"] for p, z in zip(parts, zeros))
        pad = sum(p["padding"] + z * p["row_bytes"] for p, z in zip(parts, zeros))
        return {"dtype": str(table.qtype), "rows": rows, "row_bytes": round(weights / max(rows, 1), 3),
                "weights": int(weights), "padding": int(pad), "remap": rbytes, "total": int(weights + pad + rbytes),
                "tiers": [{"dtype": p["dtype"], "rows": p["rows"] - z, "row_bytes": p["row_bytes"]}
                          for p, z in zip(parts, zeros)]}
    w, mp = table.weight, table.mapping
    row = int(w.shape[1]) * w.element_size()
    rows = int(w.shape[0]) - (1 if bool(table.zero_row) else 0)
    pad = row if bool(table.zero_row) else 0
    rbytes = mp.numel() * mp.element_size()
    return {"dtype": str(table.qtype), "rows": rows, "row_bytes": row, "weights": rows * row, "padding": pad,
            "remap": int(rbytes), "total": int(rows * row + pad + rbytes)}



def packed_tables(module: nn.Module) -> list:
    """The lookup's tables of a CPU serving model (eager or scripted), one per feature: PackedTable
    or TieredTable (not the tiers inside the latter)."""
    if isinstance(module, torch.jit.ScriptModule):
        names = ("PackedTable", "TieredTable")
        found = [(n, m) for n, m in module.named_modules() if m.original_name in names]
        tiered = [n for n, m in found if m.original_name == "TieredTable"]
        return [m for n, m in found if not any(n.startswith(t + ".") for t in tiered)]
    out, inner = [], set()
    for m in module.modules():
        if isinstance(m, TieredTable):
            inner.update(id(t) for t in m.tiers)
    for m in module.modules():
        if isinstance(m, (PackedTable, TieredTable)) and id(m) not in inner:
            out.append(m)
    return out



def cpu_option_bytes(num_original: int, num_rows: int, dim: int, dtype: str, num_mapped: Optional[int]) -> dict:
    """Bytes of one table on the CPU kernel, read from a real :class:`PackedTable` (or
    :class:`TieredTable` for a tiered dtype) with ``num_rows`` stored rows; ``num_mapped`` ids
    (of ``num_original``) have a row, None: not pruned."""
    r = None
    if num_mapped is not None:
        r = torch.full((num_original,), -1, dtype=torch.int32)
        r[:num_mapped] = torch.arange(num_mapped, dtype=torch.int32) % max(num_rows, 1)
    if is_tiered(dtype):
        return cpu_table_bytes(pack_table(qtable("t", torch.zeros(num_rows, dim), dtype, r)))
    codes = torch.zeros(num_rows, dim * BITS[dtype] // 8, dtype=torch.uint8)
    sb = None if dtype in ("fp32", "fp16") else torch.zeros(num_rows, 4, dtype=torch.uint8)
    return cpu_table_bytes(pack_table(QTable("t", dtype, dim, codes, sb, r)))

