"""`sparse-kd pipeline` end to end on a tiny synthetic config, 2 processes: teacher encoding,
teacher ranker, baseline, distilled student, compression, fresh-process serve check."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_pipeline_end_to_end(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "sparse_kd.cli", "pipeline", "configs/demo.yaml", f"output_dir={out}",
        "data.synthetic.num_users=80", "data.synthetic.num_items=50", "data.synthetic.interactions_per_user=25",
        "train.epochs=1", "train.batch_size=128", f"teacher.cache_dir={tmp_path / 'cache'}",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"teacher_ranker", "baseline", "distilled"}
    for m in metrics.values():
        assert 0.0 <= m["test"]["auc"] <= 1.0 and m["test_cold"]["n"] > 0
    assert "| distilled" in proc.stdout  # the metrics table was printed
    art = out / "artifact" / "distilled"
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["bytes"]["total_mb"] < manifest["bytes"]["fp32_mb"]
    assert "[serve check] test: AUC" in proc.stdout and "MISMATCH" not in proc.stdout
