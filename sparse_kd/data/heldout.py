"""The held-out pairs a serving process scores without the data loaders."""

from __future__ import annotations

from pathlib import Path

from sparse_kd.data.schema import RecDataset


def write_heldout_pairs(ds: RecDataset, path: Path) -> None:
    """The test and test_cold interactions as raw-id CSV (split,user_id,item_id,label), so a serving
    process can score them without the data loaders."""
    import csv
    from itertools import repeat

    import numpy as np

    user_ids, item_ids = np.asarray(ds.user_ids, dtype=object), np.asarray(ds.item_ids, dtype=object)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["split", "user_id", "item_id", "label"])
        for split in ("test", "test_cold"):
            sp = ds.splits[split]
            w.writerows(zip(repeat(split), user_ids[sp.user], item_ids[sp.item], np.asarray(sp.label).astype(np.int64).tolist()))
