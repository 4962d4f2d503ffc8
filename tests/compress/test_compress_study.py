"""The compression study: plan points chosen on validation data, both byte accountings, changes
against the uncompressed model, seeds that must vary the data, targets chosen by valid not test."""

from __future__ import annotations

import json

import pytest
import yaml

from sparse_kd.compress.prune import table_settings
from sparse_kd.compress.stage import compress_model, load_run, serving_builder, serving_dataset
from sparse_kd.config import CompressConfig, ConfigError, StudyConfig, config_from_dict, to_dict
from sparse_kd.metrics import evaluate, serving_forward
from sparse_kd.studies.compress_study import (
    SPLITS,
    average_runs,
    check_seed_runs,
    run_compress_study,
    targets,
)


def test_plan_points_and_both_accountings(run_folder, tmp_path):
    run, _, _ = run_folder
    study = StudyConfig(keep_ratios=(1.0, 0.4), dtypes=("fp32", "int4"), compress_budgets=(3.0,),
                        compress_remaps=("array", "fold"))
    base = CompressConfig(default_pruned_fill="cluster", default_cluster_ratio=0.1)
    rows = run_compress_study(run, ["baseline", "distilled"], study, tmp_path, base=base, fills=("zero", "cluster"))
    plans = [r for r in rows if r["kind"] == "plan"]
    # plans only for the last (distilled) variant: one per budget x remap, each within its budget
    assert [(r["variant"], r["budget_ratio"], r["remap"]) for r in plans] == [("distilled", 3.0, "array"),
                                                                            ("distilled", 3.0, "fold")]
    for r in plans:
        assert r["ratio"] >= 3.0 and r["embedding_bytes"] == r[f"bytes_{r['remap']}"] and r["plan"]
    inp = load_run(run, "distilled")
    full = next(r for r in rows if r["variant"] == "distilled" and r["keep_ratio"] == 1.0 and r["dtype"] == "fp32")
    for r in rows:
        # the array accounting adds exactly 4 bytes per id of each pruned table; folding changes no AUC
        assert r["bytes_array"] >= r["bytes_fold"]
        assert r["bytes_array"] == r["bytes_fold"] or r["kind"] == "plan" or r["keep_ratio"] < 1.0
        ref = full if r["variant"] == "distilled" else next(
            x for x in rows if x["variant"] == r["variant"] and x["keep_ratio"] == 1.0 and x["dtype"] == "fp32")
        for s in SPLITS:
            assert r[f"d_{s}"] == pytest.approx(r[f"{s}_auc"] - ref[f"{s}_auc"], abs=1e-12)
    # a grid point rebuilt here with a folded remap gives the study's AUCs (fold and array serve alike)
    g = next(r for r in rows if r["variant"] == "distilled" and r["fill"] == "cluster" and r["dtype"] == "int4")
    settings = table_settings(CompressConfig(default_dtype="int4", default_pruned_fill="cluster", default_cluster_ratio=0.1),
                              inp.ds.feature_names)
    for f in ("user_id", "item_id"):
        settings[f]["keep_ratio"] = g["keep_ratio"]
    comp = compress_model(inp.model, inp.ds, settings, remap="fold", text=inp.text)
    m = evaluate(serving_forward(comp.serving), serving_dataset(inp.ds, comp), serving_builder(inp.ds, comp, inp.builder))
    assert comp.embedding_bytes == g["bytes_fold"]
    for s in SPLITS:
        assert m[s]["auc"] == pytest.approx(g[f"{s}_auc"], abs=1e-9)
    doc = json.loads((tmp_path / "compress_study.json").read_text())
    assert doc["rows"] == rows and doc["budgets"] == [3.0]
    md = (tmp_path / "compress_study.md").read_text()
    assert "plan 3x fold" in md and "## Plans" in md and "ratio fold" in md
    png = (tmp_path / "compress_study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_seeds_must_vary_the_data_split(tmp_path):
    cfg = config_from_dict({"output_dir": str(tmp_path), "study": {"seeds": [0, 1, 2]}})
    for s, data_seed in ((0, 0), (1, 0)):
        d = tmp_path / f"seed_{s}"
        d.mkdir()
        raw = to_dict(cfg)
        raw["data"]["seed"] = data_seed
        (d / "config.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"seed_1/config\.yaml: data\.seed is 0 but this folder is seed 1.*data\.seed=1"):
        check_seed_runs(cfg)
    raw = yaml.safe_load((tmp_path / "seed_1" / "config.yaml").read_text())
    raw["data"]["seed"] = 1
    (tmp_path / "seed_1" / "config.yaml").write_text(yaml.safe_dump(raw))
    assert [s for s, _ in check_seed_runs(cfg)] == [0, 1]  # seed 2 has no folder: left out


def _point(kind="grid", ratio=12.0, d_valid=0.0, d_valid_cold=0.0, d_test=0.0, d_test_cold=0.0, fill="zero", keep=0.5,
           dtype="int4", remap="array", budget=0.0):
    r = {"variant": "distilled", "kind": kind, "fill": fill, "keep_ratio": keep, "dtype": dtype, "budget_ratio": budget,
         "remap": remap, "plan": "p" if kind == "plan" else "", "ratio": ratio, "ratio_array": ratio,
         "ratio_fold": ratio if keep == 1.0 else ratio * 1.5,  # nothing pruned: no remap either way
         "d_valid": d_valid, "d_valid_cold": d_valid_cold, "d_test": d_test,
         "d_test_cold": d_test_cold, "pareto": False}
    for s in SPLITS:
        r[f"{s}_auc"] = 0.7 + r[f"d_{s}"]
        r[f"{s}_logloss"] = 0.5
    for k in ("embedding_bytes", "embedding_mb", "bytes_array", "bytes_fold", "fp32_test_auc"):
        r[k] = 1.0
    return r


def test_targets_choose_on_validation_never_on_test():
    rows = [
        _point(keep=1.0, dtype="int8", ratio=3.5, d_test=-0.0004),
        _point(keep=1.0, dtype="int4", ratio=7.0, d_test=-0.002),
        # >= 10x: the best test point has the worse validation objective; the valid winner is chosen
        _point(ratio=11.0, d_valid=-0.004, d_test=+0.002, d_test_cold=0.0),
        _point(ratio=12.0, d_valid=-0.001, d_valid_cold=-0.001, d_test=-0.0005, d_test_cold=-0.004, keep=0.3),
        # cold weight matters: same valid, worse valid_cold
        _point(ratio=13.0, d_valid=-0.001, d_valid_cold=-0.02, d_test=-0.0001, keep=0.2),
        _point(kind="plan", ratio=31.0, d_valid=-0.002, d_test=-0.0035, fill="plan", keep="plan", dtype="plan",
               remap="fold", budget=30.0),
    ]
    md = targets(rows, "distilled", 0.5, 3)
    lines = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "met" in lines["int8 everywhere: test AUC drop <= 0.001"]
    assert "missed" in lines["int4 everywhere: test AUC drop <= 0.001"]
    ten = lines[">= 10x smaller (array remaps): test drop <= 0.001, test_cold drop <= 0.005"]
    assert "keep 0.3" in ten and "12.00x" in ten and "| met" in ten
    # folded accounting: every grid point is 1.5x smaller there; the same valid winner, at its fold ratio
    assert "18.00x (zero keep 0.3" in lines[">= 10x smaller (fold remaps): test drop <= 0.001, test_cold drop <= 0.005"]
    thirty = lines[">= 30x smaller (fold remaps): test drop <= 0.003"]
    assert "plan 30x" in thirty and "missed" in thirty  # test -0.0035 is over the limit
    assert "no point reaches 30x" in lines[">= 30x smaller (array remaps): test drop <= 0.003"]
    assert "never by test" in md
    # validation predicts test within 0.002 per plan: valid -0.002, test -0.0035 -> gap -0.0015, met
    gap = lines["plan 30x (fold remaps): mean Δtest within 0.002 of mean Δvalid"]
    assert "gap -0.0015" in gap and "| met" in gap
    rows[-1]["d_test"] = -0.005
    md = targets(rows, "distilled", 0.5, 3)
    assert "gap -0.0030" in md and "missed" in [ln for ln in md.splitlines() if "within 0.002" in ln][0]


def test_average_runs_means_and_spread():
    a = [_point(d_test=-0.001), _point(kind="plan", fill="plan", keep="plan", dtype="plan", remap="fold", budget=30.0)]
    b = [_point(d_test=-0.003), _point(kind="plan", fill="plan", keep="plan", dtype="plan", remap="fold", budget=30.0)]
    b[1]["plan"] = "q"
    rows = average_runs([a, b])
    assert rows[0]["d_test"] == pytest.approx(-0.002) and rows[0]["d_test_std"] == pytest.approx(0.0014142, abs=1e-6)
    assert rows[0]["seeds"] == 2 and rows[1]["plans"] == ["p", "q"]
