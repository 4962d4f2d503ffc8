"""`benchmarks/bench_lookup.py --quick` runs end to end and writes every variant (no timing asserts)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

VARIANTS = {"embbag_fp32", "ebc_fp32"} | {
    f"{dt}{prune}{par}" for dt in ("fp16", "int8", "int4", "int2") for prune in ("", "+prune") for par in ("", "+par")
}


def test_bench_lookup_quick(tmp_path: Path) -> None:
    out = tmp_path / "lookup.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_lookup.py"), "--quick", "--threads", "1,2", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    machine = data["machine"]
    for key in ("logical_cpus", "usable_cpus", "memory_gb", "torch", "fbgemm_gpu", "torchrec"):
        assert machine[key], key
    assert set(data["copy_gb_per_s"]) == {"1", "2"}
    assert all(v > 0 for v in data["copy_gb_per_s"].values())
    seen = {(r["variant"], r["threads"]) for r in data["results"]}
    assert seen == {(v, t) for v in VARIANTS for t in (1, 2)}
    for r in data["results"]:
        assert r["ids_per_s"] > 0 and r["row_gb_per_s"] > 0 and r["frac_of_copy_bw"] > 0, r
        assert r["vs_embbag_fp32"] is not None
    rb = {r["variant"]: r["row_bytes"] for r in data["results"]}
    # dim 32: fp32 128 B; FBGEMM rows padded to 16 B: fp16 64, int8 32+4 -> 48, int4 16+4 -> 32, int2 8+4 -> 16
    assert (rb["embbag_fp32"], rb["fp16"], rb["int8"], rb["int4"], rb["int2"]) == (128, 64, 48, 32, 16)
    assert data["targets"] and data["profiles"]
    assert "embbag_fp32" in proc.stdout
