"""Bytes of embedding tables as stored: a compressed model's, an option the planner weighs, the fp32 model's."""

from typing import Iterable, Mapping, Optional

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from sparse_kd.compress.cpu_kernel import cpu_option_bytes, cpu_table_bytes, packed_tables
from sparse_kd.compress.kernel import kernel_of
from sparse_kd.compress.rows import table_name
from sparse_kd.compress.tbe import ROW_ALIGNMENT, tbe_of, tbe_option_bytes, tbe_table_bytes
from sparse_kd.serve.format import KERNEL_CPU


def table_bytes(module: nn.Module) -> dict[str, dict]:
    """Real storage per table of a compressed model (eager), read from its buffers.

    table -> {"dtype", "rows" (stored), "row_bytes" (incl. scale/bias and row padding),
    "weights" (rows x row_bytes), "padding" (TBE: bytes up to the next table's 128-byte aligned
    start; CPU kernel: the extra zero row of a pruned fp16/fp32 table), "remap" (the remap array
    or hash table slice), "total"}. Sums of weights + padding and of remap are the model's
    weight and remap buffer bytes."""
    if kernel_of(module) == KERNEL_CPU:
        return {table_name(str(m.feature)): cpu_table_bytes(m) for m in packed_tables(module)}
    return tbe_table_bytes(tbe_of(module))



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

