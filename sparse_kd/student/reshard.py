"""Resuming a checkpoint with another number of processes: allowed where
``torch.distributed.checkpoint`` can reshard the saved state, refused up front where it cannot.

DCP reshards any tensor whose global shape does not depend on the number of ranks: weights of
every sharding type, element-wise Adagrad state (shaped like the weights) and the per-row
state of row-sharded tables. The one exception here is row-wise Adagrad on a column_wise table:
torchrec keeps one accumulator per row *per column shard*, a tensor of rows x column shards,
and column_wise tables are split over all ranks, so its global size changes with the world size
and DCP fails deep inside the load ("Size mismatch between saved ... and current ...").

Checkpoints record the world size and the sharding type of each table in ``meta.json``
(:mod:`sparse_kd.checkpoint`); checkpoints without them are let through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Union

from torchrec.distributed.types import ShardingPlan

from sparse_kd.checkpoint import CheckpointError, plan_sharding, read_meta

# sparse optimizers (train.sparse_optimizer) whose state has one value per row, not per weight
PER_ROW_STATE = ("rowwise_adagrad",)


def unreshardable(sharding: Mapping[str, str], sparse_optimizer: str) -> list[str]:
    """Tables whose saved state cannot be loaded by another world size, sorted."""
    if sparse_optimizer not in PER_ROW_STATE:
        return []
    return sorted(t for t, st in sharding.items() if st == "column_wise")


def resume_problem(saved_world: Optional[int], world_size: int, sharding: Mapping[str, str], sparse_optimizer: str) -> Optional[str]:
    """Why a checkpoint saved by ``saved_world`` ranks cannot be resumed by ``world_size`` ranks
    with this sharding and optimizer, or None if it can (same world size, unknown, or reshardable)."""
    if saved_world is None or saved_world == world_size:
        return None
    stuck = unreshardable(sharding, sparse_optimizer)
    if not stuck:
        return None
    return (
        f"saved by {saved_world} process(es), resumed by {world_size}: the {sparse_optimizer} state of the "
        f"column_wise table(s) {', '.join(stuck)} holds one accumulator per row per column shard, and the number "
        f"of column shards is the number of processes, so it cannot be resharded. Resume with nproc={saved_world}, "
        "or train into a new output_dir"
    )


def check_resume(checkpoint: Union[str, Path], plan: ShardingPlan, sparse_optimizer: str, world_size: int) -> None:
    """Raise :class:`CheckpointError` before loading ``checkpoint`` if ``world_size`` ranks with
    ``plan`` cannot load what it holds (see :func:`resume_problem`)."""
    meta = read_meta(Path(checkpoint))
    problem = resume_problem(meta.get("world_size"), world_size, plan_sharding(plan), sparse_optimizer)
    if problem:
        raise CheckpointError(f"{checkpoint}: {problem}.")
