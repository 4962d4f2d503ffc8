"""Per-table row importance: which rows of a trained embedding table to keep when pruning.

Notation: N rows of a table (its vocabulary), D embedding dim, H text-embedding dim,
U users, I items.

Three kinds (``CompressConfig.importance``):

``frequency``
    How often the row is read while training: every TRAIN interaction (u, i) reads, for each
    feature, every id in the bag of its owner (u for user features, i for item features), via the
    feature's CSR. A row never read in training was never updated; it scores 0.
``l2``
    The row's L2 norm (FBGEMM's ``SplitEmbInferenceConverter`` criterion).
``distill``
    Distillation-aware, only for the entity tables ``user_id`` / ``item_id`` (one row per
    entity, which has a text): a ridge map ``W`` from the teacher's text embedding to the row is
    fit on the warm rows (read at least once in training), and a row scores
    ``count * ||row - [text, 1] @ W||``: how far the row is from what its text predicts (what a
    text-computed fallback row would lose), weighted by how often it is read (a row read once
    matters less than one read a thousand times; the unweighted distance is available as
    ``weight_by_frequency=False``). Rows never read in training score 0 (their values are the
    initialisation, or rows seeded from text by weight transfer, which the text recovers anyway).
    Every other table has no per-row text, so ``distill`` falls back to ``frequency`` there;
    :func:`table_importance` records the kind actually used per table.

Ties (many rows scoring 0) are broken by training frequency, then by the lower id
(:func:`ranking`), so selection is deterministic. The ridge penalty is chosen by exact
leave-one-out error over ``sparse_kd.ridge.RIDGE_GRID`` unless one is given; a ridge map is fit
on at most ``RIDGE_MAX_ROWS`` rows (a seeded sample of the warm rows of a larger table).

``frequency`` is the default. Which kind keeps quality best depends on the model and data:
compare them with ``sparse-kd study compress CONFIG compress.importance=KIND`` (tables in
``docs/compress_study_*.md``); measured numbers live in docs/, not here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np
import torch

from sparse_kd.data.schema import RecDataset
from sparse_kd.ridge import ridge_fit, ridge_predict

log = logging.getLogger(__name__)

IMPORTANCE_KINDS = ("frequency", "l2", "distill")
#: a text -> row ridge map is fit on at most this many rows (a seeded sample of the eligible
#: ones): (H + 1) x D parameters need far fewer, and :func:`sparse_kd.ridge.ridge_fit`'s
#: leave-one-out search holds n x (H + 1) float64 copies (200k x 384 text: ~40 s and 2.5 GB)
RIDGE_MAX_ROWS = 50_000
#: tables of at least this many rows report their steps at INFO (smaller ones at DEBUG)
LOUD_ROWS = 1 << 17
#: rows per block when predicting rows from text (ridge_predict makes an (n, H + 1) float64 copy)
PREDICT_ROWS = 1 << 16
# features whose rows are entities with a text: feature -> owner ("user" / "item")
TEXT_FEATURES = {"user_id": "user", "item_id": "item"}
DEFAULT_RIDGE_L2: Optional[float] = None  # None: chosen by leave-one-out


@dataclass
class RowImportance:
    """scores: (N,) float64, higher = more important; freq: (N,) int64 training reads; kind: used."""

    feature: str
    scores: np.ndarray
    freq: np.ndarray
    kind: str


def access_counts(ds: RecDataset, feature: str, split: str = "train") -> np.ndarray:
    """(N,) int64: how many times each row of ``feature``'s table is read in ``split``.

    Example: a user-owned feature; user 0 has bag [2, 5] and 3 train interactions -> rows 2 and
    5 get 3 each from that user.
    """
    f = ds.feature(feature)
    sp = ds.splits[split]
    owners = sp.user if f.owner == "user" else sp.item
    n_ent = ds.num_users if f.owner == "user" else ds.num_items
    per_entity = np.bincount(owners, minlength=n_ent).astype(np.int64)  # (E,)
    lengths = f.lengths()
    w = np.repeat(per_entity, lengths)  # (nnz,): reads of each CSR value
    return np.bincount(f.values, weights=w, minlength=f.num_embeddings).astype(np.int64)


def fit_rows(mask: np.ndarray, cap: Optional[int] = None, seed: int = 0) -> np.ndarray:
    """(N,) bool: ``mask`` with at most ``cap`` (default ``RIDGE_MAX_ROWS``) rows left, a seeded
    uniform sample of its rows."""
    cap = RIDGE_MAX_ROWS if cap is None else cap
    mask = np.asarray(mask, dtype=bool)
    idx = np.flatnonzero(mask)
    if idx.size <= cap:
        return mask
    out = np.zeros_like(mask)
    out[np.random.default_rng(seed).choice(idx, cap, replace=False)] = True
    return out


def fit_text_map(text: torch.Tensor, rows: torch.Tensor, fit_mask: np.ndarray,
                 l2: Optional[float] = DEFAULT_RIDGE_L2) -> torch.Tensor:
    """The ridge map text (N, H) -> rows (N, D), (H + 1, D), fit on the ``fit_mask`` rows (at most
    ``RIDGE_MAX_ROWS`` of them, :func:`fit_rows`)."""
    fit = fit_rows(fit_mask)
    if fit.sum() < np.asarray(fit_mask).sum():
        log.info("ridge map: fit on %d of %d rows", int(fit.sum()), int(np.asarray(fit_mask).sum()))
    sel = torch.from_numpy(fit)
    return ridge_fit(text[sel], rows[sel].float(), l2)


def predict_rows(text: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``ridge_predict`` by blocks of PREDICT_ROWS rows: text (N, H), W (H + 1, D) -> (N, D) float32."""
    if text.shape[0] <= PREDICT_ROWS:
        return ridge_predict(text, w)
    return torch.cat([ridge_predict(text[r: r + PREDICT_ROWS], w) for r in range(0, text.shape[0], PREDICT_ROWS)])


def text_residual(
    weight: torch.Tensor, text: torch.Tensor, fit_mask: np.ndarray, l2: Optional[float] = DEFAULT_RIDGE_L2
) -> tuple[np.ndarray, torch.Tensor]:
    """||row - text-predicted row|| for every row (N,) and the ridge map W fit on ``fit_mask`` rows
    (:func:`fit_text_map`); computed by blocks of rows."""
    w = fit_text_map(text, weight, fit_mask, l2)
    res = torch.empty(weight.shape[0], dtype=torch.float64)
    for r in range(0, weight.shape[0], PREDICT_ROWS):
        s = slice(r, r + PREDICT_ROWS)
        res[s] = (weight[s].float() - ridge_predict(text[s], w)).norm(dim=1).double()
    return res.numpy(), w


def row_importance(
    kind: str,
    feature: str,
    weight: torch.Tensor,
    ds: RecDataset,
    text: Optional[Mapping[str, torch.Tensor]] = None,
    weight_by_frequency: bool = True,
    l2: Optional[float] = DEFAULT_RIDGE_L2,
) -> RowImportance:
    """Importance of every row of ``feature``'s table (weight (N, D) fp32).

    text: {"user": (U, H), "item": (I, H)} teacher text embeddings; needed for ``distill``.
    """
    if kind not in IMPORTANCE_KINDS:
        raise ValueError(f"compress.importance: {kind!r} is not valid; expected one of {', '.join(IMPORTANCE_KINDS)}")
    freq = access_counts(ds, feature)
    if freq.shape[0] != weight.shape[0]:
        raise ValueError(f"feature {feature}: {freq.shape[0]} vocabulary rows but the table has {weight.shape[0]}")
    if kind == "l2":
        return RowImportance(feature, weight.float().norm(dim=1).double().numpy(), freq, "l2")
    if kind == "distill" and feature in TEXT_FEATURES and text is not None:
        t = text[TEXT_FEATURES[feature]]
        if t.shape[0] != weight.shape[0]:
            raise ValueError(f"feature {feature}: {t.shape[0]} text embeddings but {weight.shape[0]} rows")
        warm = freq > 0
        res, _ = text_residual(weight, t, warm if warm.any() else np.ones_like(warm), l2)
        scores = res * (freq if weight_by_frequency else warm.astype(np.float64))
        return RowImportance(feature, scores.astype(np.float64), freq, "distill")
    if kind == "distill":
        why = "no text embeddings given" if text is None else "no per-row text"
        log.debug("importance: %s has %s; distill falls back to frequency", feature, why)
    return RowImportance(feature, freq.astype(np.float64), freq, "frequency")


def table_importance(
    kind: str,
    weights: Mapping[str, torch.Tensor],
    ds: RecDataset,
    text: Optional[Mapping[str, torch.Tensor]] = None,
    weight_by_frequency: bool = True,
) -> dict[str, RowImportance]:
    """feature -> :class:`RowImportance` for every table in ``weights`` (feature -> (N, D))."""
    out = {}
    for f, w in weights.items():
        t0 = time.perf_counter()
        out[f] = row_importance(kind, f, w, ds, text, weight_by_frequency)
        say = log.info if w.shape[0] >= LOUD_ROWS else log.debug  # progress lines for big tables only
        say("importance: %s (%d rows, %s) in %.1fs", f, w.shape[0], out[f].kind, time.perf_counter() - t0)
    return out


def ranking(imp: RowImportance) -> np.ndarray:
    """Row ids from most to least important: score desc, then training frequency desc, then id asc."""
    ids = np.arange(imp.scores.shape[0])
    return np.lexsort((ids, -imp.freq, -imp.scores))
