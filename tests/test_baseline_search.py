"""The baseline's own search in a training run (``study.baseline_search`` outside a study): each
candidate trains in its own folder, the best valid AUC is the reported ``baseline``, the report
says which, and the other rankers keep the config's ``train`` section."""

import json
import math

import pytest

from helpers.tiny import tiny_config
from sparse_kd import pipeline as P
from sparse_kd.baseline_search import baseline_candidates, choose_baseline, describe_choice


def _m(valid):
    return {"valid": {"auc": valid}, "test": {"auc": 0.5}}


def test_the_best_valid_auc_is_chosen_ties_keep_the_earlier_and_nan_never_wins():
    cfg = tiny_config("unused", study={"baseline_search": [["train.weight_decay=0.1"], ["train.sparse_lr=0.05"]]})
    assert list(baseline_candidates(cfg)) == ["baseline_search_0", "baseline_search_1"]
    assert baseline_candidates(cfg)["baseline_search_0"].train.weight_decay == 0.1
    got = choose_baseline(cfg, {"baseline": _m(0.70), "baseline_search_0": _m(0.74), "baseline_search_1": _m(0.72)})
    assert got["chosen"] == "baseline_search_0" and got["overrides"]["baseline_search_0"] == ["train.weight_decay=0.1"]
    assert choose_baseline(cfg, {"baseline": _m(0.74), "baseline_search_0": _m(0.74)})["chosen"] == "baseline"
    nan = choose_baseline(cfg, {"baseline": _m(0.6), "baseline_search_0": _m(float("nan")), "baseline_search_1": {}})
    assert nan["chosen"] == "baseline" and nan["valid_auc"]["baseline_search_0"] == -math.inf
    line = describe_choice(got)
    assert "train.weight_decay=0.1 0.7400" in line and "the config 0.7000" in line and line.endswith("Chosen: train.weight_decay=0.1.")


@pytest.mark.slow
def test_a_run_trains_every_candidate_and_reports_the_best_as_baseline(tmp_path, one_process):
    search = [["train.sparse_lr=0.001"], ["train.dense_lr=0.001", "train.sparse_lr=0.2"]]
    # the config's own rows barely move (lr 0.0001): a candidate is chosen, so "baseline" must be replaced
    cfg = tiny_config(str(tmp_path / "run"), nproc=1, train={"epochs": 1, "sparse_lr": 0.0001}, study={"baseline_search": search})
    metrics = P.run_training(cfg, ("baseline",))
    doc = json.loads((tmp_path / "run" / "metrics.json").read_text())
    choice = doc["baseline_search"]
    assert set(choice["valid_auc"]) == {"baseline", "baseline_search_0", "baseline_search_1"}
    assert choice["valid_auc"][choice["chosen"]] == max(choice["valid_auc"].values()) and choice["chosen"] != "baseline"
    assert metrics["baseline"]["valid"]["auc"] == pytest.approx(choice["valid_auc"][choice["chosen"]])
    for name in ("baseline", "baseline_search_0", "baseline_search_1"):  # each in its own folder, with its settings
        assert (tmp_path / "run" / name / "model_meta.json").is_file()
    assert len(set(choice["valid_auc"].values())) == 3  # the settings differ: so do the rankers
    assert "study.baseline_search" in (tmp_path / "run" / "metrics.md").read_text()
    changed = tiny_config(str(tmp_path / "run"), nproc=1, train={"epochs": 1, "sparse_lr": 0.0001},
                          study={"baseline_search": [["train.sparse_lr=0.002"], search[1]]})
    with pytest.raises(P.StaleRunError, match=r"train.sparse_lr: 0.001 -> 0.002"):  # a candidate trained with other settings
        P.run_training(changed, ("baseline",))
