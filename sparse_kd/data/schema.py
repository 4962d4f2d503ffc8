"""In-memory dataset: entities (users, items) with text and sparse features, and interaction splits.

Notation: U users, I items, N interactions in a split, F sparse features.

Every sparse feature belongs to an owner (``user`` or ``item``) and is stored as CSR over that
owner's entities: entity ``e`` has ids ``values[offsets[e]:offsets[e+1]]`` (multi-hot allowed).
``user_id`` and ``item_id`` are features too (one id per entity, the entity index itself).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

import numpy as np

from sparse_kd.data.interactions import SPLITS, Interactions  # noqa: F401 (re-exported: the dataset's parts)

if TYPE_CHECKING:
    from sparse_kd.data.negatives import NegativeSampler


class DataError(ValueError):
    """Bad input data; the message names the file, line and column where known."""


@dataclass
class SparseFeature:
    """One categorical feature of users or items, CSR over the owner's entities.

    vocab: index -> raw value string (len = embedding table rows).
    offsets: (num_entities + 1,) int64.   values: (nnz,) int64 indices into ``vocab``.
    """

    name: str
    owner: Literal["user", "item"]
    vocab: list[str]
    offsets: np.ndarray
    values: np.ndarray

    @property
    def num_embeddings(self) -> int:
        return max(1, len(self.vocab))

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def validate(self, num_entities: int) -> None:
        """Raise :class:`DataError` unless the CSR arrays fit ``num_entities`` owners and the vocab."""
        where = f"sparse feature {self.name!r} ({self.owner})"
        if self.offsets.shape != (num_entities + 1,):
            raise DataError(f"{where}: offsets have shape {self.offsets.shape}, expected ({num_entities + 1},) "
                            f"for {num_entities} {self.owner}s")
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.values):
            raise DataError(f"{where}: offsets run from {self.offsets[0]} to {self.offsets[-1]}, expected 0 to "
                            f"{len(self.values)} (the number of values)")
        if np.any(np.diff(self.offsets) < 0):
            raise DataError(f"{where}: offsets decrease at {self.owner} {int(np.argmax(np.diff(self.offsets) < 0))}")
        if len(self.values) and (self.values.min() < 0 or self.values.max() >= len(self.vocab)):
            raise DataError(f"{where}: values span {self.values.min()}..{self.values.max()}, outside the vocabulary "
                            f"0..{len(self.vocab) - 1}")


@dataclass
class RecDataset:
    """Users and items (raw string ids, text), sparse features and the splits of ``SPLITS``.

    report: what the loader did that a user should know (rows read, skipped and why); it is
    written to the run's metrics JSON.
    implicit: the source had no labels (positives only); the evaluation splits then hold
    ``negatives`` sampled negatives per positive, and ``sampler`` (set when training negatives
    are resampled every epoch) draws the training negatives (:mod:`.negatives`).
    Splits missing from ``splits`` are empty.
    """

    user_ids: list[str]
    item_ids: list[str]
    user_text: list[str]
    item_text: list[str]
    features: list[SparseFeature]
    splits: dict[str, Interactions]
    report: dict = field(default_factory=dict)
    implicit: bool = False
    negatives: int = 0
    sampler: Optional["NegativeSampler"] = None

    def __post_init__(self) -> None:
        for s in SPLITS:
            if s not in self.splits:
                self.splits[s] = Interactions.empty()

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    def feature(self, name: str) -> SparseFeature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no sparse feature {name!r}; have {[f.name for f in self.features]}")

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    def validate(self) -> None:
        """Raise :class:`DataError` if texts, features or splits do not fit the users and items."""
        if len(self.user_text) != self.num_users or len(self.item_text) != self.num_items:
            raise DataError(f"{len(self.user_text)} user texts for {self.num_users} users and {len(self.item_text)} "
                            f"item texts for {self.num_items} items: expected one text per entity")
        names = self.feature_names
        if len(set(names)) != len(names):
            raise DataError(f"duplicate sparse feature names {sorted(n for n in set(names) if names.count(n) > 1)}: "
                            "rename the columns so each feature name is unique")
        for f in self.features:
            f.validate(self.num_users if f.owner == "user" else self.num_items)
        for s in SPLITS:
            if s not in self.splits:
                raise DataError(f"split {s!r} is missing; a dataset has splits {', '.join(SPLITS)}")
            sp = self.splits[s]
            if len(sp) and (sp.user.min() < 0 or sp.user.max() >= self.num_users
                            or sp.item.min() < 0 or sp.item.max() >= self.num_items):
                raise DataError(f"split {s!r}: user/item indices outside 0..{self.num_users - 1} / "
                                f"0..{self.num_items - 1}")

    def save_mappings(self, path: str | Path) -> None:
        """Write the raw-id -> index mappings and per-feature vocabularies (JSON) for serving."""
        doc = {
            "user_ids": self.user_ids,
            "item_ids": self.item_ids,
            "features": {
                f.name: {"owner": f.owner, "vocab": f.vocab, "offsets": f.offsets.tolist(), "values": f.values.tolist()}
                for f in self.features
            },
        }
        Path(path).write_text(json.dumps(doc))

    def train_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(U,), (I,) int64 training interactions per user and per item (positives only when
        the feedback is implicit: sampled negatives are not part of the log)."""
        tr = self.splits["train"]
        keep = tr.label > 0 if self.implicit else slice(None)
        return (np.bincount(tr.user[keep], minlength=self.num_users).astype(np.int64),
                np.bincount(tr.item[keep], minlength=self.num_items).astype(np.int64))

    def summary(self) -> dict:
        out = {
            "users": self.num_users,
            "items": self.num_items,
            "features": {f.name: f.num_embeddings for f in self.features},
            "splits": {s: {"n": len(sp), "positives": round(int(np.count_nonzero(sp.label > 0)) / len(sp), 4) if len(sp) else 0.0}
                       for s, sp in self.splits.items()},
        }
        if self.implicit:
            out["feedback"] = feedback_summary(self.report, self.negatives)
        return out


def feedback_summary(report: dict, negatives: int) -> str:
    """The summary line of an implicit-feedback dataset (in-memory or converted)."""
    fb = report.get("feedback", {})
    return (f"implicit: {negatives} sampled negatives per positive; training negatives "
            f"{fb.get('train_negatives', '?')}; evaluation negatives {fb.get('eval_negatives', '?')} (report.feedback)")
