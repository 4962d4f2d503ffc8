"""`benchmarks/bench_attention.py --quick` runs both forms of DIN's unit and reports their times
and that they agree (no timing asserts)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_attention_quick(tmp_path: Path) -> None:
    out = tmp_path / "attention.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_attention.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    doc = json.loads(out.read_text())
    assert set(doc["ms_per_step"]) == {"concatenated", "factored"}
    assert all(len(v["rounds"]) == 2 and v["median"] > 0 for v in doc["ms_per_step"].values())
    assert doc["max_abs_output_diff"] < 1e-4 and doc["speedup_median"] > 0
    assert "factored speed-up" in proc.stdout
