"""The baseline as the project trains it (``sparse-kd train --variants baseline``: sharded, fused
row optimiser, best epoch on valid) under a few setting overrides, side by side, with matrix
factorisation tuned on the same splits: which settings bring the ID-only DLRM to MF.

Each ``--candidate`` is one space-separated list of config overrides (``default`` for none); without
``--candidate`` they are the config as it is and each of its ``study.baseline_search`` lists. Every
candidate trains in its own run folder under ``--work`` (kept, so a rerun reuses trained rankers:
the run folders' fingerprints decide), and the JSON holds valid / test AUC at each candidate's best
epoch, the chosen candidate (best valid AUC), the MF reference of the first candidate's run, and
whether the chosen baseline is at or above MF on valid and on test (``met``); with several seeds
(``--seed A B C`` or ``--study-seeds``) one such record per seed.

    python benchmarks/baseline_sweep.py --config configs/demo.yaml \\
        --candidate default "student.dot_logit=true" "student.dot_logit=true train.embedding_l2=0.03" \\
        --out docs/bench/baseline_sweep_demo.json
    python benchmarks/baseline_sweep.py --config configs/ml100k_baseline_mf.yaml --study-seeds \
        --out docs/bench/baseline_mf_ml100k.json
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
    # study.baseline_search emptied: `train` would search the config's candidates itself; here each is a run of its own
    cmd = [sys.executable, "-m", "sparse_kd.cli", "train", config, *common, *overrides, f"output_dir={out_dir}",
           f"train.mf_reference={'true' if mf else 'false'}", "study.baseline_search=[]"]
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


def sweep(config: str, candidates: List[str], common: List[str], seed: Optional[int], work: Path) -> dict:
    """Every candidate on one seed, and MF on the same splits: {candidates, chosen, mf, met}."""
    results = []
    for k, cand in enumerate(candidates):
        overrides = [] if cand.strip() == "default" else shlex.split(cand)
        res = run_candidate(config, overrides, work / f"candidate_{k}", seed, mf=(k == 0), common=common)
        results.append(res)
        print(f"{cand:55s} valid AUC {res['valid_auc']:.4f}  test AUC {res['test_auc']:.4f}  "
              f"(best epoch {res['best_epoch']} of {res['epochs']}, {res['seconds']}s)", flush=True)
    best = max(range(len(results)), key=lambda k: results[k]["valid_auc"])
    mf = results[0]["mf"]
    chosen = results[best]
    # the issue-21 target: the baseline, chosen on valid, at or above MF on valid and on test
    met = chosen["valid_auc"] >= mf["valid"] and chosen["test_auc"] >= mf["test"]
    print(f"{'matrix factorisation (tuned on valid)':55s} valid AUC {mf['valid']:.4f}  test AUC {mf['test']:.4f}")
    print(f"chosen on valid: {candidates[best]} -> baseline - MF: valid {chosen['valid_auc'] - mf['valid']:+.4f}, "
          f"test {chosen['test_auc'] - mf['test']:+.4f}", flush=True)
    return {"candidates": results, "chosen": best, "mf": mf, "met": met}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml", help="experiment YAML whose baseline is swept")
    p.add_argument("--candidate", nargs="+", default=None,
                   help='override lists, each one quoted string: "student.dot_logit=true train.embedding_l2=0.03"; '
                        '"default": none. Default: the config\'s own settings, then each of its study.baseline_search')
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides every candidate gets")
    p.add_argument("--seed", type=int, nargs="+", default=None,
                   help="data.seed and train.seed, one sweep each (default: the config's seed; --study-seeds: study.seeds)")
    p.add_argument("--study-seeds", action="store_true", help="one sweep per seed of the config's study.seeds")
    p.add_argument("--work", default="runs/bench/baseline_sweep", help="folder of the candidates' run folders")
    p.add_argument("--out", default="runs/bench/baseline_sweep.json", help="JSON path")
    args = p.parse_args(argv)
    from sparse_kd.config import load_config

    cfg = load_config(args.config, args.set)
    candidates = args.candidate or ["default", *(" ".join(c) for c in cfg.study.baseline_search)]
    seeds: List[Optional[int]] = list(cfg.study.seeds) if args.study_seeds else (args.seed or [None])
    info, per_seed = machine_info(), {}
    for seed in seeds:
        print(f"== seed {seed if seed is not None else 'of the config'} ==", flush=True)
        per_seed[seed] = sweep(args.config, candidates, args.set, seed, Path(args.work) / f"seed_{seed}")
    doc = {"benchmark": "baseline_sweep", "command": shlex.join(["baseline_sweep.py", *(argv or sys.argv[1:])]),
           "machine": info, "config": args.config, "overrides": args.set, "candidate_overrides": candidates}
    if len(seeds) == 1:
        doc.update({"seed": seeds[0], **per_seed[seeds[0]]})
    else:
        doc["per_seed"] = {str(s): r for s, r in per_seed.items()}
        met = [s for s, r in per_seed.items() if r["met"]]
        doc["summary"] = {"seeds_met": met, "met": len(met) == len(seeds)}
        print(f"baseline >= MF on valid and test: {len(met)} of {len(seeds)} seeds ({met})")
    write_json(args.out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
