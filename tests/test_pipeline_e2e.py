"""`sparse-kd pipeline` end to end on a tiny synthetic config, 2 processes: teacher encoding,
teacher ranker, baseline, distilled student, compression, fresh-process serve check.

The run is too small for quality comparisons between variants to be stable; what it checks is
that the stages agree with each other: the sharded evaluation of the trained student equals the
evaluation of the model exported from its checkpoint, and the artifact scores the held-out pairs
in a fresh process exactly as the compression stage scored them in-process."""

import csv
import json
import math
import re
import subprocess
import sys
from collections import Counter
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
    doc = json.loads((out / "metrics.json").read_text())
    metrics = doc["metrics"]
    assert set(metrics) == {"teacher_ranker", "baseline", "distilled"}
    # every variant is evaluated on every example of every split
    with open(out / "data" / "heldout_pairs.csv", newline="") as f:
        heldout = Counter(r["split"] for r in csv.DictReader(f))
    sizes = {s: v["n"] for s, v in doc["data"]["splits"].items()}
    assert heldout["test"] == sizes["test"] > 0 and heldout["test_cold"] == sizes["test_cold"] > 0
    for m in metrics.values():
        for split in ("valid", "test", "test_cold"):
            assert m[split]["n"] == sizes[split] and math.isfinite(m[split]["auc"]) and math.isfinite(m[split]["logloss"])
    # the table printed is the one written
    assert (out / "metrics.md").read_text().strip() in proc.stdout
    # the fp32 model exported from the distilled student's last checkpoint (one process, unsharded)
    # scores like the sharded model did at the end of training
    manifest = json.loads((out / "artifact" / "distilled" / "manifest.json").read_text())
    before, after = manifest["config"]["metrics"]["before"], manifest["config"]["metrics"]["after"]
    for split in ("valid", "test", "test_cold"):
        assert before[split]["auc"] == pytest.approx(metrics["distilled"][split]["auc"], abs=1e-6), split
        assert before[split]["logloss"] == pytest.approx(metrics["distilled"][split]["logloss"], abs=1e-6), split
    # compressed to int4 as configured, smaller than fp32
    assert {t["dtype"] for t in manifest["tables"].values()} == {"int4"}
    assert manifest["bytes"]["total_mb"] < manifest["bytes"]["fp32_mb"]
    # the fresh serving process reproduces the in-process AUC of the compressed model
    served = dict(re.findall(r"\[serve check\] (test|test_cold): AUC (\d\.\d{4}) after reload", proc.stdout))
    assert set(served) == {"test", "test_cold"}, proc.stdout[-2000:]
    for split, auc in served.items():
        assert float(auc) == pytest.approx(after[split]["auc"], abs=6e-5), split
    assert "MISMATCH" not in proc.stdout and "the predictor imported" not in proc.stdout
