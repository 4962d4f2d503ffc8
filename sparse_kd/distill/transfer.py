"""Weight transfer: seed ID embedding rows from text embeddings through a projection.

Notation: N entities, H text dim, D embedding dim.

``pca``: the top-D principal directions of the text embeddings (no training needed).
``learned``: a ridge regression from text to the trained teacher ranker's ID rows, fitted on
entities the teacher saw in training, then applied to every entity, cold ones included.
Either way rows are rescaled to a fixed RMS (``scale``) so they sit where training moves rows.

Memory: the rows are a :class:`ProjectedRows`, the map and the text, computed a slice at a time
when :func:`sparse_kd.student.init.write_tables` reads a rank's shards, never (N, D) at once;
the PCA statistics are accumulated over row chunks of :data:`CHUNK` rows.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from sparse_kd.ridge import ridge_fit, ridge_moments, ridge_predict, ridge_solve

LEARNED_L2 = 1e-2  # ridge penalty of the learned projection
CHUNK = 1 << 14  # rows per step when a whole (N, H) text matrix is reduced (50 MB of float64 at H = 384)


class ProjectedRows:
    """Rows (N, D) = ``project(text[i]) * factor``, computed for the slice asked for; rows where
    ``skip`` is True read as NaN (:func:`~sparse_kd.student.init.write_tables` leaves those as
    they are). It stands in for an (N, D) tensor: ``rows[r0:r1, c0:c1]``, ``rows.shape``, and
    :meth:`materialize` for the whole tensor.

    Example::

        rows = ProjectedRows(text, lambda x: x @ w, dim=w.shape[1])
        rows[10:20, 0:8]  # (10, 8), computed now
    """

    def __init__(self, text: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor], dim: int,
                 factor: float = 1.0, skip: Optional[torch.Tensor] = None) -> None:
        self.text, self.project, self.dim, self.factor, self.skip = text, project, dim, factor, skip

    @property
    def shape(self) -> tuple[int, int]:
        return (self.text.shape[0], self.dim)

    def __len__(self) -> int:
        return self.text.shape[0]

    @property
    def sharded(self) -> bool:
        """Whether the text is split over the ranks: read it after :meth:`localize`."""
        return bool(getattr(self.text, "sharded", False))

    def localize(self, ranges: list[tuple[int, int]], into: Optional[list[torch.Tensor]] = None) -> "ProjectedRows":
        """Collective (sharded text): the same rows over this rank's ``ranges``, projected where the
        text lies (D dims travel, not H). ``into``: tensors that receive the rows, one per range
        (:meth:`~sparse_kd.teacher.sharded_rows.ShardedRows.localize`); only for rows that are the
        projection alone (factor 1, nothing skipped)."""
        if into is not None and (self.factor != 1.0 or self.skip is not None):
            raise ValueError("ProjectedRows.localize: rows with a factor or skipped rows cannot be received in place")
        rows = self.text.mapped(lambda x: self.project(x).float(), self.dim).localize(ranges, into)
        return ProjectedRows(rows, lambda x: x, self.dim, self.factor, self.skip)

    def __getitem__(self, idx) -> torch.Tensor:
        rows, cols = idx if isinstance(idx, tuple) else (idx, slice(None))
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("ProjectedRows: index rows with a contiguous slice, e.g. rows[r0:r1, c0:c1]")
        lo, hi, _ = rows.indices(len(self))
        out = self.project(self.text[lo:hi]).float() * self.factor
        if self.skip is not None:
            out[self.skip[lo:hi]] = float("nan")
        return out[:, cols]

    def materialize(self) -> torch.Tensor:
        return torch.cat([self[lo : lo + CHUNK] for lo in range(0, len(self), CHUNK)]) if len(self) else self[0:0]

    def rms(self) -> float:
        """Root mean square of the rows (skipped rows excluded), accumulated chunk by chunk."""
        sq, n = 0.0, 0
        for lo in range(0, len(self), CHUNK):
            block = self[lo : lo + CHUNK]
            block = block[~torch.isnan(block).any(1)]
            sq += float(block.double().pow(2).sum())
            n += block.numel()
        return (sq / max(n, 1)) ** 0.5


def pca_projection(text: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (H,) and the top-``dim`` principal directions (H, dim) of text (N, H)."""
    mean, basis, _ = _pca(text, dim)
    return mean, basis


def _pca(text, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean (H,), top-``dim`` directions (H, dim) and the covariance (H, H, float64) of text (N, H)."""
    # text may be a row source read by blocks (e.g. :class:`~sparse_kd.distill.history.HistoryRows`)
    n = text.shape[0]
    mean, cov = _moments(lambda lo, hi: text[lo:hi], n, text.shape[1], n)
    return mean.float(), top_directions(cov, dim), cov


def _moments(read: Callable[[int, int], torch.Tensor], n_here: int, dim: int, n: int,
             weights: Optional[torch.Tensor] = None, summed: Callable[[torch.Tensor], torch.Tensor] = lambda t: t):
    """Mean (H,) and covariance (H, H), float64, of N rows read here as ``read(lo, hi)`` over
    ``n_here`` rows, each standing for ``weights`` rows (None: one), the sums taken over the ranks
    by ``summed``. Two passes over row chunks of :data:`CHUNK`: the (H, H) covariance
    eigen-decomposition is cheap for H = 384 and exact, and no centred (N, H) float64 copy is held
    (3 GB at 1M users)."""
    total = torch.zeros(dim, dtype=torch.float64)
    for lo in range(0, n_here, CHUNK):
        x = read(lo, lo + CHUNK).double()
        total += (x if weights is None else x * weights[lo : lo + CHUNK]).sum(0)
    mean = summed(total) / max(1, n)
    cov = torch.zeros(dim, dim, dtype=torch.float64)
    for lo in range(0, n_here, CHUNK):
        x = read(lo, lo + CHUNK).double() - mean
        cov += (x if weights is None else x * weights[lo : lo + CHUNK]).T @ x
    return mean, summed(cov) / max(1, n - 1)


def top_directions(cov: torch.Tensor, dim: int) -> torch.Tensor:
    """The top-``dim`` eigenvectors (H, dim) float32 of a covariance (H, H), zero columns past H."""
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)[:dim]
    basis = evecs[:, order].float()
    if basis.shape[1] < dim:  # fewer text dims than embedding dims: pad with zeros
        basis = torch.cat([basis, torch.zeros(basis.shape[0], dim - basis.shape[1])], 1)
    return basis


def pca_reduce(text: torch.Tensor, dim: int) -> torch.Tensor:
    """Text (N, H) -> (N, dim) PCA coordinates, each column scaled to unit variance.

    Rows split over the ranks (a :class:`~sparse_kd.teacher.sharded_rows.ShardedRows`) are
    reduced where they lie: a collective, the same (N, dim) on every rank."""
    if getattr(text, "sharded", False):
        return _sharded_pca_reduce(text, dim)
    mean, basis = pca_projection(text, dim)
    z = ProjectedRows(text, lambda x: (x - mean) @ basis, basis.shape[1]).materialize()
    return z / z.std(0, keepdim=True).clamp_min(1e-6)


def pca_rows(text, dim: int) -> ProjectedRows:
    """:func:`pca_reduce` as a row source: the same unit-variance PCA coordinates (N, dim), computed
    for the rows a reader asks for, so no rank holds all N of them (the teacher ranker's user
    features split over the ranks, ``distill.teacher_ranker.features_layout: sharded``). Rows split
    over the ranks stay where they lie (a collective here, and in ``localize``).

    Column j's standard deviation comes from the covariance C the directions were taken from,
    sqrt(b_j^T C b_j), instead of a pass over the projected rows: what ``z.std(0)`` gives, up to
    float32 rounding."""
    if getattr(text, "sharded", False):
        mean, basis, cov = sharded_pca_projection(text, dim, with_cov=True)
    else:
        mean, basis, cov = _pca(text, dim)
    b = basis.double()
    std = ((b * (cov @ b)).sum(0).clamp_min(0.0).sqrt().float()).clamp_min(1e-6)  # (dim,)
    return ProjectedRows(text, lambda x: ((x - mean) @ basis) / std, basis.shape[1])


def _sharded_pca_reduce(rows, dim: int) -> torch.Tensor:
    """:func:`pca_reduce` of a ``ShardedRows``: the projection of :func:`sharded_pca_projection`,
    each rank's block projected where it lies and the (D, dim) projections gathered."""
    mean, basis = sharded_pca_projection(rows, dim)
    z = rows.mapped(lambda x: (x - mean) @ basis, basis.shape[1]).gather().index_select(0, rows.index)
    return z / z.std(0, keepdim=True).clamp_min(1e-6)


def sharded_pca_projection(rows, dim: int, with_cov: bool = False) -> tuple[torch.Tensor, ...]:
    """:func:`pca_projection` of a ``ShardedRows`` (a collective): each distinct row weighted by how
    many of the N rows it is, mean and covariance summed over the ranks, the basis decided on
    rank 0 and sent to every rank (one basis, whatever each rank's LAPACK gives). ``with_cov``:
    the summed covariance (H, H, float64) too, the same on every rank."""
    import torch.distributed as dist

    from sparse_kd.dist import long_all_reduce, long_broadcast_object

    counts = rows.local_counts().double().unsqueeze(1)
    mean, cov = _moments(lambda lo, hi: rows.local[lo:hi], rows.local.shape[0], rows.dim, rows.shape[0], counts,
                         long_all_reduce)
    first = not dist.is_initialized() or dist.get_rank() == 0
    basis = long_broadcast_object(top_directions(cov, dim) if first else None)
    return (mean.float(), basis, cov) if with_cov else (mean.float(), basis)


def _sharded_rms(rows, project: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Root mean square of ``project`` over every one of the N rows of a ``ShardedRows`` (a collective)."""
    counts = rows.local_counts().double()
    acc = torch.zeros(2, dtype=torch.float64)  # sum of squares, number of values
    for lo in range(0, rows.local.shape[0], CHUNK):
        z = project(rows.local[lo : lo + CHUNK]).double()
        acc[0] += (z.pow(2).sum(1) * counts[lo : lo + CHUNK]).sum()
        acc[1] += counts[lo : lo + CHUNK].sum() * z.shape[1]
    from sparse_kd.dist import long_all_reduce

    acc = long_all_reduce(acc)
    return float(acc[0] / acc[1].clamp_min(1)) ** 0.5


def transfer_rows(
    text: torch.Tensor,
    dim: int,
    projection: str,
    scale: float,
    teacher_rows: torch.Tensor | None = None,
    warm: torch.Tensor | None = None,
    basis_text: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows (N, dim) to seed a table with (:func:`transfer_map`'s rows, materialised).

    Args:
        text: (N, H) text embeddings of the table's entities.
        projection: ``pca`` or ``learned``.
        teacher_rows: (N, dim) the teacher ranker's trained rows (``learned`` only).
        warm: (N,) bool, entities seen in training (``learned`` fits on these only).
        basis_text: (M, H) other embeddings of the same space whose PCA mean and basis to use
            (``pca`` only; e.g. the items' for users given by their click history), or None.
    """
    learned = None
    if projection == "learned":
        if teacher_rows is None or warm is None:
            raise ValueError("distill.transfer.projection=learned needs the teacher ranker's rows and the warm mask")
        learned = learned_map(text, teacher_rows, warm)
    return transfer_map(text, dim, projection, scale, learned, basis_text).materialize()


def learned_map(text: torch.Tensor, teacher_rows: torch.Tensor, warm: torch.Tensor, row0: int = 0) -> torch.Tensor:
    """The ``learned`` projection: ridge map (H + 1, D) text -> the teacher ranker's rows, fitted on
    ``warm``. Text rows split over the ranks: a collective (:func:`fit_map`; ``teacher_rows`` may be
    the rows from ``row0`` that :func:`fit_window` names)."""
    return fit_map(text, teacher_rows, warm, LEARNED_L2, row0)


def _fitted_here(text, fit_on: torch.Tensor) -> torch.Tensor:
    """The fitted entities whose text row this rank holds (text split over the ranks)."""
    return (fit_on & (text.index >= text.lo) & (text.index < text.hi)).nonzero().squeeze(1)


def fit_window(text, fit_on: torch.Tensor) -> tuple[int, int]:
    """The entities [r0, r1) whose target rows :func:`fit_map` reads on this rank: all N for text
    held whole, else the span of the fitted entities whose text this rank holds (its block of
    users when each has its own text), so a rank reads that part of a trained table."""
    if not getattr(text, "sharded", False):
        return 0, int(fit_on.shape[0])
    ents = _fitted_here(text, fit_on)
    return (int(ents[0]), int(ents[-1]) + 1) if ents.numel() else (0, 0)


def fit_map(text, rows: torch.Tensor, fit_on: torch.Tensor, l2: float, row0: int = 0) -> torch.Tensor:
    """Ridge map (H + 1, D) text (N, H) -> ``rows`` (N, D), fitted on the entities where ``fit_on``
    (N,) is True, at penalty ``l2``. Text rows split over the ranks (a ``ShardedRows``: a
    collective, ``fit_on`` whole on every rank) are fitted where they lie: each rank sums the
    moments of its distinct rows, each weighted by how many fitted entities it stands for, with
    their target rows summed per distinct row; the sums are added over the ranks and every rank
    solves the same system. There ``rows`` may hold only the entities [row0, row0 + len) that
    :func:`fit_window` names. The map is :func:`~sparse_kd.ridge.ridge_fit`'s, to float rounding,
    and no rank holds the (N, H) text."""
    if not getattr(text, "sharded", False):
        return ridge_fit(text[fit_on].float(), rows[fit_on], l2=l2)
    from sparse_kd.dist import long_all_reduce

    ents = _fitted_here(text, fit_on)
    if ents.numel() and (int(ents[0]) < row0 or int(ents[-1]) >= row0 + rows.shape[0]):
        raise ValueError(f"fit_map: rows hold entities {row0}:{row0 + rows.shape[0]}, but this rank fits "
                         f"{int(ents[0])}:{int(ents[-1]) + 1} (read fit_window's rows)")
    j = text.index[ents] - text.lo  # their distinct rows in this rank's block
    n_here = text.local.shape[0]
    weights = torch.bincount(j, minlength=n_here).double()
    ysum = torch.zeros(n_here, rows.shape[1], dtype=torch.float64).index_add_(0, j, rows[ents - row0].double())
    gram = torch.zeros(text.dim + 1, text.dim + 1, dtype=torch.float64)
    b = torch.zeros(text.dim + 1, rows.shape[1], dtype=torch.float64)
    for lo in range(0, n_here, CHUNK):
        g, bb = ridge_moments(text.local[lo : lo + CHUNK], ysum[lo : lo + CHUNK], weights[lo : lo + CHUNK])
        gram += g
        b += bb
    return ridge_solve(long_all_reduce(gram), long_all_reduce(b), l2)


def transfer_map(text: torch.Tensor, dim: int, projection: str, scale: float, learned: torch.Tensor | None = None,
                 basis_text: torch.Tensor | None = None) -> ProjectedRows:
    """The rows of :func:`transfer_rows` as a :class:`ProjectedRows` (computed when read).

    ``learned``: the map of :func:`learned_map` (``learned`` only; fitted once, e.g. on rank 0,
    and shared). The RMS rescale is computed here, chunk by chunk, over every row.
    """
    split = getattr(text, "sharded", False)  # rows split over the ranks: the statistics are collectives
    if projection == "pca":
        src = text if basis_text is None else basis_text  # either may be split, whatever the other is
        mean, basis = sharded_pca_projection(src, dim) if getattr(src, "sharded", False) else pca_projection(src, dim)
        rows = ProjectedRows(text, lambda x: (x - mean) @ basis, basis.shape[1])
    elif projection == "learned":
        if learned is None:
            raise ValueError("distill.transfer.projection=learned needs the map fitted on the teacher ranker's rows")
        rows = ProjectedRows(text, lambda x: ridge_predict(x, learned), learned.shape[1])
    else:
        raise ValueError(f"distill.transfer.projection: unknown {projection!r}; expected pca or learned")
    rows.factor = scale / max(_sharded_rms(text, rows.project) if split else rows.rms(), 1e-12)
    return rows
