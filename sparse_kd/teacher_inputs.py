"""What the teacher ranker is given: its dense features and its pair features, as a :class:`RankerSpec`.

Notation: U users, I items, H text dim, k text dims per entity after PCA (H with ``text_dim: -1``),
W ranks.

The teacher sees the students' count features plus text: each user's and item's text row,
PCA-reduced to k dims (or every dim), as dense features. The users' part grows with the user base
(U x k x 4 bytes: 1.3 GB at 10M users and k = 32, 15 GB at H = 384), the items' with the
catalogue. Where ``distill.teacher_ranker.features_layout`` resolves to ``sharded`` for a side
(:func:`features_sharded`, of its own size), no rank holds that part: the rows are a source computed where read (:func:`~sparse_kd.distill.transfer.pca_rows`),
written once into a frozen row_wise table (:mod:`sparse_kd.distill.targets`), each rank its shard,
and each batch's rows arrive by torchrec's all-to-all. The dense input has the same columns in the
same order either way, so a checkpoint trained under one layout loads under the other.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from sparse_kd.config import ExperimentConfig
from sparse_kd.data.batching import count_dense
from sparse_kd.data.schema import RecDataset
from sparse_kd.distill.attention import HistoryAttention, PairFeatures
from sparse_kd.distill.history import HistoryPairFeature
from sparse_kd.distill.rows import as_tensor
from sparse_kd.distill.targets import AUTO_SHARD_BYTES
from sparse_kd.distill.transfer import pca_reduce, pca_rows
from sparse_kd.student.model import teacher_arch
from sparse_kd.student.spec import RankerSpec

log = logging.getLogger(__name__)

TEACHER = "teacher_ranker"


@dataclass
class TeacherFeatures:
    """The teacher ranker's dense inputs, computed once per teacher (an ensemble's members share
    them: K copies of U x k would be K times the memory).

    user_dense: (U, Du) held by every rank: the count features, and the users' text part unless
        ``user_rows`` holds it. item_dense: (I, Di): the same for items and ``item_rows``.
        item_text: the items' text part (I, k), which the history attention reads (None where
        ``item_rows`` holds it and no attention reads it). user_rows, item_rows: the users' and
        the items' text part (U, k), (I, k) as row sources for the frozen table split over the
        ranks, or None (it is in the dense features).
    """

    user_dense: torch.Tensor
    item_dense: torch.Tensor
    item_text: Optional[torch.Tensor]
    user_rows: Optional[Any] = None
    item_rows: Optional[Any] = None


def text_dims(cfg: ExperimentConfig) -> int:
    """k: the teacher ranker's text dims per entity (-1: every dim of the text embedding)."""
    tr = cfg.distill.teacher_ranker
    return cfg.student.teacher_text_dim if tr.text_dim == 0 else tr.text_dim


def features_sharded(layout: str, rows: int, dims: int, world_size: int) -> bool:
    """Whether ``distill.teacher_ranker.features_layout`` puts ``rows`` x ``dims`` text features
    (the users' or the items') in the frozen table split over ``world_size`` ranks. ``auto``: on
    several ranks, when the dims suit the fused tables (a multiple of 4) and the replicated fp32
    rows would exceed :data:`~sparse_kd.distill.targets.AUTO_SHARD_BYTES` per rank (replicated is
    faster: one ``index_select``, no all-to-all)."""
    if layout != "auto":
        return layout == "sharded"
    return world_size > 1 and dims % 4 == 0 and rows * dims * 4 > AUTO_SHARD_BYTES


def teacher_features(cfg: ExperimentConfig, ds: RecDataset, user_text, item_text, world_size: int = 1) -> TeacherFeatures:
    """The teacher ranker's dense inputs (:class:`TeacherFeatures`): the students' count features
    and the text, PCA-reduced or every dim with ``text_dim: -1``; the users' and the items' text
    part each as a row source when :func:`features_sharded` (a collective where the rows are split
    over the ranks). The items' part is also held whole where the history attention reads it."""
    ub, ib = count_dense(ds)
    k = text_dims(cfg)
    tr = cfg.distill.teacher_ranker
    text = (lambda x: as_tensor(x).float()) if k == -1 else (lambda x: pca_reduce(x, k))  # noqa: E731
    main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

    def split(rows, n: int, who: str):
        """The rows as a source for the split table, or None where they stay in the dense features."""
        if not features_sharded(tr.features_layout, n, rows.shape[1] if k == -1 else k, world_size):
            return None
        src = rows if k == -1 else pca_rows(rows, k)
        if main:
            log.info("teacher ranker: the %s' %d x %d text features go into a table split over %d ranks "
                     "(features_layout=%s)", who, src.shape[0], src.shape[1], world_size, tr.features_layout)
        return src

    user_rows, item_rows = split(user_text, ds.num_users, "users"), split(item_text, ds.num_items, "items")
    item_t = text(item_text) if item_rows is None or tr.history_attention.enabled else None
    user_dense = ub if user_rows is not None else torch.cat([ub, text(user_text)], 1)
    item_dense = ib if item_rows is not None else torch.cat([ib, item_t], 1)
    return TeacherFeatures(user_dense, item_dense, item_t, user_rows, item_rows)


def teacher_spec(cfg: ExperimentConfig, ds: RecDataset, user_text, item_text, name: str = TEACHER,
                 features: Optional[TeacherFeatures] = None, world_size: int = 1) -> RankerSpec:
    """The teacher ranker (architecture: ``distill.teacher_ranker``, :func:`~sparse_kd.student.model.teacher_arch`)
    sees the students' inputs plus text embeddings as dense features (:func:`teacher_features`, or
    ``features`` computed by it; ``user_text`` as given by :func:`~sparse_kd.text_stage.user_text_for`), with ``history_pair`` the
    user-item history similarity (:class:`~sparse_kd.distill.history.HistoryPairFeature`), with
    ``history_attention`` target attention over the user's earlier clicks (:class:`~sparse_kd.distill.attention.HistoryAttention`)."""
    tr = cfg.distill.teacher_ranker
    f = features if features is not None else teacher_features(cfg, ds, user_text, item_text, world_size)
    spec = RankerSpec(name, f.user_dense, f.item_dense, arch=teacher_arch(cfg.student, tr), user_rows=f.user_rows,
                      item_rows=f.item_rows)
    ha = tr.history_attention
    parts = ([HistoryPairFeature(ds, item_text)] if tr.history_pair else []) + (
        [HistoryAttention(ds, f.item_text, ha.max_len, ha.dim, ha.kind, ha.hidden, ha.item_ids)] if ha.enabled else [])
    if parts:
        spec.pair_feature = parts[0] if len(parts) == 1 else PairFeatures(parts)
    return spec
