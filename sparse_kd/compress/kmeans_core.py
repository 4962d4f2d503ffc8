"""Flat weighted k-means in bounded memory: blocked nearest-centre search, weighted sums, a
k-means++ start and Lloyd steps. :mod:`.cluster` runs it directly on small problems and as the
building block of its two-level split on large ones (see there for the objective and notation).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

#: most distances (block rows x block centres) computed at once by :func:`nearest` (16 MB float32)
BLOCK_ELEMS = 1 << 22

#: rows per block when summing (float32 within a block, float64 across blocks)
SUM_ROWS = 1 << 16

#: a flat k-means trains on at most this many points per centre (faiss' max_points_per_centroid)
POINTS_PER_CENTRE = 256



@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to n inside the block (restored after)."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)



def blocks(n: int, c: int, block_elems: Optional[int] = None) -> Iterator[tuple[slice, slice]]:
    """(rows, centres) slices covering an (n, c) distance matrix, each at most ``block_elems``
    (default ``BLOCK_ELEMS``) distances: whole rows of centres when c fits, else blocks of centres."""
    block_elems = block_elems or BLOCK_ELEMS
    cb = max(1, min(c, block_elems))
    rb = max(1, block_elems // cb)
    for r0 in range(0, n, rb):
        for c0 in range(0, c, cb):
            yield slice(r0, min(n, r0 + rb)), slice(c0, min(c, c0 + cb))



def nearest(x: torch.Tensor, c: torch.Tensor, block_elems: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre of every point: x (n, d), c (C, d) float32 -> (index (n,) int64, squared
    distance (n,) float32). Never holds more than ``block_elems`` distances (:func:`blocks`);
    ties go to the lower index."""
    n, k = x.shape[0], c.shape[0]
    cn = (c * c).sum(1)  # (C,)
    best = torch.full((n,), float("inf"), dtype=torch.float32)
    arg = torch.zeros(n, dtype=torch.int64)
    buf = torch.empty(0, dtype=torch.float32)
    for rs, cs in blocks(n, k, block_elems):
        rows, cols = rs.stop - rs.start, cs.stop - cs.start
        if buf.numel() < rows * cols:
            buf = torch.empty(rows * cols, dtype=torch.float32)
        d2 = buf[: rows * cols].view(rows, cols)
        torch.addmm(cn[cs].unsqueeze(0), x[rs], c[cs].T, beta=1.0, alpha=-2.0, out=d2)  # ||c||^2 - 2 x.c
        v, a = d2.min(1)
        if cols == k:  # every centre in this block
            best[rs], arg[rs] = v, a
            continue
        better = v < best[rs]
        best[rs] = torch.where(better, v, best[rs])
        arg[rs] = torch.where(better, a + cs.start, arg[rs])
    return arg, (best + (x * x).sum(1)).clamp_(min=0)



def _sums(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cluster of ``a``: (total weight (k,) float64, weighted sum of rows (k, d) float64),
    summed in float32 by blocks of SUM_ROWS rows and the block sums added in float64."""
    ws = torch.zeros(k, dtype=torch.float64).index_add_(0, a, w.double())
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64)
    part = torch.empty(k, x.shape[1], dtype=torch.float32)
    for r0 in range(0, x.shape[0], SUM_ROWS):
        s = slice(r0, r0 + SUM_ROWS)
        sums += part.zero_().index_add_(0, a[s], x[s].float() * w[s].float()[:, None])
    return ws, sums



def _update(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Centres moved to the weighted mean of their points; a centre of zero weight keeps its place."""
    ws, sums = _sums(x, w, a, c.shape[0])
    moved = ws > 0
    c = c.clone()
    c[moved] = (sums[moved] / ws[moved, None]).float()
    return c



def _draw(p: torch.Tensor, g: torch.Generator) -> int:
    """One index drawn proportional to p (n,) float64 >= 0; uniform when p sums to 0."""
    cum = torch.cumsum(p, 0)
    total = float(cum[-1])
    if not total > 0:  # every point coincides with a centre (or weighs nothing): take any
        return int(torch.randint(p.shape[0], (1,), generator=g))
    u = float(torch.rand(1, generator=g, dtype=torch.float64)) * total
    return min(int(torch.searchsorted(cum, torch.tensor([u], dtype=torch.float64), right=True)), p.shape[0] - 1)



def _seed(x: torch.Tensor, w: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ start: (k, d) centres chosen among the rows of x (n, d)."""
    wd = w.double()
    xn = (x * x).sum(1)  # (n,)

    def dist(j: int) -> torch.Tensor:  # squared distance of every row to row j, (n,) float32
        dj = torch.addmv(xn, x, x[j], alpha=-2.0).add_(xn[j]).clamp_(min=0)
        dj[j] = 0.0
        return dj

    idx = [_draw(wd, g)]
    d2 = dist(idx[0])
    for _ in range(1, k):
        j = _draw(wd * d2, g)
        idx.append(j)
        torch.minimum(d2, dist(j), out=d2)
    return x[idx].clone()



def _flat(x: torch.Tensor, w: torch.Tensor, k: int, iters: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat weighted Lloyd (module doc) on at most POINTS_PER_CENTRE * k of the n points (one
    intra-op thread: small ops lose more to thread hand-offs than they gain), then every point
    assigned and the centres re-averaged. x (n, d) float32 -> ((n,), (k, d))."""
    n = x.shape[0]
    sampled = n > POINTS_PER_CENTRE * k
    if sampled:
        pick = torch.randperm(n, generator=g)[: POINTS_PER_CENTRE * k].sort().values
        xs, ws = x[pick], w[pick]
        if not bool((ws > 0).any()):
            ws = torch.ones_like(ws)
    else:
        xs, ws = x, w
    with _threads(1):
        c = _seed(xs, ws, k, g)
        a = nearest(xs, c)[0]
        for _ in range(iters):
            c = _update(xs, ws, a, c)
            new = nearest(xs, c)[0]
            if torch.equal(new, a):
                break
            a = new
    if sampled:
        a = nearest(x, c)[0]
    return a, _update(x, w, a, c)

