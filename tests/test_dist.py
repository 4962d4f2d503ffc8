"""Process counts, backends and devices: nproc (auto, against the GPU count), WORLD_SIZE against
the config, the mixed cpu:gloo,cuda:nccl group, and where a gather runs. Pure logic, no GPU needed."""

import os

import pytest

from sparse_kd import dist as sd
from sparse_kd.cli import main
from sparse_kd.config import ConfigError
from helpers.tiny import tiny_config


def test_nccl_group_also_has_a_cpu_backend():
    assert sd.group_backend("nccl") == "cpu:gloo,cuda:nccl"
    assert sd.group_backend("gloo") == "gloo"


def test_backend_resolution():
    assert sd.resolve_backend("auto", cuda=True) == "nccl"
    assert sd.resolve_backend("auto", cuda=False) == "gloo"
    assert sd.resolve_backend("gloo", cuda=True) == "gloo"
    with pytest.raises(ConfigError, match="train.backend: 'nccl' needs CUDA"):
        sd.resolve_backend("nccl", cuda=False)


@pytest.mark.parametrize(
    "nproc,backend,gpus,expected",
    [
        ("auto", "auto", 4, 4),  # one process per GPU
        ("auto", "auto", 0, sd.AUTO_CPU_NPROC),  # CPU machine
        ("auto", "gloo", 4, sd.AUTO_CPU_NPROC),  # CPU training on a GPU machine
        (1, "auto", 8, 1),
        (2, "gloo", 1, 2),  # gloo ranks do not need GPUs
        (2, "auto", 2, 2),
    ],
)
def test_resolve_nproc(nproc, backend, gpus, expected):
    assert sd.resolve_nproc(nproc, backend, gpus) == expected


def test_more_processes_than_gpus_is_refused_before_launch():
    with pytest.raises(ConfigError) as e:
        sd.resolve_nproc(2, "auto", 1)
    msg = str(e.value)
    assert msg.startswith("nproc: 2 processes") and "1 visible GPU" in msg and "cuda:1" in msg
    assert "nproc=1" in msg and "nproc=auto" in msg and "train.backend=gloo" in msg


def test_local_processes_checks_the_batch_against_the_resolved_count(monkeypatch, tmp_path):
    monkeypatch.setattr(sd, "_visible_gpus", lambda: 3)
    cfg = tiny_config(str(tmp_path), nproc="auto", train={"batch_size": 64})
    with pytest.raises(ConfigError, match=r"train.batch_size: 64 must be a positive multiple of nproc \(auto: 3\) = 3"):
        sd.local_processes(cfg)
    assert sd.local_processes(tiny_config(str(tmp_path), nproc="auto", train={"batch_size": 63})) == 3
    monkeypatch.setattr(sd, "_visible_gpus", lambda: 0)
    assert sd.local_processes(cfg) == sd.AUTO_CPU_NPROC


def test_world_size_must_match_an_integer_nproc(tmp_path):
    cfg = tiny_config(str(tmp_path), nproc=2)
    sd.check_world_size(cfg, 2)
    with pytest.raises(ConfigError, match="nproc: the config says 2 processes but torchrun started WORLD_SIZE=4"):
        sd.check_world_size(cfg, 4)
    auto = tiny_config(str(tmp_path), nproc="auto", train={"batch_size": 64})
    sd.check_world_size(auto, 4)
    with pytest.raises(ConfigError, match="multiple of WORLD_SIZE = 3"):
        sd.check_world_size(auto, 3)


def test_each_local_cuda_rank_needs_a_gpu():
    sd.check_local_gpus(local_world_size=8, local_rank=7, gpus=8)
    with pytest.raises(ConfigError, match="2 processes on this node .* only 1 visible GPU.*cuda:1"):
        sd.check_local_gpus(local_world_size=2, local_rank=1, gpus=1)


@pytest.mark.parametrize(
    "tensor,config,where",
    [
        ("cpu", "cpu:gloo,cuda:nccl", "cpu"),
        ("cuda", "cpu:gloo,cuda:nccl", "cuda"),
        ("cpu", "cuda:nccl", "cuda"),  # an NCCL-only group: gather CPU tensors on the GPU
        ("cuda", "cpu:gloo", "cpu"),
        ("cpu", "cpu:gloo,cuda:gloo", "cpu"),
    ],
)
def test_gather_device(tensor, config, where):
    assert sd.gather_device(tensor, config) == where


def test_cli_refuses_a_batch_that_auto_processes_cannot_split(capsys):
    # nproc=auto on this CPU machine means 2 processes: refused before anything is launched
    assert main(["train", "configs/demo.yaml", "nproc=auto", "train.batch_size=255"]) == 2
    assert "train.batch_size: 255 must be a positive multiple of nproc (auto: 2)" in capsys.readouterr().err


def test_cli_under_torchrun_refuses_a_config_for_another_world_size(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["data", "configs/demo.yaml"]) == 2
    err = capsys.readouterr().err
    assert "nproc: the config says 2 processes but torchrun started WORLD_SIZE=4" in err and "nproc=4" in err


def test_nproc_config_values(tmp_path):
    from sparse_kd.config import load_config

    assert load_config("configs/demo.yaml", ["nproc=auto", "train.batch_size=255"]).nproc == "auto"  # checked at launch
    for bad, needle in (("nproc=0", "nproc: must be >= 1 or auto"), ("nproc=all", "nproc: expected an integer"),
                        ("student.planner.ddr_cap_gb=-2", "student.planner.ddr_cap_gb: must be >= 0")):
        with pytest.raises(ConfigError, match=needle):
            load_config("configs/demo.yaml", [bad])



def test_split_range_covers_every_item_once():
    for n in (0, 1, 5, 17):
        for w in (1, 2, 3, 8):
            parts = [sd.split_range(n, r, w) for r in range(w)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1


def test_one_process_helpers_need_no_process_group():
    import torch

    assert sd.long_group() is None
    sd.long_barrier()
    assert sd.long_broadcast_object({"a": 1}) == {"a": 1}
    assert sd.long_all_gather_object(3) == [3]
    t = torch.arange(6.0).reshape(3, 2)
    assert sd.all_gather_rows(t, 3) is t
    assert sd.on_main(lambda: 7) == 7
    sd.raise_if_any(None)
    with pytest.raises(ConfigError, match="boom"):
        sd.raise_if_any("boom", ConfigError)


def test_url_output_dir_is_refused_with_the_fix(tmp_path):
    from sparse_kd.run_folder import check_shared_run_folder

    with pytest.raises(ConfigError, match=r"output_dir: 's3://bucket/run' is a URL.*s3fs.*NFS"):
        check_shared_run_folder("s3://bucket/run")
    check_shared_run_folder(str(tmp_path / "x"))  # one process: nothing to check, nothing written
    assert not (tmp_path / "x").exists()
