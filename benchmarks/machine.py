"""What every benchmark records about the machine it ran on, and how it writes its JSON."""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import warnings
from pathlib import Path
from typing import Any, Dict, Optional


def read(path: str) -> str:
    """A /proc or /sys file's text ('' where it does not exist)."""
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def pkg_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # pragma: no cover - not installed
        return "unknown"


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine_info(extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Cores, memory, caches, library versions, thread settings and the load average now."""
    import torch

    mem_kb = next((int(ln.split()[1]) for ln in read("/proc/meminfo").splitlines() if ln.startswith("MemTotal:")), 0)
    model = next((ln.split(":", 1)[1].strip() for ln in read("/proc/cpuinfo").splitlines() if ln.startswith("model name")), "")
    caches = {}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    if base.is_dir():
        for idx in sorted(base.glob("index*")):
            level, kind, size = read(f"{idx}/level"), read(f"{idx}/type"), read(f"{idx}/size")
            if level and size:
                caches[f"L{level}{'' if kind == 'Unified' else kind[0].lower()}"] = size
    fbgemm = pkg_version("fbgemm-gpu-cpu")
    if fbgemm == "unknown":  # pragma: no cover - CUDA build
        fbgemm = pkg_version("fbgemm-gpu")
    info = {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "memory_gb": round(mem_kb / 2**20, 1),
        "caches": caches,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fbgemm_gpu": fbgemm,
        "torchrec": pkg_version("torchrec"),
        "transformers": pkg_version("transformers"),
        "cuda": torch.cuda.is_available(),
        "interop_threads": torch.get_num_interop_threads(),
        "intra_op_threads_default": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS")},
        "loadavg_start": read("/proc/loadavg"),
    }
    info.update(extra or {})
    return info


def write_json(path: str | Path, doc: Dict[str, Any], indent: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=indent))
    print(f"\nwrote {path}")
    return path


def rss_mb() -> Dict[str, float]:
    """This process's resident memory (MB): now (VmRSS), peak since start or the last
    :func:`reset_peak_rss` (VmHWM; getrusage's ru_maxrss where /proc is missing), and
    ru_maxrss (peak over the process's whole life)."""
    cur = hwm = 0.0
    for line in read("/proc/self/status").splitlines():
        if line.startswith("VmRSS:"):
            cur = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {"rss_mb": round(cur, 1), "peak_rss_mb": round(hwm or maxrss, 1), "ru_maxrss_mb": round(maxrss, 1)}


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("torchrec", "torch.distributed", "fbgemm_gpu", "sparse_kd"):
        logging.getLogger(name).setLevel(logging.ERROR)
