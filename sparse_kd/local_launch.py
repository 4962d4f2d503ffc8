"""N local CPU ranks for one function call: :func:`launch_local` (tests, benchmarks).

Ranks start through torch's ``elastic_launch``, as torchrec's own tests do, each launch on a fresh
rendezvous port. By default they are forked from a *forkserver* that has imported torch, torchrec
and fbgemm_gpu once: a 2-rank launch then takes 0.30 s instead of 4.11 s with spawned ranks
(medians, ``benchmarks/bench_launch.py``, docs/BENCHMARKS.md section 9). ``start_method="spawn"``
gives ranks that import everything themselves, for benchmarks that measure a rank's own peak memory.

A forkserver starts once per parent process. multiprocessing hands each new process the parent's
working folder and ``sys.path`` as they are at that start, but not its environment: the children
inherit the *server's*, taken when it started. So each rank re-adopts the parent's environment as
it was when :func:`launch_local` was called (what a spawned rank would have seen), keeping the
variables the elastic agent set for it (RANK, MASTER_PORT, ...), and sets torch's thread count from
OMP_NUM_THREADS, which libgomp read once, in the server.
"""

from __future__ import annotations

import multiprocessing
import os
import uuid
from typing import Any, Callable

import torch

# imported once by the forkserver; this module must be among them (see _Rank)
PRELOAD = ("torch", "torchrec", "fbgemm_gpu", "sparse_kd.dist", __name__)
# what torch's LocalElasticAgent sets for a rank (local_elastic_agent.py): kept even where a
# stale value in the server's environment happens to equal it
AGENT_VARS = frozenset({"RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "LOCAL_WORLD_SIZE",
                        "WORLD_SIZE", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "TORCH_NCCL_ASYNC_ERROR_HANDLING", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS"})
# this module's import environment: in a forked rank, the forkserver's (imported in the server)
_BORN_ENV = dict(os.environ)
_BORN_PID = os.getpid()


def agent_env(now: dict[str, str], born: dict[str, str]) -> dict[str, str]:
    """The variables a rank got from its elastic agent: those that changed since the process it
    was forked from started, and those the agent always sets."""
    return {k: v for k, v in now.items() if born.get(k) != v or k in AGENT_VARS or k.startswith("TORCHELASTIC_")}


class _Rank:
    """The entrypoint a rank runs: the parent's environment at launch, then ``fn(*args)``."""

    def __init__(self, fn: Callable[..., Any], env: dict[str, str]) -> None:
        self.fn, self.env = fn, env
        # the agent names the rank's role after these
        self.__name__ = getattr(fn, "__name__", "rank")
        self.__qualname__ = getattr(fn, "__qualname__", self.__name__)

    def __call__(self, *args: Any) -> Any:
        if os.getpid() != _BORN_PID:  # forked from the server: its environment is stale
            own = agent_env(dict(os.environ), _BORN_ENV)
            os.environ.clear()
            os.environ.update(self.env)
            os.environ.update(own)
            if "OMP_NUM_THREADS" in os.environ:
                torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        return self.fn(*args)


def launch_local(fn: Callable[..., Any], nproc: int, *args: Any, start_method: str = "forkserver") -> dict[int, Any]:
    """Run ``fn(*args)`` on ``nproc`` local CPU ranks; return {rank: return value}.

    ``fn`` and ``args`` must be picklable. Each rank gets one OpenMP thread, as torchrun gives it,
    unless OMP_NUM_THREADS is set: N ranks x default threads would oversubscribe the cores and
    spin-wait on each other. The setting reaches only the ranks; this process's environment is
    left as it was.
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if start_method not in ("forkserver", "spawn"):
        raise ValueError(f"start_method must be 'forkserver' or 'spawn', not {start_method!r}")
    if start_method == "forkserver":  # takes effect when the server starts: at the first launch
        multiprocessing.get_context("forkserver").set_forkserver_preload(list(PRELOAD))
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
        start_method=start_method,
    )
    # the agent forwards OMP_NUM_THREADS from os.environ to the ranks it starts
    unset = "OMP_NUM_THREADS" not in os.environ
    if unset:
        os.environ["OMP_NUM_THREADS"] = "1"
    try:
        return elastic_launch(lc, entrypoint=_Rank(fn, dict(os.environ)))(*args)
    finally:
        if unset:
            os.environ.pop("OMP_NUM_THREADS", None)


def spawned(fn: Callable[..., Any], nproc: int, *args: Any) -> dict[int, Any]:
    """:func:`launch_local` with ranks that import everything themselves: a benchmark's peak
    memory per rank then counts nothing that a forkserver loaded."""
    return launch_local(fn, nproc, *args, start_method="spawn")
