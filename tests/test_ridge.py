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
