"""Ridge regression with an unpenalised bias: the one linear map text -> embedding row used by
weight transfer (:mod:`sparse_kd.distill`), row importance and text fills
(:mod:`sparse_kd.compress`), and rows for new entities in an artifact.

Notation: n examples, H input (text) dim, D output (row) dim.

W (H + 1, D) minimises ||[x, 1] W - y||^2 + l2 ||W[:H]||^2: the bias row is not penalised, so a
strong penalty shrinks predictions towards the mean row of ``y``, not towards zero.
"""

from __future__ import annotations

from typing import Optional

import torch

RIDGE_GRID = tuple(10.0 ** k for k in range(-3, 5))


def _with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)


def ridge_fit(x: torch.Tensor, y: torch.Tensor, l2: Optional[float] = None) -> torch.Tensor:
    """x (n, H), y (n, D) -> W (H + 1, D) float32, the last row the (unpenalised) bias.

    l2: the penalty; None chooses it from ``RIDGE_GRID`` by exact leave-one-out error (closed form
    e_i / (1 - h_ii)). Predict with :func:`ridge_predict`. With n = 0 the map predicts zeros.

    Example::

        w = ridge_fit(text[warm], rows[warm])   # (H + 1, D)
        cold_rows = ridge_predict(text[~warm], w)
    """
    h, d = x.shape[1], y.shape[1]
    if x.shape[0] == 0:
        return torch.zeros(h + 1, d)
    xb = _with_bias(x)
    yd = y.double()
    gram, b = xb.T @ xb, xb.T @ yd
    if l2 is None:
        best = (float("inf"), RIDGE_GRID[0])
        for lam in RIDGE_GRID:
            a_inv = torch.linalg.inv(_system(gram, lam))
            w = a_inv @ b
            hat = ((xb @ a_inv) * xb).sum(1).clamp(max=1 - 1e-6)  # (n,) leverage
            loo = (((yd - xb @ w) / (1 - hat)[:, None]) ** 2).mean().item()
            if loo < best[0]:
                best = (loo, lam)
        l2 = best[1]
    return ridge_solve(gram, b, l2)


def _system(gram: torch.Tensor, lam: float) -> torch.Tensor:
    """gram (H + 1, H + 1) of the examples with their bias column, plus the penalty (not on the bias)."""
    h = gram.shape[0] - 1
    reg = torch.eye(h + 1, dtype=torch.float64) * lam
    reg[h, h] = 1e-9  # bias (tiny jitter keeps the system solvable)
    return gram + reg


def ridge_moments(x: torch.Tensor, y: torch.Tensor, weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums a fit needs, float64: gram = [x, 1]^T diag(w) [x, 1] (H + 1, H + 1) and
    b = [x, 1]^T y (H + 1, D), each row of x counted ``weights`` times (None: once) and y
    already summed over those times. Sums from several parts (e.g. ranks) add up to the whole's."""
    xb = _with_bias(x)
    return (xb * (1.0 if weights is None else weights.double()[:, None])).T @ xb, xb.T @ y.double()


def ridge_solve(gram: torch.Tensor, b: torch.Tensor, l2: float) -> torch.Tensor:
    """W (H + 1, D) float32 from :func:`ridge_moments` (summed) at penalty ``l2``: what
    :func:`ridge_fit` gives with that ``l2`` on the same examples. No examples (gram all zero):
    the map predicts zeros."""
    if not bool(gram.any()):
        return torch.zeros(gram.shape[0], b.shape[1])
    return torch.linalg.solve(_system(gram, l2), b).float()


def ridge_predict(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (n, H), W (H + 1, D) -> (n, D) float32."""
    return (_with_bias(x) @ w.double()).float()
