"""bench_lookup's data and tables: Zipf ids, one batch in every layout, and the fp32, quantized,
pruned and hot-first tables with the serving lookups built from them, as ``sparse-kd compress``
builds them (``benchmarks/bench_lookup.py`` measures them; ``bench_lookup_paths.py`` reuses them)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import fbgemm_gpu  # noqa: E402,F401  (registers torch.ops.fbgemm)
from torch import nn  # noqa: E402
from torch.ao import quantization as quant  # noqa: E402
from torchrec.modules.embedding_configs import EmbeddingBagConfig, QuantConfig  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

from sparse_kd.compress import cpu_kernel as CK  # noqa: E402
from sparse_kd.compress import tiers as TI  # noqa: E402
from sparse_kd.compress.layout import reorder_table  # noqa: E402
from sparse_kd.compress.prune import PrunedTable  # noqa: E402
from sparse_kd.serve import cpu_model as CM  # noqa: E402



# ----------------------------------------------------------------------------------------------
# Data


def zipf_sampler(rows: int, a: float, gen: torch.Generator) -> Callable[[int], torch.Tensor]:
    """ids ~ Zipf(a) over ``rows`` (a <= 0: uniform); rank r is row perm[r] (hot rows scattered)."""
    perm = torch.randperm(rows, generator=gen)
    if a <= 0:
        return lambda n: torch.randint(0, rows, (n,), generator=gen)
    cdf = torch.arange(1, rows + 1, dtype=torch.float64).pow_(-a).cumsum_(0)
    cdf /= cdf[-1].clone()

    def sample(n: int) -> torch.Tensor:
        u = torch.rand(n, generator=gen, dtype=torch.float64)
        ranks = torch.searchsorted(cdf, u).clamp_(max=rows - 1)
        return perm[ranks]

    sample.rank_to_row = perm  # type: ignore[attr-defined]
    return sample


class Batch:
    """One batch in every layout: a KJT (torchrec), values + lengths (the serving lookup) and
    per-table (ids, offsets) views, int64 and int32 (the nn.EmbeddingBag floors)."""

    def __init__(self, keys: List[str], values: torch.Tensor, lengths: torch.Tensor, T: int, B: int) -> None:
        self.kjt = KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths)
        self.kjt.offsets()  # cache
        self.values, self.lengths = values, lengths
        offsets = torch.zeros(T * B + 1, dtype=torch.int64)
        offsets[1:] = lengths.cumsum(0)
        self.per_table = []
        for t in range(T):
            s, e = int(offsets[t * B]), int(offsets[(t + 1) * B])
            self.per_table.append((values[s:e], (offsets[t * B : (t + 1) * B] - s).contiguous()))
        self.per_table_i32 = [(i.int(), o.int()) for i, o in self.per_table]
        self.ids = int(values.numel())
        # the ids as the serving lookup gets them: int32, as the predictor's entity bags hold them
        # for CPU artifacts (whole tables' ids permuted too under --layout served)
        self.values32 = values.int()
        self.served_values = self.values32
        self.ids_per_table = [int(offsets[(t + 1) * B] - offsets[t * B]) for t in range(T)]


def make_batches(args: argparse.Namespace, samplers: List[Callable[[int], torch.Tensor]], gen: torch.Generator) -> List[Batch]:
    T, B, L = args.tables, args.batch, args.bag
    keys = [f"f{t}" for t in range(T)]
    out = []
    for _ in range(args.num_batches):
        # bag sizes uniform in [max(1, L/2), 3L/2]: mean ~L ids per bag
        lo, hi = max(1, L // 2), max(1, L // 2) + L
        lengths = torch.randint(lo, hi + 1, (T * B,), generator=gen)
        per = lengths.view(T, B).sum(1).tolist()
        values = torch.cat([samplers[t](int(per[t])) for t in range(T)])
        out.append(Batch(keys, values, lengths, T, B))
    return out


# ----------------------------------------------------------------------------------------------
# Models


def build_fp32(args: argparse.Namespace, gen: torch.Generator) -> EmbeddingBagCollection:
    tables = [
        EmbeddingBagConfig(name=f"t{t}", embedding_dim=args.dim, num_embeddings=args.rows, feature_names=[f"f{t}"])
        for t in range(args.tables)
    ]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    for t in range(args.tables):
        w = torch.empty(args.rows, args.dim).uniform_(-0.1, 0.1, generator=gen)
        ebc.embedding_bags[f"t{t}"] = nn.EmbeddingBag.from_pretrained(w, freeze=True, mode="sum")
    return ebc


def quantize(ebc: EmbeddingBagCollection, dtype: torch.dtype) -> QuantEBC:
    """torchrec's own path: qconfig + ``quant.embedding_modules.EmbeddingBagCollection.from_float``."""
    ebc.qconfig = QuantConfig(  # type: ignore[attr-defined]
        activation=quant.PlaceholderObserver.with_args(dtype=torch.float),
        weight=quant.PlaceholderObserver.with_args(dtype=dtype),
        per_table_weight_dtype={c.name: dtype for c in ebc.embedding_bag_configs()},
    )
    try:
        return QuantEBC.from_float(ebc)
    finally:
        del ebc.qconfig


def prune_tables(
    ebc: EmbeddingBagCollection, keep: float, samplers: List[Any], gen: torch.Generator
) -> tuple[EmbeddingBagCollection, List[torch.Tensor]]:
    """Keep ``keep`` of each table's rows (the most frequent ones under Zipf, random under uniform),
    compacted by ``torch.ops.fbgemm.embedding_bag_rowwise_prune``; returns the small fp32 EBC and
    the per-table remaps (original id -> kept row, -1 if pruned)."""
    configs, weights, remaps = [], {}, []
    for cfg in ebc.embedding_bag_configs():
        w = ebc.embedding_bags[cfg.name].weight.detach()
        rows = w.shape[0]
        n_keep = max(1, int(round(rows * keep)))
        sampler = samplers[len(remaps)]
        ranked = getattr(sampler, "rank_to_row", None)
        kept_rows = ranked[:n_keep] if ranked is not None else torch.randperm(rows, generator=gen)[:n_keep]
        indicator = torch.zeros(rows)
        indicator[kept_rows] = 1.0
        pruned, remap = torch.ops.fbgemm.embedding_bag_rowwise_prune(w, indicator, 0.5, torch.int32)
        configs.append(
            EmbeddingBagConfig(
                name=cfg.name, embedding_dim=cfg.embedding_dim, num_embeddings=pruned.shape[0], feature_names=cfg.feature_names
            )
        )
        weights[cfg.name] = pruned
        remaps.append(remap)
    small = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    for name, w in weights.items():
        small.embedding_bags[name] = nn.EmbeddingBag.from_pretrained(w, freeze=True, mode="sum")
    return small, remaps


def hot_first_tables(ebc: EmbeddingBagCollection, remaps: Optional[List[torch.Tensor]], train_ids: List[torch.Tensor]
                     ) -> tuple[EmbeddingBagCollection, List[Optional[torch.Tensor]]]:
    """``ebc``'s tables stored hot-first by the reads of ``train_ids`` (per table), exactly as
    :func:`sparse_kd.compress.layout.reorder_table` lays out an artifact. Returns (the reordered
    tables, per table: the new remap of a pruned table, or the id permutation of a whole one)."""
    configs, weights, out = [], {}, []
    for t, cfg in enumerate(ebc.embedding_bag_configs()):
        w = ebc.embedding_bags[cfg.name].weight.detach()
        remap = None if remaps is None else remaps[t]
        n = int(remap.numel()) if remap is not None else int(w.shape[0])
        freq = torch.bincount(train_ids[t], minlength=n).numpy()
        pt, _ = reorder_table(PrunedTable(cfg.feature_names[0], w, remap, n, int(w.shape[0]), "zero"), freq)
        configs.append(cfg)
        weights[cfg.name] = pt.weight
        out.append(pt.remap)
    hot = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    for name, w in weights.items():
        hot.embedding_bags[name] = nn.EmbeddingBag.from_pretrained(w, freeze=True, mode="sum")
    return hot, out


def tbe_row_bytes(qebc: QuantEBC) -> List[int]:
    """Padded bytes of one stored row per feature, read off the FBGEMM modules themselves."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import rounded_row_size_in_bytes

    out: List[int] = []
    for tbe in qebc._emb_modules:
        for t in tbe.feature_table_map:
            _n, _rows, dim, ty, _loc = tbe.embedding_specs[t]
            out.append(int(rounded_row_size_in_bytes(dim, ty, tbe.row_alignment, tbe.scale_bias_size_in_bytes)))
    return out


def tier_name(spec: str) -> str:
    return f"tiers({spec})"


def serving_lookup(ebc: EmbeddingBagCollection, dt: str, remaps: Optional[List[torch.Tensor]]) -> CM.QuantizedLookup:
    """The CPU serving lookup over ``ebc``'s tables (their stored rows, hot-first with ``--layout
    served``), quantized to ``dt`` (one dtype, or precision tiers) exactly as ``sparse-kd
    compress`` does (:func:`sparse_kd.compress.tiers.qtable`)."""
    tables = []
    for t, cfg in enumerate(ebc.embedding_bag_configs()):
        w = ebc.embedding_bags[cfg.name].weight.detach()
        remap = None if remaps is None else remaps[t]
        tables.append(CK.pack_table(TI.qtable(cfg.feature_names[0], w, dt, remap)))
    return CM.QuantizedLookup(tables)


def lookup_row_bytes(lookup: CM.QuantizedLookup) -> List[float]:
    """Bytes per stored row of each table (a tiered table's: averaged over its rows)."""
    return [CK.cpu_table_bytes(t)["row_bytes"] for t in lookup.tables]


def without_remap(t: Any) -> Any:
    """The same table with no remap (``remap: fold``: ids arrive as stored rows)."""
    if hasattr(t, "starts"):
        return CM.TieredTable(t.feature, t.qtype, t.dim, list(t.tiers), t.starts, None)
    return CM.PackedTable(t.feature, t.qtype, t.dim, t.weight, None)
