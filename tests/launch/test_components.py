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
