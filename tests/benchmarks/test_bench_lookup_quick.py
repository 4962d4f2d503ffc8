"""`benchmarks/bench_lookup.py --quick` runs end to end and writes every variant (no timing asserts)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

VARIANTS = {"embbag_fp32", "embbag_fp32_i32"} | {
    f"{dt}{prune}" for dt in ("fp32", "fp16", "int8", "int4", "int2", "tiers(int8:0.05,int4:0.25,int2)")
    for prune in ("", "+prune", "+prune/fold")
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
        if r["threads"] == 2:  # one stream of batches per core too, paired with the floor's streams
            assert r["ids_per_s_streams"] > 0 and r["vs_embbag_fp32_streams"] > 0 and r["vs_embbag_fp32_best"] > 0, r
        else:
            assert r["ids_per_s_streams"] is None
    for t in data["targets"].values():  # the verdict is on each side's better use of the cores
        assert t["ratio_split"] > 0 and t["ratio_streams"] > 0 and t["met"] == (t["ratio"] >= t["target"])
    rb = {r["variant"]: r["row_bytes"] for r in data["results"]}
    # dim 32: fp32 128 B, fp16 64; int8 32 codes + fp32 scale and bias = 40; int4 16 + fp16 scale
    # and bias = 20; int2 8 + 4 = 12 (the CPU operators' rows: no padding)
    assert (rb["embbag_fp32"], rb["fp32"], rb["fp16"], rb["int8"], rb["int4"], rb["int2"]) == (128, 128, 64, 40, 20, 12)
    # the serving layout by default: hot-first rows on huge pages where the kernel allows them
    assert data["config"]["layout"] == "served" and data["config"]["thp"]
    tiers = "tiers(int8:0.05,int4:0.25,int2)"
    # a tiered table's row bytes: the mean over its rows (5% int8, 25% int4, 70% int2)
    assert abs(rb[tiers] - (0.05 * 40 + 0.25 * 20 + 0.70 * 12)) < 0.5
    assert set(data["targets"]) == {f"{v} / embbag_fp32 @ 2 threads" for v in (
        "int8", "int4", "int8+prune", "int4+prune", "int8+prune/fold", "int4+prune/fold", tiers, tiers + "+prune",
        tiers + "+prune/fold")}
    assert data["profiles"]
    assert "embbag_fp32" in proc.stdout


def test_bench_lookup_quick_with_the_tbe(tmp_path: Path) -> None:
    out = tmp_path / "lookup.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_lookup.py"), "--quick", "--threads", "2", "--tbe",
         "--dtypes", "int4,int2", "--tiers", "", "--no-profile", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = {r["variant"] for r in json.loads(out.read_text())["results"]}
    assert seen == {"embbag_fp32", "embbag_fp32_i32", "ebc_fp32"} | {
        f"{dt}{tbe}{prune}" for dt in ("int4", "int2") for tbe in ("", "_tbe") for prune in ("", "+prune")} | {
        f"{dt}+prune/fold" for dt in ("int4", "int2")}


def test_bench_lookup_paths_quick(tmp_path: Path) -> None:
    """`bench_lookup_paths.py --quick` measures every path; exiting 0 means it also found the
    index_select path's sums equal to the operators' own compressed_indices_mapping path's."""
    out = tmp_path / "paths.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_lookup_paths.py"), "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    med = json.loads(out.read_text())["m_ids_per_s_median"]
    for dt in ("int8", "int4"):
        names = [k for k in med if k.startswith(dt + " ")]
        assert any("compressed_indices_mapping" in k for k in names) and any("index_select" in k for k in names)
        assert any("independent threads" in k for k in names) and sum("workers" in k for k in names) >= 1
    assert all(v > 0 for v in med.values())
