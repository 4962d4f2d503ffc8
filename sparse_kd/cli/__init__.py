"""``sparse-kd``: one subcommand per stage, plus ``pipeline`` that runs them all.

Every subcommand takes a YAML config (see configs/) followed by ``key=value`` overrides, e.g.
``sparse-kd train configs/demo.yaml train.epochs=1 nproc=1``. Stages that train re-launch
themselves under ``torch.distributed.run`` with ``nproc`` processes when not already under
torchrun, so one command is enough on a laptop; on a cluster, use the torchx components in
launch/ (same code, another scheduler).

Overrides may stand anywhere after the config, before or after the flags:
``sparse-kd compress CONFIG --variant baseline compress.default_dtype=int4``.

Modules: :mod:`.parser` (the arguments), :mod:`.run_commands` (training and compression),
:mod:`.serve_commands` (serving), :mod:`.common` (logging, config, re-launch).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sparse_kd.cli.common import setup_logging  # noqa: E402  (after the environment defaults)
from sparse_kd.cli.parser import SERVE_LIMITS, build_parser  # noqa: E402

__all__ = ["SERVE_LIMITS", "build_parser", "main"]


def _user_errors() -> tuple[type, ...]:
    """Exceptions that are the user's to fix: printed as one line, exit 2 (imported only when one is
    raised, so that `serve` does not import the training code)."""
    from sparse_kd.checkpoint import CheckpointError
    from sparse_kd.config import ConfigError
    from sparse_kd.data.schema import DataError
    from sparse_kd.run_folder import StaleRunError
    from sparse_kd.teacher.encoder import TeacherModelError
    from sparse_kd.serve.format import ArtifactError

    return (ConfigError, DataError, FileNotFoundError, CheckpointError, StaleRunError, TeacherModelError, ArtifactError)


def parse(argv: list[str] | None = None):
    """Parse ``argv`` with one rule for every command: ``key=value`` overrides may stand anywhere
    after the config, flags before or after them (argparse alone ends the positionals at the first
    flag, so an override after ``--variant X`` would be "unrecognized")."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    setup_logging(args.verbose)
    try:
        return args.fn(args) or 0
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank stops; one says why
            print(f"error: {e}", file=sys.stderr, flush=True)
        if getattr(e, "on_every_rank", False):  # no rank exits (and gets the others killed) before that
            from sparse_kd.dist import barrier

            barrier()
        return 2

