"""`benchmarks/bench_data.py --quick` runs end to end and writes every measurement (no timing asserts)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # four training launches


def test_bench_data_quick(tmp_path: Path) -> None:
    out = tmp_path / "data.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_data.py"), "--quick", "--out", str(out),
                           "--work", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    doc = json.loads(out.read_text())
    assert doc["machine"]["usable_cpus"] >= 1 and doc["config"]["quick"]
    conv = {r["set"]: r for r in doc["convert"]}
    assert set(conv) == {"big", "small", "subset"}
    assert all(r["seconds"] > 0 and r["peak_rss_mb"] > 0 and r["parquet_mb"] > 0 for r in conv.values())
    assert conv["big"]["interactions"] == 10 * conv["small"]["interactions"]
    runs = {r["variant"]: r for r in doc["train"]}
    assert set(runs) == {"in_memory_subset", "streamed_subset", "streamed_small", "streamed_big"}
    assert all(r["examples_per_s"] > 0 and r["peak_rss_mb_per_process"] > 0 for r in runs.values())
    assert runs["streamed_subset"]["ranks"][0]["loader_workers"] == (1 if torch.cuda.is_available() else 0) and runs["in_memory_subset"]["ranks"][0]["loader_workers"] == 0
    # both paths trained on the same examples
    assert runs["streamed_subset"]["ranks"][0]["train_examples"] == runs["in_memory_subset"]["ranks"][0]["train_examples"]
    s = doc["summary"]
    assert s["streamed_vs_in_memory_examples_per_s"] > 0 and s["train_peak_rss_big_vs_small"] > 0
    assert "streamed / in-memory" in proc.stdout
    assert not (tmp_path / "work").exists()  # generated data removed
