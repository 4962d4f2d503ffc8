"""`benchmarks/bench_serve.py --quick` runs end to end: every artifact phase with its swap, the
malformed flood, and the JSON the lead's full run writes (no timing asserts)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_serve_quick(tmp_path: Path) -> None:
    out = tmp_path / "serve.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--quick", "--malformed", "120",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in ("logical_cpus", "usable_cpus", "torch", "loadavg_start"):
        assert data["machine"][key], key
    assert isinstance(data["machine_busy"], bool)
    assert [p["dtype"] for p in data["phases"]] == ["fp32", "int8", "int4"]
    for p in data["phases"]:
        assert p["ok"] > 0 and p["errors"] == 0 and p["requests_per_s"] > 0, p
        assert p["p50_ms"] <= p["p99_ms"] <= p["max_ms"]
        sw = p["swap"]
        assert sw["status"] == 200 and sw["swapped"] is True and sw["from"] != sw["to"]
        # both artifacts answered: the phase ran on after the swap
        assert set(sw["answers_by_artifact"]) == {sw["from"], sw["to"]}, sw
        assert p["in_process"]["p50_ms"] > 0
        assert p["outside_swap_window"]["requests"] + sw["window"]["requests"] == p["requests"]
    m = data["malformed"]
    assert m["requests"] == 120 and m["not_4xx"] == 0 and m["server_alive"] and m["health_after"] == 200
    assert set(data["framework_overhead"]["us_per_request_median"]) == {"starlette", "fastapi", "fastapi_pydantic_model"}
    assert data["server_exit_code"] == 0
    assert set(data["targets"]) == {"int4_p99_ms", "int4_requests_per_s", "failed_requests_across_swaps",
                                    "malformed_all_4xx_server_alive"}
    assert data["targets"]["failed_requests_across_swaps"]["met"] and data["targets"]["malformed_all_4xx_server_alive"]["met"]
    assert "int4" in proc.stdout and "target" in proc.stdout
