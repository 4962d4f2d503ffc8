"""Rank 0's training log: ``train_log.csv`` (one row per scalar: global_step, epoch, name, value)
and the same scalars as TensorBoard events in ``tensorboard/``.

Scalars: ``loss/<part>`` every ``train.log_every`` steps (the parts of the training loss, e.g.
click, kd, align_item_id), ``valid_auc`` and ``valid_logloss`` after every epoch. The CSV is
appended to, so a resumed run continues the same file.
"""

from __future__ import annotations

import csv
from pathlib import Path


class TrainLog:
    def __init__(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "train_log.csv"
        self.f = open(self.path, "a", newline="")
        self.w = csv.writer(self.f)
        if self.f.tell() == 0:
            self.w.writerow(["global_step", "epoch", "name", "value"])
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        except Exception:  # pragma: no cover - tensorboard is pinned; stay usable without it
            self.tb = None

    def _scalar(self, step: int, epoch: int, name: str, value: float) -> None:
        self.w.writerow([step, epoch, name, f"{value:.6f}"])
        if self.tb:
            self.tb.add_scalar(name, value, step)

    def losses(self, step: int, epoch: int, parts: dict[str, float]) -> None:
        for k, v in parts.items():
            self._scalar(step, epoch, f"loss/{k}", v)

    def epoch(self, row: dict) -> None:
        """row: {"epoch", "global_step", "valid_auc", "valid_logloss"}."""
        for k in ("valid_auc", "valid_logloss"):
            self._scalar(row["global_step"], row["epoch"], k, row[k])
        self.f.flush()

    def close(self) -> None:
        self.f.close()
        if self.tb:
            self.tb.close()
