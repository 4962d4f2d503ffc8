"""``torchrun ... -m helpers.faults OUT_DIR KILL_STEP`` (with ``tests/`` on PYTHONPATH): train the
tiny baseline on every rank with checkpoints every 5 steps; on the first attempt rank 1 SIGKILLs
itself after step KILL_STEP. Rank 0 writes OUT_DIR/metrics.json at the end:
{"metrics", "restart_count" (TORCHELASTIC_RESTART_COUNT of the attempt that finished),
"resumed_from" (the checkpoint that attempt resumed from, or null)}.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from helpers.tiny import tiny_config, tiny_dataset
from sparse_kd.dist import init_distributed
from sparse_kd.pipeline import baseline_spec
from sparse_kd.student.train import train_ranker


def kill_self_at(step: int, rank: int):
    """An ``on_step`` hook: SIGKILL this process after ``step`` on ``rank``, first attempt only."""

    def hook(global_step: int) -> None:
        if (
            global_step == step
            and int(os.environ.get("RANK", "0")) == rank
            and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0
        ):
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


class _Resumed(logging.Handler):
    """Keeps the checkpoint path of train_ranker's 'resumed from' log line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.path: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().split("] ", 1)[-1].startswith("resumed from "):
            self.path = str(record.args[1])


def main(argv: list[str] | None = None) -> None:
    warnings.filterwarnings("ignore")
    out, kill_step = (argv or sys.argv[1:])[:2]
    resumed = _Resumed()
    train_log = logging.getLogger("sparse_kd.student.train")
    train_log.addHandler(resumed)
    train_log.setLevel(logging.INFO)
    cfg = tiny_config(out, nproc=2, train={"checkpoint_every": 5})
    env = init_distributed("gloo", 60)
    ds = tiny_dataset(cfg)
    res = train_ranker(cfg, ds, baseline_spec(ds), Path(out) / "baseline", env, on_step=kill_self_at(int(kill_step), rank=1))
    if env.is_main:
        doc = {"metrics": res.metrics, "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
               "resumed_from": resumed.path}
        (Path(out) / "metrics.json").write_text(json.dumps(doc))


if __name__ == "__main__":
    main()
