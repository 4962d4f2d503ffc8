"""Sharding plans for multi-node and CUDA topologies, checked without GPUs: which rank and which
device each shard lands on, where table_row_wise tables go, and which kernel torchrec's planner
gives a table larger than GPU memory."""

import pytest

from sparse_kd.config import ConfigError, PlannerConfig, StudentConfig
from sparse_kd.student.model import build_dlrm
from sparse_kd.student.sharding import GB, build_plan, hand_built_plan, memory_caps, planned_plan

# 2 nodes x 8 GPUs
WORLD, LOCAL = 16, 8


def _model(num_embeddings: dict, dim: int = 64):
    cfg = StudentConfig(embedding_dim=dim, dense_arch=(dim,), over_arch=(8, 1))
    return build_dlrm(num_embeddings, 3, cfg, device="meta")


def _student(dim: int = 64, **kw) -> StudentConfig:
    return StudentConfig(embedding_dim=dim, dense_arch=(dim,), over_arch=(8, 1), **kw)


def _shards(plan, table):
    ps = next(iter(plan.plan.values()))[table]
    return ps, [(s.placement.rank(), str(s.placement.device())) for s in ps.sharding_spec.shards]


def test_hand_built_plan_puts_each_rank_on_its_local_gpu():
    model = _model({"user_id": 1600, "item_id": 800, "genre": 400, "city": 160})
    cfg = _student(
        default_sharding="table_wise",
        sharding={"user_id": "row_wise", "item_id": "table_row_wise", "genre": "table_row_wise"},
    )
    plan = hand_built_plan(model, cfg, WORLD, LOCAL, "cuda")
    ps, shards = _shards(plan, "t_user_id")
    assert ps.sharding_type == "row_wise" and len(shards) == WORLD
    for rank, device in shards:
        assert device == f"cuda:{rank % LOCAL}", (rank, device)  # rank 9 -> cuda:1, not cuda:9
    # the two table_row_wise tables go to different hosts, each split over that host's 8 ranks
    hosts = {}
    for table in ("t_item_id", "t_genre"):
        ps, shards = _shards(plan, table)
        ranks = sorted(r for r, _ in shards)
        assert ps.sharding_type == "table_row_wise" and len(ranks) == LOCAL
        assert ranks[-1] - ranks[0] == LOCAL - 1 and ranks[0] % LOCAL == 0, ranks
        assert all(d == f"cuda:{r % LOCAL}" for r, d in shards)
        hosts[table] = ranks[0] // LOCAL
    assert sorted(hosts.values()) == [0, 1], hosts
    ps, shards = _shards(plan, "t_city")
    assert ps.sharding_type == "table_wise" and shards[0][1] == f"cuda:{shards[0][0] % LOCAL}"


def test_local_size_defaults_to_local_world_size_env(monkeypatch):
    model = _model({"user_id": 1600, "item_id": 800})
    cfg = _student(default_sharding="row_wise")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(LOCAL))
    plan = build_plan(model, cfg, WORLD, "meta")  # not cuda: the hand-built path, device-neutral
    explicit = build_plan(model, cfg, WORLD, "meta", local_world_size=LOCAL)
    assert plan.plan == explicit.plan
    with pytest.raises(ConfigError, match="16 ranks cannot form hosts of 5 processes"):
        build_plan(model, cfg, WORLD, "cpu", local_world_size=5)


def test_table_row_wise_on_one_node_uses_all_its_ranks():
    model = _model({"user_id": 100, "item_id": 60})
    plan = hand_built_plan(model, _student(default_sharding="table_row_wise"), 2, 2, "cpu")
    for table in ("t_user_id", "t_item_id"):
        _, shards = _shards(plan, table)
        assert sorted(r for r, _ in shards) == [0, 1]


def test_memory_caps_from_config_or_machine():
    assert memory_caps(PlannerConfig(), 4, device_bytes=80 * GB, host_bytes=512 * GB) == (80 * GB, 128 * GB)
    assert memory_caps(PlannerConfig(hbm_cap_gb=2, ddr_cap_gb=10), 4, device_bytes=80 * GB, host_bytes=512 * GB) == (2 * GB, 10 * GB)
    hbm, ddr = memory_caps(PlannerConfig(hbm_cap_gb=1), 2)  # host RAM read from this machine
    assert hbm == GB and ddr > 0


# a 2M x 64 fp32 table is 0.5 GB: it fits 16 GB of GPU memory but not 0.25 GB
BIG = {"user_id": 2_000_000, "item_id": 1000}


def test_planner_keeps_tables_that_fit_in_gpu_memory():
    plan = planned_plan(_model(BIG), _student(default_sharding="table_wise"), 2, 2, batch_size=256,
                        device_bytes=16 * GB, host_bytes=64 * GB)
    for table in ("t_user_id", "t_item_id"):
        ps, shards = _shards(plan, table)
        assert ps.sharding_type == "table_wise" and ps.compute_kernel == "fused", (table, ps.compute_kernel)
        assert all(d == f"cuda:{r}" for r, d in shards)


def test_planner_moves_a_table_larger_than_gpu_memory_to_uvm_caching():
    cfg = _student(default_sharding="table_wise", planner=PlannerConfig(hbm_cap_gb=0.25))
    plan = planned_plan(_model(BIG), cfg, 2, 2, batch_size=256, host_bytes=64 * GB)
    ps, _ = _shards(plan, "t_user_id")
    assert ps.compute_kernel == "fused_uvm_caching", ps.compute_kernel
    ps, _ = _shards(plan, "t_item_id")
    assert ps.compute_kernel == "fused", ps.compute_kernel
    # split row_wise over 16 GPUs, each shard (32 MB) fits the same cap: back on the GPU
    cfg = _student(default_sharding="table_wise", sharding={"user_id": "row_wise"}, planner=PlannerConfig(hbm_cap_gb=0.25))
    plan = planned_plan(_model(BIG), cfg, WORLD, LOCAL, batch_size=256, host_bytes=64 * GB)
    ps, _ = _shards(plan, "t_user_id")
    assert ps.sharding_type == "row_wise" and ps.compute_kernel == "fused", ps.compute_kernel


def test_planner_places_multi_node_ranks_on_local_devices_and_splits_columns_over_all_ranks():
    cfg = _student(dim=64, default_sharding="row_wise", sharding={"item_id": "column_wise"})
    plan = planned_plan(_model({"user_id": 3200, "item_id": 320}), cfg, WORLD, LOCAL, device_bytes=16 * GB, host_bytes=64 * GB)
    _, shards = _shards(plan, "t_user_id")
    assert sorted(r for r, _ in shards) == list(range(WORLD))
    assert all(d == f"cuda:{r % LOCAL}" for r, d in shards)
    with pytest.raises(ConfigError, match="column_wise needs embedding_dim"):
        planned_plan(_model({"user_id": 3200, "item_id": 320}, dim=32), _student(dim=32, default_sharding="column_wise"),
                     WORLD, LOCAL, device_bytes=16 * GB, host_bytes=64 * GB)


def test_tables_that_fit_nowhere_are_a_config_error():
    cfg = _student(default_sharding="table_wise", planner=PlannerConfig(hbm_cap_gb=0.01, ddr_cap_gb=0.01))
    with pytest.raises(ConfigError, match=r"student.planner: the embedding tables do not fit 2 rank\(s\)"):
        planned_plan(_model(BIG), cfg, 2, 2, batch_size=256)
