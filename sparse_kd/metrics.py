"""Quality metrics of a binary click ranker, one home for every stage (training, compression,
studies, the serving check).

Notation: N examples of a split, B batch size.

:func:`auc` is torchmetrics' binary AUROC (exact, non-binned), with tied scores counting half
(the Mann-Whitney U statistic); :func:`binary_metrics` adds the log loss. Both take logits.
:func:`weighted_aucs` gives the same AUC under many row weightings at once (bootstrap resamples
from :func:`bootstrap_weights`): how much of a difference on validation is noise.

Single-process evaluation of an unsharded model (the compression stage, its planner and study):
:func:`evaluate` runs ``forward(batch) -> logits (B,)`` over whole splits;
:func:`fp32_forward` and :func:`serving_forward` adapt a float DLRM and a quantized serving
module to that signature. Sharded models are evaluated by :mod:`sparse_kd.student.predict`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

if TYPE_CHECKING:  # runtime imports stay light: the serving check imports this module
    from sparse_kd.data.batching import BatchBuilder, KDBatch
    from sparse_kd.data.schema import RecDataset

EVAL_SPLITS = ("valid", "test", "valid_cold", "test_cold")


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


def bootstrap_weights(n: int, draws: int, seed: int = 0) -> np.ndarray:
    """(draws, n) float64 Poisson(1) row weights: ``draws`` bootstrap resamples of n rows (the
    Poisson bootstrap: each row appears k ~ Poisson(1) times), seeded."""
    return np.random.default_rng([seed, 0xB007]).poisson(1.0, size=(draws, n)).astype(np.float64)


def weighted_aucs(scores: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(R,) ROC AUC of scores (N,) against 0/1 labels (N,) under each row of ``weights`` (R, N)
    (e.g. :func:`bootstrap_weights`); ties count half, as in :func:`auc`. One sort for all R:
    the negatives' weight below each distinct score is a cumulative sum per row."""
    s = np.asarray(torch.as_tensor(scores).reshape(-1).double())
    pos = np.asarray(torch.as_tensor(labels).reshape(-1)) > 0
    uniq, inv = np.unique(s, return_inverse=True)  # (G,), (N,)
    out = np.empty(weights.shape[0])
    for r, w in enumerate(weights):
        neg_g = np.bincount(inv, weights=w * ~pos, minlength=len(uniq))  # (G,) negative weight per score
        below = np.cumsum(neg_g) - neg_g
        wp = w * pos
        denom = wp.sum() * neg_g.sum()
        out[r] = float((wp * (below[inv] + 0.5 * neg_g[inv])).sum() / denom) if denom > 0 else float("nan")
    return out


def split_batches(ds: RecDataset, builder: BatchBuilder, split: str, batch_size: int = 4096) -> list[tuple[KDBatch, int]]:
    """Every example of ``split`` in order, as (batch, rows) on one process: consecutive slices of
    ``batch_size`` (the last one shorter, not padded), i.e. the same batches as
    ``Predictor.score`` makes with ``max_batch=batch_size``, so the logits agree to the bit."""
    sp = ds.splits[split]
    user, item, label, ts = (torch.from_numpy(a) for a in (sp.user, sp.item, sp.label, sp.timestamp))
    out = []
    for lo in range(0, len(sp), batch_size):
        hi = min(len(sp), lo + batch_size)
        out.append((builder.build(user[lo:hi], item[lo:hi], label[lo:hi], timestamp=ts[lo:hi]), hi - lo))
    return out


def predict_split(forward: Callable[[KDBatch], torch.Tensor], batches: Sequence[tuple[KDBatch, int]]) -> torch.Tensor:
    """Logits (N,) of a split on the CPU (beside the labels), whatever device ``forward(batch) ->
    (B,)`` computes on, over pre-built batches."""
    outs = []
    with torch.no_grad():
        for b, real in batches:
            outs.append(forward(b).reshape(-1)[:real].float().cpu())
    return torch.cat(outs) if outs else torch.zeros(0)


def split_metrics(forward: Callable[[KDBatch], torch.Tensor], batches: Sequence[tuple[KDBatch, int]],
                  labels: torch.Tensor) -> dict:
    """:func:`binary_metrics` of ``forward`` over pre-built batches, against labels (N,)."""
    return binary_metrics(predict_split(forward, batches), labels)


def evaluate(forward: Callable[[KDBatch], torch.Tensor], ds: RecDataset, builder: BatchBuilder,
             splits=EVAL_SPLITS, batch_size: int = 4096) -> dict:
    """split -> {"auc", "logloss", "n"} of ``forward(batch) -> logits (B,)``."""
    out = {}
    for s in splits:
        labels = torch.from_numpy(ds.splits[s].label)
        out[s] = split_metrics(forward, split_batches(ds, builder, s, batch_size), labels)
    return out


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's tensors live (its first buffer or parameter; CPU when it has none)."""
    for t in module.buffers():
        return t.device
    for t in module.parameters():
        return t.device
    return torch.device("cpu")


def fp32_forward(model: torch.nn.Module) -> Callable[[KDBatch], torch.Tensor]:
    """A float torchrec DLRM as ``forward(batch) -> logits (B,)``; batches (built on the CPU) are
    moved to the model's device."""
    dev = module_device(model)
    return lambda b: model(b.dense_features.to(dev), b.sparse_features.to(dev)).reshape(-1)


def serving_forward(serving: torch.nn.Module) -> Callable[[KDBatch], torch.Tensor]:
    """A quantized serving module (dense (B, Dd), KJT values, lengths) as ``forward(batch) -> logits
    (B,)``; batches (built on the CPU) are moved to the module's device (a GPU for the TBE kernel)."""
    dev = module_device(serving)
    return lambda b: serving(b.dense_features.to(dev), b.sparse_features.values().to(dev),
                             b.sparse_features.lengths().to(dev))
