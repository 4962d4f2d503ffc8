"""What a ranker costs: parameters (tables and dense layers) and multiply-adds per example.

Notation: F sparse features, D embedding dim, Dd dense input width.

Parameters are counted on the real model (table rows x D for every table, plus every dense
parameter); multiply-adds per example are measured, not estimated: one forward of the same
architecture (tables of 2 rows, same D) on one example under ``torch.utils.flop_counter``,
which counts every matmul (MLPs, DCN cross layers, the pairwise dot products) and halves the
FLOPs. Embedding pooling (F x D adds of the looked-up rows) is not a multiply-add and is left
out; a pair feature module (the teacher ranker's history feature) is counted with the rest.

Example::

    c = ranker_cost({"user_id": 943, "item_id": 1682}, dense_in=4, arch=arch_of(StudentConfig()))
    c["params"], c["macs_per_example"]
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from sparse_kd.report import markdown_table
from sparse_kd.student.model import Arch, build_dlrm


def ranker_cost(num_embeddings: Mapping[str, int], dense_in: int, arch: Arch,
                pair_feature: Optional[nn.Module] = None) -> dict:
    """{"params", "table_params", "dense_params", "macs_per_example", "embedding_dim"} of a ranker
    with these tables (rows per feature, KJT key order), ``dense_in`` dense inputs (pair features
    included) and architecture ``arch``."""
    table_params = sum(int(n) * arch.embedding_dim for n in num_embeddings.values())
    probe = build_dlrm({f: 2 for f in num_embeddings}, dense_in, arch, device="cpu").eval()
    dense_params = sum(p.numel() for n, p in probe.named_parameters() if not n.startswith("sparse_arch."))
    pair_params = sum(p.numel() for p in pair_feature.parameters()) if pair_feature is not None else 0
    keys = list(num_embeddings)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=torch.zeros(len(keys), dtype=torch.long),
                                              lengths=torch.ones(len(keys), dtype=torch.int32))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        probe(torch.zeros(1, dense_in), kjt)
        if pair_feature is not None:
            pair_feature(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    return {
        "params": int(table_params + dense_params + pair_params),
        "table_params": int(table_params),
        "dense_params": int(dense_params + pair_params),
        "macs_per_example": int(counter.get_total_flops() // 2),
        "embedding_dim": arch.embedding_dim,
    }


def cost_table(costs: Mapping[str, dict], examples_per_s: Mapping[str, float], reference: str = "baseline") -> str:
    """A markdown table of each ranker's cost, with its ratio to ``reference`` (the student's size)."""
    ref = costs.get(reference)
    rows = []
    for name, c in costs.items():
        ratio = (f"{c['params'] / max(1, ref['params']):.1f}x / {c['macs_per_example'] / max(1, ref['macs_per_example']):.1f}x"
                 if ref else "")
        rows.append([name, c["embedding_dim"], f"{c['params']:,}", f"{c['table_params']:,}", f"{c['dense_params']:,}",
                     f"{c['macs_per_example']:,}", f"{examples_per_s.get(name, 0.0):,.0f}", ratio])
    return markdown_table(["ranker", "D", "params", "table params", "dense params", "MACs / example",
                           "train examples/s", f"x {reference} (params / MACs)"], rows)
