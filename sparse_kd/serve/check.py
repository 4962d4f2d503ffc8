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


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC with ties counted half."""
    order = np.argsort(scores, kind="mergesort")
    s, y = scores[order], labels[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2 + 1
        i = j + 1
    n_pos = y.sum()
    n_neg = len(y) - n_pos
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)) if n_pos and n_neg else float("nan")


def main(argv: list[str] | None = None) -> int:
    art, run = (Path(a) for a in (argv or sys.argv[1:])[:2])
    p = Predictor.load(art)
    rows = list(csv.DictReader(open(run / "data" / "heldout_pairs.csv", newline="", encoding="utf-8")))
    manifest = json.loads((art / "manifest.json").read_text())
    in_process = manifest.get("config", {}).get("metrics", {}).get("after", {})
    ok = True
    print(f"[serve check] {art}: embedding storage {manifest.get('bytes', {}).get('total_mb', float('nan')):.4f} MB "
          f"(fp32 {manifest.get('bytes', {}).get('fp32_mb', float('nan')):.4f} MB)")
    for split in ("test", "test_cold"):
        sel = [r for r in rows if r["split"] == split]
        if not sel:
            continue
        scores = p.score_logits([r["user_id"] for r in sel], [r["item_id"] for r in sel])
        got = auc(scores, np.array([float(r["label"]) for r in sel]))
        want = in_process.get(split, {}).get("auc")
        same = want is None or abs(got - want) < 1e-6
        ok &= same
        print(f"[serve check] {split}: AUC {got:.4f} after reload in a fresh process"
              + (f" (in-process compressed model: {want:.4f}{'' if same else ' MISMATCH'})" if want is not None else ""))
    leaked = [m for m in ("transformers", "sparse_kd.student", "sparse_kd.teacher", "sparse_kd.distill") if m in sys.modules]
    if leaked:
        print(f"[serve check] the predictor imported {leaked}; serving must need neither BERT nor training code")
        ok = False
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
