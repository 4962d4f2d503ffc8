"""One split of interactions, and the split names and codes every loader shares.

Notation: N interactions in a split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "valid", "test", "valid_cold", "test_cold")
TRAIN, VALID, TEST, VALID_COLD, TEST_COLD = range(5)  # split codes, in SPLITS order


@dataclass
class Interactions:
    """One split. user, item: (N,) int64 entity indices; label: (N,) float32 in {0, 1};
    timestamp: (N,) int64 (0 where the source has none)."""

    user: np.ndarray
    item: np.ndarray
    label: np.ndarray
    timestamp: np.ndarray

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def subset(self, idx: np.ndarray) -> "Interactions":
        return Interactions(self.user[idx], self.item[idx], self.label[idx], self.timestamp[idx])

    @staticmethod
    def empty() -> "Interactions":
        z = np.zeros(0, dtype=np.int64)
        return Interactions(z, z.copy(), np.zeros(0, dtype=np.float32), z.copy())
