"""Quantized rows, kernel-independent: fp32 rows to FBGEMM's row-wise bytes and back (and the
optional int8 dense layers).

Notation: R stored rows, D embedding dim, N original rows of a table.

Rows are quantized once, the way torchrec's ``quantize_state_dict`` does it (FBGEMM's
``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf``: an fp16 scale and bias per row for
int8/int4/int2) into a :class:`QTable` per table, which either serving kernel then packs
(:mod:`sparse_kd.compress.cpu_kernel`, :mod:`sparse_kd.compress.tbe`).
"""

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm: row quantization)

from sparse_kd.compress.row_fit import quantize_rows_mse


DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "int8": torch.qint8,
    "int4": torch.quint4x2,
    "int2": torch.quint2x4,
}


BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4, "int2": 2}



def table_name(feature: str) -> str:
    return f"t_{feature}"



@dataclass
class QTable:
    """A quantized table, kernel-independent: codes (R, D * bits / 8) uint8 (the raw bytes for
    fp32/fp16), scale_bias (R, 4) uint8 (fp16 scale, fp16 bias) or None for fp32/fp16; remap (N,)
    int32 original id -> stored row (-1: adds nothing) or None. A tiered table (dtype a tier spec)
    holds its rows in ``parts`` (weight empty) and its remap here."""

    feature: str
    dtype: str
    dim: int
    weight: torch.Tensor
    scale_bias: Optional[torch.Tensor]
    remap: Optional[torch.Tensor]
    parts: Optional[List["QTable"]] = None  # a tiered table (:mod:`~.tiers`): one QTable per tier, hottest first

    @property
    def num_rows(self) -> int:
        if self.parts is not None:
            return sum(p.num_rows for p in self.parts)
        return int(self.weight.shape[0])



QUANTIZERS = ("minmax", "mse")


def quantize_rows(rows: torch.Tensor, dtype: str, quantizer: str = "minmax") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """fp32 rows (K, D) -> FBGEMM bytes: (codes (K, D * bits / 8) uint8, scale_bias (K, 4) uint8 or
    None). ``minmax``: exactly as torchrec's ``quantize_state_dict`` makes them; ``mse``: scale and
    bias fitted per row to squared error (:mod:`~.row_fit`), same layout."""
    if quantizer not in QUANTIZERS:
        raise ValueError(f"compress.quantizer: {quantizer!r} is not one of {', '.join(QUANTIZERS)}")
    rows = rows.detach().float().contiguous().cpu()
    if quantizer == "mse" and dtype not in ("fp32", "fp16"):
        return quantize_rows_mse(rows, BITS[dtype])
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



def quantize_dense_layers(model: nn.Module) -> None:
    """``dense_int8``: the dense and over archs' ``nn.Linear`` layers to dynamic int8, in place."""
    for name in ("dense_arch", "over_arch"):
        sub = getattr(model, name)
        setattr(model, name, torch.ao.quantization.quantize_dynamic(sub, {nn.Linear}, dtype=torch.qint8))
