"""The compression stage over a run folder, and the compression study."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from sparse_kd.compress.planner import BudgetError
from sparse_kd.compress.prune import table_settings
from sparse_kd.compress.stage import compress_model, compress_run, load_run, model_weights, serving_builder, serving_dataset
from sparse_kd.config import CompressConfig, StudyConfig
from sparse_kd.metrics import binary_metrics, evaluate, fp32_forward, serving_forward
from sparse_kd.serve import Predictor
from sparse_kd.studies.compress_report import pareto_front
from sparse_kd.studies.compress_study import run_compress_study


def test_compress_run_report_and_artifact(run_folder, tmp_path, capsys):
    run, ds, _ = run_folder
    cfg = CompressConfig(default_dtype="int8", keep_ratio={"item_id": 0.5}, dtype={"user_id": "int4"})
    rep = compress_run(run, "baseline", cfg, tmp_path / "art")
    printed = capsys.readouterr().out
    assert "embedding storage" in printed and "t_item_id" in printed and "delta AUC" in printed
    assert set(rep["metrics"]["before"]) == set(rep["metrics"]["after"]) == {"valid", "test", "valid_cold", "test_cold"}
    t = rep["tables"]["t_item_id"]
    assert t["rows_kept"] == 15 and t["dtype"] == "int8" and rep["tables"]["t_user_id"]["dtype"] == "int4"
    assert rep["bytes"]["total"] == sum(v["bytes"]["total"] for v in rep["tables"].values())
    assert rep["bytes"]["fp32_total"] == sum(v["rows_original"] * 8 * 4 for v in rep["tables"].values())
    assert rep["bytes"]["ratio"] > 1.5
    # the artifact's scores give the same test metrics the stage reported
    p = Predictor.load(tmp_path / "art")
    sp = ds.splits["test"]
    logits = p.score_logits([ds.user_ids[u] for u in sp.user], [ds.item_ids[i] for i in sp.item])
    m = binary_metrics(torch.from_numpy(logits), torch.from_numpy(sp.label))
    assert m["auc"] == pytest.approx(rep["metrics"]["after"]["test"]["auc"], abs=1e-9)
    assert m["logloss"] == pytest.approx(rep["metrics"]["after"]["test"]["logloss"], abs=1e-5)
    assert p.manifest["config"]["source"]["variant"] == "baseline"


def test_compress_run_with_budget(run_folder, tmp_path):
    run, _, _ = run_folder
    budget = 0.004
    rep = compress_run(run, "baseline", CompressConfig(budget_mb=budget), tmp_path / "art")
    assert rep["bytes"]["total"] <= budget * 1e6 and rep["plan"]["plan_bytes"] == rep["bytes"]["total"]
    with pytest.raises(BudgetError, match=r"compress\.budget_mb"):
        compress_run(run, "baseline", CompressConfig(budget_mb=1e-6), tmp_path / "art2")
    assert not (tmp_path / "art2").exists()


def test_folded_remap_serves_the_same_scores_without_remap_bytes(run_folder, tmp_path):
    from sparse_kd.compress import artifact as A
    from sparse_kd.compress.stage import serving_builder, serving_dataset

    run, ds, _ = run_folder
    inp = load_run(run, "distilled")
    settings = table_settings(CompressConfig(default_dtype="int4", default_pruned_fill="cluster",
                                             default_cluster_ratio=0.1), list(model_weights(inp.model)))
    settings["user_id"].update(keep_ratio=0.5, fill="zero")
    settings["item_id"]["keep_ratio"] = 0.3
    comp = {r: compress_model(inp.model, inp.ds, settings, remap=r, text=inp.text) for r in ("array", "fold")}
    m = {r: evaluate(serving_forward(c.serving), serving_dataset(inp.ds, c), serving_builder(inp.ds, c, inp.builder))
         for r, c in comp.items()}
    for split in m["array"]:
        assert m["fold"][split]["auc"] == pytest.approx(m["array"][split]["auc"], abs=1e-9), split
    # the array remaps (4 bytes per original id of a pruned table) and the all-zero row that their
    # -1 ids read (the table's padding) are all the difference
    ids = sum(t["rows_original"] for t in comp["array"].tables.values() if t["bytes"]["remap"])
    assert ids == ds.num_users + ds.num_items
    pad = sum(t["bytes"]["padding"] for t in comp["array"].tables.values())
    assert all(t["bytes"]["padding"] == 0 for t in comp["fold"].tables.values())
    assert comp["array"].embedding_bytes - comp["fold"].embedding_bytes == 4 * ids + pad
    assert all(t["bytes"]["remap"] == 0 for t in comp["fold"].tables.values())
    assert comp["fold"].tables["t_item_id"]["remap"] == "folded" and comp["fold"].tables["t_item_id"]["clusters"] > 0
    # the artifact: its mappings hold stored rows, the predictor scores what the stage measured
    cfg = CompressConfig(default_dtype="int4", default_pruned_fill="cluster", default_cluster_ratio=0.1,
                         keep_ratio={"user_id": 0.5, "item_id": 0.3}, pruned_fill={"user_id": "zero"}, remap="fold")
    rep = compress_run(run, "distilled", cfg, tmp_path / "art")
    assert rep["bytes"]["total"] == comp["fold"].embedding_bytes
    p = Predictor.load(tmp_path / "art")
    for split in ("test", "valid_cold"):
        sp = ds.splits[split]
        logits = p.score_logits([ds.user_ids[u] for u in sp.user], [ds.item_ids[i] for i in sp.item])
        assert binary_metrics(torch.from_numpy(logits), torch.from_numpy(sp.label))["auc"] == \
            pytest.approx(rep["metrics"]["after"][split]["auc"], abs=1e-9)
    # a new text-only item joins a folded table: its bag points at its new row
    before = p.score(ds.user_ids[:3], ds.item_ids[:3])
    text = inp.text["item"][:1] * 0.9
    A.add_items(tmp_path / "art", ["brand-new"], text)
    p2 = Predictor.load(tmp_path / "art")
    np.testing.assert_array_equal(p2.score(ds.user_ids[:3], ds.item_ids[:3]), before)
    _, st = p2.score(ds.user_ids[:2], ["brand-new", "brand-new"], return_stats=True)
    assert st["unknown_items"] == 0
    fm = json.loads((tmp_path / "art" / "mappings.json").read_text())["features"]["item_id"]
    rows = p2.manifest["tables"]["t_item_id"]["rows_stored"]
    assert fm["values"][-1] == rows - 1 and len(fm["vocab"]) == ds.num_items + 1


def test_pareto_front():
    pts = [(1, 0.5), (2, 0.7), (3, 0.6), (2, 0.7), (4, 0.9), (5, 0.9)]
    assert pareto_front(pts) == [True, True, False, True, True, False]


def _md_rows(path, variant: str) -> list[list[str]]:
    """The cells of the markdown table's rows of ``variant``."""
    return [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in path.read_text().splitlines() if line.startswith(f"| {variant} ")]


def test_compress_study_writes_csv_json_png(run_folder, tmp_path):
    run, ds, baseline = run_folder
    study = StudyConfig(keep_ratios=(1.0, 0.5), dtypes=("fp32", "int4"))
    rows = run_compress_study(run, ["baseline", "distilled"], study, tmp_path)
    # one row per variant x keep ratio x dtype of the inputs, in order
    grid = [(v, k, d) for v in ("baseline", "distilled") for k in (1.0, 0.5) for d in ("fp32", "int4")]
    assert [(r["variant"], r["keep_ratio"], r["dtype"]) for r in rows] == grid
    # the CSV, JSON and markdown files hold exactly these rows
    with open(tmp_path / "compress_study.csv") as f:
        table = list(csv.DictReader(f))
    assert [(t["variant"], float(t["keep_ratio"]), t["dtype"], int(t["embedding_bytes"]), float(t["test_auc"]),
             t["pareto"] == "True") for t in table] == \
        [(r["variant"], r["keep_ratio"], r["dtype"], r["embedding_bytes"], r["test_auc"], r["pareto"]) for r in rows]
    doc = json.loads((tmp_path / "compress_study.json").read_text())
    assert doc["rows"] == rows and doc["keep_ratios"] == [1.0, 0.5] and doc["dtypes"] == ["fp32", "int4"]
    for v in ("baseline", "distilled"):
        assert [(c[1], float(c[2]), c[3]) for c in _md_rows(tmp_path / "compress_study.md", v)] == \
            [(r["fill"], r["keep_ratio"], r["dtype"]) for r in rows if r["variant"] == v]
    png = (tmp_path / "compress_study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # the numbers are those of the models: the fp32 AUC of the trained baseline, measured here
    inp = load_run(run, "baseline")
    fp32 = evaluate(fp32_forward(baseline), ds, inp.builder)["test"]["auc"]
    by = {(r["variant"], r["keep_ratio"], r["dtype"]): r for r in rows}
    assert by[("baseline", 1.0, "fp32")]["fp32_test_auc"] == pytest.approx(fp32, abs=1e-9)
    assert by[("baseline", 1.0, "fp32")]["test_auc"] == pytest.approx(fp32, abs=1e-6)  # fp32 TBE: same lookups
    # and the compressed baseline at keep 0.5 / int4, compressed and evaluated here
    settings = table_settings(CompressConfig(default_dtype="int4"), list(model_weights(baseline)))
    for f in ("user_id", "item_id"):
        settings[f]["keep_ratio"] = 0.5
    comp = compress_model(baseline, ds, settings, remap=CompressConfig().remap, text=inp.text)  # as the study does
    small = by[("baseline", 0.5, "int4")]
    assert small["embedding_bytes"] == comp.embedding_bytes < by[("baseline", 1.0, "fp32")]["embedding_bytes"]
    got = evaluate(serving_forward(comp.serving), serving_dataset(ds, comp), serving_builder(ds, comp, inp.builder))
    assert small["test_auc"] == pytest.approx(got["test"]["auc"], abs=1e-9)
    for v in ("baseline", "distilled"):
        mine = [r for r in rows if r["variant"] == v]
        assert [r["pareto"] for r in mine] == pareto_front([(r["embedding_bytes"], r["test_auc"]) for r in mine])
        full = by[(v, 1.0, "fp32")]
        assert full["test_auc"] == pytest.approx(full["fp32_test_auc"], abs=1e-6)
        assert full["ratio"] == 1.0  # fp32 on the CPU kernel: the same rows, nothing added


def test_compress_study_fill_series(run_folder, tmp_path):
    run, _, _ = run_folder
    rows = run_compress_study(run, ["distilled"], StudyConfig(keep_ratios=(1.0, 0.5), dtypes=("int8",)), tmp_path,
                              fills=("zero", "text"))
    # nothing pruned at keep 1.0: the same model for every fill, built once (under the first fill)
    assert [(r["fill"], r["keep_ratio"]) for r in rows] == [("zero", 1.0), ("zero", 0.5), ("text", 0.5)]
    z = {r["keep_ratio"]: r for r in rows if r["fill"] == "zero"}
    t = {r["keep_ratio"]: r for r in rows if r["fill"] == "text"}
    # pruned: text keeps a row per id (the unpruned bytes, other rows); zero drops rows
    assert t[0.5]["embedding_bytes"] == z[1.0]["embedding_bytes"] > z[0.5]["embedding_bytes"]
    assert t[0.5]["test_auc"] != z[1.0]["test_auc"]
    # one Pareto front per fill series
    for fill in ("zero", "text"):
        mine = [r for r in rows if r["fill"] == fill]
        assert mine
        assert [r["pareto"] for r in mine] == pareto_front([(r["embedding_bytes"], r["test_auc"]) for r in mine])
    assert [(c[1], float(c[2])) for c in _md_rows(tmp_path / "compress_study.md", "distilled")] == \
        [(r["fill"], r["keep_ratio"]) for r in rows]
