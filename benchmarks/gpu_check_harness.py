"""gpu_check's harness: the plan of checks (each in its own process group under its own time
limit, the JSON rewritten after each one), the result rows and their table, and the CLI commands
a check runs. ``benchmarks/gpu_check.py`` holds the checks themselves and the command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo.yaml"
MIN_CHECK_S = 20  # a check gets at least this much of the budget, or is "not run"
DEFAULT_BUDGET_S = 390  # + ~3 min to install the CUDA stack: under 10 minutes on one GPU
Rows = List[Dict[str, Any]]


@dataclass(frozen=True)
class Check:
    name: str
    limit_s: int
    fn: Callable[["Ctx"], Rows | Dict[str, Any]]
    doc: str
    gpus: int = 1  # GPUs it needs
    after: Optional[str] = None  # a check whose output it reads (skipped if that one did not pass)


@dataclass(frozen=True)
class Ctx:
    """Where a check writes (``out``), training overrides, and the device / backend (CPU in tests)."""

    out: Path
    overrides: tuple = ()
    device: str = "cuda"
    backend: str = "nccl"


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def require_cuda() -> Optional[str]:
    """The GPU's name; None, after saying on stderr what is missing, without a CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    print(f"error: gpu_check needs a CUDA GPU; torch {torch.__version__} ({build}) sees none. Run it with "
          "`make gpu-check` on a machine with an NVIDIA GPU (it installs the CUDA stack into .venv-gpu); "
          "`--dry-run` shows the plan without one.", file=sys.stderr)
    return None


def row(check: str, ok: bool | str, detail: str, seconds: float, **figures: Any) -> Dict[str, Any]:
    status = ok if isinstance(ok, str) else ("ok" if ok else "FAIL")
    return {"check": check, "status": status, "detail": detail, "seconds": round(seconds, 1), "figures": figures}


def summary_table(rows: Rows) -> str:
    """The rows as one aligned text table (check, status, seconds, detail)."""
    head = ("check", "status", "s", "detail")
    cells = [(r["check"], r["status"], f"{r['seconds']:.1f}", r["detail"]) for r in rows]
    widths = [max(len(head[i]), *(len(c[i]) for c in cells)) if cells else len(head[i]) for i in range(3)]
    line = lambda c: f"{c[0]:<{widths[0]}}  {c[1]:<{widths[1]}}  {c[2]:>{widths[2]}}  {c[3]}"  # noqa: E731
    return "\n".join([line(head), line(tuple("-" * w for w in widths) + ("-" * 6,))] + [line(c) for c in cells])


def result_doc(rows: Rows, machine: Dict[str, Any], pending: List[str] = ()) -> Dict[str, Any]:
    """passed: complete, no FAIL and nothing ``not run`` (a ``skip`` does not apply to this machine)."""
    return {"machine": machine, "complete": not pending, "pending": list(pending), "rows": rows,
            "passed": not pending and all(r["status"] in ("ok", "skip") for r in rows)}


def write_json(path: Path, doc: Dict[str, Any]) -> None:
    from sparse_kd.atomic import write_text  # temp file + fsync + os.replace

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(doc, indent=1))


def timed(check: str, fn: Callable[[], Rows | Dict[str, Any]]) -> Rows:
    """Run one check; an exception becomes a FAIL row with its first line."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # one broken check must not hide the others
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return [row(check, False, f"{type(e).__name__}: {first[:240]}", time.perf_counter() - t0)]
    return out if isinstance(out, list) else [out]


def skip_reason(c: Check, gpus: int, status: Dict[str, str], left_s: float) -> tuple[str, str] | None:
    """(status, reason) of a check that does not run here, or None."""
    if gpus < c.gpus:
        return "skip", f"needs {c.gpus} GPU{'s' * (c.gpus > 1)}, {gpus} visible"
    if c.after and status.get(c.after, "ok") != "ok":
        return "skip", f"reads {c.after}'s run, and {c.after} did not pass ({status[c.after]})"
    if left_s < MIN_CHECK_S:
        return "not run", f"time budget spent ({left_s:.0f}s left of --budget-s; run it with --only {c.name})"
    return None


def run_plan(checks: List[Check], run_one: Callable[[str, float], Rows], json_path: Path, machine: Dict[str, Any],
             budget_s: float, gpus: int, clock: Callable[[], float] = time.monotonic) -> Dict[str, Any]:
    """Run ``checks`` in order with ``run_one(name, limit_s)``; JSON rewritten after each one."""
    end, rows, status = clock() + budget_s, [], {}
    write_json(json_path, result_doc(rows, machine, [c.name for c in checks]))
    for k, c in enumerate(checks):
        why = skip_reason(c, gpus, status, end - clock())
        new = [row(c.name, why[0], why[1], 0.0)] if why else run_one(c.name, min(c.limit_s, end - clock()))
        status[c.name] = "ok" if all(r["status"] == "ok" for r in new) else next(
            r["status"] for r in new if r["status"] != "ok")
        rows += new
        for r in new:
            print(f"  {r['check']}: {r['status']} ({r['detail']})", flush=True)
        write_json(json_path, result_doc(rows, machine, [x.name for x in checks[k + 1:]]))
    return result_doc(rows, machine)


def run_limited(cmd: List[str], limit_s: float, log: Path, env: Optional[dict] = None) -> tuple[int, bool, float]:
    """Run ``cmd`` in its own process group, output to ``log``; past ``limit_s`` the whole group
    gets SIGTERM (torchrun stops its workers), 15 s later SIGKILL. Returns (exit code, timed out, seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, limit_s)), False, time.perf_counter() - t0
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)  # the group outlives its leader while a member is left
                    proc.wait(timeout=15)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            return proc.wait(), True, time.perf_counter() - t0


def cli_env(hide_gpus: bool = False) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if hide_gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def cli_command(subcommand: str, output_dir: Optional[Path], *overrides: str, variants: tuple = (),
                extra: tuple = ()) -> List[str]:
    """``python -m sparse_kd.cli SUBCOMMAND configs/demo.yaml output_dir=... OVERRIDES [--variants ...]``."""
    cmd = [sys.executable, "-m", "sparse_kd.cli", subcommand, CONFIG]
    cmd += [f"output_dir={output_dir}"] if output_dir is not None else []
    return cmd + list(overrides) + (["--variants", *variants] if variants else []) + list(extra)


def run_cli(cmd: List[str], hide_gpus: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(hide_gpus), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"{' '.join(cmd[3:5])} exit {proc.returncode}: {tail}")
    return proc
