"""Why an ID-only DLRM baseline can sit far below matrix factorisation: the same architecture in
plain PyTorch (no torchrec, no sharding), so that a gap here is the model's, not the training path's.

On a config's splits (default: the demo's), each variant trains single-process with its best
epoch on valid AUC (patience 3, ``--epochs`` as a cap), and reports valid / test AUC there:

- ``dlrm``: the student's architecture (``student.dense_arch`` with ReLU; the pairwise dot
  products of the dense output and every feature's embedding, upper triangle; ``student.over_arch``),
  torchrec's default row init (uniform +-sqrt(1/rows)), full Adagrad at ``train.sparse_lr`` on the
  rows (torchrec trains row-wise Adagrad: one accumulator per row) and Adam at ``train.dense_lr``;
- ``dlrm_l2``: the same, with MF's optimiser on the rows: Adam lr 0.01 and an L2 of 0.03 on the
  user and item rows a batch reads;
- ``dlrm_bias_dot``: ``dlrm``, plus a learned bias per user and per item and the user . item
  dot product added to the logit directly (what MF has);
- ``dlrm_bias_dot_l2``: that, with MF's optimiser on the rows: Adam lr 0.01 and an L2 of 0.03
  on the rows a batch reads;
- ``mf``: the run's outside reference (:func:`sparse_kd.mf_reference.tuned_mf`, its grid).

    python benchmarks/probe_baseline.py --out docs/bench/baseline_probe.json
"""

from __future__ import annotations

import argparse
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

VARIANTS = ("dlrm", "dlrm_l2", "dlrm_bias_dot", "dlrm_bias_dot_l2", "mf")


def mlp(sizes: List[int], last_relu: bool):
    import torch

    layers = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if last_relu or k < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def build(ds, cfg, bias_dot: bool):
    """The DLRM of ``cfg.student`` over ``ds``'s single-id features and its two count features."""
    import torch

    D, feats = cfg.student.embedding_dim, ds.features
    F = len(feats) + 1

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.ModuleList(torch.nn.Embedding(len(f.vocab), D) for f in feats)
            for e in self.emb:
                torch.nn.init.uniform_(e.weight, -(1 / e.num_embeddings) ** 0.5, (1 / e.num_embeddings) ** 0.5)
            self.dense = mlp([2] + list(cfg.student.dense_arch), last_relu=True)
            self.over = mlp([D + F * (F - 1) // 2] + list(cfg.student.over_arch), last_relu=False)
            self.bias = torch.nn.ModuleList(torch.nn.Embedding(len(f.vocab), 1) for f in feats[:2])
            for b in self.bias:
                torch.nn.init.zeros_(b.weight)
            self.tri = torch.triu_indices(F, F, 1)

        def forward(self, cols, dense):
            d = self.dense(dense)
            x = torch.stack([d] + [e(c) for e, c in zip(self.emb, cols)], 1)
            z = x @ x.transpose(1, 2)
            out = self.over(torch.cat([d, z[:, self.tri[0], self.tri[1]]], 1)).squeeze(1)
            if bias_dot:  # feats[0], feats[1]: user_id, item_id
                out = out + self.bias[0](cols[0]).squeeze(1) + self.bias[1](cols[1]).squeeze(1) + (x[:, 1] * x[:, 2]).sum(1)
            return out

    return Net()


def train_variant(ds, cfg, name: str, epochs: int, seed: int) -> dict:
    import numpy as np
    import torch

    from sparse_kd.data.batching import count_dense
    from sparse_kd.metrics import binary_metrics
    from sparse_kd.mf_reference import train_rows

    torch.manual_seed(seed)
    ub, ib = count_dense(ds)

    def tensors(user, item, label):
        return (torch.from_numpy(np.ascontiguousarray(user, dtype=np.int64)),
                torch.from_numpy(np.ascontiguousarray(item, dtype=np.int64)),
                torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32)))

    def batch(u, i, y):
        cols = [torch.from_numpy(f.values[f.offsets[(u if f.owner == "user" else i).numpy()]]) for f in ds.features]
        return cols, torch.cat([ub[u], ib[i]], 1), y

    net = build(ds, cfg, bias_dot=name.startswith("dlrm_bias_dot"))
    row_params = list(net.emb.parameters()) + list(net.bias.parameters())
    dense = list(net.dense.parameters()) + list(net.over.parameters())
    l2 = 0.03 if name.endswith("_l2") else 0.0
    opts = [torch.optim.Adam(row_params, lr=0.01) if l2 else torch.optim.Adagrad(row_params, lr=cfg.train.sparse_lr),
            torch.optim.Adam(dense, lr=cfg.train.dense_lr)]
    evals = {s: batch(*tensors(ds.splits[s].user, ds.splits[s].item, ds.splits[s].label)) for s in ("valid", "test")}
    valid, test, losses, since = [], [], [], 0
    for epoch in range(epochs):
        # the examples MF and the rankers train on: the stored split, or its positives with this
        # epoch's sampled negatives (per_epoch negatives), permuted
        u, i, y = tensors(*train_rows(ds, seed, epoch))
        total, n, bs = 0.0, len(u), cfg.train.batch_size
        for lo in range(0, n, bs):
            cols, d, y_b = batch(u[lo:lo + bs], i[lo:lo + bs], y[lo:lo + bs])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(net(cols, d), y_b)
            if l2:
                loss = loss + l2 * sum((e(c) ** 2).sum(1).mean() for e, c in zip(net.emb[:2], cols[:2]))
            for o in opts:
                o.zero_grad()
            loss.backward()
            for o in opts:
                o.step()
            total += loss.item() * len(y_b)
        losses.append(round(total / max(1, n), 4))
        with torch.no_grad():
            auc = {s: binary_metrics(net(*evals[s][:2]), evals[s][2])["auc"] for s in evals}
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
