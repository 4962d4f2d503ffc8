"""Sharding plans: one sharding type per table, chosen in config.

- CPU: plans are built by hand with torchrec's ``construct_module_sharding_plan``, since torchrec's
  planner refuses row_wise / table_row_wise on CPU although they train correctly (see
  ../shared/STACK.md). Every non-data-parallel table gets the FUSED compute kernel: otherwise
  torchrec picks DENSE and silently ignores the in-backward optimizer.
- CUDA: torchrec's ``EmbeddingShardingPlanner`` over a real :class:`Topology` (GPU memory and
  host memory per rank, nodes of ``local_world_size`` GPUs), constrained to the configured
  sharding type of each table. A table too large for GPU memory gets a UVM-caching kernel
  (rows in host memory, a cache on the GPU) instead of an out-of-memory at start-up.

Ranks are grouped into hosts of ``local_world_size`` consecutive ranks; rank r of a CUDA job runs
on ``cuda:(r mod local_world_size)``. table_row_wise tables are spread over hosts.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch
import torch.distributed as dist
from torchrec.distributed.comm import get_local_size
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    get_default_sharders,
    row_wise,
    table_row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from sparse_kd.checkpoint import frozen
from sparse_kd.config import ConfigError, PlannerConfig, StudentConfig
from sparse_kd.student.model import feature_of

log = logging.getLogger(__name__)

GB = 1 << 30
# kernels the CUDA planner may choose for a sharded table, fastest first: rows in GPU memory,
# rows in host memory with a GPU cache, rows in host memory
CUDA_KERNELS = (
    EmbeddingComputeKernel.FUSED.value,
    EmbeddingComputeKernel.FUSED_UVM_CACHING.value,
    EmbeddingComputeKernel.FUSED_UVM.value,
)
# share of each GPU's memory the planner leaves to dense layers, activations and input batches
HBM_RESERVED = 0.15


def sharding_types(ebc: EmbeddingBagCollection, cfg: StudentConfig) -> dict[str, str]:
    """table name -> sharding type (config ``student.sharding`` by feature, else the default)."""
    names = [t.name for t in ebc.embedding_bag_configs()]
    feats = {feature_of(n) for n in names}
    for f in cfg.sharding:
        if f not in feats:
            raise ConfigError(f"student.sharding.{f}: no such sparse feature; features are {sorted(feats)}")
    return {n: cfg.sharding.get(feature_of(n), cfg.default_sharding) for n in names}


def _column_split(table, world_size: int) -> int:
    """Columns per column_wise shard: the table's dim split evenly over all ranks, in multiples of 4."""
    if table.embedding_dim % world_size or (table.embedding_dim // world_size) % 4:
        raise ConfigError(
            f"student.sharding.{feature_of(table.name)}: column_wise needs embedding_dim ({table.embedding_dim}) "
            f"split into {world_size} parts that are multiples of 4"
        )
    return table.embedding_dim // world_size


def _local_size(world_size: int, local_world_size: Optional[int]) -> int:
    local = local_world_size or get_local_size(world_size)  # torchrec's: LOCAL_WORLD_SIZE, else the world
    if local < 1 or world_size % local:
        raise ConfigError(
            f"nproc: {world_size} ranks cannot form hosts of {local} processes (LOCAL_WORLD_SIZE); "
            "start the same number of processes on every node"
        )
    return local


def build_plan(
    model: torch.nn.Module,
    cfg: StudentConfig,
    world_size: int,
    device_type: str = "cpu",
    local_world_size: Optional[int] = None,
    batch_size: Optional[int] = None,
    pg: Optional[dist.ProcessGroup] = None,
) -> ShardingPlan:
    """A plan for the (single) EmbeddingBagCollection inside ``model`` (tables on ``meta``).

    ``local_world_size`` (processes per node) defaults to torchrec's reading of LOCAL_WORLD_SIZE.
    On ``cuda`` torchrec's planner chooses shards and kernels (``batch_size``: examples per rank,
    for its cost model; ``pg``: the group it plans on, default the world); elsewhere the plan is
    built by hand: see :func:`hand_built_plan`.
    """
    local = _local_size(world_size, local_world_size)
    if device_type == "cuda":
        return planned_plan(model, cfg, world_size, local, batch_size=batch_size, pg=pg)
    return hand_built_plan(model, cfg, world_size, local, device_type)


def hand_built_plan(
    model: torch.nn.Module, cfg: StudentConfig, world_size: int, local_world_size: int, device_type: str = "cpu"
) -> ShardingPlan:
    """A plan built with torchrec's per-table helpers.

    table_wise tables are placed greedily on the rank with the fewest rows so far; column_wise
    splits each table's columns over all ranks (dim must divide by world size); row_wise splits
    rows over all ranks; table_row_wise splits rows over the ranks of one host, each table on the
    host with the fewest rows so far. The frozen alignment-target tables
    (:mod:`sparse_kd.distill.targets`) are row_wise over all ranks.
    """
    plans = {}
    for path, ebc in _collections(model):
        if frozen(path):
            per_param = {t.name: row_wise() for t in ebc.embedding_bag_configs()}
        else:
            per_param = _id_table_shardings(ebc, cfg, world_size, local_world_size)
        module_plan = construct_module_sharding_plan(
            ebc, per_param, local_size=local_world_size, world_size=world_size, device_type=device_type
        )
        for name, ps in module_plan.items():
            if ps.sharding_type != "data_parallel":
                ps.compute_kernel = EmbeddingComputeKernel.FUSED.value
        plans[path] = module_plan
    return ShardingPlan(plans)


def _collections(model: torch.nn.Module) -> list[tuple[str, EmbeddingBagCollection]]:
    """(path, module) of every EmbeddingBagCollection in ``model``: the ID tables, and the frozen
    alignment targets where the ranker holds them sharded."""
    return [(p, m) for p, m in model.named_modules() if isinstance(m, EmbeddingBagCollection)]


def _id_table_shardings(ebc: EmbeddingBagCollection, cfg: StudentConfig, world_size: int, local_world_size: int) -> dict:
    """table -> torchrec's per-table sharding helper, for the ID tables (see :func:`hand_built_plan`)."""
    types = sharding_types(ebc, cfg)
    load = [0] * world_size
    host_load = [0] * (world_size // local_world_size)
    per_param = {}
    for t in sorted(ebc.embedding_bag_configs(), key=lambda t: -t.num_embeddings * t.embedding_dim):
        st = types[t.name]
        size = t.num_embeddings * t.embedding_dim
        if st == "table_wise":
            rank = min(range(world_size), key=lambda r: load[r])
            load[rank] += size
            per_param[t.name] = table_wise(rank=rank)
        elif st == "row_wise":
            per_param[t.name] = row_wise()
        elif st == "column_wise":
            _column_split(t, world_size)
            per_param[t.name] = column_wise(ranks=list(range(world_size)))
        elif st == "table_row_wise":
            host = min(range(len(host_load)), key=lambda h: host_load[h])
            host_load[host] += size
            per_param[t.name] = table_row_wise(host_index=host)
        elif st == "data_parallel":
            per_param[t.name] = data_parallel()
        else:  # validated in config; keep the error readable anyway
            raise ConfigError(f"student.sharding: unknown sharding type {st!r}")
    return per_param


def memory_caps(
    planner: PlannerConfig, local_world_size: int, device_bytes: Optional[int] = None, host_bytes: Optional[int] = None
) -> tuple[int, int]:
    """(GPU memory, host memory) in bytes the planner may use per rank.

    Config values win when > 0; otherwise the GPU's total memory (``device_bytes``, read from the
    current CUDA device when not given) and the host's RAM (``host_bytes``, read from the OS when
    not given) shared by the ``local_world_size`` processes of the node.
    """
    if planner.hbm_cap_gb > 0:
        hbm = int(planner.hbm_cap_gb * GB)
    else:
        if device_bytes is None:
            device_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        hbm = int(device_bytes)
    if planner.ddr_cap_gb > 0:
        ddr = int(planner.ddr_cap_gb * GB)
    else:
        if host_bytes is None:
            host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        ddr = int(host_bytes) // local_world_size
    return hbm, ddr


def planned_plan(
    model: torch.nn.Module,
    cfg: StudentConfig,
    world_size: int,
    local_world_size: int,
    batch_size: Optional[int] = None,
    pg: Optional[dist.ProcessGroup] = None,
    device_bytes: Optional[int] = None,
    host_bytes: Optional[int] = None,
) -> ShardingPlan:
    """torchrec's planner on a CUDA topology, each table constrained to its configured sharding type.

    Sharded tables may get the fused, fused-UVM-caching or fused-UVM kernel (the planner picks
    what fits in memory at the lowest cost); data_parallel tables the dense kernel. column_wise
    tables are split over all ranks as on CPU. In a process group of more than one rank, rank 0
    plans and broadcasts (every rank gets the same plan); otherwise the plan is made locally.
    """
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
    from torchrec.distributed.planner.types import PlannerError

    constraints = {}
    for path, ebc in _collections(model):
        if frozen(path):  # alignment targets: row_wise over all ranks
            for t in ebc.embedding_bag_configs():
                constraints[t.name] = ParameterConstraints(sharding_types=["row_wise"], compute_kernels=list(CUDA_KERNELS))
        else:
            constraints.update(_id_table_constraints(ebc, cfg, world_size))
    hbm, ddr = memory_caps(cfg.planner, local_world_size, device_bytes, host_bytes)
    topology = Topology(
        world_size=world_size, compute_device="cuda", hbm_cap=hbm, ddr_cap=ddr, local_world_size=local_world_size
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        batch_size=batch_size,
        constraints=constraints,
        storage_reservation=FixedPercentageStorageReservation(HBM_RESERVED),
        debug=False,
    )
    sharders = get_default_sharders()
    try:
        if pg is not None or (dist.is_initialized() and dist.get_world_size() > 1):
            return planner.collective_plan(model, sharders, pg)
        return planner.plan(model, sharders)
    except PlannerError as e:
        first = str(e).strip().splitlines()[0][:300]
        raise ConfigError(
            f"student.planner: the embedding tables do not fit {world_size} rank(s) with {hbm / GB:.2f} GB of GPU "
            f"memory and {ddr / GB:.2f} GB of host memory each ({first}). Use more GPUs, shard the large tables "
            "row_wise (student.sharding.FEATURE=row_wise), or raise student.planner.hbm_cap_gb / ddr_cap_gb if the "
            "machine has more."
        ) from None


def _id_table_constraints(ebc: EmbeddingBagCollection, cfg: StudentConfig, world_size: int) -> dict:
    """table -> the planner's constraints for the ID tables (see :func:`planned_plan`)."""
    from torchrec.distributed.planner import ParameterConstraints

    types = sharding_types(ebc, cfg)
    constraints = {}
    for t in ebc.embedding_bag_configs():
        st = types[t.name]
        if st == "data_parallel":
            constraints[t.name] = ParameterConstraints(
                sharding_types=[st], compute_kernels=[EmbeddingComputeKernel.DENSE.value]
            )
        else:
            constraints[t.name] = ParameterConstraints(
                sharding_types=[st],
                compute_kernels=list(CUDA_KERNELS),
                min_partition=_column_split(t, world_size) if st == "column_wise" else None,
            )
    return constraints


def describe_plan(plan: ShardingPlan) -> list[dict]:
    """Rows for a log table: table, sharding type, kernel, ranks."""
    rows = []
    for path, mp in plan.plan.items():
        for name, ps in mp.items():
            rows.append({"table": name, "sharding": ps.sharding_type, "kernel": ps.compute_kernel, "ranks": ps.ranks})
    return rows
