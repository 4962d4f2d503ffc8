"""``read_table(..., rows=(r0, r1))``: a row range of a trained table, read from the saved shards
it overlaps, equals the same rows of the whole table, for a table saved whole and one saved in
row shards by two ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed.checkpoint as dcp

from sparse_kd.student.refit import read_table

KEY = "model.sparse_arch.embedding_bag_collection.embedding_bags.t_{}.weight"
N, D = 37, 6


def table() -> torch.Tensor:
    return torch.arange(N * D, dtype=torch.float32).reshape(N, D) / 7


def save_row_shards(path: str) -> None:
    """Two ranks save the table as a DTensor split by rows (two saved chunks: rows 0-18, 19-36)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from sparse_kd.dist import init_distributed

    init_distributed("gloo", 120)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    state = {"model": {KEY.format("user_id"): distribute_tensor(table(), mesh, [Shard(0)]),
                       KEY.format("item_id"): torch.ones(4, D)}}
    dcp.save(state, checkpoint_id=path)


@pytest.mark.parametrize("sharded", [False, True])
def test_a_row_range_reads_those_rows_of_the_whole_table(tmp_path, sharded):
    from sparse_kd.local_launch import launch_local

    if sharded:
        launch_local(save_row_shards, 2, str(tmp_path))
        chunks = dcp.FileSystemReader(str(tmp_path)).read_metadata().state_dict_metadata[f"model.{KEY.format('user_id')}"].chunks
        assert len(chunks) == 2  # the ranges below cross the boundary between the saved shards
    else:
        dcp.save({"model": {KEY.format("user_id"): table()}}, checkpoint_id=str(tmp_path), no_dist=True)
    whole = read_table(tmp_path, "user_id")
    torch.testing.assert_close(whole, table(), rtol=0, atol=0)
    for r0, r1 in ((0, N), (0, 5), (3, 30), (18, 20), (19, 37), (36, 37), (30, 99), (-4, 2)):
        got = read_table(tmp_path, "user_id", (r0, r1))
        assert torch.equal(got, table()[max(r0, 0) : min(r1, N)]), (r0, r1)
    assert read_table(tmp_path, "user_id", (20, 20)).shape == (0, D)
