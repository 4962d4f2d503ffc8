"""benchmarks/baseline_sweep.py trains the baseline once per candidate through the CLI, reports
each candidate's best epoch and the MF reference of the first run, and picks the best valid AUC."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.synthetic.num_users=60", "data.synthetic.num_items=40", "data.synthetic.interactions_per_user=20",
        "nproc=1", "train.epochs=2", "train.batch_size=64", "train.early_stop_patience=0"]
pytestmark = pytest.mark.slow


def test_baseline_sweep_quick(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.chdir(ROOT)
    import baseline_sweep

    out = tmp_path / "sweep.json"
    assert baseline_sweep.main(["--set", *TINY, "--candidate", "default", "student.dot_logit=false",
                                "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    a, b = doc["candidates"]
    assert a["overrides"] == [] and b["overrides"] == ["student.dot_logit=false"]
    for c in (a, b):
        assert c["epochs"] == 2 and c["valid_auc"] == round(max(c["valid_auc_by_epoch"]), 4)
    assert a["valid_auc"] != b["valid_auc"]  # the dot changes the model
    assert doc["chosen"] == (0 if a["valid_auc"] >= b["valid_auc"] else 1)
    assert 0.5 < a["mf"]["valid"] < 1 and "mf" not in b
    cfg = json.loads((tmp_path / "work" / "candidate_1" / "metrics.json").read_text())["config"]
    assert cfg["student"]["dot_logit"] is False and cfg["nproc"] == 1  # configs/demo.yaml has it on
