"""Quantized lookups, pruned-id fills, array vs hash remaps and real byte counts."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from sparse_kd.compress import quantize as Q
from sparse_kd.compress.importance import access_counts
from sparse_kd.compress.planner import option_bytes
from sparse_kd.metrics import serving_forward, split_batches
from sparse_kd.compress.stage import compress_model, model_weights

DTYPES = ["fp32", "fp16", "int8", "int4", "int2"]


def settings(model, dtype="int8", keep=1.0, fill="zero", keep_ids_only=True):
    return {
        f: {"keep_ratio": keep if (f.endswith("_id") or not keep_ids_only) else 1.0, "dtype": dtype, "fill": fill}
        for f in model_weights(model)
    }


def lookup_each_id(serving, feature: str, n: int) -> torch.Tensor:
    """(n, D): the pooled embedding of a bag holding just id k, for k in 0..n-1, other features empty."""
    keys = serving.keys
    lengths = torch.cat([torch.ones(n, dtype=torch.int32) if k == feature else torch.zeros(n, dtype=torch.int32) for k in keys])
    kjt = KeyedJaggedTensor(keys=keys, values=torch.arange(n, dtype=torch.int32), lengths=lengths)
    with torch.no_grad():
        return Q.quant_ebc_of(serving)(kjt).to_dict()[feature]


def error_bound(ref: torch.Tensor, dtype: str) -> torch.Tensor:
    """Per-row max |dequantized - fp32| allowed: half a quantization step + fp16 rounding of scale/bias."""
    if dtype == "fp32":
        return torch.full((ref.shape[0],), 1e-7)
    if dtype == "fp16":
        return ref.abs().amax(1) * 2 ** -10 + 1e-7
    lo, hi = ref.amin(1), ref.amax(1)
    steps = 2 ** Q.BITS[dtype] - 1
    return (hi - lo) / steps * 0.5 + (hi - lo) * 2 ** -9 + lo.abs() * 2 ** -10 + 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_lookup_matches_dequantized_reference(tiny, dtype):
    ds, text, model, _ = tiny
    comp = compress_model(model, ds, settings(model, dtype), text=text)
    q = Q.extract_qtables(comp.serving)
    w = model_weights(model)
    for f, ref in w.items():
        deq = Q.dequantize_rows(q[f].weight, q[f].scale_bias, dtype)
        got = lookup_each_id(comp.serving, f, ref.shape[0])
        # the FBGEMM lookup is exactly the dequantized row
        torch.testing.assert_close(got, deq, atol=1e-6, rtol=0)
        # and the dequantized row is within the dtype's rounding of the trained row
        err = (deq - ref).abs().amax(1)
        assert torch.all(err <= error_bound(ref, dtype)), (f, dtype, float((err - error_bound(ref, dtype)).max()))
    if dtype in ("int4", "int2"):  # coarse types really are coarse: the check above is not vacuous
        assert float((Q.dequantize_rows(q["user_id"].weight, q["user_id"].scale_bias, dtype) - w["user_id"]).abs().max()) > 1e-3


def test_pruned_ids_zero_mean_text(tiny):
    ds, text, model, _ = tiny
    w = model_weights(model)["item_id"]
    freq = access_counts(ds, "item_id")
    kept = None
    for fill in ("zero", "mean", "text"):
        comp = compress_model(model, ds, settings(model, "fp32", keep=0.5, fill=fill), text=text)
        if kept is None:  # zero fill: remap -1 marks the pruned ids (same selection for every fill)
            kept = comp.remaps["t_item_id"] >= 0
        got = lookup_each_id(comp.serving, "item_id", w.shape[0])
        # frequency importance keeps the most read rows; kept rows are unchanged
        assert int(kept.sum()) == 20
        assert freq[kept.numpy()].min() >= freq[~kept.numpy()].max()
        torch.testing.assert_close(got[kept], w[kept], atol=1e-6, rtol=0)
        pr = ~kept
        if fill == "zero":
            assert torch.all(got[pr] == 0)
            assert comp.tables["t_item_id"]["rows_stored"] == 20
        elif fill == "mean":
            torch.testing.assert_close(got[pr], w[pr].mean(0).expand(int(pr.sum()), -1), atol=1e-6, rtol=0)
            assert comp.tables["t_item_id"]["rows_stored"] == 21
        else:
            # each pruned item gets its own row: the saved text map applied to its text
            from sparse_kd.ridge import ridge_predict

            expect = ridge_predict(text["item"][pr], comp.text_maps["item_id"])
            torch.testing.assert_close(got[pr], expect, atol=1e-5, rtol=1e-5)
            assert len({tuple(r.tolist()) for r in got[pr]}) == int(pr.sum())
            assert comp.tables["t_item_id"]["rows_stored"] == 40  # text fill stores a row per id: no saving
            assert "t_item_id" not in comp.remaps  # rows overwritten in place: no remap needed


def test_text_fill_falls_back_to_mean_for_features_without_text(tiny):
    ds, text, model, _ = tiny
    comp = compress_model(model, ds, settings(model, "fp32", keep=0.5, fill="text", keep_ids_only=False), text=text)
    assert comp.tables["t_tags"]["fill"] == "mean" and comp.tables["t_item_id"]["fill"] == "text"
    assert any("tags" in n for n in comp.notes)


@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_remap_array_and_hash_give_identical_outputs(tiny, fill):
    ds, text, model, builder = tiny
    s = settings(model, "int4", keep=0.2, fill=fill, keep_ids_only=False)
    a = compress_model(model, ds, s, remap="array", text=text)
    h = compress_model(model, ds, s, remap="hash", text=text)
    assert Q.remap_kind(Q.tbe_of(a.serving)) == "array" and Q.remap_kind(Q.tbe_of(h.serving)) == "hash"
    for split in ("valid", "test_cold"):
        for b, _ in split_batches(ds, builder, split):
            assert torch.equal(serving_forward(a.serving)(b), serving_forward(h.serving)(b))
    # pruning changed something (the comparison is not between two unpruned models)
    full = compress_model(model, ds, settings(model, "int4"), text=text)
    b, _ = split_batches(ds, builder, "valid")[0]
    assert not torch.equal(serving_forward(full.serving)(b), serving_forward(a.serving)(b))
    # sizes: array = 4 bytes per original id; hash = 2 int32 per slot, round_up(mapped ids / 0.5, 32)
    # slots, mapped = kept ids (zero fill) or every id (mean fill: many ids share the mean row)
    ta, th = a.tables["t_user_id"], h.tables["t_user_id"]
    assert ta["bytes"]["remap"] == 4 * ta["rows_original"]
    mapped = th["rows_kept"] if fill == "zero" else th["rows_original"]
    assert th["bytes"]["remap"] == 8 * (-(-int(mapped / 0.5) // 32) * 32)


def test_table_bytes_equal_real_buffers(tiny):
    ds, text, model, _ = tiny
    s = settings(model, "int8", keep=0.5)
    s["age"]["dtype"], s["tags"]["dtype"] = "fp16", "int2"
    comp = compress_model(model, ds, s, text=text)
    tbe = Q.tbe_of(comp.serving)
    tb = Q.table_bytes(comp.serving)
    assert sum(v["weights"] + v["padding"] for v in tb.values()) == tbe.weights_host.numel() * tbe.weights_host.element_size()
    assert sum(v["remap"] for v in tb.values()) == tbe.index_remappings_array.numel() * 4 > 0
    d = 8  # embedding dim of the tiny model
    row = {"fp32": 4 * d, "fp16": 2 * d, "int8": d + 4, "int4": d // 2 + 4, "int2": d // 4 + 4}
    for t, v in tb.items():
        dt = s[t[2:]]["dtype"]
        assert v["row_bytes"] == -(-row[dt] // 16) * 16, (t, v)  # scale/bias + 16-byte row alignment
        assert v["weights"] == v["rows"] * v["row_bytes"]
        assert (v["weights"] + v["padding"]) % 128 == 0  # tables start on cache lines
    assert tb["t_user_id"]["rows"] == 30 and tb["t_user_id"]["remap"] == 60 * 4
    # the planner's per-option bytes (from a one-table TBE) agree with the full model's
    for t, v in tb.items():
        f = t[2:]
        pruned = f in ("user_id", "item_id")
        ob = option_bytes(comp.tables[t]["rows_original"], v["rows"], d, v["dtype"], v["rows"] if pruned else None, "array")
        assert ob["total"] == v["total"], (t, ob, v)


def test_quantized_model_scripts_and_matches_eager(tiny):
    ds, text, model, builder = tiny
    comp = compress_model(model, ds, settings(model, "int4", keep=0.5, fill="mean"), remap="hash", text=text)
    sm = Q.script_model(comp.serving)
    for b, _ in split_batches(ds, builder, "test"):
        v, l = b.sparse_features.values(), b.sparse_features.lengths()
        assert torch.equal(sm(b.dense_features, v, l), comp.serving(b.dense_features, v, l))
