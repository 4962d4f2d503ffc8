"""compress.quantizer: mse: FBGEMM's bytes, never worse than FBGEMM's min/max row by row, better
where rows have outliers, and the same through compress -> artifact -> Predictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparse_kd.compress import rows as QR
from sparse_kd.compress.row_fit import fit_block, pack_codes


@pytest.mark.parametrize("dtype,bits", [("int8", 8), ("int4", 4), ("int2", 2)])
def test_fitted_rows_read_back_as_fitted_and_never_worse(dtype, bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3000, 32, generator=g)
    x[::3, 0] *= 6  # outliers widen min/max rows
    w_mm, sb_mm = QR.quantize_rows(x, dtype)
    w, sb = QR.quantize_rows(x, dtype, "mse")
    assert w.shape == w_mm.shape and sb.shape == sb_mm.shape and w.dtype == sb.dtype == torch.uint8
    err_mm = (QR.dequantize_rows(w_mm, sb_mm, dtype) - x).pow(2).sum(1)
    err = (QR.dequantize_rows(w, sb, dtype) - x).pow(2).sum(1)
    assert bool((err <= err_mm + 1e-7).all())
    assert err.mean() < err_mm.mean() * (0.97 if bits == 8 else 0.9)
    # the packed codes are FBGEMM's layout: its dequantize operator reads s * q + b
    q, s, b = fit_block(x[:50], bits)
    fused = torch.cat([pack_codes(q, bits), torch.stack([s, b], 1).view(torch.uint8)], 1)
    want = q.float() * s.float()[:, None] + b.float()[:, None]
    torch.testing.assert_close(torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(fused, bits), want)
    with pytest.raises(ValueError, match="compress.quantizer"):
        QR.quantize_rows(x, dtype, "best")


def test_compress_with_the_fitted_quantizer_serves_its_rows(tiny):
    from sparse_kd.compress import quantize as Q
    from sparse_kd.compress.stage import compress_model, serving_builder, serving_dataset
    from sparse_kd.metrics import evaluate, serving_forward

    ds, text, model, builder = tiny
    settings = {f: {"keep_ratio": 1.0, "dtype": "int2", "fill": "zero"} for f in ("user_id", "item_id", "age", "tags")}
    a = compress_model(model, ds, settings, text=text)
    b = compress_model(model, ds, settings, text=text, quantizer="mse")
    assert a.embedding_bytes == b.embedding_bytes and b.tables["t_user_id"]["quantizer"] == "mse"
    qa, qb = Q.extract_qtables(a.serving)["user_id"], Q.extract_qtables(b.serving)["user_id"]
    assert not torch.equal(qa.weight, qb.weight)
    w = model.sparse_arch.embedding_bag_collection.embedding_bags["t_user_id"].weight.detach()
    # stored hot-first: compare the stored rows against the fp32 rows they came from
    ra = QR.dequantize_rows(qa.weight, qa.scale_bias, "int2")
    rb = QR.dequantize_rows(qb.weight, qb.scale_bias, "int2")
    assert sorted(ra.pow(2).sum(1).tolist()) != sorted(rb.pow(2).sum(1).tolist())
    perm = a.remaps["t_user_id"]
    fp = torch.empty_like(w)
    fp[perm.long()] = w  # id -> stored row
    assert (rb - fp).pow(2).sum() < (ra - fp).pow(2).sum()
    m = evaluate(serving_forward(b.serving), serving_dataset(ds, b), serving_builder(ds, b, builder))
    assert np.isfinite(m["test"]["auc"])


def test_config_refuses_the_fitted_quantizer_for_the_tbe():
    from sparse_kd.config import ConfigError, config_from_dict

    assert config_from_dict({"compress": {"quantizer": "mse"}}).compress.quantizer == "mse"
    with pytest.raises(ConfigError, match="compress.quantizer"):
        config_from_dict({"compress": {"quantizer": "mse", "serve_device": "cuda"}})
    with pytest.raises(ConfigError, match="compress.quantizer"):
        config_from_dict({"compress": {"quantizer": "best"}})
