"""Weight transfer: seed ID embedding rows from text embeddings through a projection.

Notation: N entities, H text dim, D embedding dim.

``pca``: the top-D principal directions of the text embeddings (no training needed).
``learned``: a ridge regression from text to the trained teacher ranker's ID rows, fitted on
entities the teacher saw in training, then applied to every entity, cold ones included.
Either way rows are rescaled to a fixed RMS (``scale``) so they sit where training moves rows.
"""

from __future__ import annotations

import torch

from sparse_kd.ridge import ridge_fit, ridge_predict

LEARNED_L2 = 1e-2  # ridge penalty of the learned projection


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
    basis_text: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows (N, dim) to seed a table with.

    Args:
        text: (N, H) text embeddings of the table's entities.
        projection: ``pca`` or ``learned``.
        teacher_rows: (N, dim) the teacher ranker's trained rows (``learned`` only).
        warm: (N,) bool, entities seen in training (``learned`` fits on these only).
        basis_text: (M, H) other embeddings of the same space whose PCA mean and basis to use
            (``pca`` only; e.g. the items' for users given by their click history), or None.
    """
    if projection == "pca":
        mean, basis = pca_projection(text if basis_text is None else basis_text, dim)
        rows = (text - mean) @ basis
    elif projection == "learned":
        if teacher_rows is None or warm is None:
            raise ValueError("distill.transfer.projection=learned needs the teacher ranker's rows and the warm mask")
        w = ridge_fit(text[warm], teacher_rows[warm], l2=LEARNED_L2)
        rows = ridge_predict(text, w)
    else:
        raise ValueError(f"distill.transfer.projection: unknown {projection!r}; expected pca or learned")
    return rescale_rms(rows, scale)
