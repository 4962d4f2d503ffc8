"""Weighted k-means, for pruned ids that share a few stored rows (the ``cluster`` fills).

Notation: n points, d dims, C clusters.

:func:`kmeans` is Lloyd's algorithm from a k-means++ start, every step weighted by a per-point
weight w >= 0 (a point of weight 2 counts as two copies of it): the seeding draws the first
centre with probability proportional to w and each next one proportional to w * (distance to
the nearest centre chosen so far)^2; a centre is the weighted mean of its points; a centre left
without points (or with zero total weight) keeps its place. Deterministic for a given ``seed``;
computed in float64.

Example::

    assign, centres = kmeans(rows, 64, weights=reads + 1.0)   # (n,), (64, d)
"""

from __future__ import annotations

from typing import Optional

import torch


def _nearest(x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest centre (n,), squared distance to it (n,))."""
    d2 = (x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)[None, :]  # (n, C)
    d2, a = d2.clamp(min=0).min(1)
    return a, d2


def kmeans(
    x: torch.Tensor, k: int, weights: Optional[torch.Tensor] = None, iters: int = 30, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster x (n, d) into min(k, n) clusters.

    Returns (assign (n,) int64 in [0, C), centres (C, d) float32), C = min(k, n).
    weights: (n,) >= 0, default all ones; a point of weight 0 is assigned but moves no centre.
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty (n, d) tensor, got {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"kmeans needs k >= 1, got {k}")
    n = x.shape[0]
    k = min(int(k), n)
    xd = x.detach().double()
    w = torch.ones(n, dtype=torch.float64) if weights is None else torch.as_tensor(weights).double().reshape(-1)
    if w.shape[0] != n or bool((w < 0).any()):
        raise ValueError(f"kmeans weights must be (n,) = ({n},) and >= 0")
    g = torch.Generator().manual_seed(int(seed))

    def draw(p: torch.Tensor) -> int:
        s = float(p.sum())
        if s <= 0:  # every remaining point coincides with a centre (or weighs nothing): take any
            p = torch.ones(n, dtype=torch.float64)
            s = float(n)
        return int(torch.multinomial(p / s, 1, generator=g))

    first = draw(w)
    centres = [first]
    d2 = ((xd - xd[first]) ** 2).sum(1)
    for _ in range(1, k):
        j = draw(w * d2)
        centres.append(j)
        d2 = torch.minimum(d2, ((xd - xd[j]) ** 2).sum(1))
    c = xd[centres].clone()
    a = _nearest(xd, c)[0]
    for _ in range(iters):
        ws = torch.zeros(k, dtype=torch.float64).index_add_(0, a, w)
        sums = torch.zeros(k, xd.shape[1], dtype=torch.float64).index_add_(0, a, xd * w[:, None])
        moved = ws > 0
        c[moved] = sums[moved] / ws[moved, None]
        new = _nearest(xd, c)[0]
        if torch.equal(new, a):
            break
        a = new
    return a, c.float()


def weighted_means(rows: torch.Tensor, assign: torch.Tensor, k: int, weights: torch.Tensor) -> torch.Tensor:
    """(k, D) float32: the weighted mean of ``rows`` (n, D) per cluster of ``assign`` (n,); a
    cluster whose weights sum to 0 gets the plain mean of its rows (zeros if it has none)."""
    w = torch.as_tensor(weights).double().reshape(-1)
    r = rows.detach().double()
    ws = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, w)
    sums = torch.zeros(k, r.shape[1], dtype=torch.float64).index_add_(0, assign, r * w[:, None])
    counts = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, torch.ones_like(w))
    plain = torch.zeros(k, r.shape[1], dtype=torch.float64).index_add_(0, assign, r)
    out = plain / counts.clamp(min=1)[:, None]
    ok = ws > 0
    out[ok] = sums[ok] / ws[ok, None]
    return out.float()
