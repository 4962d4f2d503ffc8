"""A training run's report: with ``train.mf_reference`` the quality table has the outside
reference (matrix factorisation on the same splits, tuned on valid) beside the rankers, and a
reference that fails costs the rankers nothing."""

import json

import pytest

from helpers.tiny import tiny_config
from sparse_kd import mf_reference as M
from sparse_kd import pipeline as P
from sparse_kd.run_report import reference_note


@pytest.mark.slow
def test_the_reference_row_is_mf_tuned_on_the_runs_own_splits(tmp_path, one_process):
    from sparse_kd.data import load_dataset

    cfg = tiny_config(str(tmp_path / "run"), nproc=1, train={"epochs": 1, "mf_reference": True})
    metrics = P.run_training(cfg, ("baseline",))
    assert set(metrics) == {"baseline"}  # what callers get: the rankers only
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    ref = doc["mf_reference"]
    # independently: the same data, MF tuned with the student's dims and the run's seed
    want = M.tuned_mf(load_dataset(cfg.data), dim=cfg.student.embedding_dim, seed=cfg.train.seed)
    assert ref["settings"] == want["settings"] and ref["grid"] == want["grid"]
    assert ref["valid"] == want["valid"] and ref["test"] == want["test"]
    md = (tmp_path / "run" / "metrics.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| mf_reference "))
    assert f"{want['valid']['auc']:.4f}" in row and f"{want['test']['auc']:.4f}" in row
    assert "not this project's model" in md and f"best epoch {want['best_epoch']} of {want['epochs']}" in md


def test_mf_reference_does_not_change_what_a_ranker_is(tmp_path):
    """Runs trained without the reference are reused with it: it is neither in a ranker's
    fingerprint nor in the settings a run folder is checked against."""
    from sparse_kd.config import to_dict
    from sparse_kd.run_folder import identity

    off, on = tiny_config(str(tmp_path)), tiny_config(str(tmp_path), train={"mf_reference": True})
    assert identity(to_dict(off)) == identity(to_dict(on))
    for name in ("baseline", P.TEACHER):
        assert P.variant_fingerprint(off, name, off.distill, 0) == P.variant_fingerprint(on, name, on.distill, 0)


def test_a_failing_reference_is_reported_not_raised(monkeypatch):
    from helpers.tiny import tiny_dataset

    def broken(*a, **k):
        raise RuntimeError("no memory")

    monkeypatch.setattr(M, "tuned_mf", broken)
    ref = M.reference(tiny_dataset(), 8, seed=0)
    assert ref == {"error": "RuntimeError: no memory"}
    assert "failed (RuntimeError: no memory)" in reference_note(ref, 8)
