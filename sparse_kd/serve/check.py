"""``python -m sparse_kd.serve.check ARTIFACT RUN_DIR``: reload an artifact in a fresh process and
score the run's held-out pairs with it, with neither BERT nor the training code imported.

Prints the artifact's embedding bytes and the AUC it reaches on test and test_cold, next to the
AUC the compression stage measured in-process; exits 1 if they disagree or if ``transformers``
or the training modules were imported.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

from sparse_kd.serve.predictor import Predictor


def main(argv: list[str] | None = None) -> int:
    art, run = (Path(a) for a in (argv or sys.argv[1:])[:2])
    p = Predictor.load(art)
    rows = list(csv.DictReader(open(run / "data" / "heldout_pairs.csv", newline="", encoding="utf-8")))
    manifest = json.loads((art / "manifest.json").read_text())
    in_process = manifest.get("config", {}).get("metrics", {}).get("after", {})
    ok = True
    print(f"[serve check] {art}: embedding storage {manifest.get('bytes', {}).get('total_mb', float('nan')):.4f} MB "
          f"(fp32 {manifest.get('bytes', {}).get('fp32_mb', float('nan')):.4f} MB)")
    scored = {}
    for split in ("test", "test_cold"):
        sel = [r for r in rows if r["split"] == split]
        if sel:
            scores = p.score_logits([r["user_id"] for r in sel], [r["item_id"] for r in sel])
            scored[split] = (scores, np.array([float(r["label"]) for r in sel]))
    # what loading and scoring imported, taken before the AUC (torchmetrics imports transformers)
    leaked = [m for m in ("transformers", "sparse_kd.student", "sparse_kd.teacher", "sparse_kd.distill") if m in sys.modules]
    from sparse_kd.metrics import auc

    for split, (scores, labels) in scored.items():
        got = auc(scores, labels)
        want = in_process.get(split, {}).get("auc")
        same = want is None or abs(got - want) < 1e-6
        ok &= same
        print(f"[serve check] {split}: AUC {got:.4f} after reload in a fresh process"
              + (f" (in-process compressed model: {want:.4f}{'' if same else ' MISMATCH'})" if want is not None else ""))
    if leaked:
        print(f"[serve check] the predictor imported {leaked}; serving must need neither BERT nor training code")
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
