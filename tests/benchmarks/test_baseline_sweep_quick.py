"""benchmarks/baseline_sweep.py trains the baseline once per candidate (the config's own settings,
then its study.baseline_search) and seed through the CLI, reports each candidate's best epoch and
the MF reference of the first run, picks the best valid AUC and says per seed whether that
baseline is at or above MF."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.synthetic.num_users=60", "data.synthetic.num_items=40", "data.synthetic.interactions_per_user=20",
        "nproc=1", "train.epochs=2", "train.batch_size=64", "train.early_stop_patience=0",
        "study.baseline_search=[[train.embedding_l2=0.3]]"]
pytestmark = pytest.mark.slow


def test_baseline_sweep_quick(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.chdir(ROOT)
    import baseline_sweep

    out = tmp_path / "sweep.json"
    assert baseline_sweep.main(["--set", *TINY, "--seed", "3", "4", "--work", str(tmp_path / "work"),
                                "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["candidate_overrides"] == ["default", "train.embedding_l2=0.3"]
    for seed in ("3", "4"):
        r = doc["per_seed"][seed]
        a, b = r["candidates"]
        assert a["overrides"] == [] and b["overrides"] == ["train.embedding_l2=0.3"]
        for c in (a, b):
            assert c["epochs"] == 2 and c["valid_auc"] == round(max(c["valid_auc_by_epoch"]), 4)
        assert a["valid_auc"] != b["valid_auc"]  # a ten times larger row L2 (demo: 0.03) changes the model
        assert r["chosen"] == (0 if a["valid_auc"] >= b["valid_auc"] else 1)
        assert 0.5 < r["mf"]["valid"] < 1 and "mf" not in b
        c = r["candidates"][r["chosen"]]
        assert r["met"] == (c["valid_auc"] >= r["mf"]["valid"] and c["test_auc"] >= r["mf"]["test"])
    assert doc["per_seed"]["3"]["mf"] != doc["per_seed"]["4"]["mf"]  # each seed its own splits
    assert doc["summary"]["met"] == all(doc["per_seed"][s]["met"] for s in ("3", "4"))
    m = json.loads((tmp_path / "work" / "seed_4" / "candidate_1" / "metrics.json").read_text())
    assert m["config"]["train"]["embedding_l2"] == 0.3 and m["config"]["data"]["seed"] == 4 and m["seed"] == 4
