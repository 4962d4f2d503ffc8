"""benchmarks/bench_launch.py runs end to end on one rank and writes its JSON (no timing asserts)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_launch_quick(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_launch

    assert bench_launch.main(["--rounds", "1", "--nproc", "1", "--out", str(tmp_path / "launch.json")]) == 0
    doc = json.loads((tmp_path / "launch.json").read_text())
    assert set(doc["seconds"]) == {"spawn", "forkserver"} and all(len(v) == 1 for v in doc["seconds"].values())
    assert doc["spawn_over_forkserver"] > 0 and doc["machine"]["usable_cpus"] >= 1
