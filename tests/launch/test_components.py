"""The torchx components validate, build the expected torchrun command, and check their inputs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from torchx.specs import AppDef
from torchx.specs.file_linter import validate

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = ROOT / "launch" / "components.py"
sys.path.insert(0, str(ROOT / "launch"))
import components  # noqa: E402


@pytest.mark.parametrize("name", ["train", "train_teacher", "train_student"])
def test_component_passes_torchx_linter(name):
    errors = validate(str(COMPONENTS), name)
    assert errors == [], errors


def test_train_builds_torchrun_of_the_cli():
    app = components.train("train.epochs=1", config="configs/ml100k.yaml", nproc_per_node=2)
    assert isinstance(app, AppDef)
    role = app.roles[0]
    cmd = " ".join([role.entrypoint, *role.args])
    assert "torch.distributed.run" in cmd or "torchrun" in cmd
    assert "--nproc_per_node 2" in cmd or "--nproc_per_node=2" in cmd
    assert "-m sparse_kd.cli train configs/ml100k.yaml train.epochs=1 nproc=2" in cmd
    assert "--variants teacher_ranker baseline distilled" in cmd
    teacher = components.train_teacher(config="configs/demo.yaml")
    assert "--variants teacher_ranker" in " ".join(teacher.roles[0].args)


@pytest.mark.parametrize("name", ["train", "train_teacher", "train_student"])
def test_nodes_times_processes_is_the_world_size(name):
    app = getattr(components, name)("nproc=3", config="configs/demo.yaml", nnodes=2, nproc_per_node=4)
    role = app.roles[0]
    cmd = " ".join([role.entrypoint, *role.args])
    assert role.num_replicas == 2  # one torchrun agent per node
    assert "--nnodes 2" in cmd and "--nproc_per_node 4" in cmd and "--rdzv_backend c10d" in cmd
    # the component's nproc comes after the user's overrides, so it wins: 2 nodes x 4 = 8 ranks
    assert cmd.index("nproc=3") < cmd.index("nproc=8")


@pytest.mark.parametrize(
    "kwargs,msg",
    [({"nproc_per_node": 0}, "must be >= 1"), ({"config": "configs/demo.json"}, "expected a YAML"), ({"overrides": ("epochs",)}, "key=value"),
     ({"gpu": 2, "nproc_per_node": 4}, "each process of a CUDA job needs its own GPU")],
)
def test_component_rejects_bad_input(kwargs, msg):
    overrides = kwargs.pop("overrides", ())
    with pytest.raises(ValueError, match=msg):
        components.train(*overrides, **kwargs)


def test_torchx_dryrun_local_cwd():
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    out = subprocess.run(
        [str(Path(sys.executable).parent / "torchx"), "run", "--dryrun", "-s", "local_cwd",
         "launch/components.py:train", "--config", "configs/demo.yaml"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sparse_kd.cli" in out.stdout + out.stderr


# ---------------------------------------------------------------- resources, mounts, interfaces (issue 20, item 7)


def test_default_image_is_the_dockerfiles():
    role = components.train().roles[0]
    assert role.image == components.DEFAULT_IMAGE == "sparse-kd:cu126"
    assert "-t sparse-kd:cu126" in (ROOT / "launch" / "Dockerfile").read_text()
    assert components.train(image="reg.example/sparse-kd:v1").roles[0].image == "reg.example/sparse-kd:v1"
    with pytest.raises(ValueError, match="image is empty"):
        components.train(image=" ")


@pytest.mark.parametrize("name", ["train", "train_teacher", "train_student"])
def test_resources_scale_with_processes_per_node(name):
    fn = getattr(components, name)
    r8 = fn(nproc_per_node=8, gpu=8).roles[0].resource
    assert (r8.cpu, r8.memMB, r8.gpu) == (16, 8 * 8192, 8)  # 2 CPUs and 8 GB per process
    r2 = fn().roles[0].resource
    assert (r2.cpu, r2.memMB, r2.gpu) == (2 * 2, 2 * 8192, 0)
    r = fn(nproc_per_node=8, gpu=8, cpu=64, memMB=500_000).roles[0].resource
    assert (r.cpu, r.memMB) == (64, 500_000)  # explicit figures win


@pytest.mark.parametrize(
    "kwargs,msg",
    [({"cpu": 3, "nproc_per_node": 4}, "each process needs at least one CPU"), ({"cpu": -1}, "must be >= 0"),
     ({"memMB": -5}, "must be >= 0"), ({"gpu": -1}, "must be >= 0")],
)
def test_bad_resources_are_refused_up_front(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        components.train(**kwargs)


def test_mounts_reach_every_replica():
    from torchx.specs import BindMount, VolumeMount

    app = components.train_student(nnodes=2, mounts=["type=bind", "src=/data/runs", "dst=/app/runs",
                                                     "type=volume", "src=hf-cache", "dst=/cache", "readonly"])
    mounts = app.roles[0].mounts
    assert mounts == [BindMount(src_path="/data/runs", dst_path="/app/runs", read_only=False),
                      VolumeMount(src="hf-cache", dst_path="/cache", read_only=True)]
    assert components.train().roles[0].mounts == []
    with pytest.raises(ValueError, match="expected type=bind,src=HOST_PATH"):
        components.train(mounts=["src=/data", "dst=/app/runs"])  # type must come first
    with pytest.raises(ValueError, match="unknown mount option from"):
        components.train(mounts=["type=bind", "from=/data", "dst=/x"])
    with pytest.raises(ValueError, match="no dst= given"):
        components.train(mounts=["type=bind", "src=/data"])


def test_network_interface_sets_gloo_and_nccl():
    env = components.train(network_interface="eth0").roles[0].env
    assert env["GLOO_SOCKET_IFNAME"] == "eth0" and env["NCCL_SOCKET_IFNAME"] == "eth0"
    assert env["HF_HUB_OFFLINE"] == "1"
    env = components.train().roles[0].env
    assert "GLOO_SOCKET_IFNAME" not in env and "NCCL_SOCKET_IFNAME" not in env
    assert components.train(network_interface="eth0,ib0").roles[0].env["NCCL_SOCKET_IFNAME"] == "eth0,ib0"
    with pytest.raises(ValueError, match="expected an interface name"):
        components.train(network_interface="eth0; rm -rf /")


def test_components_read_no_environment(monkeypatch):
    """Same AppDef whatever the caller's environment (torchx's own LOGLEVEL default aside)."""
    monkeypatch.setenv("LOGLEVEL", "WARNING")
    a = components.train(nproc_per_node=4, gpu=4, network_interface="eth0")
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "CUDA_VISIBLE_DEVICES", "MASTER_ADDR"):
        monkeypatch.setenv(var, "elsewhere")
    b = components.train(nproc_per_node=4, gpu=4, network_interface="eth0")
    assert a.roles[0].env == b.roles[0].env and a.roles[0].resource == b.roles[0].resource


def test_torchx_cli_passes_the_new_options():
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    out = subprocess.run(
        [str(Path(sys.executable).parent / "torchx"), "run", "--dryrun", "-s", "local_cwd",
         "launch/components.py:train", "--config", "configs/demo.yaml", "--nproc_per_node", "2",
         "--network_interface", "lo", "--mounts", "type=bind,src=/tmp,dst=/tmp/x"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "GLOO_SOCKET_IFNAME" in text and "'lo'" in text
