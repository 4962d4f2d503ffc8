"""benchmarks/baseline_sweep.py: one real baseline run through the CLI (its best epoch and the MF
reference read back from the run's metrics.json), and, with the runs stubbed, the candidates (the
config's own settings, then its study.baseline_search), one sweep per seed, the choice on valid and
the per-seed verdict against MF."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.synthetic.num_users=60", "data.synthetic.num_items=40", "data.synthetic.interactions_per_user=20",
        "nproc=1", "train.epochs=2", "train.batch_size=64", "train.early_stop_patience=0"]


@pytest.fixture
def sweep_module(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.chdir(ROOT)
    import baseline_sweep

    return baseline_sweep


@pytest.mark.slow
def test_one_real_run_reads_its_best_epoch_and_mf(sweep_module, tmp_path):
    out = tmp_path / "sweep.json"
    assert sweep_module.main(["--set", *TINY, "train.embedding_l2=0.3", "--seed", "4", "--candidate", "default",
                              "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    (c,) = doc["candidates"]
    assert doc["seed"] == 4 and doc["candidate_overrides"] == ["default"] and c["overrides"] == []
    m = json.loads((tmp_path / "w" / "seed_4" / "candidate_0" / "metrics.json").read_text())
    assert m["seed"] == 4 and m["config"]["data"]["seed"] == 4 and m["config"]["train"]["embedding_l2"] == 0.3
    assert "baseline_search" not in m and m["config"]["study"]["baseline_search"] == []  # the sweep's candidates only
    valid = [e["valid_auc"] for e in m["history"]["baseline"]]
    assert c["epochs"] == 2 and c["valid_auc_by_epoch"] == [round(v, 4) for v in valid]
    assert c["valid_auc"] == round(m["metrics"]["baseline"]["valid"]["auc"], 4) == round(max(valid), 4)
    assert doc["mf"] == {k: round(m["mf_reference"][k]["auc"], 4) for k in ("valid", "test")}
    assert doc["met"] == (c["valid_auc"] >= doc["mf"]["valid"] and c["test_auc"] >= doc["mf"]["test"])


def test_candidates_seeds_choice_and_verdict(sweep_module, tmp_path, monkeypatch):
    calls = []
    # valid / test per (seed, candidate): seed 3's second candidate wins on valid and beats MF;
    # seed 4's first wins on valid but is below MF on test
    table = {(3, 0): (0.70, 0.71), (3, 1): (0.75, 0.76), (4, 0): (0.74, 0.70), (4, 1): (0.72, 0.79)}
    mf_by_seed = {3: {"valid": 0.74, "test": 0.75}, 4: {"valid": 0.73, "test": 0.72}}

    def fake(config, overrides, out_dir, seed, mf, common=()):
        k = int(out_dir.name.split("_")[1])
        calls.append((seed, k, overrides, list(common), mf))
        v, t = table[(seed, k)]
        return {"overrides": overrides, "valid_auc": v, "test_auc": t, "best_epoch": 1, "epochs": 1, "seconds": 0.0,
                **({"mf": mf_by_seed[seed]} if mf else {})}

    monkeypatch.setattr(sweep_module, "run_candidate", fake)
    out = tmp_path / "s.json"
    common = ["nproc=1", "study.baseline_search=[[train.embedding_l2=0.3]]", "study.seeds=[3,4]"]
    assert sweep_module.main(["--set", *common, "--study-seeds", "--work", str(tmp_path), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["candidate_overrides"] == ["default", "train.embedding_l2=0.3"]
    assert [(s, k, o, m) for s, k, o, _, m in calls] == [
        (3, 0, [], True), (3, 1, ["train.embedding_l2=0.3"], False), (4, 0, [], True), (4, 1, ["train.embedding_l2=0.3"], False)]
    assert all(c == common for *_, c, _ in calls)
    assert doc["per_seed"]["3"]["chosen"] == 1 and doc["per_seed"]["3"]["met"] is True
    assert doc["per_seed"]["4"]["chosen"] == 0 and doc["per_seed"]["4"]["met"] is False
    assert doc["summary"] == {"seeds_met": [3], "met": False}
