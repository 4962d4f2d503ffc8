"""What every command shares: logging, loading the config (checked against a torchrun world),
and re-launching the same command line under ``torch.distributed.run``."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

log = logging.getLogger("sparse_kd")


def setup_logging(verbose: bool = False) -> None:
    rank = int(os.environ.get("RANK", "0"))
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"[rank{rank}] " if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("sparse_kd")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING))
    root.propagate = False
    import warnings

    warnings.filterwarnings("ignore")
    for noisy in ("torchrec", "torch.distributed", "fbgemm_gpu"):
        logging.getLogger(noisy).setLevel(logging.ERROR)



def load(args):
    from sparse_kd.config import load_config

    cfg = load_config(args.config, args.overrides)
    if under_torchrun():  # WORLD_SIZE, not the config, splits the batch: they must agree
        from sparse_kd.dist import check_world_size

        check_world_size(cfg, int(os.environ["WORLD_SIZE"]))
    return cfg



def nproc(cfg) -> int:
    """Local processes to re-launch with (``nproc`` resolved: auto, one per GPU, batch divisible)."""
    from sparse_kd.dist import local_processes

    return local_processes(cfg)



def under_torchrun() -> bool:
    return "RANK" in os.environ and "LOCAL_RANK" in os.environ



def relaunch(nproc: int, max_restarts: int = 0, extra: tuple[str, ...] = ()) -> int:
    """Run this same command line (plus ``extra``) under torch.distributed.run with ``nproc`` local processes."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        f"--max-restarts={max_restarts}", "-m", "sparse_kd.cli", *sys.argv[1:], *extra,
    ]
    log.info("launching %d processes: %s", nproc, " ".join(cmd[2:]))
    return subprocess.call(cmd)

