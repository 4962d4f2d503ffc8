"""A per-row quantizer fitted to squared error (``compress.quantizer: mse``), in FBGEMM's bytes.

FBGEMM's row-wise formats store, per row, codes q in [0, 2^bits - 1] and an fp16 scale s and bias
b; a value reads back as s * q + b. Its own quantizer takes b = min and s = (max - min) /
(2^bits - 1): one outlier widens every step of its row. Here, per row (vectorised over blocks):

1. candidate ranges: [min, max] shrunk from both ends by every pair of ``CLIP_FRACTIONS`` (the
   codes clamp what falls outside); each is scored by its squared error, the best kept;
2. a few alternating steps: given the codes, (s, b) is the least-squares line through
   (q, x) (closed form); given (s, b), the codes are the nearest levels;
3. s and b rounded to fp16 (as stored) and the codes recomputed for the rounded pair; each row
   keeps whichever of this and FBGEMM's own min/max quantization reads back (through FBGEMM's
   dequantize operator) with the smaller squared error: never worse than min/max, row by row.

The bytes are FBGEMM's (codes packed low bits first, then fp16 scale and bias), so every kernel
reads them unchanged: :func:`sparse_kd.compress.rows.dequantize_rows` is FBGEMM's own operator.
"""

from __future__ import annotations

import torch

CLIP_FRACTIONS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
REFINE_STEPS = 3
BLOCK_ROWS = 16384


def _levels(bits: int) -> int:
    return (1 << bits) - 1


def _codes(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, top: int) -> torch.Tensor:
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.clamp(torch.round((x - bias) / safe), 0, top)


def _sq_err(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return (x - (q * scale + bias)).pow(2).sum(-1)


def fit_block(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows x (K, D) float32 -> (codes (K, D) uint8 in [0, 2^bits - 1], scale (K,) fp16, bias (K,) fp16)."""
    top = _levels(bits)
    lo, hi = x.min(1).values, x.max(1).values
    span = hi - lo
    best_err = torch.full((x.shape[0],), float("inf"))
    best_s, best_b = torch.zeros_like(lo), lo.clone()
    for a in CLIP_FRACTIONS:  # 1. clipped ranges
        for c in CLIP_FRACTIONS:
            if a + c >= 0.9:
                continue
            b = lo + a * span
            s = (span * (1 - a - c)) / top
            q = _codes(x, s[:, None], b[:, None], top)
            err = _sq_err(x, q, s[:, None], b[:, None])
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s, best_b = torch.where(better, s, best_s), torch.where(better, b, best_b)
    s, b = best_s, best_b
    for _ in range(REFINE_STEPS):  # 2. least squares given the codes, then the nearest codes
        q = _codes(x, s[:, None], b[:, None], top)
        qm, xm = q.mean(1, keepdim=True), x.mean(1, keepdim=True)
        var = (q - qm).pow(2).sum(1)
        cov = ((q - qm) * (x - xm)).sum(1)
        s_new = torch.where(var > 0, cov / var.clamp_min(1e-12), s)
        b_new = xm.squeeze(1) - s_new * qm.squeeze(1)
        ok = s_new > 0
        s, b = torch.where(ok, s_new, s), torch.where(ok, b_new, b)
    s16, b16 = s.half(), b.half()  # 3. as stored
    q = _codes(x, s16.float()[:, None], b16.float()[:, None], top)
    return q.to(torch.uint8), s16, b16


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (K, D) uint8 -> FBGEMM's packed bytes (K, D * bits / 8): element j in byte
    j // (8 / bits), at bit (j % (8 / bits)) * bits."""
    if bits == 8:
        return q.contiguous()
    per = 8 // bits
    k, d = q.shape
    g = q.view(k, d // per, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (g << shifts).sum(-1).to(torch.uint8)


def quantize_rows_mse(rows: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 rows (K, D) -> (codes (K, D * bits / 8) uint8, scale_bias (K, 4) uint8), FBGEMM's layout;
    each row the fitted quantization or FBGEMM's own, whichever reads back closer (read back by
    FBGEMM's dequantize operator)."""
    import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)

    rows = rows.detach().float().contiguous().cpu()
    k, d = rows.shape
    if d % (8 // bits):
        raise ValueError(f"dim {d} is not a multiple of {8 // bits}: FBGEMM's {bits}-bit rows need that")
    out = torch.empty(k, d * bits // 8 + 4, dtype=torch.uint8)
    for i in range(0, k, BLOCK_ROWS):
        x = rows[i: i + BLOCK_ROWS]
        q, s, b = fit_block(x, bits)
        fit = torch.cat([pack_codes(q, bits), torch.stack([s, b], 1).view(torch.uint8)], 1)
        own = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(x, bits)
        deq = torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat
        better = (deq(fit, bits) - x).pow(2).sum(1) < (deq(own, bits) - x).pow(2).sum(1)
        out[i: i + BLOCK_ROWS] = torch.where(better[:, None], fit, own)
    return out[:, :-4].contiguous(), out[:, -4:].contiguous()
