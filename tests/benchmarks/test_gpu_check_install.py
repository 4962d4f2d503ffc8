"""scripts/gpu_check.sh's install step on CPU, with a fake GPU and a fake venv (issue 20, item 5).

The fake venv's python logs pip calls and behaves as pip does with local version labels: a
torch 2.13.0 of any build meets ``torch==2.13.0``, so only ``--force-reinstall`` replaces it;
the build it then installs is the CUDA of the index URL (``.../cu130`` -> 13.0, or
FAKE_INDEX_CUDA). Everything else runs the real python with a fake ``torch`` module reporting the
installed build. The script must switch builds when CUDA_FLAVOR changes and stamp only the
stack asked for.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = -m ] && [ "$2" = pip ]; then shift 2; exec "{real}" "{fake}/fakepip.py" "$@"; fi
if [ "$1" = benchmarks/gpu_check.py ]; then echo "gpu_check.py $*" >> "{fake}/ran.log"; exit 0; fi
PYTHONPATH="{fake}/mods" exec "{real}" "$@"
"""

FAKE_PIP = r'''
import os, re, sys
fake = os.path.dirname(os.path.abspath(__file__))
args = sys.argv[1:]
with open(os.path.join(fake, "pip.log"), "a") as f:
    f.write(" ".join(args) + "\n")
state = os.path.join(fake, "torch_cuda")
cpu_pkg = os.path.join(fake, "has_fbgemm_cpu")
if args[0] == "show":
    sys.exit(0 if os.path.exists(cpu_pkg) else 1)
if args[0] == "uninstall" and "fbgemm-gpu-cpu" in args:
    os.remove(cpu_pkg)
if args[0] == "install" and "torch==2.13.0" in args:
    url = args[args.index("--index-url") + 1]
    m = re.search(r"cu(\d\d)(\d)$", url)
    served = os.environ.get("FAKE_INDEX_CUDA") or f"{m.group(1)}.{m.group(2)}"
    if not os.path.exists(state) or "--force-reinstall" in args:  # pip: 2.13.0+cuXXX meets ==2.13.0
        open(state, "w").write(served)
'''

FAKE_TORCH = '''
import os, types
_state = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "torch_cuda")
if not os.path.exists(_state):
    raise ImportError("no torch installed (fake)")
_cuda = open(_state).read().strip()
__version__ = "2.13.0+cu" + _cuda.replace(".", "")
version = types.SimpleNamespace(cuda=_cuda)
class _T(list):
    def cpu(self):
        return self
    def tolist(self):
        return list(self)
def tensor(values, dtype=None, device=None):
    return _T(values)
int32 = "int32"
def _cumsum(t):
    out = [0]
    for v in t:
        out.append(out[-1] + v)
    return _T(out)
cuda = types.SimpleNamespace(is_available=lambda: True, get_device_name=lambda i=0: "Fake GPU")
ops = types.SimpleNamespace(fbgemm=types.SimpleNamespace(asynchronous_complete_cumsum=_cumsum))
'''


@pytest.fixture
def fake(tmp_path: Path):
    fk = tmp_path / "fake"
    (fk / "mods" / "torch").mkdir(parents=True)
    for mod in ("fbgemm_gpu", "torchrec"):
        (fk / "mods" / mod).mkdir()
        (fk / "mods" / mod / "__init__.py").write_text("")
    (fk / "mods" / "torch" / "__init__.py").write_text(FAKE_TORCH)
    (fk / "fakepip.py").write_text(FAKE_PIP)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(FAKE_PYTHON.format(real=sys.executable, fake=fk))
    py.chmod(0o755)
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (bin_ / "nvidia-smi").chmod(0o755)

    def run(flavor: str, **env: str) -> subprocess.CompletedProcess:
        e = dict(os.environ, PATH=f"{bin_}:{os.environ['PATH']}", GPU_VENV=str(venv), CUDA_FLAVOR=flavor, **env)
        e.pop("FAKE_INDEX_CUDA", None) if "FAKE_INDEX_CUDA" not in env else None
        return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--only", "env"], capture_output=True,
                              text=True, timeout=120, env=e)

    def pip_calls() -> list[str]:
        log = fk / "pip.log"
        return log.read_text().splitlines() if log.exists() else []

    def installed() -> str:
        return (fk / "torch_cuda").read_text() if (fk / "torch_cuda").exists() else ""

    return type("Fake", (), {"dir": fk, "venv": venv, "run": staticmethod(run), "pip_calls": staticmethod(pip_calls),
                             "installed": staticmethod(installed)})


def _torch_installs(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("install") and "torch==2.13.0" in c]


def test_switching_flavor_reinstalls_and_stamps_the_new_build(fake):
    out = fake.run("cu126")
    assert out.returncode == 0, out.stderr
    assert fake.installed() == "12.6" and (fake.venv / ".installed-cu126").exists()
    assert "--force-reinstall" not in _torch_installs(fake.pip_calls())[0]  # a fresh venv: plain install
    assert (fake.dir / "ran.log").read_text().split() == ["gpu_check.py", "benchmarks/gpu_check.py", "--only", "env"]

    (fake.dir / "pip.log").unlink()
    out = fake.run("cu130")
    assert out.returncode == 0, out.stderr
    calls = fake.pip_calls()
    (torch_call,) = _torch_installs(calls)
    assert "--force-reinstall" in torch_call and torch_call.endswith("/whl/cu130")
    (fbgemm_call,) = [c for c in calls if "fbgemm-gpu==1.8.0" in c]
    assert "--force-reinstall" in fbgemm_call and fbgemm_call.endswith("/whl/cu130")
    assert fake.installed() == "13.0"  # the old script kept 12.6 here and stamped cu130
    assert (fake.venv / ".installed-cu130").exists() and not (fake.venv / ".installed-cu126").exists()
    assert "holds torch for CUDA 12.6" in out.stdout

    (fake.dir / "pip.log").unlink()
    assert fake.run("cu130").returncode == 0 and fake.pip_calls() == []  # stamped: nothing installed again


def test_no_stamp_when_the_installed_build_is_not_the_one_asked_for(fake):
    # an index (mirror) that serves the CUDA 12.6 build under the cu130 URL
    out = fake.run("cu130", FAKE_INDEX_CUDA="12.6")
    assert out.returncode == 2
    assert "built for CUDA 12.6, not 13.0" in out.stderr and "nothing stamped" in out.stderr
    assert not list(fake.venv.glob(".installed-*")) and not (fake.dir / "ran.log").exists()


def test_fbgemm_gpu_cpu_is_removed_before_the_cuda_build(fake):
    assert fake.run("cu126").returncode == 0
    (fake.venv / ".installed-cu126").unlink()
    (fake.dir / "has_fbgemm_cpu").write_text("")  # e.g. someone ran `pip install .[cpu]` into .venv-gpu
    (fake.dir / "pip.log").unlink()
    out = fake.run("cu126")
    assert out.returncode == 0, out.stderr
    calls = fake.pip_calls()
    assert any(c.startswith("uninstall") and "fbgemm-gpu-cpu" in c for c in calls)
    (fbgemm_call,) = [c for c in calls if "fbgemm-gpu==1.8.0" in c]
    assert "--force-reinstall" in fbgemm_call  # its files were shared with the removed package
    assert not (fake.dir / "has_fbgemm_cpu").exists()
