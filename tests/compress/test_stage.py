"""The compression stage over a run folder, and the compression study."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from sparse_kd.compress.planner import BudgetError
from sparse_kd.compress.stage import compress_run
from sparse_kd.config import CompressConfig, StudyConfig
from sparse_kd.serve import Predictor
from sparse_kd.student.train import binary_metrics
from sparse_kd.studies.compress_study import pareto_front, run_compress_study


def test_compress_run_report_and_artifact(run_folder, tmp_path, capsys):
    run, ds, _ = run_folder
    cfg = CompressConfig(default_dtype="int8", keep_ratio={"item_id": 0.5}, dtype={"user_id": "int4"})
    rep = compress_run(run, "baseline", cfg, tmp_path / "art")
    printed = capsys.readouterr().out
    assert "embedding storage" in printed and "t_item_id" in printed and "delta AUC" in printed
    assert set(rep["metrics"]["before"]) == set(rep["metrics"]["after"]) == {"valid", "test", "test_cold"}
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


def test_pareto_front():
    pts = [(1, 0.5), (2, 0.7), (3, 0.6), (2, 0.7), (4, 0.9), (5, 0.9)]
    assert pareto_front(pts) == [True, True, False, True, True, False]


def test_compress_study_writes_csv_json_png(run_folder, tmp_path):
    run, _, _ = run_folder
    study = StudyConfig(keep_ratios=(1.0, 0.5), dtypes=("fp32", "int4"))
    rows = run_compress_study(run, ["baseline", "distilled"], study, tmp_path)
    assert len(rows) == 8
    with open(tmp_path / "compress_study.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and {r["variant"] for r in table} == {"baseline", "distilled"}
    doc = json.loads((tmp_path / "compress_study.json").read_text())
    assert len(doc["rows"]) == 8
    png = (tmp_path / "compress_study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    for v in ("baseline", "distilled"):
        mine = [r for r in rows if r["variant"] == v]
        assert any(r["pareto"] for r in mine)
        smallest = min(mine, key=lambda r: r["embedding_bytes"])
        assert smallest["pareto"] or any(r["embedding_bytes"] == smallest["embedding_bytes"] and r["pareto"] for r in mine)
        full = next(r for r in mine if r["keep_ratio"] == 1.0 and r["dtype"] == "fp32")
        assert full["test_auc"] == pytest.approx(full["fp32_test_auc"], abs=1e-6)
        assert full["ratio"] == 1.0  # fp32 on the CPU kernel: the same rows, nothing added


def test_compress_study_fill_series(run_folder, tmp_path):
    run, _, _ = run_folder
    rows = run_compress_study(run, ["distilled"], StudyConfig(keep_ratios=(0.5,), dtypes=("int8",)), tmp_path,
                              fills=("zero", "text"))
    z, t = rows
    assert (z["fill"], t["fill"]) == ("zero", "text")
    assert z["pareto"] and t["pareto"]  # one point per series: each is its own front
    assert t["embedding_bytes"] > z["embedding_bytes"]  # text keeps a row per id
    assert "distilled/text" in (tmp_path / "compress_study.md").read_text() or "text" in (tmp_path / "compress_study.csv").read_text()
