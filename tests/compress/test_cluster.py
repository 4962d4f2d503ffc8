"""Weighted k-means for the cluster fills: exact on separated groups, weights respected, seeded."""

from __future__ import annotations

import pytest
import torch

from sparse_kd.compress.cluster import kmeans, weighted_means


def _blobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = torch.arange(30) % 3
    return centres[labels] + 0.1 * torch.randn(30, 2, generator=g), labels


def test_separated_groups_are_found_and_centres_are_their_means():
    x, labels = _blobs()
    a, c = kmeans(x, 3)
    assert c.shape == (3, 2) and a.shape == (30,)
    # the same partition as the true groups (cluster numbers may differ)
    pairs = {(int(t), int(p)) for t, p in zip(labels, a)}
    assert len(pairs) == 3 and len({p for _, p in pairs}) == 3
    for k in range(3):
        assert torch.allclose(c[k], x[a == k].mean(0), atol=1e-5)


def test_seeded_and_deterministic():
    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(1))
    a1, c1 = kmeans(x, 7, seed=3)
    a2, c2 = kmeans(x, 7, seed=3)
    assert torch.equal(a1, a2) and torch.equal(c1, c2)


def test_weights_pull_centres_and_zero_weights_move_nothing():
    x = torch.tensor([[0.0], [1.0], [2.0], [100.0]])
    w = torch.tensor([1.0, 1.0, 8.0, 0.0])
    a, c = kmeans(x, 1, w)
    assert float(c[0, 0]) == pytest.approx((0 + 1 + 16) / 10)  # the point at 100 weighs nothing
    assert torch.equal(a, torch.zeros(4, dtype=torch.int64))
    m = weighted_means(x, a, 1, w)
    assert torch.allclose(m, c)
    # a cluster of zero total weight gets the plain mean of its rows
    m2 = weighted_means(x, torch.tensor([0, 0, 0, 1]), 2, w)
    assert float(m2[1, 0]) == pytest.approx(100.0)


def test_more_clusters_than_points_and_bad_input():
    x = torch.randn(4, 3)
    a, c = kmeans(x, 10)
    assert c.shape[0] == 4 and sorted(a.tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="non-empty"):
        kmeans(torch.zeros(0, 3), 2)
    with pytest.raises(ValueError, match="k >= 1"):
        kmeans(x, 0)
    with pytest.raises(ValueError, match="weights"):
        kmeans(x, 2, torch.tensor([1.0, -1.0, 1.0, 1.0]))
