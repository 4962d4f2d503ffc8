"""Training and distillation losses, kept apart from the models. All return scalar means over the batch.

Notation: B batch size, F sparse features, D embedding dim, H teacher (text) embedding dim.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def click_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy on clicks. logits, labels: (B,); ``reduction="none"``: per example (B,)."""
    return F.binary_cross_entropy_with_logits(logits, labels, reduction=reduction)


def embedding_l2(pooled: torch.Tensor) -> torch.Tensor:
    """L2 penalty on the embeddings a batch looks up: the mean over the batch of the squared norm
    of its pooled embeddings, pooled (B, F, D) -> scalar. Rows read often are pulled to 0 more
    often, as an L2 term on the rows of each example does (``train.embedding_l2`` weighs it)."""
    return pooled.pow(2).sum(dim=(1, 2)).mean()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (B,) over the rows where mask (B,) is 1 (weights in [0, 1]); 0 when none is."""
    return (x * mask).sum() / mask.sum().clamp_min(1.0)


def logit_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, reduction: str = "mean"
) -> torch.Tensor:
    """Soft-label distillation for a binary ranker (Hinton et al. with a sigmoid).

    BCE between sigmoid(student / T) and the teacher's soft target sigmoid(teacher / T),
    times T^2 so that gradients keep their scale as T changes. Zero when the student equals
    the teacher only up to the entropy of the soft target, so we subtract that entropy:
    the returned value is the KL divergence KL(p_t || p_s) per example, averaged
    (``reduction="none"``: per example, (B,)).
    """
    t = temperature
    p_t = torch.sigmoid(teacher_logits / t)
    s = student_logits / t
    bce = F.binary_cross_entropy_with_logits(s, p_t, reduction="none")
    ent = F.binary_cross_entropy_with_logits(teacher_logits / t, p_t, reduction="none")
    per = (bce - ent) * (t * t)
    return per if reduction == "none" else per.mean()


def cosine_align_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - cosine(projected, target), averaged. projected, target: (B, H)."""
    return (1.0 - F.cosine_similarity(projected, target, dim=-1)).mean()


def mse_align_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per coordinate. projected, target: (B, H)."""
    return F.mse_loss(projected, target)


def infonce_align_loss(
    projected: torch.Tensor, target: torch.Tensor, temperature: float, ids: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """In-batch contrastive alignment (InfoNCE, as in CTRL, Li et al. 2023), symmetric.

    Row b's positive is target b; other rows are negatives, except rows with the same entity
    id (``ids``, (B,)), which are masked out so repeats in a batch are not pushed apart.
    """
    p = F.normalize(projected, dim=-1)
    t = F.normalize(target, dim=-1)
    sim = p @ t.T / temperature  # (B, B)
    if ids is not None:
        same = ids[:, None] == ids[None, :]
        same.fill_diagonal_(False)
        sim = sim.masked_fill(same, float("-inf"))
    labels = torch.arange(sim.shape[0], device=sim.device)
    return 0.5 * (F.cross_entropy(sim, labels) + F.cross_entropy(sim.T, labels))


def align_loss(
    kind: str, projected: torch.Tensor, target: torch.Tensor, temperature: float, ids: Optional[torch.Tensor] = None
) -> torch.Tensor:
    if kind == "cosine":
        return cosine_align_loss(projected, target)
    if kind == "mse":
        return mse_align_loss(projected, target)
    if kind == "infonce":
        return infonce_align_loss(projected, target, temperature, ids)
    raise ValueError(f"distill.align.kind: unknown {kind!r}; expected cosine, mse or infonce")
