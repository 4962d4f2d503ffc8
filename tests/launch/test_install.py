"""How the package installs (issue 20, items 6 and 7): pyproject.toml cannot put the CPU FBGEMM over
a CUDA one, and launch/Dockerfile installs the same CUDA stack as scripts/gpu_check.sh."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DOCKERFILE = (ROOT / "launch" / "Dockerfile").read_text()
SCRIPT = (ROOT / "scripts" / "gpu_check.sh").read_text()


def _names(reqs: list[str]) -> dict[str, Requirement]:
    return {canonicalize_name(Requirement(r).name): Requirement(r) for r in reqs}


def test_base_dependencies_hold_no_fbgemm_and_no_torchrec():
    base = _names(PROJECT["dependencies"])
    assert not [n for n in base if n.startswith("fbgemm")], base  # `pip install .` never picks a FBGEMM build
    assert "torchrec" not in base  # its metadata requires the CUDA fbgemm-gpu: installed --no-deps
    # torch==2.13.0 is met by 2.13.0+cu126 / +cu130 / +cpu alike: a CUDA torch stays in place
    assert str(base["torch"].specifier) == "==2.13.0" and base["torch"].specifier.contains("2.13.0+cu126")


def test_extras_pick_one_fbgemm_build():
    extras = {k: _names(v) for k, v in PROJECT["optional-dependencies"].items()}
    assert set(extras["cpu"]) == {"fbgemm-gpu-cpu"} and str(extras["cpu"]["fbgemm-gpu-cpu"].specifier) == "==1.8.0"
    assert set(extras["cuda"]) == {"fbgemm-gpu"} and str(extras["cuda"]["fbgemm-gpu"].specifier) == "==1.8.0"


def test_lock_and_make_venv_unchanged_by_the_extras():
    """`make venv` installs the lock (with fbgemm-gpu-cpu) and then `-e .` with --no-deps: no extra needed."""
    lock = (ROOT / "requirements.lock").read_text()
    assert re.search(r"^fbgemm_gpu-cpu==1\.8\.0$", lock, re.M) and re.search(r"^torchrec==1\.8\.0$", lock, re.M)
    make = (ROOT / "Makefile").read_text()
    assert "pip install --quiet --no-deps -r requirements.lock" in make
    assert "pip install --quiet --no-deps --no-build-isolation -e ." in make


def _exclusion(text: str) -> re.Pattern:
    (pattern,) = re.findall(r"grep -v -E '([^']+)' requirements\.lock", text)
    return re.compile(pattern)


def test_dockerfile_installs_the_same_cuda_stack_as_gpu_check():
    for text in (DOCKERFILE, SCRIPT):
        assert re.search(r'pip install [^\n]*"torch==2\.13\.0" --index-url "\$\{?TORCH_INDEX_URL', text)
        assert re.search(r'pip install [^\n]*"fbgemm-gpu==1\.8\.0" --index-url "\$\{?TORCH_INDEX_URL', text)
        assert re.search(r'pip install [^\n]*--no-deps "torchrec==1\.8\.0"', text)
        assert "--no-deps -r" in text and "--no-deps --no-build-isolation" in text
    assert "download.pytorch.org/whl/${CUDA_FLAVOR}" in DOCKERFILE and "ARG CUDA_FLAVOR=cu126" in DOCKERFILE
    assert _exclusion(DOCKERFILE).pattern == _exclusion(SCRIPT).pattern


def test_the_rest_of_the_lock_is_everything_but_the_cpu_builds():
    lines = [ln for ln in (ROOT / "requirements.lock").read_text().splitlines() if ln and not ln.startswith("#")]
    pattern = _exclusion(DOCKERFILE)
    dropped = {canonicalize_name(ln.split("==")[0]) for ln in lines if pattern.search(ln)}
    assert dropped == {"torch", "fbgemm-gpu-cpu", "torchrec"}, dropped
    kept = [ln for ln in lines if not pattern.search(ln)]
    assert "torchmetrics==1.0.3" in kept and "torchx==0.7.0" in kept and "setuptools" in " ".join(kept)
    assert len(kept) == len(lines) - 3
