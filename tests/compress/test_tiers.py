"""Precision tiers inside a table: spec parsing, the served TieredTable against dequantized rows,
pruned and folded, scripted, bytes, and the refusals."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from sparse_kd.compress import rows as QR
from sparse_kd.compress import tiers as TI
from sparse_kd.compress.cpu_kernel import cpu_option_bytes, pack_table, unpack_table
from sparse_kd.config.dtypes import is_tiered, parse_tiers
from sparse_kd.serve.cpu_model import QuantizedLookup

SPEC = "int8:0.1,int4:0.3,int2"


def _bags(n_ids: int, rows: int, bags: int, gen: torch.Generator):
    ids = torch.randint(0, rows, (n_ids,), generator=gen, dtype=torch.int32)
    cuts = torch.sort(torch.randint(0, n_ids + 1, (bags - 1,), generator=gen)).values
    offsets = torch.cat([torch.tensor([0]), cuts, torch.tensor([n_ids])]).to(torch.int32)
    return ids, offsets


def _reference(deq: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.embedding_bag(ids.long(), deq, offsets.long(), mode="sum", include_last_offset=True)


def test_parse_and_starts():
    t = parse_tiers(SPEC)
    assert [x.dtype for x in t] == ["int8", "int4", "int2"] and t[-1].share is None
    assert TI.tier_starts(t, 100) == [0, 10, 40, 100]
    assert [x.share for x in t] == [0.1, 0.3, None]
    assert is_tiered(SPEC) and not is_tiered("int4")
    for bad, why in [("int8", "one tier"), ("int9:0.1,int2", "int9"), ("int8:0.6,int4:0.5,int2", "add up"),
                     ("int8:0.1,int2:0.2", "no share"), ("int8:x,int2", "share"), ("int8:1.5,int2", "share")]:
        with pytest.raises(ValueError, match=why):
            parse_tiers(bad, "compress.dtype.user_id")


@pytest.mark.parametrize("pruned", [False, True])
def test_tiered_lookup_equals_dequantized_rows(pruned):
    gen = torch.Generator().manual_seed(0)
    R, D, N = 200, 16, 320
    rows = torch.randn(R, D, generator=gen)
    remap = None
    if pruned:  # N ids: some to no row (-1), the rest to stored rows
        remap = torch.randint(-1, R, (N,), generator=gen, dtype=torch.int32)
    q = TI.qtable("user_id", rows, SPEC, remap)
    assert [p.num_rows for p in q.parts] == [20, 60, 120] and q.num_rows == R
    deq = TI.simulate(rows, SPEC)  # stored order is the hot-first order here
    # every tier's rows dequantize through their own dtype
    for (lo, hi), dt in zip([(0, 20), (20, 80), (80, 200)], ["int8", "int4", "int2"]):
        w, sb = QR.quantize_rows(rows[lo:hi], dt)
        assert torch.equal(deq[lo:hi], QR.dequantize_rows(w, sb, dt))
    full = deq if remap is None else torch.cat([deq, torch.zeros(1, D)])[torch.where(remap < 0, R, remap).long()]
    table = pack_table(q)
    ids, offsets = _bags(1000, N if pruned else R, 137, gen)
    want = _reference(full, ids, offsets)
    got = table(ids, offsets)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    scripted = torch.jit.script(QuantizedLookup([table, pack_table(QR.QTable("x", "fp32", D, rows.view(torch.uint8), None, None))]))
    lengths = torch.cat([offsets[1:] - offsets[:-1], torch.ones(137, dtype=torch.int32)])
    values = torch.cat([ids, torch.randint(0, R, (137,), generator=gen, dtype=torch.int32)])
    out = scripted(values, lengths)
    torch.testing.assert_close(out[:, 0], want, rtol=1e-5, atol=1e-5)
    # unpack gives the same rows back, remap included
    back = unpack_table(scripted.tables[0])
    assert back.dtype == SPEC and [p.dtype for p in back.parts] == ["int8", "int4", "int2"]
    for a, b in zip(back.parts, q.parts):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.scale_bias, b.scale_bias)
    assert (back.remap is None) == (remap is None) and (remap is None or torch.equal(back.remap, remap))


def test_simulate_ranks_rows_by_reads():
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(50, 8, generator=gen)
    reads = np.arange(50, dtype=np.float64)  # the last row is the hottest
    sim = TI.simulate(rows, "int8:0.2,int2", reads)
    hot = np.argsort(-reads, kind="stable")[:10]
    w, sb = QR.quantize_rows(rows[torch.from_numpy(hot)], "int8")
    assert torch.equal(sim[torch.from_numpy(hot)], QR.dequantize_rows(w, sb, "int8"))
    err = (sim - rows).pow(2).sum(1)
    assert err[torch.from_numpy(hot)].mean() < err[:40].mean() / 10


def test_bytes_of_a_tiered_table():
    D, R = 64, 1000
    b = cpu_option_bytes(R, R, D, SPEC, None)
    parts = [cpu_option_bytes(n, n, D, dt, None)["weights"] for n, dt in [(100, "int8"), (300, "int4"), (600, "int2")]]
    assert b["weights"] == sum(parts) and b["remap"] == 0 and b["rows"] == R
    assert [t["dtype"] for t in b["tiers"]] == ["int8", "int4", "int2"]
    # the all-zero rows around the tiers' rows are padding (tier 0: one; the others: two each);
    # a pruned table adds its remap, counted once
    zero_rows = 1 * (64 + 8) + 2 * (32 + 4) + 2 * (16 + 4)
    assert b["padding"] == zero_rows
    p = cpu_option_bytes(5000, R, D, SPEC, 3000)
    assert p["weights"] == sum(parts) and p["remap"] == 5000 * 4 and p["padding"] == zero_rows
    assert cpu_option_bytes(R, R, D, "int4", None)["weights"] > b["weights"] > cpu_option_bytes(R, R, D, "int2", None)["weights"]


def test_tiny_tables_with_empty_tiers():
    rows = torch.randn(3, 8)
    q = TI.qtable("f", rows, "int8:0.1,int2", None)
    assert [p.num_rows for p in q.parts] == [0, 3]
    t = pack_table(q)
    ids = torch.tensor([0, 2, 1], dtype=torch.int32)
    torch.testing.assert_close(t(ids, torch.tensor([0, 1, 3], dtype=torch.int32)),
                               _reference(TI.simulate(rows, "int8:0.1,int2"), ids, torch.tensor([0, 1, 3])))


def test_tiered_artifact_scores_as_its_dequantized_rows_and_takes_new_items(tiny, tmp_path):
    """compress (one tiered pruned table, one tiered table kept whole: its remap folded) ->
    artifact -> Predictor: scores equal the fp32 model holding the tiers' dequantized rows, as
    the planner simulates them; add-items appends into the last tier; bytes below plain int8 (at dim 8 scale and bias make int4 and these tiers alike)."""
    from sparse_kd.compress import artifact as A
    from sparse_kd.compress.importance import table_importance
    from sparse_kd.compress.planner import _with_rows, simulated_rows
    from sparse_kd.compress.prune import prune_tables
    from sparse_kd.compress.quantize import extract_qtables
    from sparse_kd.compress.stage import artifact_mappings, compress_model, model_weights
    from sparse_kd.metrics import fp32_forward
    from sparse_kd.serve import Predictor

    ds, text, model, builder = tiny
    settings = {
        "user_id": {"keep_ratio": 0.5, "dtype": "int8:0.2,int4:0.3,int2", "fill": "zero"},
        "item_id": {"keep_ratio": 1.0, "dtype": "int8:0.1,int2", "fill": "zero"},
        "age": {"keep_ratio": 1.0, "dtype": "fp16", "fill": "zero"},
        "tags": {"keep_ratio": 1.0, "dtype": "int4", "fill": "zero"},
    }
    comp = compress_model(model, ds, settings, text=text)
    plain = compress_model(model, ds, {f: {**s, "dtype": "int8"} for f, s in settings.items()}, text=text)
    assert comp.embedding_bytes < plain.embedding_bytes
    out = tmp_path / "artifact"
    A.save_artifact(out, comp, artifact_mappings(ds, comp), {"user": builder.user_dense, "item": builder.item_dense}, {})
    p = Predictor.load(out)
    sp = ds.splits["test"]
    users, items = [ds.user_ids[u] for u in sp.user], [ds.item_ids[i] for i in sp.item]
    got = p.score_logits(users, items)
    # the fp32 model with each table's simulated rows (tiers by training reads, as the stage stores them)
    imps = table_importance("frequency", model_weights(model), ds, text)
    pruned = prune_tables(model_weights(model), imps, {f: s["keep_ratio"] for f, s in settings.items()},
                          {f: s["fill"] for f, s in settings.items()}, text)
    with contextlib.ExitStack() as stack:
        for f, s in settings.items():
            stack.enter_context(_with_rows(model, f, simulated_rows(pruned[f], s["dtype"], imps[f].freq)))
        b = builder.build(torch.from_numpy(sp.user), torch.from_numpy(sp.item), torch.from_numpy(sp.label))
        with torch.no_grad():
            want = fp32_forward(model)(b).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    m = A.load_artifact_parts(out)["manifest"]
    assert m["tables"]["t_user_id"]["dtype"] == "int8:0.2,int4:0.3,int2"
    # add-items: the new item's row lands in the last tier of the tiered item table
    A.add_items(out, ["fresh-item"], text["item"][3:4])
    q = extract_qtables(torch.jit.load(str(out / "model.pt")))
    it = q["item_id"]
    assert it.parts is not None and it.parts[-1].dtype == "int2"
    assert it.num_rows == len(ds.item_ids) + 1
    assert Predictor.load(out).score_logits(["u1"], ["fresh-item"]).shape == (1,)


def test_config_refuses_bad_tiers_with_the_key():
    from sparse_kd.config import ConfigError, config_from_dict

    ok = config_from_dict({"compress": {"dtype": {"user_id": "int8:0.1,int4"}, "planner_tiers": ["int4:0.2,int2"]},
                           "study": {"dtypes": ["int4", "int8:0.05,int4:0.2,int2"]}})
    assert ok.compress.dtype["user_id"] == "int8:0.1,int4"
    for raw, key in [({"compress": {"dtype": {"user_id": "int8:0.1"}}}, "compress.dtype.user_id"),
                     ({"compress": {"dtype": {"user_id": "int8:0.1,int4"}, "row_order": "id"}}, "compress.row_order"),
                     ({"compress": {"dtype": {"user_id": "int8:0.1,int4"}, "serve_device": "cuda"}}, "compress.serve_device"),
                     ({"compress": {"planner_tiers": ["int4"]}}, "compress.planner_tiers"),
                     ({"study": {"dtypes": ["int4:0.5,int9"]}}, "study.dtypes")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config_from_dict(raw)


def test_planner_weighs_tier_splits_and_its_bytes_and_aucs_hold_for_real(tiny):
    """A tier split among the planner's dtypes: its bytes are those of the real compressed table,
    and the valid AUC it measured (simulated rows) is the real tiered model's."""
    from sparse_kd.compress.importance import table_importance
    from sparse_kd.compress.planner import sensitivity
    from sparse_kd.compress.prune import table_settings
    from sparse_kd.compress.stage import compress_model, model_weights, serving_builder, serving_dataset
    from sparse_kd.config import CompressConfig
    from sparse_kd.metrics import auc, predict_split, serving_forward, split_batches

    ds, text, model, builder = tiny
    imps = table_importance("frequency", model_weights(model), ds, text)
    spec = "int8:0.3,int2"
    sens = sensitivity(model, ds, builder, imps, table_settings(CompressConfig(), list(imps)), ("fold",), text,
                       keep_ratios=(1.0, 0.5), dtypes=("int8", spec), fills=("zero",), confidence=0.0)
    tiered = [o for o in sens.options["user_id"] if o.dtype == spec]
    assert len(tiered) == 2 and all(np.isfinite(o.valid_auc) for o in tiered)
    o = next(o for o in tiered if o.keep_ratio == 0.5)
    settings = {f: {"keep_ratio": 1.0, "dtype": "fp32", "fill": "zero"} for f in imps}
    settings["user_id"] = {"keep_ratio": 0.5, "dtype": spec, "fill": "zero"}
    comp = compress_model(model, ds, settings, importances=imps, remap="fold", text=text)
    from sparse_kd.compress.table_bytes import table_bytes
    assert table_bytes(comp.serving)["t_user_id"]["total"] == o.bytes
    sds = serving_dataset(ds, comp)
    logits = predict_split(serving_forward(comp.serving), split_batches(sds, serving_builder(ds, comp, builder), "valid", 4096))
    assert auc(logits, torch.from_numpy(ds.splits["valid"].label)) == pytest.approx(o.valid_auc, abs=2e-3)
