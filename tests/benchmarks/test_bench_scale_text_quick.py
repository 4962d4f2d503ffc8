"""`benchmarks/bench_scale.py --quick --variants ""`: the per-rank memory of a run's text stages
(issue 20, 4b) is measured and written for both ranks; a baseline-only run holds no text."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # launches a 2-process run


def test_text_stage_memory_quick(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--quick", "--variants", "",
                           "--text-users", "2000,3000", "--baseline-only-above", "2500", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = json.loads(out.read_text())["text_memory"]
    # above --baseline-only-above: the data and baseline-only stages alone, said so
    big = [r for r in recs if r["users"] == 3000]
    assert [r["rank"] for r in big] == [0, 1] and all("teacher_text" not in r and r["text_stages"] for r in big)
    assert all(r["baseline_only"]["peak_mb"] > 0 for r in big)
    recs = [r for r in recs if r["users"] == 2000]
    assert [r["rank"] for r in recs] == [0, 1]
    for r in recs:
        for stage in ("data", "baseline_only", "teacher_text", "distilled_spec"):
            assert r[stage]["peak_mb"] > 0 and r[stage]["peak_above_start_mb"] >= 0, (stage, r)
        # a baseline-only run builds no text: far below the text the old code held on every rank
        assert r["baseline_only"]["peak_above_start_mb"] < r["old_text_mb"], r
        # the student's alignment targets: about half per rank of 2 when sharded row_wise
        sharded, replicated = r["student_model_sharded"]["target_mb"], r["student_model_replicated"]["target_mb"]
        assert 0.4 * replicated <= sharded <= 0.6 * replicated, r
        # the teacher ranker's user features (count + 64 text dims replicated; count + half the text split)
        split, whole = r["teacher_model_sharded"]["features_mb"], r["teacher_model_replicated"]["features_mb"]
        assert 0.45 * whole <= split <= 0.6 * whole, r
    assert "text stages, 2,000 users, rank 1" in proc.stdout
