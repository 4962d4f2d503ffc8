"""`benchmarks/bench_compress_scale.py --quick` compresses a 50k-user run folder with the cluster
fill and reports every step's time and peak RSS (no timing asserts)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # writes a CSV log and a run folder, compresses in a child process

STEPS = {"load", "importance", "evaluate_fp32", "compress_model", "prune", "kmeans", "layout", "fold", "quantize",
         "evaluate_compressed", "mappings", "artifact"}


def test_bench_compress_scale_quick(tmp_path: Path) -> None:
    out, work = tmp_path / "compress_scale.json", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_compress_scale.py"), "--quick", "--out", str(out),
                           "--work", str(work)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    doc = json.loads(out.read_text())
    assert doc["config"]["quick"] and doc["config"]["users"] == 50_000 and doc["config"]["fill"] == "cluster"
    steps = {s["step"]: s for s in doc["steps"]}
    assert set(steps) == STEPS
    assert all(s["seconds"] >= 0 and s["peak_rss_mb"] > 0 and s["calls"] >= 1 for s in steps.values())
    assert steps["kmeans"]["within"] == "prune" and steps["prune"]["within"] == "compress_model"
    # nested steps: an inner peak never exceeds its outer one, nor the process peak
    assert steps["kmeans"]["peak_rss_mb"] <= steps["prune"]["peak_rss_mb"] <= steps["compress_model"]["peak_rss_mb"]
    assert max(s["peak_rss_mb"] for s in steps.values()) <= doc["total"]["peak_rss_mb"]
    user = doc["tables"]["t_user_id"]
    assert user["fill"] == "cluster" and user["clusters"] == 2500 and user["rows_stored"] == user["rows_kept"] + 2500
    assert doc["total"]["seconds"] > 0 and doc["bytes"]["ratio"] > 1
    assert "sparse-kd compress" in doc["compress_command"]
    # progress lines of the long steps reach stderr
    assert "k-means:" in proc.stderr and "compress: evaluating" in proc.stderr and "artifact:" in proc.stderr
    assert not work.exists()  # generated files removed
