"""What one ranker run is given and what it returns.

Notation: U users, I items, Du / Di dense features per user / item, H text-embedding dim,
D embedding dim, N_train training examples.

:class:`RankerSpec` is everything that tells one ranker apart from another (the teacher ranker,
the baseline, each distilled variant); :class:`RefitSpec` is the optional weight transfer after
training; :class:`RankerResult` is what :func:`sparse_kd.student.train.train_ranker` returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from sparse_kd.config import DistillConfig
from sparse_kd.data.schema import Interactions
from sparse_kd.student.model import Arch


@dataclass
class RefitSpec:
    """After training, replace rows of rarely seen entities by a text -> row ridge regression
    fitted on the others (weight transfer into the student's learned space; see
    :mod:`sparse_kd.student.refit`).

    text: feature -> (N, H) text embeddings; counts: feature -> (N,) training interactions;
    rows with fewer than ``min_count`` interactions are replaced; ``l2``: the ridge penalty.
    """

    text: dict[str, torch.Tensor]
    counts: dict[str, np.ndarray]
    min_count: int = 1
    l2: float = 1.0


@dataclass
class RankerSpec:
    """What distinguishes one ranker run from another.

    user_dense, item_dense: (U, Du), (I, Di) dense features per entity.
    teacher_logits: (N_train,) soft targets aligned with the train split, for logit KD.
    user_text, item_text: (U, H), (I, H) text embeddings, for feature alignment.
    init_rows: feature -> (num_embeddings, D) rows to seed the table with (weight transfer);
        NaN rows keep the default initialisation.
    refit: rows to replace from text after training, or None.
    pair_feature: module (user (B,), item (B,)) -> (B, P) of extra dense features computed per
        pair (the teacher ranker's history pair feature), or None.
    kd_pool, kd_pool_logits: sampled unobserved pairs (P_pool,) and the teacher's logits on them
        (P_pool,), added to every training batch for KD (``distill.pairs``), or None.
    arch: the ranker's architecture when it is not the student's (the teacher ranker), or None.
    user_rows: (U, k) more per-user dense features, held in a frozen row_wise table split over the
        ranks instead of in ``user_dense`` (the teacher ranker's text features with
        ``distill.teacher_ranker.features_layout: sharded``): a tensor or a row source read by
        slices (:class:`~sparse_kd.distill.transfer.ProjectedRows`), each rank reading only its
        shards' rows. The dense input is the same as with them as ``user_dense``'s last columns.
    item_rows: (I, k) the same for items: the dense input is the same as with them as
        ``item_dense``'s last columns.
    """

    name: str
    user_dense: torch.Tensor
    item_dense: torch.Tensor
    distill: DistillConfig = field(default_factory=DistillConfig)
    teacher_logits: Optional[torch.Tensor] = None
    user_text: Optional[torch.Tensor] = None
    item_text: Optional[torch.Tensor] = None
    init_rows: dict[str, torch.Tensor] = field(default_factory=dict)
    refit: Optional[RefitSpec] = None
    pair_feature: Optional[torch.nn.Module] = None
    kd_pool: Optional[Interactions] = None
    kd_pool_logits: Optional[torch.Tensor] = None
    arch: Optional[Arch] = None
    user_rows: Optional[Any] = None
    item_rows: Optional[Any] = None

    @property
    def dense_dim(self) -> int:
        """Width of the DLRM's dense input: user (+ user rows) + item dense features (+ item rows) (+ pair features)."""
        extra = self.pair_feature.dim if self.pair_feature is not None else 0
        rows = sum(r.shape[1] for r in (self.user_rows, self.item_rows) if r is not None)
        return self.user_dense.shape[1] + self.item_dense.shape[1] + rows + extra


@dataclass
class RankerResult:
    """metrics: split -> {"auc", "logloss", "n"} ({} when the run was stopped early);
    checkpoint: the last complete checkpoint; train_logits: (N_train,) when requested;
    history: one row per epoch (global_step, valid AUC and log loss); members: an ensemble's
    (spec, checkpoint) per member (:mod:`sparse_kd.student.ensemble`), empty for one model;
    eval_logits: split -> (N_split,) logits behind ``metrics``, kept where train logits are;
    member_metrics: an ensemble's members' own metrics, in member order (empty for one model)."""

    name: str
    metrics: dict
    checkpoint: Optional[Path]
    train_logits: Optional[torch.Tensor] = None
    examples_per_s: float = 0.0
    history: list = field(default_factory=list)
    members: list = field(default_factory=list)
    eval_logits: Optional[dict] = None
    member_metrics: list = field(default_factory=list)
