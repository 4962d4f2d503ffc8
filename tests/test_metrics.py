"""The one AUC (torchmetrics' binary AUROC) equals the Mann-Whitney U statistic with ties counted half."""

import math

import numpy as np
import pytest
import torch

from sparse_kd.metrics import auc, binary_metrics


def _mann_whitney(scores: np.ndarray, labels: np.ndarray) -> float:
    """Reference: P(score of a positive > score of a negative) + 0.5 P(equal), over all pairs."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def test_hand_computed_with_ties():
    # pairs (pos, neg): (2,1) win, (2,2) tie, (3,1) win, (3,2) win -> 3.5 / 4
    assert auc(torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.875, abs=1e-7)
    assert auc(np.array([0.5, 0.5, 0.5]), np.array([0, 1, 1])) == pytest.approx(0.5, abs=1e-7)


@pytest.mark.parametrize("levels", [3, 40, 100000])
def test_matches_mann_whitney_on_tied_scores(levels):
    g = np.random.default_rng(levels)
    scores = g.integers(0, levels, 3000) / 7.0 - 2.0  # many ties when levels is small
    labels = (g.random(3000) < 0.3 + 0.1 * (scores > 0)).astype(np.int64)
    assert auc(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(_mann_whitney(scores, labels), abs=1e-6)


def test_large_logits_are_not_merged_into_ties():
    # torchmetrics applies a sigmoid to scores outside [0, 1]; these round to 1.0 (float32 from
    # about 17, float64 from about 37) and would all tie; the AUC must still order them
    for scores in (torch.tensor([20.0, 21.0, 22.0, 23.0]), torch.tensor([40.0, 41.0, 42.0, 43.0], dtype=torch.float64)):
        assert auc(scores, torch.tensor([0, 0, 1, 1])) == pytest.approx(1.0, abs=1e-7)


def test_one_class_is_nan_and_binary_metrics():
    assert math.isnan(auc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1])))
    m = binary_metrics(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0]))
    want = (-math.log(0.5) - math.log(1 - 1 / (1 + math.exp(-2.0)))) / 2
    assert m["n"] == 2 and m["logloss"] == pytest.approx(want, rel=1e-9) and m["auc"] == 0.0
    empty = binary_metrics(torch.zeros(0), torch.zeros(0))
    assert empty["n"] == 0 and math.isnan(empty["auc"]) and math.isnan(empty["logloss"])


def test_weighted_aucs_equal_auc_with_unit_weights_and_ties():
    import numpy as np
    import torch

    from sparse_kd.metrics import auc, bootstrap_weights, weighted_aucs

    rng = np.random.default_rng(3)
    s = np.round(rng.normal(size=2000), 1)  # many ties
    y = (rng.random(2000) < 0.3 + 0.3 * (s > 0)).astype(np.float32)
    assert weighted_aucs(s, y, np.ones((1, 2000)))[0] == pytest.approx(auc(torch.tensor(s), torch.tensor(y)), abs=1e-6)
    # a weight of 2 on a row is that row twice
    w = np.ones(2000)
    w[:10] = 2.0
    twice = np.concatenate([s, s[:10]]), np.concatenate([y, y[:10]])
    assert weighted_aucs(s, y, w[None])[0] == pytest.approx(auc(torch.tensor(twice[0]), torch.tensor(twice[1])), abs=1e-6)
    b = bootstrap_weights(2000, 50, seed=1)
    assert b.shape == (50, 2000) and np.array_equal(b, bootstrap_weights(2000, 50, seed=1))
    spread = weighted_aucs(s, y, b)
    assert 0.001 < spread.std() < 0.05 and abs(spread.mean() - auc(torch.tensor(s), torch.tensor(y))) < 0.01
