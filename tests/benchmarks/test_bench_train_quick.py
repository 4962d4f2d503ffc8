"""`benchmarks/bench_train.py --quick` and `benchmarks/bench_scale.py --quick` run end to end and
write every variant (no timing asserts). Both run at once, as subprocesses, to keep the test short."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MACHINE_KEYS = ("logical_cpus", "usable_cpus", "memory_gb", "torch", "fbgemm_gpu", "torchrec")

pytestmark = pytest.mark.slow  # launches 2-process runs


def _start(script: str, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError("timed out:\n" + out[-3000:])
    assert proc.returncode == 0, out[-4000:]
    return out


def test_bench_train_and_scale_quick(tmp_path: Path) -> None:
    train_json, scale_json = tmp_path / "train.json", tmp_path / "scale.json"
    procs = [_start("bench_train.py", train_json), _start("bench_scale.py", scale_json)]
    train_out, scale_out = (_finish(p) for p in procs)

    # bench_train: every (process count, sharding, variant), the paired ratios and the machine
    data = json.loads(train_json.read_text())
    for key in MACHINE_KEYS:
        assert data["machine"][key], key
    seen = {(r["nproc"], r["sharding"], r["variant"]) for r in data["results"]}
    want = {(n, s, v) for n in (1, 2) for s in ("table_wise", "row_wise", "column_wise") for v in ("plain", "project", "distill")}
    assert seen == want
    for r in data["results"]:
        assert r["examples_per_s"] > 0 and len(r["examples_per_s_samples"]) == data["config"]["rounds"], r
    assert {(r["nproc"], r["sharding"], r["ratio"]) for r in data["ratios"]} == {
        (n, s, q) for n in (1, 2) for s in ("table_wise", "row_wise", "column_wise") for q in ("project/plain", "distill/project")
    }
    assert all(r["value"] > 0 for r in data["ratios"])
    assert "project/plain" in train_out

    # bench_scale: every variant and rank, local shard bytes halve when sharded over 2 ranks
    data = json.loads(scale_json.read_text())
    for key in MACHINE_KEYS:
        assert data["machine"][key], key
    seen = {(r["variant"], r["rank"]) for r in data["results"]}
    assert seen == {("1proc", 0), ("2proc_table_wise", 0), ("2proc_table_wise", 1), ("2proc_row_wise", 0), ("2proc_row_wise", 1)}
    by = {(r["variant"], r["rank"]): r for r in data["results"]}
    assert by[("1proc", 0)]["emb_rows_local"] == data["config"]["total_rows"]
    assert by[("1proc", 0)]["emb_mb_local"] == round(data["config"]["fp32_table_bytes"] / 2**20, 1)
    for v in ("2proc_table_wise", "2proc_row_wise"):
        assert by[(v, 0)]["emb_rows_local"] + by[(v, 1)]["emb_rows_local"] == data["config"]["total_rows"]
        assert all(0.3 < by[(v, k)]["emb_vs_1proc"] < 0.7 for k in (0, 1)), v
    assert all(r["peak_rss_mb"] > 0 and r["examples_per_s"] > 0 for r in data["results"])
    assert {s["variant"] for s in data["summary"]} == {"1proc", "2proc_table_wise", "2proc_row_wise"}
    assert "2proc_row_wise" in scale_out


def test_bench_train_teacher_variant_quick(tmp_path: Path) -> None:
    """The teacher ranker's step with its users' text features in the sharded frozen table."""
    out = tmp_path / "teacher.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--quick", "--nprocs", "2",
                           "--shardings", "row_wise", "--variants", "project,teacher", "--features-layout", "sharded",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["config"]["features_layout"] == "sharded"
    assert {r["variant"] for r in data["results"]} == {"project", "teacher"}
    assert all(r["examples_per_s"] > 0 for r in data["results"])
