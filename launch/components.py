"""torchx components for sparse_kd: the same training code on any scheduler.

Run 2 CPU processes here::

    torchx run -s local_cwd launch/components.py:train --config configs/demo.yaml
    torchx run -s local_cwd launch/components.py:train_teacher --config configs/ml100k.yaml --nproc_per_node 2

On a cluster only the scheduler changes (``-s kubernetes`` / ``-s slurm``) and, for GPUs,
``--gpu 8 --nproc_per_node 8`` (nccl is picked automatically when CUDA is present).
Each component wraps ``torchx.components.dist.ddp`` (torchrun) around ``python -m sparse_kd.cli``.
"""


import torchx
from torchx import specs
from torchx.components.dist import ddp

from typing import List, Tuple

_VARIANTS = ("teacher_ranker", "baseline", "distilled")


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
) -> specs.AppDef:
    if nnodes < 1 or nproc_per_node < 1:
        raise ValueError(f"nnodes ({nnodes}) and nproc_per_node ({nproc_per_node}) must be >= 1")
    if 0 < gpu < nproc_per_node:
        raise ValueError(
            f"gpu ({gpu}) < nproc_per_node ({nproc_per_node}): each process of a CUDA job needs its own GPU; "
            f"ask for --gpu {nproc_per_node} or start --nproc_per_node {gpu}"
        )
    if not config.endswith((".yaml", ".yml")):
        raise ValueError(f"config {config!r}: expected a YAML file such as configs/demo.yaml")
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r}: expected key=value, e.g. train.epochs=2")
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
        env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )


def train(
    *overrides: str,
    config: str = "configs/demo.yaml",
    nnodes: int = 1,
    nproc_per_node: int = 2,
    image: str = torchx.IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    max_retries: int = 0,
) -> specs.AppDef:
    """Train the teacher ranker, the baseline and the distilled student (sharded DLRMs).

    Args:
        overrides: key=value config overrides, e.g. train.epochs=2
        config: experiment YAML (relative to the working directory)
        nnodes: number of hosts
        nproc_per_node: processes (ranks) per host; one per GPU on GPU hosts
        image: container image (local_cwd: the working directory)
        cpu: CPUs per replica
        gpu: GPUs per replica
        memMB: memory per replica in MB
        max_retries: restarts of the whole job; each restart resumes from the last checkpoint
    """
    return _ranker_app(_VARIANTS, config, list(overrides), nnodes, nproc_per_node, image, cpu, gpu, memMB, max_retries, "sparse-kd-train")


def train_teacher(
    *overrides: str,
    config: str = "configs/demo.yaml",
    nnodes: int = 1,
    nproc_per_node: int = 2,
    image: str = torchx.IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    max_retries: int = 0,
) -> specs.AppDef:
    """Train only the teacher ranker (DLRM + BERT text features), sharded like the student.

    Args:
        overrides: key=value config overrides, e.g. train.epochs=2
        config: experiment YAML (relative to the working directory)
        nnodes: number of hosts
        nproc_per_node: processes (ranks) per host
        image: container image (local_cwd: the working directory)
        cpu: CPUs per replica
        gpu: GPUs per replica
        memMB: memory per replica in MB
        max_retries: restarts of the whole job; each restart resumes from the last checkpoint
    """
    return _ranker_app(("teacher_ranker",), config, list(overrides), nnodes, nproc_per_node, image, cpu, gpu, memMB, max_retries, "sparse-kd-teacher")


def train_student(
    *overrides: str,
    config: str = "configs/demo.yaml",
    nnodes: int = 1,
    nproc_per_node: int = 2,
    image: str = torchx.IMAGE,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    max_retries: int = 0,
) -> specs.AppDef:
    """Train the baseline and the distilled student (reads the teacher ranker if distillation needs it).

    Args:
        overrides: key=value config overrides, e.g. train.epochs=2
        config: experiment YAML (relative to the working directory)
        nnodes: number of hosts
        nproc_per_node: processes (ranks) per host
        image: container image (local_cwd: the working directory)
        cpu: CPUs per replica
        gpu: GPUs per replica
        memMB: memory per replica in MB
        max_retries: restarts of the whole job; each restart resumes from the last checkpoint
    """
    return _ranker_app(("baseline", "distilled"), config, list(overrides), nnodes, nproc_per_node, image, cpu, gpu, memMB, max_retries, "sparse-kd-student")
