"""Why an ID-only DLRM baseline can sit far below matrix factorisation: the student's own model
(``sparse_kd.student.model.build_dlrm``, batches from ``BatchBuilder``) trained in one process with
plain torch optimisers (no sharding, no fused optimiser, no training loop of the project), so that
a gap here is the model's, not the training path's.

On a config's splits (default: the demo's), each variant trains on the examples MF trains on
(:func:`sparse_kd.mf_reference.train_rows`) with its best epoch on valid AUC (patience 3,
``--epochs`` as a cap), and reports valid / test AUC there:

- ``dlrm``: the student's DLRM as ``student`` configures it, full Adagrad at ``train.sparse_lr``
  on the rows (the project trains row-wise Adagrad: one accumulator per row) and Adam at
  ``train.dense_lr`` (weight decay ``train.weight_decay``) on the MLPs;
- ``dlrm_l2``: the same, with MF's optimiser on the rows: Adam lr 0.01 and an L2 of 0.03 on the
  user and item rows a batch reads;
- ``dlrm_bias_dot``: ``dlrm``, plus a learned bias per user and per item and the user . item
  dot product added to the logit directly (what MF has);
- ``dlrm_bias_dot_l2``: that, with MF's optimiser and row L2;
- ``dlrm_dot``, ``dlrm_dot_l2``: the student with ``student.dot_logit`` (the dot product alone, no
  biases: no new parameters), with the rows' optimiser of ``dlrm`` / ``dlrm_l2``;
- ``dlrm_skip``, ``dlrm_skip_l2``: a learned linear skip from the interaction's output to the logit
  (zero at the start; its weight on the dot product is learned) instead of a fixed dot;
- ``mf``: the run's outside reference (:func:`sparse_kd.mf_reference.tuned_mf`, its grid).

    python benchmarks/probe_baseline.py --out docs/bench/baseline_probe.json
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from machine import machine_info, write_json  # noqa: E402

VARIANTS = ("dlrm", "dlrm_l2", "dlrm_bias_dot", "dlrm_bias_dot_l2", "dlrm_dot", "dlrm_dot_l2", "dlrm_skip", "dlrm_skip_l2", "mf")


def train_variant(ds, cfg, name: str, epochs: int, seed: int) -> dict:
    import numpy as np
    import torch

    from sparse_kd.data.batching import BatchBuilder, count_dense
    from sparse_kd.metrics import binary_metrics
    from sparse_kd.mf_reference import train_rows
    from sparse_kd.student.model import build_dlrm

    torch.manual_seed(seed)
    bb = BatchBuilder(ds, *count_dense(ds))
    bias_dot, skip_on = name.startswith("dlrm_bias_dot"), name.startswith("dlrm_skip")
    l2 = 0.03 if name.endswith("_l2") else 0.0
    # the dot product in the logit: the student's own student.dot_logit (sparse_kd.student.model.DotOverArch)
    student = dataclasses.replace(cfg.student, dot_logit=bias_dot or name.startswith("dlrm_dot"))
    model = build_dlrm({f.name: len(f.vocab) for f in ds.features}, bb.dense_dim, student, device="cpu")
    nf = len(ds.features)
    skip = torch.nn.Linear(cfg.student.embedding_dim + (nf + 1) * nf // 2, 1)  # over the interaction's output
    biases = torch.nn.ModuleList(torch.nn.Embedding(n, 1) for n in (ds.num_users, ds.num_items))
    for p in [*skip.parameters(), *biases.parameters()]:
        torch.nn.init.zeros_(p)
    ui = [bb.keys.index("user_id"), bb.keys.index("item_id")]

    def logits(batch):
        # DLRM.forward, split open (as sparse_kd.distill.module does) to reach the pooled rows
        pooled = model.sparse_arch(batch.sparse_features)  # (B, F, D)
        inter = model.inter_arch(model.dense_arch(batch.dense_features), pooled)
        out = model.over_arch(inter).squeeze(-1)
        if skip_on:
            out = out + skip(inter).squeeze(-1)
        if bias_dot:
            out = out + biases[0](batch.user).squeeze(1) + biases[1](batch.item).squeeze(1)
        return out, pooled[:, ui]

    rows = list(model.sparse_arch.parameters()) + (list(biases.parameters()) if bias_dot else [])
    mlps = [p for n, p in model.named_parameters() if not n.startswith("sparse_arch.")] + (
        list(skip.parameters()) if skip_on else [])
    opts = [torch.optim.Adam(rows, lr=0.01) if l2 else torch.optim.Adagrad(rows, lr=cfg.train.sparse_lr),
            torch.optim.Adam(mlps, lr=cfg.train.dense_lr, weight_decay=cfg.train.weight_decay)]  # as the project's dense optimizer
    evals = {s: bb.build(*(torch.from_numpy(np.ascontiguousarray(a)) for a in
                           (ds.splits[s].user.astype(np.int64), ds.splits[s].item.astype(np.int64), ds.splits[s].label)))
             for s in ("valid", "test")}
    valid, test, losses, since = [], [], [], 0
    for epoch in range(epochs):
        u, i, y = (torch.from_numpy(np.ascontiguousarray(a)) for a in train_rows(ds, seed, epoch))
        u, i, total, n, bs = u.long(), i.long(), 0.0, len(u), cfg.train.batch_size
        for lo in range(0, n, bs):
            batch = bb.build(u[lo:lo + bs], i[lo:lo + bs], y[lo:lo + bs])
            out, ids_rows = logits(batch)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(out, batch.labels)
            if l2:
                loss = loss + l2 * (ids_rows ** 2).sum(-1).mean(0).sum()
            for o in opts:
                o.zero_grad()
            loss.backward()
            for o in opts:
                o.step()
            total += loss.item() * len(batch.labels)
        losses.append(round(total / max(1, n), 4))
        with torch.no_grad():
            auc = {s: binary_metrics(logits(b)[0], b.labels)["auc"] for s, b in evals.items()}
        valid.append(round(auc["valid"], 4))
        test.append(round(auc["test"], 4))
        since = 0 if valid[-1] == max(valid) else since + 1
        if since >= 3:
            break
    best = int(np.argmax(valid))
    return {"best_epoch": best + 1, "epochs": len(valid), "valid_auc": valid[best], "test_auc": test[best],
            "valid_auc_by_epoch": valid, "train_loss_by_epoch": losses}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml", help="whose data, splits and student architecture")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--epochs", type=int, default=30, help="cap; each variant stops 3 epochs after its best")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--out", default="runs/bench/baseline_probe.json", help="JSON path")
    args = p.parse_args(argv)
    import torch

    from sparse_kd.config import load_config
    from sparse_kd.dist import DistEnv
    from sparse_kd.mf_reference import tuned_mf
    from sparse_kd.pipeline import prepare_data

    torch.set_num_threads(1)
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; expected some of {', '.join(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:  # prepare_data writes the run's data files: none are kept
        cfg = load_config(args.config, [*args.set, "nproc=1", f"output_dir={tmp}"])
        ds = prepare_data(cfg, DistEnv(0, 1, 0, torch.device("cpu"), "gloo"))
    info, results = machine_info(), {}
    for name in names:
        t0 = time.perf_counter()
        if name == "mf":
            r = tuned_mf(ds, dim=cfg.student.embedding_dim, seed=args.seed)
            res = {"best_epoch": r["best_epoch"], "epochs": r["epochs"], "valid_auc": round(r["valid"]["auc"], 4),
                   "test_auc": round(r["test"]["auc"], 4), "settings": r["settings"]}
        else:
            res = train_variant(ds, cfg, name, args.epochs, args.seed)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        results[name] = res
        print(f"{name:18s} valid AUC {res['valid_auc']:.4f}  test AUC {res['test_auc']:.4f}  "
              f"(best epoch {res['best_epoch']} of {res['epochs']}, {res['seconds']}s)", flush=True)
    write_json(args.out, {"benchmark": "baseline_probe", "command": " ".join(["probe_baseline.py", *(argv or sys.argv[1:])]),
                          "machine": info, "config": args.config, "overrides": args.set, "seed": args.seed,
                          "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
