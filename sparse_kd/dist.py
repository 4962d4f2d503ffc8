"""Process-group set-up shared by every stage: the same code runs as 1 process or under torchrun
(N local ranks for one function call: :mod:`sparse_kd.local_launch`).

How many processes, and on which devices:

- ``nproc`` (config) is the number of local processes a command re-launches itself with;
  :func:`local_processes` resolves ``auto`` (one per GPU when training on CUDA, else 2) and
  refuses more processes than GPUs, since each CUDA rank needs a GPU of its own.
- Under torchrun (or torchx), WORLD_SIZE is what splits the global batch; :func:`check_world_size`
  refuses a config whose integer ``nproc`` says otherwise.
- With ``nccl`` the default group is ``cpu:gloo,cuda:nccl``: CUDA tensors go through NCCL, and
  CPU tensors, objects and barriers through gloo (an NCCL-only group rejects CPU tensors).
- Waits on work that one rank does alone, or that ranks finish unevenly (rank 0 writing the run's
  files, teacher encoding split over the ranks, checkpoint hashing) go through a second gloo group
  with a long timeout (:func:`long_group`, :func:`long_barrier`, :func:`on_main`), so that
  ``train.collective_timeout_s`` can stay short for the training steps.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

AUTO_CPU_NPROC = 2  # nproc: auto without CUDA
# Timeout of the long-wait group (:func:`long_group`): waits on work that only some ranks do, or
# that takes as long as a whole stage (teacher encoding, checkpoint hashing, rank 0's writes).
# Proposed config key: train.long_wait_timeout_s.
LONG_WAIT_S = 6 * 3600
_LONG: dict = {"world": None, "group": None}


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str  # the backend of the training tensors: "nccl" or "gloo"
    local_world_size: int = 1  # processes on this node (torchrun's LOCAL_WORLD_SIZE)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config_error(msg: str) -> Exception:
    from sparse_kd.config import ConfigError

    return ConfigError(msg)


def resolve_backend(backend: str, cuda: bool) -> str:
    """``auto`` -> nccl with CUDA, else gloo; nccl without CUDA is an error."""
    if backend == "auto":
        return "nccl" if cuda else "gloo"
    if backend == "nccl" and not cuda:
        raise _config_error("train.backend: 'nccl' needs CUDA GPUs; none is visible. Use train.backend=gloo (or auto) on CPU.")
    return backend


def group_backend(backend: str) -> str:
    """The backend string of the default process group for training tensors on ``backend``.

    nccl -> ``cpu:gloo,cuda:nccl``, so that collectives on CPU tensors (gathered metrics,
    broadcast objects, barriers) have a backend too; gloo serves both devices as it is.
    """
    return "cpu:gloo,cuda:nccl" if backend == "nccl" else backend


def resolve_nproc(nproc: Union[int, str], backend: str, gpus: int) -> int:
    """Local processes for ``nproc`` (an int or ``auto``) on a machine with ``gpus`` visible GPUs.

    With CUDA training (``backend`` resolves to nccl) every process needs its own GPU: ``auto`` is
    the GPU count, and an integer above it is an error. Otherwise ``auto`` is 2 CPU processes.
    """
    cuda_training = resolve_backend(backend, gpus > 0) == "nccl"
    if nproc == "auto":
        return gpus if cuda_training else AUTO_CPU_NPROC
    if cuda_training and nproc > gpus:
        raise _config_error(
            f"nproc: {nproc} processes, but this machine has {gpus} visible GPU(s) and each CUDA rank needs its own "
            f"(rank {gpus} would ask for cuda:{gpus}). Set nproc={gpus} or nproc=auto, or train.backend=gloo to "
            "train on CPU."
        )
    return nproc


def _visible_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_processes(cfg) -> int:
    """How many local processes a command that trains ``cfg`` starts (``nproc`` resolved and checked)."""
    n = resolve_nproc(cfg.nproc, cfg.train.backend, _visible_gpus())
    check_batch(cfg.train.batch_size, n, "nproc" if cfg.nproc != "auto" else f"nproc (auto: {n})")
    return n


def check_batch(batch_size: int, world_size: int, what: str) -> None:
    if batch_size < world_size or batch_size % world_size:
        raise _config_error(
            f"train.batch_size: {batch_size} must be a positive multiple of {what} = {world_size}: "
            "it is the global batch split across ranks"
        )


def check_world_size(cfg, world_size: int) -> None:
    """Under torchrun, WORLD_SIZE splits the batch: refuse an integer ``nproc`` that disagrees."""
    if cfg.nproc != "auto" and cfg.nproc != world_size:
        raise _config_error(
            f"nproc: the config says {cfg.nproc} processes but torchrun started WORLD_SIZE={world_size} "
            f"(nodes x processes per node). Pass nproc={world_size} (or nproc=auto) so the config matches the launch."
        )
    check_batch(cfg.train.batch_size, world_size, "WORLD_SIZE")


def check_local_gpus(local_world_size: int, local_rank: int, gpus: int) -> None:
    """Each CUDA rank on a node needs its own GPU: cuda:LOCAL_RANK must exist."""
    if local_world_size > gpus or local_rank >= gpus:
        raise _config_error(
            f"nproc: {local_world_size} processes on this node (LOCAL_WORLD_SIZE) but only {gpus} visible GPU(s): "
            f"local rank {local_rank} would use cuda:{local_rank}. Start at most {gpus} processes per node "
            "(--nproc_per_node, or nproc=auto), or use train.backend=gloo to train on CPU."
        )


def init_distributed(backend: str = "auto", timeout_s: int = 300, long_wait_s: int = LONG_WAIT_S) -> DistEnv:
    """Join (or create) the default process group.

    Under torchrun the environment (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, ...) is used;
    otherwise a 1-process group on a free local port. backend ``auto`` is nccl with CUDA, else
    gloo; nccl runs rank r of a node on ``cuda:LOCAL_RANK``. Collectives that wait longer than
    ``timeout_s`` fail instead of hanging; waits on long one-sided work go through
    :func:`long_group` (``long_wait_s``).
    """
    if "RANK" not in os.environ:
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    backend = resolve_backend(backend, torch.cuda.is_available())
    if backend == "nccl":
        check_local_gpus(local_world, local_rank, torch.cuda.device_count())
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
        dist.init_process_group(backend=group_backend(backend), store=store, rank=rank, world_size=world, timeout=timeout)
    long_group(long_wait_s)  # every rank, right after the default group: creating a group is a collective
    return DistEnv(rank, world, local_rank, device, backend, local_world)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def long_group(timeout_s: int = LONG_WAIT_S):
    """The gloo group (all ranks) for waits longer than ``train.collective_timeout_s`` may allow:
    one rank (or each rank, unevenly) works while the others wait (rank 0 writing the run's data
    files, teacher encoding, checkpoint hashing). None with one process.

    Made once per default group (:func:`init_distributed` makes it right away); making it is a
    collective, so a first call from elsewhere must come from every rank at the same point.
    Its timeout is ``timeout_s`` (:data:`LONG_WAIT_S`): a peer that dies closes its connections and
    fails the wait at once; one that hangs is given up on after ``timeout_s``.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    world = dist.group.WORLD
    if _LONG["world"] is not world:
        _LONG["group"] = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        _LONG["world"] = world
    return _LONG["group"]


def long_barrier() -> None:
    """:func:`barrier` on :func:`long_group`: for waits on rank 0's (or one rank's) long work."""
    g = long_group()
    if g is not None:
        dist.barrier(group=g)


def long_broadcast_object(obj, src: int = 0):
    """:func:`broadcast_object` on :func:`long_group` (``obj`` from rank ``src`` once it is ready)."""
    g = long_group()
    if g is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=g)
    return box[0]


def long_all_reduce(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks in place (on :func:`long_group`; one process: as it is)."""
    g = long_group()
    if g is not None:
        dist.all_reduce(t, group=g)
    return t


def long_all_gather_object(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (on :func:`long_group`)."""
    g = long_group()
    if g is None:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=g)
    return out


def raise_if_any(error: Union[str, None], exc_type: type = RuntimeError) -> None:
    """Collective: raise ``exc_type`` on every rank if any rank passes an error message (the
    lowest rank's message, naming it), so no rank is left waiting for a peer that failed."""
    errors = long_all_gather_object(error)
    failed = [(r, e) for r, e in enumerate(errors) if e]
    if failed:
        r, e = failed[0]
        others = f" (ranks {', '.join(str(x) for x, _ in failed)} failed)" if len(failed) > 1 else ""
        err = exc_type(e if len(errors) == 1 else f"rank {r}: {e}{others}")
        err.on_every_rank = True  # the CLI lets the ranks leave together
        raise err


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on rank 0 only, its (small, picklable) result sent to every rank on
    :func:`long_group` (the others wait as long as it takes). If ``fn`` raises, rank 0 raises it
    and every other rank raises the same type with the same message (RuntimeError where that
    type cannot be sent), marked ``on_every_rank`` so the ranks stop together."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fn()
    import pickle

    box, failure = None, None
    if dist.get_rank() == 0:
        try:
            box = ("ok", fn())
        except Exception as e:
            failure = e
            try:
                box = ("error", pickle.loads(pickle.dumps(type(e))), str(e))
            except Exception:
                box = ("error", RuntimeError, f"{type(e).__name__}: {e}")
    box = long_broadcast_object(box)
    if failure is not None:
        failure.on_every_rank = True
        raise failure
    if box[0] == "error":
        try:
            err = box[1](box[2])
        except Exception:
            err = RuntimeError(box[2])
        err.on_every_rank = True
        raise err
    return box[1]


def split_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share [lo, hi) of ``n`` items split over ``world_size`` ranks."""
    return n * rank // world_size, n * (rank + 1) // world_size


def all_gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """(n, ...) CPU tensor on every rank from each rank's rows :func:`split_range` (``local``).

    One broadcast per rank into views of the result: no padding, no second copy. Runs on
    :func:`long_group`, so ranks that finish their share early wait as long as the slowest needs.
    """
    g = long_group()
    if g is None:
        return local
    world, rank = dist.get_world_size(), dist.get_rank()
    out = torch.empty((n, *local.shape[1:]), dtype=local.dtype)
    for r in range(world):
        lo, hi = split_range(n, r, world)
        if r == rank:
            out[lo:hi].copy_(local)
        if hi > lo:
            dist.broadcast(out[lo:hi], src=r, group=g)
    return out


def gather_device(tensor_device: str, backend_config: str) -> str:
    """The device type to run a collective on for a tensor on ``tensor_device``, given the group's
    backend config (``dist.get_backend_config()``, e.g. ``cpu:gloo,cuda:nccl`` or ``cuda:nccl``):
    the tensor's own device when the group serves it, else the device the group does serve."""
    served = [pair.split(":")[0] for pair in backend_config.split(",") if ":" in pair]
    if not served or tensor_device in served:
        return tensor_device
    return "cuda" if "cuda" in served else served[0]


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank along dim 0, in rank order.

    Returns a tensor on ``t``'s device; the gather itself runs on a device the group serves
    (a CPU tensor in an NCCL-only group is gathered on this rank's GPU).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    where = gather_device(t.device.type, dist.get_backend_config())
    src = t.contiguous()
    if where != t.device.type:
        src = src.to(torch.device("cuda", torch.cuda.current_device()) if where == "cuda" else torch.device(where))
    out = [torch.empty_like(src) for _ in range(dist.get_world_size())]
    dist.all_gather(out, src)
    return torch.cat(out).to(t.device)


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (torch picks gloo for objects in a cpu:gloo,cuda:nccl group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
