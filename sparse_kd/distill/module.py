"""The training wrapper: a DLRM plus the distillation heads and losses (like torchrec's DLRMTrain).

The served model is the bare DLRM inside (``.model``); heads and text buffers stay here, so the
served student carries no BERT and no text.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torchrec.models.dlrm import DLRM

from sparse_kd.config import DistillConfig
from sparse_kd.data.batching import ITEM_ROWS_KEY, TARGET_KEYS, USER_ROWS_KEY, KDBatch
from sparse_kd.distill import losses
from sparse_kd.distill.pairs import SAMPLED
from sparse_kd.distill.targets import COSINE_EPS, MODULE, held_rows, lookup, target_collection


class RankerTrain(nn.Module):
    """forward(batch) -> (loss, (loss.detach(), logits (B,), labels (B,))), the pipeline's contract.

    Args:
        model: the DLRM (its EBC may be sharded by DMP).
        distill: which distillation losses are on.
        feature_names: the DLRM's sparse feature order (the KJT keys).
        user_text, item_text: (U, H), (I, H) teacher embeddings for feature alignment, or None.
            With ``sharded_targets`` only their shapes are read here: the rows go into a
            sharded table (:mod:`sparse_kd.distill.targets`; the caller writes them after
            sharding) and batches must carry ``teacher_ids``.
        sharded_targets: hold the alignment targets in that table (``distill.align.layout``, as
            :func:`sparse_kd.distill.targets.sharded_layout` resolves it), not as buffers.
        pair_feature: a module (user (B,), item (B,), timestamp (B,) or None) -> (B, P) whose
            output is appended to the dense features (the teacher ranker's history features), or None.
        embedding_l2: weight of :func:`sparse_kd.distill.losses.embedding_l2` on the pooled
            embeddings (``train.embedding_l2``; 0: none).
        user_rows_shape: (U, k) of per-user dense features held in the frozen table (the teacher
            ranker's text features, ``distill.teacher_ranker.features_layout: sharded``), or None.
            Looked up for every batch (batches carry ``teacher_ids``) and put into the dense input
            right after its first ``user_dense_dim`` columns, where the replicated layout has them.
        item_rows_shape: (I, k) the same for items (None: none), appended after the item's own
            dense columns (before any pair features), where the replicated layout has them.

    Rows labelled :data:`sparse_kd.distill.pairs.SAMPLED` are sampled pairs (distill.pairs):
    they get only the KD loss on their teacher logits (``kd_sampled``) and are left out of the
    click loss and the observed-pair KD; alignment covers every row, and the returned logits and
    labels are those of every row (the training loop only counts them).
    """

    def __init__(
        self,
        model: DLRM,
        distill: Optional[DistillConfig] = None,
        feature_names: Optional[list[str]] = None,
        user_text: Optional[torch.Tensor] = None,
        item_text: Optional[torch.Tensor] = None,
        embedding_dim: int = 0,
        pair_feature: Optional[nn.Module] = None,
        embedding_l2: float = 0.0,
        sharded_targets: bool = False,
        user_rows_shape: Optional[tuple[int, int]] = None,
        user_dense_dim: int = 0,
        item_rows_shape: Optional[tuple[int, int]] = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.has_user_rows, self.has_item_rows = user_rows_shape is not None, item_rows_shape is not None
        self.user_dense_dim = int(user_dense_dim)
        frozen_shapes: dict[str, tuple[int, int]] = {key: tuple(shape) for key, shape in (
            (USER_ROWS_KEY, user_rows_shape), (ITEM_ROWS_KEY, item_rows_shape)) if shape is not None}
        self.embedding_l2 = float(embedding_l2)
        self.pair_feature = pair_feature
        self.distill = distill or DistillConfig()
        self.last_parts: dict[str, torch.Tensor] = {}
        al = self.distill.align
        self.align_index: dict[str, int] = {}
        self.align_heads = nn.ModuleDict()
        if al.enabled:
            texts = {"user_id": user_text, "item_id": item_text}
            if feature_names is None or any(texts.get(f) is None for f in al.features if f in texts):
                raise ValueError("distill.align is enabled: feature_names and the text rows of every aligned feature "
                                 f"({', '.join(al.features)}) are needed")
            for f in al.features:
                if f not in feature_names:
                    raise ValueError(f"distill.align.features: {f!r} is not a sparse feature ({feature_names})")
                if f not in ("user_id", "item_id"):
                    raise ValueError(f"distill.align.features: {f!r}: only user_id and item_id have text")
                self.align_index[f] = feature_names.index(f)
                self.align_heads[f] = nn.Linear(embedding_dim, (user_text if f == "user_id" else item_text).shape[1])
            if sharded_targets:
                frozen_shapes.update({TARGET_KEYS[f]: tuple((user_text if f == "user_id" else item_text).shape)
                                      for f in al.features})
            else:
                # cosine is blind to the target's length: keep unit rows, so the loss can be
                # computed in the embedding space (:func:`cosine_align_from_head`)
                unit = al.kind == "cosine"
                # only the aligned features' rows (users' rows may be split over the ranks when unused)
                self.register_buffer("user_text", held_rows(user_text, unit) if "user_id" in al.features else None,
                                     persistent=False)
                self.register_buffer("item_text", held_rows(item_text, unit) if "item_id" in al.features else None,
                                     persistent=False)
        self.frozen_keys = tuple(frozen_shapes)  # the frozen table's keys: what every batch's teacher_ids carries
        if frozen_shapes:
            setattr(self, MODULE, target_collection(frozen_shapes))

    def forward(self, batch: KDBatch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        m = self.model
        table = getattr(self, MODULE, None)
        # one lookup per batch: always for the text features, in training for the alignment targets
        rows = lookup(table, batch.teacher_ids, self.frozen_keys) if table is not None and (
            self.has_user_rows or self.has_item_rows or (self.align_heads and self.training)) else {}
        dense_in = batch.dense_features  # (B, Du + Di)
        if self.has_user_rows:  # (B, Du + k + Di): the user's features after its own columns
            du = self.user_dense_dim
            dense_in = torch.cat([dense_in[:, :du], rows[USER_ROWS_KEY], dense_in[:, du:]], 1)
        if self.has_item_rows:  # (B, ... + Di + k): the item's features after its own columns
            dense_in = torch.cat([dense_in, rows[ITEM_ROWS_KEY]], 1)
        if self.pair_feature is not None:
            dense_in = torch.cat([dense_in, self.pair_feature(batch.user, batch.item, batch.timestamp)], 1)  # (B, Du + Di + P)
        dense = m.dense_arch(dense_in)  # (B, D)
        sparse = m.sparse_arch(batch.sparse_features)  # (B, F, D)
        logits = m.over_arch(m.inter_arch(dense, sparse)).squeeze(-1)  # (B,)
        lk, al, pk = self.distill.logit, self.distill.align, self.distill.pairs
        labels = batch.labels
        if pk.enabled and self.training:
            # sampled rows (distill.pairs) have no click: masks, not slicing by a count, so the
            # forward stays traceable by the train pipeline's torch.fx pass
            obs = (labels != SAMPLED).float()  # (B,)
            labels = labels.clamp_min(0.0)
            parts: dict[str, torch.Tensor] = {"click": losses.masked_mean(losses.click_loss(logits, labels, "none"), obs)}
        else:
            obs = None
            parts = {"click": losses.click_loss(logits, labels)}
        if lk.enabled and self.training:
            kd = losses.logit_kd_loss(logits, batch.teacher_logits, lk.temperature, "none")  # (B,)
            parts["kd"] = losses.masked_mean(kd, obs) if obs is not None else kd.mean()
            loss = (1.0 - lk.kd_ratio) * parts["click"] + lk.kd_ratio * parts["kd"]
        else:
            loss = parts["click"]
        if obs is not None:
            kd_s = losses.logit_kd_loss(logits, batch.teacher_logits, pk.temperature, "none")  # (B,)
            parts["kd_sampled"] = losses.masked_mean(kd_s, 1.0 - obs)
            loss = loss + pk.weight * parts["kd_sampled"]
        if self.align_heads and self.training:
            targets = {f: rows[TARGET_KEYS[f]] for f in self.align_heads if TARGET_KEYS[f] in rows}
            for f, head in self.align_heads.items():
                emb = sparse[:, self.align_index[f], :]  # (B, D)
                ids = batch.user if f == "user_id" else batch.item
                # index_select: a row gather, several times faster than advanced indexing
                target = targets[f] if targets else (self.user_text if f == "user_id" else self.item_text).index_select(0, ids)  # (B, H)
                if al.kind == "cosine":
                    part = cosine_align_from_head(head, emb, target)
                else:
                    part = losses.align_loss(al.kind, head(emb), target, al.temperature, ids)
                parts[f"align_{f}"] = part
                loss = loss + al.weight * part
        if self.embedding_l2 > 0 and self.training:
            parts["embedding_l2"] = losses.embedding_l2(sparse)
            loss = loss + self.embedding_l2 * parts["embedding_l2"]
        self.last_parts = {k: v.detach() for k, v in parts.items()}
        return loss, (loss.detach(), logits.detach(), batch.labels)


def cosine_align_from_head(head: nn.Linear, emb: torch.Tensor, unit_target: torch.Tensor) -> torch.Tensor:
    """``losses.cosine_align_loss(head(emb), unit_target)``, without building ``head(emb)``.

    emb: (B, D) student embeddings; unit_target: (B, H) rows of unit norm (or zero);
    head: Linear(D, H), p = W e + b. Then p . t = e . (W^T t) + b . t and
    |p|^2 = e^T (W^T W) e + 2 e . (W^T b) + |b|^2 (the latter in float64, against cancellation),
    so the work is one (B, H) x (H, D) product per direction instead of ~15 passes over
    (B, H) tensors in F.cosine_similarity's forward and backward: the same loss and gradients
    up to float rounding (~1e-6 relative), several times faster for H >> D.
    """
    w, b = head.weight, head.bias  # (H, D), (H,)
    d = w.shape[1]
    tw = unit_target @ torch.cat([w, b[:, None]], dim=1)  # (B, D + 1): [W^T t, b . t], one pass over t
    dot = (emb * tw[:, :d]).sum(-1) + tw[:, d]  # (B,) p . t
    e64, w64, b64 = emb.double(), w.double(), b.double()
    sq = ((e64 @ (w64.T @ w64)) * e64).sum(-1) + 2.0 * (e64 @ (w64.T @ b64)) + b64 @ b64  # (B,) |p|^2
    norm = sq.clamp_min(0.0).sqrt().clamp_min(COSINE_EPS).float()
    return (1.0 - dot / norm).mean()
