"""Distillation after compression (``compress.finetune``): the compressed model fitted to the
uncompressed student, then quantized again.

Compression's loss in the method this project follows is L_COMP = mean over examples of
l(g(x; M) - f(x; S)): the compressed model M fitted to the trained student S. Post-training
pruning and quantization only approximate S's rows; this stage trains M itself, briefly:

* **what M computes**: every table as it will be served: pruned ids on their fill rows, each
  stored row read through its dtype's quantization (a tiered table's row through its tier's:
  :mod:`~.tiers`, tiers by training reads as the stage stores them), by FBGEMM's min/max
  quantizer (the rows are quantized again at every step: ``compress.quantizer: mse`` would cost
  most of the step; the final quantization uses it). The quantization is straight-through: its
  forward is the quantize-dequantize of the rows a batch reads, its gradient passes to the fp32
  rows unchanged;
* **what is trained**: the kept rows (row-wise Adagrad on the rows a batch reads, as the student
  trained) and the dense and over archs (Adam). Fill rows (zero, mean, cluster, text) stay as
  pruning made them, so the same compression settings rebuild the same fills;
* **the loss**: ``(1 - kd_weight)`` x BCE with the labels + ``kd_weight`` x T^2 x BCE with the
  student's soft predictions at temperature T (the student S, fp32, no gradient), on ``train``;
* **after**: the trained rows go back into a copy of S at their original ids, and the caller
  compresses that copy with the same settings and importances (:func:`sparse_kd.compress.stage.
  compress_run`), which quantizes the trained rows again. Whether the result is kept is decided
  there, on valid (+ ``cold_weight`` x valid_cold), never test.

It runs in one process on the CPU (the tables of one machine's memory; a sharded version under
``DistributedModelParallel`` is not built). Notation: B batch, F tables, D dim, R stored rows.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Mapping, Optional

import numpy as np
import torch
from torch import nn

from sparse_kd.compress import rows as QR
from sparse_kd.compress import tiers as TI
from sparse_kd.compress.layout import row_reads
from sparse_kd.compress.prune import PrunedTable
from sparse_kd.data.batching import BatchBuilder
from sparse_kd.data.schema import RecDataset

log = logging.getLogger(__name__)


@dataclass
class FinetuneResult:
    model: nn.Module  # a copy of the student with the trained rows and dense layers
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


class _Table:
    """One table of the compressed model being trained: stored rows (R, D), the remap, the dtype
    of each row, which rows train (the kept ones), and row-wise Adagrad state."""

    def __init__(self, pt: PrunedTable, dtype: str, freq: np.ndarray) -> None:
        self.pt = pt
        self.rows = pt.weight.detach().clone().float()
        self.remap = None if pt.remap is None else pt.remap.long()
        self.dtypes, self.which = TI.row_tiers(dtype, pt.num_rows, row_reads(pt, freq))
        self.state = torch.zeros(pt.num_rows)

    def stored(self, ids: torch.Tensor) -> torch.Tensor:
        """Stored row of each id (R: none, read as zero)."""
        if self.remap is None:
            return ids.long()
        r = self.remap[ids.long()]
        return torch.where(r >= 0, r, torch.full_like(r, self.pt.num_rows))

    def quantized(self, u: torch.Tensor) -> torch.Tensor:
        """Rows ``u`` read through their dtypes (no gradient), by FBGEMM's own min/max quantizer
        while training (fast); the final quantization uses compress.quantizer (mse is never worse
        row by row)."""
        return TI.fake_quantize(self.rows[u], self.dtypes, self.which[u])


class _FakeQuantDLRM:
    """The student's dense layers (copies, trained) over :class:`_Table` lookups."""

    def __init__(self, model: nn.Module, tables: Mapping[str, _Table], keys: list[str]) -> None:
        self.dense_arch = copy.deepcopy(model.dense_arch).train()
        self.inter_arch = copy.deepcopy(model.inter_arch).train()
        self.over_arch = copy.deepcopy(model.over_arch).train()
        self.tables, self.keys = tables, keys

    def parameters(self):
        for m in (self.dense_arch, self.inter_arch, self.over_arch):
            yield from m.parameters()

    def forward(self, batch) -> tuple[torch.Tensor, list[tuple[_Table, torch.Tensor, torch.Tensor]]]:
        """Logits (B,) and, per table, (table, rows read (u,), their leaf (u, D) for the update)."""
        kjt = batch.sparse_features
        pooled, reads = [], []
        for f in self.keys:
            jt = kjt[f]
            t = self.tables[f]
            stored = t.stored(jt.values())
            zero = t.pt.num_rows
            u, local = torch.unique(stored, return_inverse=True)
            real = u < zero
            q = torch.zeros(u.numel(), t.rows.shape[1])
            if bool(real.any()):
                q[real] = t.quantized(u[real])
            leaf = t.rows[u.clamp(max=max(zero - 1, 0))].clone() * real[:, None]
            leaf.requires_grad_(True)
            ste = leaf + (q - leaf).detach()  # straight through: forward q, gradient to the fp32 rows
            pooled.append(nn.functional.embedding_bag(local, ste, jt.offsets(), mode="sum", include_last_offset=True))
            reads.append((t, u, leaf))
        dense = self.dense_arch(batch.dense_features)
        inter = self.inter_arch(dense, torch.stack(pooled, 1))
        return self.over_arch(inter).reshape(-1), reads


def _kd_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, kd_weight: float,
             temperature: float) -> torch.Tensor:
    bce = nn.functional.binary_cross_entropy_with_logits
    hard = bce(logits, labels)
    soft = bce(logits / temperature, torch.sigmoid(teacher / temperature)) * temperature ** 2
    return (1 - kd_weight) * hard + kd_weight * soft


def finetune(model: nn.Module, ds: RecDataset, builder: BatchBuilder, pruned: Mapping[str, PrunedTable],
             dtypes: Mapping[str, str], freqs: Mapping[str, np.ndarray], *,
             epochs: int = 1, batch_size: int = 1024, dense_lr: float = 1e-4, row_lr: float = 0.01,
             kd_weight: float = 0.5, temperature: float = 2.0, seed: int = 0,
             max_steps: Optional[int] = None) -> FinetuneResult:
    """Train the compressed model (module doc) on ``ds``'s train split; return a copy of ``model``
    (not modified) holding the trained kept rows and dense layers. ``pruned``: every table pruned
    and filled as the compression settings make it (before folding or reordering)."""
    t0 = time.perf_counter()
    ebc = model.sparse_arch.embedding_bag_collection
    keys = [f for c in ebc.embedding_bag_configs() for f in c.feature_names]
    for c in ebc.embedding_bag_configs():
        if "SUM" not in str(c.pooling):
            raise ValueError(f"compress.finetune: table {c.name} pools by {c.pooling}; only sum pooling is supported")
    tables = {f: _Table(pruned[f], dtypes[f], freqs[f]) for f in keys}
    m = _FakeQuantDLRM(model, tables, keys)
    opt = torch.optim.Adam(list(m.parameters()), lr=dense_lr)
    teacher = copy.deepcopy(model).eval()
    sp = ds.splits["train"]
    gen = np.random.default_rng(seed)
    history = []
    step = 0
    for epoch in range(epochs):
        order = gen.permutation(len(sp))
        total, n = 0.0, 0
        for lo in range(0, len(order), batch_size):
            idx = np.sort(order[lo: lo + batch_size])
            b = builder.build(torch.from_numpy(sp.user[idx]), torch.from_numpy(sp.item[idx]),
                              torch.from_numpy(sp.label[idx]))
            with torch.no_grad():
                t_logits = teacher(b.dense_features, b.sparse_features).reshape(-1)
            logits, reads = m.forward(b)
            loss = _kd_loss(logits, b.labels.float(), t_logits, kd_weight, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for t, u, leaf in reads:  # row-wise Adagrad on the kept rows read
                    train = u < t.pt.num_kept
                    if leaf.grad is None or not bool(train.any()):
                        continue
                    g, rows = leaf.grad[train], u[train]
                    t.state[rows] += g.pow(2).mean(1)
                    t.rows[rows] -= row_lr * g / (t.state[rows].sqrt()[:, None] + 1e-10)
            total += float(loss) * len(idx)
            n += len(idx)
            step += 1
            if max_steps is not None and step >= max_steps:
                break
        history.append({"epoch": epoch, "loss": total / max(n, 1), "examples": n})
        log.info("compress.finetune: epoch %d, loss %.5f over %d examples (%.0fs)", epoch, total / max(n, 1), n,
                 time.perf_counter() - t0)
        if max_steps is not None and step >= max_steps:
            break
    tuned = copy.deepcopy(model).eval()
    tuned.dense_arch.load_state_dict(m.dense_arch.state_dict())
    tuned.inter_arch.load_state_dict(m.inter_arch.state_dict())
    tuned.over_arch.load_state_dict(m.over_arch.state_dict())
    tebc = tuned.sparse_arch.embedding_bag_collection
    with torch.no_grad():
        for f in keys:
            t = tables[f]
            w = tebc.embedding_bags[QR.table_name(f)].weight
            if t.remap is None:
                w.copy_(t.rows)
                continue
            kept_ids = (t.remap >= 0) & (t.remap < t.pt.num_kept)
            ids = kept_ids.nonzero().squeeze(1)
            w[ids] = t.rows[t.remap[ids]]
    if not all(math.isfinite(h["loss"]) for h in history):
        raise RuntimeError("compress.finetune: the loss is not finite; lower compress.finetune.row_lr / dense_lr")
    return FinetuneResult(tuned, history, time.perf_counter() - t0)
