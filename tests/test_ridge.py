"""The one ridge fit (text -> row maps): exact solution, unpenalised bias, leave-one-out penalty."""

import numpy as np
import torch

from sparse_kd.ridge import ridge_fit, ridge_predict


def test_ridge_fit_matches_numpy_and_loo_regularises_noise():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(50, 6, generator=g), torch.randn(50, 3, generator=g)
    w = ridge_fit(x, y, l2=2.0)
    xb = np.c_[x.double().numpy(), np.ones(50)]
    reg = 2.0 * np.eye(7)
    reg[-1, -1] = 0
    expect = np.linalg.solve(xb.T @ xb + reg, xb.T @ y.double().numpy())
    assert np.allclose(w.numpy(), expect, atol=1e-5)
    # pure noise targets: LOO picks strong shrinkage (predictions near the mean)
    dev_loo = float((ridge_predict(x, ridge_fit(x, y)) - y.mean(0)).norm())
    dev_ols = float((ridge_predict(x, ridge_fit(x, y, l2=1e-9)) - y.mean(0)).norm())
    assert dev_loo < 0.5 * dev_ols, (dev_loo, dev_ols)
    # an exact linear map: LOO picks a small penalty and recovers it
    a = torch.randn(6, 3, generator=g)
    assert torch.allclose(ridge_predict(x, ridge_fit(x, x @ a)), x @ a, atol=1e-2)


def test_bias_is_not_penalised():
    # rows far from the origin: a huge penalty flattens the map to the mean row, not to zero
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 5, generator=g)
    y = x @ torch.randn(5, 4, generator=g) + torch.tensor([10.0, -20.0, 5.0, 3.0])
    pred = ridge_predict(x, ridge_fit(x, y, l2=1e9))
    torch.testing.assert_close(pred, y.mean(0).expand_as(pred), atol=1e-3, rtol=0)


def test_no_rows_predicts_zeros():
    w = ridge_fit(torch.zeros(0, 3), torch.zeros(0, 2))
    assert w.shape == (4, 2) and torch.equal(ridge_predict(torch.randn(5, 3), w), torch.zeros(5, 2))


def test_moments_summed_over_parts_solve_to_the_fit():
    """ridge_moments of parts (each distinct row weighted by its count, its targets summed) add up
    to the whole's, and ridge_solve gives ridge_fit's map: what a fit over rows split across ranks uses."""
    from sparse_kd.ridge import ridge_moments, ridge_solve

    g = torch.Generator().manual_seed(3)
    distinct = torch.randn(12, 5, generator=g)
    index = torch.randint(0, 12, (90,), generator=g)  # 90 entities share 12 distinct rows
    y = torch.randn(90, 3, generator=g)
    want = ridge_fit(distinct[index], y, l2=0.7)
    gram, b = 0, 0
    for part in (slice(0, 5), slice(5, 12)):  # two "ranks", each its block of distinct rows
        ids = torch.arange(12)[part]
        mine = torch.isin(index, ids)
        j = index[mine] - ids[0]
        w = torch.bincount(j, minlength=len(ids))
        ysum = torch.zeros(len(ids), 3, dtype=torch.float64).index_add_(0, j, y[mine].double())
        pg, pb = ridge_moments(distinct[part], ysum, w)
        gram, b = gram + pg, b + pb
    assert torch.allclose(ridge_solve(gram, b, 0.7), want, atol=1e-5)
    assert torch.equal(ridge_solve(torch.zeros(6, 6, dtype=torch.float64), torch.zeros(6, 3, dtype=torch.float64), 1.0),
                       torch.zeros(6, 3))  # no examples: zeros, as ridge_fit


def test_split_fit_reads_only_its_window_of_target_rows():
    """``fit_map`` on text split over the ranks (here one rank holding distinct rows 10-29 of 40)
    fits from the target rows of ``fit_window`` alone, to the map the whole rows give; a window
    that misses a fitted entity is refused."""
    import pytest

    from sparse_kd.distill.transfer import fit_map, fit_window
    from sparse_kd.teacher.sharded_rows import ShardedRows

    g = torch.Generator().manual_seed(4)
    distinct = torch.randn(40, 5, generator=g)
    index = torch.arange(60) % 40  # entities 40-59 repeat rows 0-19
    text = ShardedRows(distinct[10:30].clone(), index, 10, 40)
    rows = torch.randn(60, 3, generator=g)
    fit_on = torch.arange(60) % 4 != 0
    r0, r1 = fit_window(text, fit_on)
    assert (r0, r1) == (10, 60)  # entities 10-29 hold rows 10-29, entities 50-59 rows 10-19
    torch.testing.assert_close(fit_map(text, rows[r0:r1], fit_on, 1.0, row0=r0), fit_map(text, rows, fit_on, 1.0))
    with pytest.raises(ValueError, match="fit_window"):
        fit_map(text, rows[r0 + 1 : r1], fit_on, 1.0, row0=r0 + 1)
