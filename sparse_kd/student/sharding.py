"""Sharding plans: one sharding type per table, chosen in config, built by hand with torchrec helpers.

On CPU, torchrec's planner refuses row_wise / table_row_wise, yet they train correctly with a
hand-built plan (see ../shared/STACK.md), so every plan is built with
``construct_module_sharding_plan``. Every non-data-parallel table gets the FUSED compute kernel:
otherwise torchrec picks DENSE and silently ignores the in-backward optimizer.
"""

from __future__ import annotations

import torch
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from sparse_kd.config import ConfigError, StudentConfig
from sparse_kd.student.model import feature_of


def sharding_types(ebc: EmbeddingBagCollection, cfg: StudentConfig) -> dict[str, str]:
    """table name -> sharding type (config ``student.sharding`` by feature, else the default)."""
    names = [t.name for t in ebc.embedding_bag_configs()]
    feats = {feature_of(n) for n in names}
    for f in cfg.sharding:
        if f not in feats:
            raise ConfigError(f"student.sharding.{f}: no such sparse feature; features are {sorted(feats)}")
    return {n: cfg.sharding.get(feature_of(n), cfg.default_sharding) for n in names}


def build_plan(
    model: torch.nn.Module, cfg: StudentConfig, world_size: int, device_type: str = "cpu"
) -> ShardingPlan:
    """A plan for the (single) EmbeddingBagCollection inside ``model``.

    table_wise tables are placed greedily on the rank with the fewest rows so far; column_wise
    splits each table's columns over all ranks (dim must divide by world size).
    """
    path, ebc = next((p, m) for p, m in model.named_modules() if isinstance(m, EmbeddingBagCollection))
    types = sharding_types(ebc, cfg)
    load = [0] * world_size
    per_param = {}
    for t in sorted(ebc.embedding_bag_configs(), key=lambda t: -t.num_embeddings * t.embedding_dim):
        st = types[t.name]
        if st == "table_wise":
            rank = min(range(world_size), key=lambda r: load[r])
            load[rank] += t.num_embeddings * t.embedding_dim
            per_param[t.name] = table_wise(rank=rank)
        elif st == "row_wise":
            per_param[t.name] = row_wise()
        elif st == "column_wise":
            if t.embedding_dim % world_size or (t.embedding_dim // world_size) % 4:
                raise ConfigError(
                    f"student.sharding.{feature_of(t.name)}: column_wise needs embedding_dim ({t.embedding_dim}) "
                    f"split into {world_size} parts that are multiples of 4"
                )
            per_param[t.name] = column_wise(ranks=list(range(world_size)))
        elif st == "table_row_wise":
            per_param[t.name] = table_row_wise(host_index=0)
        elif st == "data_parallel":
            per_param[t.name] = data_parallel()
        else:  # validated in config; keep the error readable anyway
            raise ConfigError(f"student.sharding: unknown sharding type {st!r}")
    module_plan = construct_module_sharding_plan(
        ebc, per_param, local_size=world_size, world_size=world_size, device_type=device_type
    )
    for name, ps in module_plan.items():
        if ps.sharding_type != "data_parallel":
            ps.compute_kernel = EmbeddingComputeKernel.FUSED.value
    return ShardingPlan({path: module_plan})


def describe_plan(plan: ShardingPlan) -> list[dict]:
    """Rows for a log table: table, sharding type, kernel, ranks."""
    rows = []
    for path, mp in plan.plan.items():
        for name, ps in mp.items():
            rows.append({"table": name, "sharding": ps.sharding_type, "kernel": ps.compute_kernel, "ranks": ps.ranks})
    return rows
