"""Process-group set-up shared by every stage: the same code runs as 1 process or under torchrun;
and :func:`launch_local`, N local CPU ranks in fresh processes (tests, benchmarks)."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto", timeout_s: int = 300) -> DistEnv:
    """Join (or create) the default process group.

    Under torchrun the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) is used; otherwise a
    1-process group on a free local port. backend ``auto`` is nccl with CUDA, else gloo.
    Collectives that wait longer than ``timeout_s`` fail instead of hanging.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            from sparse_kd.config import ConfigError

            raise ConfigError("train.backend: 'nccl' needs CUDA GPUs; none is visible. Use train.backend=gloo (or auto) on CPU.")
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        # torchrun keeps one store across --max-restarts attempts: without a per-attempt prefix, a
        # restarted rank can read a dead peer's address from the previous attempt and fail to
        # connect (seen with gloo after a SIGKILLed rank). The prefix keeps attempts apart.
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"sparse_kd/attempt_{attempt}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)
    return DistEnv(rank, world, local_rank, device, backend)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank along dim 0, in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def launch_local(fn: Callable[..., Any], nproc: int, *args: Any) -> dict[int, Any]:
    """Run ``fn(*args)`` on ``nproc`` fresh local CPU ranks (``elastic_launch``, as torchrec's own
    tests do, each launch on a fresh rendezvous port); return {rank: return value}.

    ``fn`` and ``args`` must be picklable (ranks are spawned). Each rank gets one OpenMP thread,
    as torchrun gives it, unless OMP_NUM_THREADS is set: N ranks x default threads would
    oversubscribe the cores and spin-wait on each other. The setting reaches only the ranks;
    this process's environment is left as it was.
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    lc = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        rdzv_configs={"timeout": 120},
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    # the agent forwards OMP_NUM_THREADS from os.environ to the ranks it spawns
    unset = "OMP_NUM_THREADS" not in os.environ
    if unset:
        os.environ["OMP_NUM_THREADS"] = "1"
    try:
        return elastic_launch(lc, entrypoint=fn)(*args)
    finally:
        if unset:
            os.environ.pop("OMP_NUM_THREADS", None)
