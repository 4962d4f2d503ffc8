"""benchmarks/probe_baseline.py runs on a tiny config and writes its JSON; its MF row is the
run's reference (tuned_mf on the same data); an unknown variant is refused."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["data.synthetic.num_users=60", "data.synthetic.num_items=40", "data.synthetic.interactions_per_user=20"]


def test_probe_baseline_quick(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.chdir(ROOT)
    import probe_baseline

    from sparse_kd.config import load_config
    from sparse_kd.data import load_dataset
    from sparse_kd.mf_reference import tuned_mf

    out = tmp_path / "probe.json"
    assert probe_baseline.main(["--set", *TINY, "--epochs", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["results"]
    assert list(res) == list(probe_baseline.VARIANTS)
    for name in ("dlrm", "dlrm_l2", "dlrm_bias_dot", "dlrm_bias_dot_l2"):
        r = res[name]
        assert 1 <= r["best_epoch"] <= r["epochs"] <= 2 and len(r["valid_auc_by_epoch"]) == r["epochs"]
        assert r["valid_auc"] == max(r["valid_auc_by_epoch"]) and 0 < r["test_auc"] < 1
    cfg = load_config("configs/demo.yaml", TINY)
    want = tuned_mf(load_dataset(cfg.data), dim=cfg.student.embedding_dim, seed=0)
    assert res["mf"]["valid_auc"] == round(want["valid"]["auc"], 4) and res["mf"]["settings"] == want["settings"]
    with pytest.raises(SystemExit):
        probe_baseline.main(["--variants", "dlrm,nope", "--out", str(out)])
