"""Quantized lookups on both kernels, pruned-id fills, array vs hash remaps, threads and real byte counts."""

from __future__ import annotations

import pytest
import torch

from sparse_kd.compress import cpu_kernel as CK
from sparse_kd.compress import kernel as K
from sparse_kd.compress import quantize as Q
from sparse_kd.compress import rows as QR
from sparse_kd.compress import table_bytes as TB
from sparse_kd.compress import tbe as QT
from sparse_kd.serve import cpu_model as CM
from sparse_kd.serve.format import KERNEL_CPU, KERNEL_TBE
from sparse_kd.compress.importance import access_counts
from sparse_kd.compress.planner import option_bytes
from sparse_kd.metrics import serving_forward, split_batches
# compress_model(..., row_order="id") throughout: these tests look ids up in the model directly,
# so tables must stay in id order (the hot-first layout is tested in test_layout.py)
from sparse_kd.compress.stage import compress_model, model_weights

DTYPES = ["fp32", "fp16", "int8", "int4", "int2"]
TBE = KERNEL_TBE


def settings(model, dtype="int8", keep=1.0, fill="zero", keep_ids_only=True):
    return {
        f: {"keep_ratio": keep if (f.endswith("_id") or not keep_ids_only) else 1.0, "dtype": dtype, "fill": fill}
        for f in model_weights(model)
    }


def lookup_each_id(serving, feature: str, n: int) -> torch.Tensor:
    """(n, D): the pooled embedding of a bag holding just id k, for k in 0..n-1, other features empty."""
    keys = serving.keys
    lengths = torch.cat([torch.ones(n, dtype=torch.int32) if k == feature else torch.zeros(n, dtype=torch.int32) for k in keys])
    with torch.no_grad():
        return serving.embeddings(torch.arange(n, dtype=torch.int64), lengths)[:, keys.index(feature)]


def error_bound(ref: torch.Tensor, dtype: str) -> torch.Tensor:
    """Per-row max |dequantized - fp32| allowed: half a quantization step + fp16 rounding of scale/bias."""
    if dtype == "fp32":
        return torch.full((ref.shape[0],), 1e-7)
    if dtype == "fp16":
        return ref.abs().amax(1) * 2 ** -10 + 1e-7
    lo, hi = ref.amin(1), ref.amax(1)
    steps = 2 ** QR.BITS[dtype] - 1
    return (hi - lo) / steps * 0.5 + (hi - lo) * 2 ** -9 + lo.abs() * 2 ** -10 + 1e-6


@pytest.mark.parametrize("kernel", [KERNEL_CPU, TBE])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantized_lookup_matches_dequantized_reference(tiny, dtype, kernel):
    ds, text, model, _ = tiny
    comp = compress_model(model, ds, settings(model, dtype), text=text, row_order="id", kernel=kernel)
    assert K.kernel_of(comp.serving) == kernel
    q = Q.extract_qtables(comp.serving)
    w = model_weights(model)
    for f, ref in w.items():
        deq = QR.dequantize_rows(q[f].weight, q[f].scale_bias, dtype)
        got = lookup_each_id(comp.serving, f, ref.shape[0])
        # the FBGEMM lookup is exactly the dequantized row (fp16: stored rows are fp16 already)
        torch.testing.assert_close(got, deq, atol=1e-6, rtol=0)
        # and the dequantized row is within the dtype's rounding of the trained row
        err = (deq - ref).abs().amax(1)
        assert torch.all(err <= error_bound(ref, dtype)), (f, dtype, float((err - error_bound(ref, dtype)).max()))
    if dtype in ("int4", "int2"):  # coarse types really are coarse: the check above is not vacuous
        assert float((QR.dequantize_rows(q["user_id"].weight, q["user_id"].scale_bias, dtype) - w["user_id"]).abs().max()) > 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("keep, fill", [(1.0, "zero"), (0.5, "zero"), (0.5, "mean")], ids=["whole", "pruned", "mean_fill"])
def test_cpu_kernel_scores_equal_the_tbe_path(tiny, dtype, keep, fill):
    """The CPU serving model (torch.ops.quantized / embedding_bag) scores every pair as the TBE
    model does, up to float summation order; fp16 also rounds each pooled sum to fp16 once."""
    ds, text, model, builder = tiny
    s = settings(model, dtype, keep=keep, fill=fill, keep_ids_only=False)
    cpu = compress_model(model, ds, s, text=text, row_order="id")
    tbe = compress_model(model, ds, s, text=text, row_order="id", kernel=TBE)
    assert (keep < 1.0) == bool(cpu.remaps)  # the pruned cases are pruned
    tol = dict(atol=2e-3, rtol=2 ** -10) if dtype == "fp16" else dict(atol=1e-5, rtol=1e-5)
    for split in ("valid", "test_cold"):
        for b, _ in split_batches(ds, builder, split):
            v, ln = b.sparse_features.values(), b.sparse_features.lengths()
            with torch.no_grad():
                torch.testing.assert_close(cpu.serving.embeddings(v, ln), tbe.serving.embeddings(v, ln), **tol)
                torch.testing.assert_close(serving_forward(cpu.serving)(b), serving_forward(tbe.serving)(b), **tol)
    # bytes: same rows, the CPU layout has no row padding (int8 keeps fp32 scale/bias: 8 bytes a row)
    d = 8
    row = {"fp32": 4 * d, "fp16": 2 * d, "int8": d + 8, "int4": d // 2 + 4, "int2": d // 4 + 4}[dtype]
    for t, info in cpu.tables.items():
        assert info["bytes"]["row_bytes"] == row and info["bytes"]["rows"] == tbe.tables[t]["bytes"]["rows"]


def test_pruned_ids_zero_mean_text(tiny):
    ds, text, model, _ = tiny
    w = model_weights(model)["item_id"]
    freq = access_counts(ds, "item_id")
    kept = None
    for fill in ("zero", "mean", "text"):
        comp = compress_model(model, ds, settings(model, "fp32", keep=0.5, fill=fill), text=text, row_order="id")
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
    for dtype in DTYPES:  # every operator gives a pruned id nothing (mapping -1, or the zero row)
        comp = compress_model(model, ds, settings(model, dtype, keep=0.5), text=text, row_order="id")
        got = lookup_each_id(comp.serving, "item_id", w.shape[0])
        assert torch.all(got[~kept] == 0) and torch.all(got[kept].abs().sum(1) > 0), dtype


def test_text_fill_falls_back_to_mean_for_features_without_text(tiny):
    ds, text, model, _ = tiny
    comp = compress_model(model, ds, settings(model, "fp32", keep=0.5, fill="text", keep_ids_only=False), text=text, row_order="id")
    assert comp.tables["t_tags"]["fill"] == "mean" and comp.tables["t_item_id"]["fill"] == "text"
    assert any("tags" in n for n in comp.notes)


@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_remap_array_and_hash_give_identical_outputs_on_the_tbe(tiny, fill):
    ds, text, model, builder = tiny
    s = settings(model, "int4", keep=0.2, fill=fill, keep_ids_only=False)
    a = compress_model(model, ds, s, remap="array", text=text, row_order="id", kernel=TBE)
    h = compress_model(model, ds, s, remap="hash", text=text, row_order="id", kernel=TBE)
    assert QT.remap_kind(QT.tbe_of(a.serving)) == "array" and QT.remap_kind(QT.tbe_of(h.serving)) == "hash"
    for split in ("valid", "test_cold"):
        for b, _ in split_batches(ds, builder, split):
            assert torch.equal(serving_forward(a.serving)(b), serving_forward(h.serving)(b))
    # pruning changed something (the comparison is not between two unpruned models)
    full = compress_model(model, ds, settings(model, "int4"), text=text, row_order="id", kernel=TBE)
    b, _ = split_batches(ds, builder, "valid")[0]
    assert not torch.equal(serving_forward(full.serving)(b), serving_forward(a.serving)(b))
    # sizes: array = 4 bytes per original id; hash = 2 int32 per slot, round_up(mapped ids / 0.5, 32)
    # slots, mapped = kept ids (zero fill) or every id (mean fill: many ids share the mean row)
    ta, th = a.tables["t_user_id"], h.tables["t_user_id"]
    assert ta["bytes"]["remap"] == 4 * ta["rows_original"]
    mapped = th["rows_kept"] if fill == "zero" else th["rows_original"]
    assert th["bytes"]["remap"] == 8 * (-(-int(mapped / 0.5) // 32) * 32)


def test_hash_remap_is_refused_on_the_cpu_kernel(tiny):
    from pathlib import Path

    from sparse_kd.config import ConfigError, load_config

    ds, text, model, _ = tiny
    with pytest.raises(ValueError, match=r"compress\.remap: 'hash' needs the TBE"):
        compress_model(model, ds, settings(model, "int8", keep=0.5), remap="hash", text=text, row_order="id")
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    with pytest.raises(ConfigError, match=r"compress\.remap: 'hash' needs compress\.serve_device: cuda"):
        load_config(demo, ["compress.remap=hash"])
    with pytest.raises(ConfigError, match=r"compress\.row_alignment: 1 is not valid with compress\.serve_device: cuda"):
        load_config(demo, ["compress.serve_device=cuda", "compress.row_alignment=1"])
    assert load_config(demo, ["compress.serve_device=cuda", "compress.remap=hash"]).compress.serve_device == "cuda"


def test_table_bytes_equal_real_buffers(tiny):
    ds, text, model, _ = tiny
    s = settings(model, "int8", keep=0.5)
    s["age"]["dtype"], s["tags"]["dtype"], s["item_id"]["dtype"] = "fp16", "int2", "fp32"
    d = 8  # embedding dim of the tiny model
    for kernel in (KERNEL_CPU, TBE):
        comp = compress_model(model, ds, s, text=text, row_order="id", kernel=kernel)
        tb = TB.table_bytes(comp.serving)
        if kernel == TBE:
            tbe = QT.tbe_of(comp.serving)
            weights, remaps = tbe.weights_host.numel(), tbe.index_remappings_array.numel() * 4
            row = {"fp32": 4 * d, "fp16": 2 * d, "int8": d + 4, "int4": d // 2 + 4, "int2": d // 4 + 4}
            row = {k: -(-v // 16) * 16 for k, v in row.items()}  # fp16 scale/bias first, rows padded to 16 bytes
        else:
            tables = comp.serving.lookup.tables
            weights = sum(t.weight.numel() * t.weight.element_size() for t in tables)
            remaps = sum(t.mapping.numel() * 4 for t in tables)
            row = {"fp32": 4 * d, "fp16": 2 * d, "int8": d + 8, "int4": d // 2 + 4, "int2": d // 4 + 4}
        assert sum(v["weights"] + v["padding"] for v in tb.values()) == weights
        assert sum(v["remap"] for v in tb.values()) == remaps > 0
        for t, v in tb.items():
            assert v["row_bytes"] == row[s[t[2:]]["dtype"]], (kernel, t, v)
            assert v["weights"] == v["rows"] * v["row_bytes"]
            if kernel == TBE:
                assert (v["weights"] + v["padding"]) % 128 == 0  # tables start on cache lines
        assert tb["t_user_id"]["rows"] == 30 and tb["t_user_id"]["remap"] == 60 * 4
        # a pruned fp32 table on the CPU kernel carries one zero row for its pruned ids
        assert kernel == TBE or tb["t_item_id"]["padding"] == 4 * d
        # the planner's per-option bytes (from a one-table module) agree with the full model's
        for t, v in tb.items():
            f = t[2:]
            pruned = f in ("user_id", "item_id")
            ob = option_bytes(comp.tables[t]["rows_original"], v["rows"], d, v["dtype"], v["rows"] if pruned else None,
                              "array", kernel=kernel)
            assert ob["total"] == v["total"], (kernel, t, ob, v)


@pytest.mark.parametrize("kernel, remap", [(KERNEL_CPU, "array"), (TBE, "hash")])
def test_quantized_model_scripts_and_matches_eager(tiny, kernel, remap):
    ds, text, model, builder = tiny
    comp = compress_model(model, ds, settings(model, "int4", keep=0.5, fill="mean"), remap=remap, text=text, row_order="id", kernel=kernel)
    sm = Q.script_model(comp.serving)
    for b, _ in split_batches(ds, builder, "test"):
        v, l = b.sparse_features.values(), b.sparse_features.lengths()
        assert torch.equal(sm(b.dense_features, v, l), comp.serving(b.dense_features, v, l))
    assert K.kernel_of(sm) == kernel
    assert {f: (q.dtype, q.num_rows) for f, q in Q.extract_qtables(sm).items()} == {
        f: (q.dtype, q.num_rows) for f, q in Q.extract_qtables(comp.serving).items()}


def _lookup(dtypes, pruned, seed=0):
    """A QuantizedLookup over random tables of dim 16 (``pruned``: keep every other id)."""
    g = torch.Generator().manual_seed(seed)
    tables = []
    for k, (dt, pr) in enumerate(zip(dtypes, pruned)):
        n = 300 + 50 * k
        rows = torch.randn(n, 16, generator=g)
        remap = None
        if pr:
            remap = torch.full((n,), -1, dtype=torch.int32)
            remap[::2] = torch.arange((n + 1) // 2, dtype=torch.int32)
            rows = rows[::2].contiguous()
        w, sb = QR.quantize_rows(rows, dt)
        tables.append(CK.pack_table(QR.QTable(f"f{k}", dt, 16, w, sb, remap)))
    return CM.QuantizedLookup(tables, min_ids_per_worker=1)


def _batch(num_tables, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 6, (num_tables * batch,), generator=g)
    lengths[:3] = 0  # empty bags
    values = torch.cat([torch.randint(0, 300 + 50 * (k // batch), (int(n),), generator=g) for k, n in enumerate(lengths)])
    return values, lengths


@pytest.mark.parametrize("workers", [2, 3, 7])
def test_forked_lookup_is_bit_identical_to_one_worker(workers):
    """Every table runs on forked runs of samples; every bag comes out bit-identical to the
    one-worker lookup, scripted or not."""
    dtypes = ["int4", "int8", "int8", "int2", "fp16", "fp32", "int4"]
    pruned = [False, False, True, True, True, False, True]
    lk = _lookup(dtypes, pruned)
    values, lengths = _batch(len(dtypes), 53)
    ref = lk(values, lengths)
    assert ref.shape == (53, len(dtypes), 16) and torch.all(ref[:3, 0] == 0)
    sm = torch.jit.script(lk)
    for m in (lk, sm):
        m.set_num_workers(workers)
        assert torch.equal(m(values, lengths), ref)
        assert torch.equal(torch.stack(m.pooled(values, lengths), 1), ref)  # per table, as the model reads it
        m.set_num_workers(1)
        assert torch.equal(torch.stack(m.pooled(values, lengths), 1), ref)
    # the reference itself is right: per table, the dequantized rows summed per bag
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    for t, table in enumerate(lk.tables):
        q = CK.unpack_table(table)
        deq = QR.dequantize_rows(q.weight, q.scale_bias, q.dtype)
        for b in (3, 17, 52):
            ids = values[offsets[t * 53 + b]: offsets[t * 53 + b + 1]]
            rows = ids if q.remap is None else q.remap[ids].long()
            expect = deq[rows[rows >= 0]].sum(0)
            torch.testing.assert_close(ref[b, t], expect, atol=1e-5, rtol=2 ** -10 if q.dtype == "fp16" else 1e-6)


@pytest.mark.parametrize("num_features", [1, 3, 6])
def test_pooled_interaction_is_torchrecs_interaction_arch_bit_for_bit(num_features):
    from torchrec.models.dlrm import InteractionArch

    g = torch.Generator().manual_seed(num_features)
    dense, sparse = torch.randn(41, 16, generator=g), torch.randn(41, num_features, 16, generator=g)
    want = InteractionArch(num_features)(dense, sparse)
    for m in (CM.PooledInteraction(num_features), torch.jit.script(CM.PooledInteraction(num_features))):
        assert torch.equal(m(dense, list(sparse.unbind(1))), want)


def test_cpu_serving_model_is_the_trained_dlrm_on_its_lookup(tiny):
    """forward == torchrec's interaction + over arch of the trained model on the lookup's (B, F, D)
    output: the served model's own interaction changes no bit."""
    ds, text, model, builder = tiny
    comp = compress_model(model, ds, settings(model, "int8", keep=0.5), row_order="id")
    serving = comp.serving
    for b, _ in split_batches(ds, builder, "test"):
        v, l = b.sparse_features.values(), b.sparse_features.lengths()
        with torch.no_grad():
            ref = model.over_arch(model.inter_arch(serving.dense_arch(b.dense_features), serving.embeddings(v, l)))
            assert torch.equal(serving(b.dense_features, v, l), ref.reshape(-1))


def test_lookup_with_no_rows_and_pack_round_trip():
    lk = _lookup(["int8", "fp16"], [True, True])
    out = lk(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int32))
    assert out.shape == (0, 2, 16)
    for table in lk.tables:  # pack -> unpack gives back the same bytes and remap
        q = CK.unpack_table(table)
        again = CK.unpack_table(CK.pack_table(q))
        assert torch.equal(q.weight, again.weight) and torch.equal(q.remap, again.remap)
        assert (q.scale_bias is None) == (again.scale_bias is None)


@pytest.mark.parametrize("dtype", ["int8", "int4", "int2"])
def test_pruned_table_equals_the_operators_own_compressed_indices_path(dtype):
    """A pruned table remaps ids itself (-1 to one all-zero row) and runs the dense operator: the
    sums are bit-identical to the operators' ``compressed_indices_mapping`` path on the R rows."""
    g = torch.Generator().manual_seed(3)
    n, r, dim = 500, 120, 16
    remap = torch.full((n,), -1, dtype=torch.int32)
    remap[torch.randperm(n, generator=g)[:r]] = torch.arange(r, dtype=torch.int32)
    w, sb = QR.quantize_rows(torch.randn(r, dim, generator=g), dtype)
    t = CK.pack_table(QR.QTable("f", dtype, dim, w, sb, remap))
    assert bool(t.zero_row) and t.weight.shape[0] == r + 1 and not bool(t.weight[-1].any())
    ids = torch.randint(0, n, (900,), generator=g, dtype=torch.int32)
    offsets = torch.tensor([0, 1, 1, 300, 650, 900], dtype=torch.int32)  # an empty bag too
    op = {"int8": torch.ops.quantized.embedding_bag_byte_rowwise_offsets,
          "int4": torch.ops.quantized.embedding_bag_4bit_rowwise_offsets,
          "int2": torch.ops.quantized.embedding_bag_2bit_rowwise_offsets}[dtype]
    ref = op(t.weight[:-1].contiguous(), ids, offsets, False, 0, True, None, remap, True)
    assert torch.equal(t(ids, offsets), ref)
    back = CK.unpack_table(t)  # the zero row is not part of the table's rows
    assert torch.equal(back.weight, w) and torch.equal(back.remap, remap)
