"""Quality metrics of a binary click ranker, one home for every stage (training, compression,
studies, the serving check).

Notation: N examples of a split.

:func:`auc` is torchmetrics' binary AUROC (exact, non-binned), with tied scores counting half
(the Mann-Whitney U statistic); :func:`binary_metrics` adds the log loss. Both take logits.
"""

from __future__ import annotations

import numpy as np
import torch

EVAL_SPLITS = ("valid", "test", "test_cold")


def auc(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray) -> float:
    """ROC AUC of scores (N,) (logits or any monotone score) against 0/1 labels (N,); ties
    count half. NaN when a class is missing.

    torchmetrics turns inputs outside [0, 1] into probabilities with a sigmoid, which in floating
    point can merge distinct large logits into ties; the scores are therefore handed over as
    their dense ranks scaled into [0, 1], which keeps order and ties exactly.
    """
    from torchmetrics.functional.classification import binary_auroc  # imports in seconds: only when used

    scores, labels = torch.as_tensor(scores).reshape(-1), torch.as_tensor(labels).reshape(-1)
    n_pos = int((labels > 0).sum())
    if n_pos == 0 or n_pos == labels.numel():
        return float("nan")
    _, rank = torch.unique(scores, return_inverse=True)  # (N,) dense rank, ties share one
    preds = rank.double() / max(1, int(rank.max()))
    return float(binary_auroc(preds, (labels > 0).long(), thresholds=None))


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """{"auc", "logloss", "n"} of logits (N,) against 0/1 labels (N,); NaN for an empty split."""
    logits, labels = logits.double(), labels.double()
    ll = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).item() if labels.numel() else float("nan")
    return {"auc": auc(logits, labels), "logloss": ll, "n": int(labels.numel())}
