"""torchx components for sparse_kd: the same training code on any scheduler.

Run 2 CPU processes here (local_cwd runs in the working directory; the image is not used)::

    torchx run -s local_cwd launch/components.py:train --config configs/demo.yaml
    torchx run -s local_cwd launch/components.py:train_teacher --config configs/ml100k.yaml --nproc_per_node 2

On a cluster the image must hold the CUDA stack: build ``launch/Dockerfile`` (CUDA torch 2.13,
fbgemm-gpu 1.8.0, torchrec, the locked dependencies, this package) and push it, then e.g.::

    docker build -f launch/Dockerfile -t REGISTRY/sparse-kd:cu126 .
    torchx run -s kubernetes launch/components.py:train --image REGISTRY/sparse-kd:cu126 \\
        --nnodes 2 --nproc_per_node 8 --gpu 8 --network_interface eth0 \\
        --mounts type=volume,src=sparse-kd-runs,dst=/app/runs --config configs/demo.yaml

nccl is picked automatically when CUDA is present. Each component wraps
``torchx.components.dist.ddp`` (torchrun) around ``python -m sparse_kd.cli``. CPU and memory
per replica (one replica per node) default to a per-process figure times ``nproc_per_node``.
Nodes must share ``output_dir`` (a mount every node sees); docs/GPU.md says what has run where.
"""

import re
from typing import List, Optional, Tuple

from torchx import specs
from torchx.components.dist import ddp

_VARIANTS = ("teacher_ranker", "baseline", "distilled")
# the image launch/Dockerfile builds (``docker build -f launch/Dockerfile -t sparse-kd:cu126 .``)
DEFAULT_IMAGE = "sparse-kd:cu126"
# per training process: CPUs (torch threads, a loader worker) and host memory (data, features,
# the teacher's text embeddings, torchrec's buffers); a replica gets these times nproc_per_node
CPU_PER_PROCESS = 2
MEM_MB_PER_PROCESS = 8192
# interface names as GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME take them (one, or a comma list)
_IFNAME = re.compile(r"[A-Za-z0-9_.:@-]+(,[A-Za-z0-9_.:@-]+)*")


def replica_resources(nproc_per_node: int, cpu: int, memMB: int) -> Tuple[int, int]:
    """(CPUs, memory MB) of one replica: ``cpu`` / ``memMB`` when > 0, else the per-process figures
    times ``nproc_per_node``. Raises ValueError when a replica cannot give every process a CPU."""
    if cpu < 0 or memMB < 0:
        raise ValueError(f"cpu ({cpu}) and memMB ({memMB}) must be >= 0 (0: {CPU_PER_PROCESS} CPUs and "
                         f"{MEM_MB_PER_PROCESS} MB per process)")
    cpu = cpu or CPU_PER_PROCESS * nproc_per_node
    memMB = memMB or MEM_MB_PER_PROCESS * nproc_per_node
    if cpu < nproc_per_node:
        raise ValueError(f"cpu ({cpu}) < nproc_per_node ({nproc_per_node}): each process needs at least one CPU; "
                         f"ask for --cpu {nproc_per_node} or more (or 0: {CPU_PER_PROCESS} per process)")
    return cpu, memMB


def interface_env(network_interface: Optional[str]) -> dict:
    """GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME for ``network_interface`` (None: none set, and gloo
    takes the address the host name resolves to, which may be unreachable from other nodes)."""
    if network_interface is None:
        return {}
    if not _IFNAME.fullmatch(network_interface):
        raise ValueError(f"network_interface {network_interface!r}: expected an interface name such as eth0 "
                         "(or a comma-separated list: eth0,eth1)")
    return {"GLOO_SOCKET_IFNAME": network_interface, "NCCL_SOCKET_IFNAME": network_interface}


def check_mounts(mounts: Optional[List[str]]) -> Optional[List[str]]:
    """``mounts`` as torchx's ddp takes them (``type=bind,src=/host,dst=/job[,readonly]``, several
    one after another), checked up front so that a typo fails here, not on the scheduler."""
    if not mounts:
        return None
    try:
        specs.parse_mounts(mounts)
    except (KeyError, ValueError) as e:
        why = str(e.args[0]) if e.args else type(e).__name__
        why = f"no {why}= given" if why in ("src", "dst") else why
        raise ValueError(
            f"mounts {','.join(mounts)!r}: {why}; expected type=bind,src=HOST_PATH,dst=PATH[,readonly] "
            "or type=volume,src=NAME,dst=PATH (several one after another)"
        ) from None
    return list(mounts)


def _ranker_app(
    variants: Tuple[str, ...],
    config: str,
    overrides: List[str],
    nnodes: int,
    nproc_per_node: int,
    image: str,
    cpu: int,
    gpu: int,
    memMB: int,
    max_retries: int,
    name: str,
    mounts: Optional[List[str]] = None,
    network_interface: Optional[str] = None,
) -> specs.AppDef:
    if nnodes < 1 or nproc_per_node < 1:
        raise ValueError(f"nnodes ({nnodes}) and nproc_per_node ({nproc_per_node}) must be >= 1")
    if gpu < 0:
        raise ValueError(f"gpu ({gpu}) must be >= 0")
    if 0 < gpu < nproc_per_node:
        raise ValueError(
            f"gpu ({gpu}) < nproc_per_node ({nproc_per_node}): each process of a CUDA job needs its own GPU; "
            f"ask for --gpu {nproc_per_node} or start --nproc_per_node {gpu}"
        )
    if not image.strip():
        raise ValueError("image is empty: give the image built from launch/Dockerfile (e.g. sparse-kd:cu126)")
    if not config.endswith((".yaml", ".yml")):
        raise ValueError(f"config {config!r}: expected a YAML file such as configs/demo.yaml")
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r}: expected key=value, e.g. train.epochs=2")
    cpu, memMB = replica_resources(nproc_per_node, cpu, memMB)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **interface_env(network_interface)}
    mounts = check_mounts(mounts)
    world = nnodes * nproc_per_node  # the config's nproc must equal torchrun's WORLD_SIZE (checked by the CLI)
    args = ["train", config, *overrides, f"nproc={world}", "--variants", *variants]
    return ddp(
        *args,
        m="sparse_kd.cli",
        image=image,
        name=name,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}",
        max_retries=max_retries,
        env=env,
        mounts=mounts,
    )


def train(
    *overrides: str,
    config: str = "configs/demo.yaml",
    nnodes: int = 1,
    nproc_per_node: int = 2,
    image: str = DEFAULT_IMAGE,
    cpu: int = 0,
    gpu: int = 0,
    memMB: int = 0,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
    network_interface: Optional[str] = None,
) -> specs.AppDef:
    """Train the teacher ranker, the baseline and the distilled student (sharded DLRMs).

    Args:
        overrides: key=value config overrides, e.g. train.epochs=2
        config: experiment YAML (relative to the working directory)
        nnodes: number of hosts
        nproc_per_node: processes (ranks) per host; one per GPU on GPU hosts
        image: container image built from launch/Dockerfile (local_cwd: unused, runs the working directory)
        cpu: CPUs per replica (host); 0: 2 per process
        gpu: GPUs per replica (host)
        memMB: memory per replica (host) in MB; 0: 8192 per process
        max_retries: restarts of the whole job; each restart resumes from the last checkpoint
        mounts: mounts for every replica, e.g. type=bind,src=/data,dst=/app/runs[,readonly] or type=volume,src=NAME,dst=/app/runs
        network_interface: network interface for gloo and NCCL between hosts (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME), e.g. eth0
    """
    return _ranker_app(_VARIANTS, config, list(overrides), nnodes, nproc_per_node, image, cpu, gpu, memMB, max_retries,
                       "sparse-kd-train", mounts, network_interface)


def train_teacher(
    *overrides: str,
    config: str = "configs/demo.yaml",
    nnodes: int = 1,
    nproc_per_node: int = 2,
    image: str = DEFAULT_IMAGE,
    cpu: int = 0,
    gpu: int = 0,
    memMB: int = 0,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
    network_interface: Optional[str] = None,
) -> specs.AppDef:
    """Train only the teacher ranker (DLRM + BERT text features), sharded like the student.

    Args:
        overrides: key=value config overrides, e.g. train.epochs=2
        config: experiment YAML (relative to the working directory)
        nnodes: number of hosts
        nproc_per_node: processes (ranks) per host; one per GPU on GPU hosts
        image: container image built from launch/Dockerfile (local_cwd: unused, runs the working directory)
        cpu: CPUs per replica (host); 0: 2 per process
        gpu: GPUs per replica (host)
        memMB: memory per replica (host) in MB; 0: 8192 per process
        max_retries: restarts of the whole job; each restart resumes from the last checkpoint
        mounts: mounts for every replica, e.g. type=bind,src=/data,dst=/app/runs[,readonly] or type=volume,src=NAME,dst=/app/runs
        network_interface: network interface for gloo and NCCL between hosts (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME), e.g. eth0
    """
    return _ranker_app(("teacher_ranker",), config, list(overrides), nnodes, nproc_per_node, image, cpu, gpu, memMB,
                       max_retries, "sparse-kd-teacher", mounts, network_interface)


def train_student(
    *overrides: str,
    config: str = "configs/demo.yaml",
    nnodes: int = 1,
    nproc_per_node: int = 2,
    image: str = DEFAULT_IMAGE,
    cpu: int = 0,
    gpu: int = 0,
    memMB: int = 0,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
    network_interface: Optional[str] = None,
) -> specs.AppDef:
    """Train the baseline and the distilled student (reads the teacher ranker if distillation needs it).

    Args:
        overrides: key=value config overrides, e.g. train.epochs=2
        config: experiment YAML (relative to the working directory)
        nnodes: number of hosts
        nproc_per_node: processes (ranks) per host; one per GPU on GPU hosts
        image: container image built from launch/Dockerfile (local_cwd: unused, runs the working directory)
        cpu: CPUs per replica (host); 0: 2 per process
        gpu: GPUs per replica (host)
        memMB: memory per replica (host) in MB; 0: 8192 per process
        max_retries: restarts of the whole job; each restart resumes from the last checkpoint
        mounts: mounts for every replica, e.g. type=bind,src=/data,dst=/app/runs[,readonly] or type=volume,src=NAME,dst=/app/runs
        network_interface: network interface for gloo and NCCL between hosts (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME), e.g. eth0
    """
    return _ranker_app(("baseline", "distilled"), config, list(overrides), nnodes, nproc_per_node, image, cpu, gpu,
                       memMB, max_retries, "sparse-kd-student", mounts, network_interface)
