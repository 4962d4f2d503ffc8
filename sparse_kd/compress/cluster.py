"""Weighted k-means, for pruned ids that share a few stored rows (the ``cluster`` fills).

Notation: n points, d dims, C clusters, w (n,) weights >= 0 (a point of weight 2 counts as two
copies of it). The objective is sum_i w_i ||x_i - c(i)||^2.

:func:`kmeans` runs in bounded memory and in time close to linear in n, at any C:

* **flat** (C <= ``FLAT_CENTRES``, or (training points) x C <= ``FLAT_WORK``): Lloyd's algorithm
  from a k-means++ start (first centre drawn proportional to w, each next one proportional to
  w * squared distance to the nearest centre so far); a centre is the weighted mean of its
  points; a centre without points (or of zero total weight) keeps its place. It trains on at
  most ``POINTS_PER_CENTRE`` * C points (a seeded uniform sample keeping their weights, as faiss
  does); then every point is assigned once and the centres re-averaged over all points.
* **two-level** (otherwise; e.g. 800k rows into 50k clusters): a flat k-means into
  C1 = ceil(sqrt(C)) coarse groups; each group clustered on its own (recursively) into a share
  of the C centres proportional to its weight (at least 1, at most its points); then
  ``REFINE_STEPS`` Lloyd steps across group borders, each point compared with the centres of its
  ``PROBE`` nearest coarse groups, and empty centres moved onto the worst-served point of their
  group (as scikit-learn relocates empty clusters). A Lloyd step costs about n * C / C1
  (x PROBE across borders) distances instead of n * C: flat, 800k x 50k distances per step take
  minutes on 2 cores (the old code's float64 n x C matrix needed ~318 GB). The price is a
  slightly worse objective than flat k-means: measured 2% worse on Gaussian data and 11% on
  2000 tight blobs (50k x 32 into 2500; ``tests/compress/test_cluster.py`` bounds it).

Every distance computation works on blocks of at most ``BLOCK_ELEMS`` distances (16 MB of
float32; :func:`nearest`), so memory is O(n (d + PROBE) + C d) whatever n and C. float32 (rows
far from the origin for their spread are centred first), per-cluster sums in float64.
Deterministic for a given ``seed``, machine and thread count: each group draws from its own
generator (a function of the seed and its place), so the groups run on
``torch.get_num_threads()`` worker threads of one intra-op thread each (small matrices lose
more to thread hand-offs than they gain, badly so on a busy machine). Progress on runs of at
least ``PROGRESS_MIN_CENTRES`` centres: INFO lines (every ``LOG_EVERY_S`` s and per border
step), or a tqdm bar when stderr is a terminal.

Why not a library: scikit-learn's ``MiniBatchKMeans`` (pinned) seeds with k-means++ on 3 * C
points, one Python iteration per centre over 3 * C points each, and labels with a full n x C
pass: 86 s for 200k x 16 rows into 10k clusters here, against 5 s for this one at a 0.6% larger
objective. faiss (not pinned) trains flat, n x C per iteration. float32 GEMM runs at ~20-25
GFLOP/s on these 2 cores, so one flat pass over 800k x 50k x 64 takes minutes; this k-means
does the whole 800k x 64 into 50k in 50-75 s on busy cores, in under 1 GB.

Example::

    assign, centres = kmeans(rows, 64, weights=reads + 1.0)   # (n,), (64, d)
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch

from sparse_kd.compress import kmeans_core
from sparse_kd.compress.kmeans_core import (POINTS_PER_CENTRE, _flat, _sums, _threads, _update,
                                            nearest)

log = logging.getLogger(__name__)

#: a k-means is flat when (training points) x C is at most this, or C is at most FLAT_CENTRES
FLAT_WORK = 1 << 24
FLAT_CENTRES = 64
#: two-level: Lloyd steps across group borders, and how many nearest coarse groups each point sees
REFINE_STEPS = 3
PROBE = 6
LOG_EVERY_S = 10.0
#: rows are centred (copied) when ||mean||^2 exceeds this many times their mean squared spread
CENTRE_WHEN = 4.0
#: runs with at least this many centres report progress
PROGRESS_MIN_CENTRES = 2048


def _generator(seed: int, path: tuple[int, ...]) -> torch.Generator:
    """The generator of one sub-problem: a function of the seed and its place in the tree only,
    so groups can run in any order or in parallel and give the same result."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *path]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _shares(k: int, weight: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Centres per group (G,) int64 summing to k: proportional to the group weights (to the
    counts where every weight is 0), at least 1 per non-empty group, at most its points.
    Needs count.sum() >= k >= number of non-empty groups."""
    weight = np.where(count > 0, np.asarray(weight, dtype=np.float64), 0.0)
    basis = weight if weight.sum() > 0 else count.astype(np.float64)
    want = k * basis / basis.sum()
    out = np.clip(np.floor(want), 1, count).astype(np.int64) * (count > 0)
    gap = k - int(out.sum())
    while gap != 0:  # largest remainders first (ties: the lower group)
        if gap > 0:
            room = np.flatnonzero(out < count)
            pick = room[np.argsort(-(want[room] - out[room]), kind="stable")][:gap]
            out[pick] += 1
        else:
            room = np.flatnonzero(out > 1)
            pick = room[np.argsort(want[room] - out[room], kind="stable")][:-gap]
            out[pick] -= 1
        gap = k - int(out.sum())
    return out


class _Progress:
    """Centres finished out of C: a tqdm bar on a terminal, else an INFO line every LOG_EVERY_S."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.done, self.what = total, 0, what
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        self.lock = threading.Lock()
        if total >= PROGRESS_MIN_CENTRES and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=what, unit=" centres", leave=False, dynamic_ncols=True)

    def add(self, k: int) -> None:
        with self.lock:
            self.done += k
            if self.bar is not None:
                self.bar.update(k)
                return
            now = time.perf_counter()
            if now - self.last < LOG_EVERY_S:
                return
            self.last = now
            log.info("%s: %d of %d centres (%.0f%%), %.0fs", self.what, self.done, self.total,
                     100.0 * self.done / max(1, self.total), now - self.t0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _cluster(x: torch.Tensor, w: torch.Tensor, k: int, iters: int, seed: int, path: tuple[int, ...],
             prog: Optional[_Progress], workers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat or two-level k-means (module doc) of x (n, d) float32 into k <= n clusters; the
    groups of a two-level split run on ``workers`` threads (one intra-op thread each)."""
    n = x.shape[0]
    if k <= FLAT_CENTRES or k * min(n, POINTS_PER_CENTRE * k) <= FLAT_WORK:
        out = _flat(x, w, k, iters, _generator(seed, path))
        if prog is not None:
            prog.add(k)
        return out
    k1 = int(math.ceil(math.sqrt(k)))
    t0 = time.perf_counter()
    top, c1 = _cluster(x, w, k1, iters, seed, path + (0,), None)
    log.debug("k-means %s: %d points into %d coarse groups in %.1fs", path, n, k1, time.perf_counter() - t0)
    count = torch.bincount(top, minlength=k1).numpy()
    gw = torch.zeros(k1, dtype=torch.float64).index_add_(0, top, w.double()).numpy()
    share = _shares(k, gw, count)
    order = torch.argsort(top, stable=True)
    starts = np.concatenate([[0], np.cumsum(count)])
    firsts = np.concatenate([[0], np.cumsum(share)])
    assign = torch.empty(n, dtype=torch.int64)
    centres = torch.empty(k, x.shape[1], dtype=torch.float32)

    def group(j: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        idx = order[starts[j]: starts[j + 1]]
        a, c = _cluster(x[idx], w[idx], int(share[j]), iters, seed, path + (1, int(j)), prog)
        return j, a, c

    def place(j: int, a: torch.Tensor, c: torch.Tensor) -> None:
        assign[order[starts[j]: starts[j + 1]]] = a + int(firsts[j])
        centres[firsts[j]: firsts[j + 1]] = c

    todo = [int(j) for j in np.flatnonzero(count)]
    t0 = time.perf_counter()
    _run(group, todo, workers, lambda r: place(*r))
    log.debug("k-means %s: %d groups of %d points into %d clusters in %.1fs", path, len(todo), n, k,
              time.perf_counter() - t0)
    steps = min(REFINE_STEPS, iters)
    if steps > 0:
        assign, centres = _refine(x, w, c1, firsts, assign, centres, steps, workers, loud=prog is not None and not path)
    return assign, centres


def _run(fn, items: list, workers: int, done) -> None:
    """done(fn(item)) for every item, in order; on ``workers`` threads of one intra-op thread each."""
    if workers > 1 and len(items) > 1:
        with _threads(1), ThreadPoolExecutor(workers) as pool:
            for r in pool.map(fn, items):
                done(r)
    else:
        for it in items:
            done(fn(it))


def _top_cells(x: torch.Tensor, c1: torch.Tensor, p: int) -> torch.Tensor:
    """(n, p) int64: the p nearest of the coarse centres c1 (k1, d) to every row of x (n, d),
    by blocks of rows."""
    cn = (c1 * c1).sum(1)
    out = torch.empty(x.shape[0], p, dtype=torch.int64)
    rb = max(1, kmeans_core.BLOCK_ELEMS // max(1, c1.shape[0]))  # read at call time (tests shrink it)
    for r0 in range(0, x.shape[0], rb):
        s = slice(r0, r0 + rb)
        d2 = torch.addmm(cn.unsqueeze(0), x[s], c1.T, beta=1.0, alpha=-2.0)
        out[s] = torch.topk(d2, p, dim=1, largest=False).indices
    return out


def _refine(x, w, c1, firsts, assign, centres, steps: int, workers: int, loud: bool = False):
    """Up to ``steps`` Lloyd steps across group borders: every point (x (n, d)) is compared with
    the centres of its PROBE nearest coarse groups (c1 (k1, d); its own and those across the
    nearest borders; group j owns centres firsts[j]:firsts[j+1]), empty centres are relocated
    (:func:`_relocate_empty`), then every centre is re-averaged. Returns (assign, centres)."""
    t0 = time.perf_counter()
    k1, n = c1.shape[0], x.shape[0]
    probe = min(PROBE, k1)
    cells = _top_cells(x, c1, probe)
    home = cells[:, 0].numpy()
    cells = cells.reshape(-1)  # (n * probe,): entry e is point e // probe
    order = torch.argsort(cells, stable=True)
    starts = np.concatenate([[0], np.cumsum(torch.bincount(cells, minlength=k1).numpy())])
    todo = [j for j in range(k1) if starts[j + 1] > starts[j] and firsts[j + 1] > firsts[j]]
    for step in range(steps):
        best = torch.full((n * probe,), float("inf"))
        arg = torch.zeros(n * probe, dtype=torch.int64)

        def cell(j: int):
            e = order[starts[j]: starts[j + 1]]
            a, d2 = nearest(x[e // probe], centres[int(firsts[j]): int(firsts[j + 1])])
            return e, d2, a + int(firsts[j])

        def place(r):
            best[r[0]], arg[r[0]] = r[1], r[2]

        _run(cell, todo, workers, place)
        dist, pick = best.view(n, probe).min(1)
        new = arg.view(n, probe).gather(1, pick[:, None]).squeeze(1)
        lost = torch.isinf(dist)  # every probed group without centres (rare): keep the old one
        new[lost], dist[lost] = assign[lost], 0.0
        centres = _relocate_empty(x, w, new, centres, dist, home, firsts)
        centres = _update(x, w, new, centres)
        moved = int((new != assign).sum())
        (log.info if loud else log.debug)("k-means: border step %d of %d, %d of %d points moved, %.1fs", step + 1,
                                          steps, moved, n, time.perf_counter() - t0)
        assign = new
        if moved == 0:
            break
    return assign, centres


def _relocate_empty(x, w, assign, centres, dist, home, firsts) -> torch.Tensor:
    """A centre left without points moves onto the point of its own coarse group that is worst
    served (largest weight x squared distance; as scikit-learn relocates empty clusters); that
    point joins it (``assign`` is changed in place). Returns the centres."""
    k = centres.shape[0]
    empty = torch.nonzero(torch.bincount(assign, minlength=k) == 0).squeeze(1).numpy()
    if empty.size == 0:
        return centres
    score = (w * dist).numpy()
    order = np.lexsort((-score, home))  # by home group, worst served first
    hstart = np.searchsorted(home[order], np.arange(len(firsts)))
    owner = np.searchsorted(firsts, empty, side="right") - 1
    _, first = np.unique(owner, return_index=True)
    rank = np.arange(empty.size) - np.repeat(first, np.diff(np.append(first, empty.size)))
    at = hstart[owner] + rank
    ok = (at < hstart[owner + 1]) & (score[order[np.minimum(at, len(order) - 1)]] > 0)
    pts, ids = torch.from_numpy(order[at[ok]]), torch.from_numpy(empty[ok])
    centres = centres.clone()
    centres[ids] = x[pts]
    assign[pts] = ids
    return centres


def kmeans(
    x: torch.Tensor, k: int, weights: Optional[torch.Tensor] = None, iters: int = 30, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster x (n, d) into C = min(k, n) clusters (module doc).

    Returns (assign (n,) int64 in [0, C), centres (C, d) float32); centres[j] is the weighted
    mean of the points assigned to j (or where it was, if they weigh nothing).
    weights: (n,) >= 0, default all ones; a point of weight 0 is assigned but moves no centre.
    iters: most Lloyd steps per flat k-means (each stops early once no point changes cluster).
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans needs a non-empty (n, d) tensor, got {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"kmeans needs k >= 1, got {k}")
    n, d = x.shape
    k = min(int(k), n)
    w = torch.ones(n, dtype=torch.float32) if weights is None else torch.as_tensor(weights).detach().reshape(-1).float()
    if w.shape[0] != n or bool((w < 0).any()):
        raise ValueError(f"kmeans weights must be (n,) = ({n},) and >= 0")
    xf = x.detach().float().contiguous()  # read, never written: no copy of float32 rows
    mean = xf.mean(0)
    spread = float(xf.norm(dim=1).square().mean()) - float(mean.square().sum())  # mean ||x - mean||^2
    if float(mean.square().sum()) > CENTRE_WHEN * max(spread, 0.0):
        # rows far from the origin for their spread: ||x||^2 - 2 x.c + ||c||^2 would cancel in
        # float32; distances are translation invariant, so cluster the centred copy
        xf = xf - mean
    else:
        mean = torch.zeros_like(mean)
    t0 = time.perf_counter()
    big = k >= PROGRESS_MIN_CENTRES
    if big:
        log.info("k-means: %d points x %d dims into %d clusters", n, d, k)
    prog = _Progress(k, "k-means") if big else None
    try:
        a, c = _cluster(xf, w, k, iters, int(seed), (), prog, workers=max(1, torch.get_num_threads()))
    finally:
        if prog is not None:
            prog.close()
    if big:
        log.info("k-means: %d clusters of %d points in %.1fs", k, n, time.perf_counter() - t0)
    return a, c + mean


def weighted_means(rows: torch.Tensor, assign: torch.Tensor, k: int, weights: torch.Tensor) -> torch.Tensor:
    """(k, D) float32: the weighted mean of ``rows`` (n, D) per cluster of ``assign`` (n,); a
    cluster whose weights sum to 0 gets the plain mean of its rows (zeros if it has none).
    Memory O(k D) beyond the inputs (sums by blocks of rows, see :func:`_sums`)."""
    w = torch.as_tensor(weights).detach().reshape(-1).double()
    r = rows.detach()
    a = assign.long()
    ws, sums = _sums(r, w, a, k)
    counts = torch.bincount(a, minlength=k).double()
    ones = torch.ones_like(w)
    plain = _sums(r, ones, a, k)[1] / counts.clamp(min=1)[:, None]
    ok = ws > 0
    plain[ok] = sums[ok] / ws[ok, None]
    return plain.float()
