"""The teacher-encoding benchmark's quick variant runs and writes every method (no timing asserts)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_bench_teacher_quick(tmp_path):
    out = tmp_path / "teacher.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_teacher.py"), "--quick", "--no-shrunk", "--texts", "32", "--reps", "1",
                           "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in ("usable_cpus", "memory_gb", "torch", "transformers"):
        assert data["machine"][key], key
    text = json.dumps(data)
    for method in ("naive_fp32", "default"):
        assert method in text, method
    assert "texts/s" in proc.stdout
