"""Best-epoch selection and early stopping on the ``valid`` split (``train.select_best``,
``train.early_stop_patience``).

After every epoch the training loop hands the epoch's valid AUC to :class:`EpochSelector`. An
epoch that beats every earlier one (strictly; NaN never does) becomes the best: rank 0 copies
its checkpoint to ``checkpoints/best/step_N`` (atomically: a ``.tmp`` copy renamed; the files are
hard links where the filesystem allows, so the copy costs no time at any checkpoint size), then
records it in ``selection.json``, and only then removes older best copies, so the file always
names a complete folder. After ``early_stop_patience`` epochs without a new best, training
stops. At the end the best weights are loaded back and saved as the run's final checkpoint,
marked finished (``epoch = train.epochs``): a rerun re-evaluates the chosen model and trains no
further. ``selection.json``::

    {"history": [{"epoch": 1, "score": 0.74}, ...], "best_epoch": 2, "best_score": 0.75,
     "best_checkpoint": "checkpoints/best/step_00000412", "stopped": false, "restored": false}

Paths in it are relative to the ranker's folder; on resume rank 0 reads it and sends it to the
other ranks (checkpoints already need a filesystem all ranks share, see
:func:`sparse_kd.run_folder.check_shared_run_folder`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Optional

from sparse_kd.atomic import swap_in_dir, write_text
from sparse_kd.dist import on_main

FILE = "selection.json"
BEST_DIR = "best"


class EpochSelector:
    """Tracks valid scores per epoch; says which epoch is best and when to stop.

    Args:
        out_dir: the ranker's folder (holds ``selection.json`` and ``checkpoints/``).
        enabled: ``train.select_best``; when False every method is a no-op.
        patience: ``train.early_stop_patience`` (0: never stop early).

    Example::

        sel = EpochSelector(out_dir, enabled=True, patience=1)
        sel.update(1, 0.70)  # True: a new best
        sel.update(2, 0.69)  # False
        sel.should_stop()    # True: one epoch without improvement
    """

    def __init__(self, out_dir: Path, enabled: bool, patience: int = 0) -> None:
        self.out_dir, self.enabled, self.patience = Path(out_dir), enabled, patience
        self.history: list[dict] = []
        self.best_epoch: Optional[int] = None
        self.best_score = -math.inf
        self.best_checkpoint: Optional[str] = None
        self.stopped = False
        self.restored = False
        doc = on_main(self._read) if enabled else None  # a collective under torchrun: every rank constructs it
        if doc is not None:
            self.history = doc["history"]
            self.best_epoch, self.best_checkpoint = doc["best_epoch"], doc["best_checkpoint"]
            self.best_score = doc["best_score"] if doc["best_score"] is not None else -math.inf
            self.stopped, self.restored = doc["stopped"], doc["restored"]

    def _read(self) -> Optional[dict]:
        f = self.out_dir / FILE
        if not f.is_file():
            return None
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: unreadable ({e}); delete it and the ranker's folder to retrain") from None

    @property
    def last_epoch(self) -> int:
        return self.history[-1]["epoch"] if self.history else 0

    def update(self, epoch: int, score: float) -> bool:
        """Record epoch ``epoch``'s valid score; True when it is the new best."""
        if not self.enabled:
            return False
        self.history.append({"epoch": epoch, "score": score})
        if not math.isnan(score) and score > self.best_score:
            self.best_epoch, self.best_score = epoch, score
            return True
        return False

    def should_stop(self) -> bool:
        """True after ``patience`` recorded epochs since the best one (never when patience is 0)."""
        if not self.enabled or self.patience <= 0 or self.best_epoch is None:
            return False
        return self.last_epoch - self.best_epoch >= self.patience

    def keep(self, checkpoint: Path) -> Path:
        """Rank 0: copy ``checkpoint`` (the new best epoch's) into ``checkpoints/best/`` atomically;
        returns the copy. Call :meth:`save` next, then :meth:`prune`."""
        checkpoint = Path(checkpoint)
        best_dir = checkpoint.parent / BEST_DIR
        best_dir.mkdir(parents=True, exist_ok=True)
        final = best_dir / checkpoint.name
        tmp = best_dir / (checkpoint.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(checkpoint, tmp, copy_function=_link_or_copy)
        swap_in_dir(tmp, final, best_dir / (checkpoint.name + ".old"))
        self.best_checkpoint = str(final.relative_to(self.out_dir))
        return final

    def prune(self) -> None:
        """Rank 0: remove every folder in ``checkpoints/best/`` but the recorded best."""
        if self.best_checkpoint is None:
            return
        keep = self.out_dir / self.best_checkpoint
        for p in keep.parent.iterdir():
            if p != keep:
                shutil.rmtree(p, ignore_errors=True)

    def best_path(self) -> Optional[Path]:
        return self.out_dir / self.best_checkpoint if self.best_checkpoint else None

    def save(self) -> None:
        """Rank 0: write ``selection.json`` atomically."""
        if not self.enabled:
            return
        doc = {
            "history": self.history,
            "best_epoch": self.best_epoch,
            "best_score": None if self.best_score == -math.inf else self.best_score,
            "best_checkpoint": self.best_checkpoint,
            "stopped": self.stopped,
            "restored": self.restored,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_text(self.out_dir / FILE, json.dumps(doc, indent=1))


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link ``src`` to ``dst`` (checkpoint files are never rewritten in place, only replaced
    or deleted), or copy it where the filesystem has no hard links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
