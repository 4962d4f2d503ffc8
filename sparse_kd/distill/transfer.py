"""Weight transfer: seed ID embedding rows from text embeddings through a projection.

Notation: N entities, H text dim, D embedding dim.

``pca``: the top-D principal directions of the text embeddings (no training needed).
``learned``: a ridge regression from text to the trained teacher ranker's ID rows, fitted on
entities the teacher saw in training, then applied to every entity, cold ones included.
Either way rows are rescaled to a fixed RMS (``scale``) so they sit where training moves rows.
"""

from __future__ import annotations

import torch


def pca_projection(text: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (H,) and the top-``dim`` principal directions (H, dim) of text (N, H)."""
    mean = text.mean(0)
    x = (text - mean).double()
    # (H, H) covariance eigen-decomposition: cheap for H = 384 and exact
    cov = x.T @ x / max(1, x.shape[0] - 1)
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)[:dim]
    basis = evecs[:, order].float()
    if basis.shape[1] < dim:  # fewer text dims than embedding dims: pad with zeros
        basis = torch.cat([basis, torch.zeros(basis.shape[0], dim - basis.shape[1])], 1)
    return mean.float(), basis


def pca_reduce(text: torch.Tensor, dim: int) -> torch.Tensor:
    """Text (N, H) -> (N, dim) PCA coordinates, each column scaled to unit variance."""
    mean, basis = pca_projection(text, dim)
    z = (text - mean) @ basis
    return z / z.std(0, keepdim=True).clamp_min(1e-6)


def ridge_fit(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2) -> torch.Tensor:
    """W (H+1, D) minimising ||[x, 1] W - y||^2 + l2 ||W||^2. x: (N, H), y: (N, D)."""
    xa = torch.cat([x, torch.ones(x.shape[0], 1)], 1).double()
    a = xa.T @ xa + l2 * torch.eye(xa.shape[1], dtype=torch.float64)
    return torch.linalg.solve(a, xa.T @ y.double()).float()


def ridge_apply(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1)], 1) @ w


def rescale_rms(rows: torch.Tensor, rms: float) -> torch.Tensor:
    cur = rows.pow(2).mean().sqrt().clamp_min(1e-12)
    return rows * (rms / cur)


def transfer_rows(
    text: torch.Tensor,
    dim: int,
    projection: str,
    scale: float,
    teacher_rows: torch.Tensor | None = None,
    warm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows (N, dim) to seed a table with.

    Args:
        text: (N, H) text embeddings of the table's entities.
        projection: ``pca`` or ``learned``.
        teacher_rows: (N, dim) the teacher ranker's trained rows (``learned`` only).
        warm: (N,) bool, entities seen in training (``learned`` fits on these only).
    """
    if projection == "pca":
        mean, basis = pca_projection(text, dim)
        rows = (text - mean) @ basis
    elif projection == "learned":
        if teacher_rows is None or warm is None:
            raise ValueError("distill.transfer.projection=learned needs the teacher ranker's rows and the warm mask")
        w = ridge_fit(text[warm], teacher_rows[warm])
        rows = ridge_apply(text, w)
    else:
        raise ValueError(f"distill.transfer.projection: unknown {projection!r}; expected pca or learned")
    return rescale_rms(rows, scale)
