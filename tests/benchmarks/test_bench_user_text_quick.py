"""benchmarks/bench_user_text.py --quick: both layouts run on 2 ranks, the sharded one keeps
ShardedRows and the gathered one a whole tensor, and the JSON has every stage per rank."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_measures_both_layouts(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_user_text

    out = tmp_path / "user_text.json"
    assert bench_user_text.main(["--quick", "--out", str(out)]) == 0
    recs = json.loads(out.read_text())["records"]
    assert [(r["layout"], r["rank"]) for r in recs] == [("sharded", 0), ("sharded", 1), ("gathered", 0), ("gathered", 1)]
    assert [r["user_rows"] for r in recs] == ["ShardedRows", "ShardedRows", "Tensor", "Tensor"]
    assert [r["item_rows"] for r in recs] == ["ShardedRows", "ShardedRows", "Tensor", "Tensor"]
    for r in recs:
        assert r["users"] == 2000 and r["user_rows_mb_whole"] == pytest.approx(2000 * 384 * 4 / 2**20, abs=0.1)
        assert r["target_mb"] > 0 and r["peak_rss_mb"] >= r["student_model"]["peak_mb"]  # the student's alignment targets, this rank's shard
        for stage in ("data", "teacher_text", "teacher_text_hit", "distilled_spec", "student_model"):
            # the kernel's RSS counters lag by a few pages: a stage that allocates nothing may read just below 0
            assert r[stage]["peak_mb"] > 0 and r[stage]["peak_above_start_mb"] > -16 and r[stage]["seconds"] >= 0
