"""The baseline as the project trains it (``sparse-kd train --variants baseline``: sharded, fused
row optimiser, best epoch on valid) under a few setting overrides, side by side, with matrix
factorisation tuned on the same splits: which settings bring the ID-only DLRM to MF.

Each ``--candidate`` is one space-separated list of config overrides (``default`` for none). Every
candidate trains in its own run folder under ``--work`` (kept, so a rerun reuses trained rankers:
the run folders' fingerprints decide), and the JSON holds valid / test AUC at each candidate's best
epoch, the chosen candidate (best valid AUC), and the MF reference of the first candidate's run.

    python benchmarks/baseline_sweep.py --config configs/demo.yaml \\
        --candidate default "student.dot_logit=true" "student.dot_logit=true train.embedding_l2=0.03" \\
        --out docs/bench/baseline_sweep_demo.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from machine import machine_info, write_json  # noqa: E402


def run_candidate(config: str, overrides: List[str], out_dir: Path, seed: Optional[int], mf: bool,
                  common: List[str] = ()) -> dict:
    """Train the baseline with ``common`` + ``overrides`` into ``out_dir``; its metrics.json's figures."""
    cmd = [sys.executable, "-m", "sparse_kd.cli", "train", config, *common, *overrides, f"output_dir={out_dir}",
           f"train.mf_reference={'true' if mf else 'false'}"]
    if seed is not None:
        cmd += [f"data.seed={seed}", "--seed", str(seed)]
    cmd += ["--variants", "baseline"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"candidate {overrides}: `{shlex.join(cmd)}` failed ({r.returncode}):\n{r.stderr[-3000:]}")
    m = json.loads((out_dir / "metrics.json").read_text())
    valid = [e["valid_auc"] for e in m["history"]["baseline"]]  # per epoch
    res = {"overrides": overrides, "seconds": round(time.perf_counter() - t0, 1),
           **{f"{s}_auc": round(m["metrics"]["baseline"][s]["auc"], 4) for s in ("valid", "test", "test_cold")},
           "best_epoch": valid.index(max(valid)) + 1, "epochs": len(valid),
           "valid_auc_by_epoch": [round(v, 4) for v in valid]}
    if mf:
        ref = m["mf_reference"]
        if "error" in ref:
            raise SystemExit(f"the MF reference failed: {ref['error']}")
        res["mf"] = {k: round(ref[k]["auc"], 4) for k in ("valid", "test")}
    return res


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml", help="experiment YAML whose baseline is swept")
    p.add_argument("--candidate", nargs="+", default=["default"],
                   help='override lists, each one quoted string: "student.dot_logit=true train.embedding_l2=0.03"; default: none')
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides every candidate gets")
    p.add_argument("--seed", type=int, default=None, help="data.seed and train.seed (default: the config's)")
    p.add_argument("--work", default="runs/bench/baseline_sweep", help="folder of the candidates' run folders")
    p.add_argument("--out", default="runs/bench/baseline_sweep.json", help="JSON path")
    args = p.parse_args(argv)
    info, results = machine_info(), []
    for k, cand in enumerate(args.candidate):
        overrides = [] if cand.strip() == "default" else shlex.split(cand)
        res = run_candidate(args.config, overrides, Path(args.work) / f"candidate_{k}", args.seed, mf=(k == 0),
                            common=args.set)
        results.append(res)
        print(f"{cand:55s} valid AUC {res['valid_auc']:.4f}  test AUC {res['test_auc']:.4f}  "
              f"(best epoch {res['best_epoch']} of {res['epochs']}, {res['seconds']}s)", flush=True)
    best = max(range(len(results)), key=lambda k: results[k]["valid_auc"])
    mf = results[0].get("mf")
    if mf:
        print(f"{'matrix factorisation (tuned on valid)':55s} valid AUC {mf['valid']:.4f}  test AUC {mf['test']:.4f}")
    print(f"chosen on valid: {args.candidate[best]}")
    write_json(args.out, {"benchmark": "baseline_sweep", "command": shlex.join(["baseline_sweep.py", *(argv or sys.argv[1:])]),
                          "machine": info, "config": args.config, "overrides": args.set, "seed": args.seed, "candidates": results,
                          "chosen": best, "mf": mf})
    return 0


if __name__ == "__main__":
    sys.exit(main())
