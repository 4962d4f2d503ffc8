"""Row pruning of one embedding table: keep the important rows, remap ids, fill pruned ids.

Notation: N original rows (ids 0..N-1), K kept rows, R stored rows, D embedding dim.

A pruned table stores R rows: the K kept rows first, in original id order, then the fill rows.
Its remap (N,) int32 maps an original id to its stored row; -1 means "no row": FBGEMM's
quantized lookup (``IntNBitTableBatchedEmbeddingBagsCodegen`` with ``index_remapping``) then adds
nothing to the bag, i.e. the id contributes a zero vector. The compaction and the remap come from
FBGEMM's ``torch.ops.fbgemm.embedding_bag_rowwise_prune`` (given a 0/1 indicator of the kept
rows, which makes the selection exact even among tied scores); fills are built here.

What a pruned id gets (``CompressConfig.pruned_fill`` per feature, ``default_pruned_fill``):

``zero``  remap -1: a zero vector (R = K). The cheapest.
``mean``  one shared extra row, the mean of the pruned rows; every pruned id maps to it (R = K + 1).
``text``  a row per pruned entity computed from its teacher text embedding through a ridge map
          text -> row fit on the kept warm rows (penalty by leave-one-out). Every id keeps a row
          (R = N), so the table stays in original id order with the pruned rows overwritten in
          place and needs no remap: it saves no storage over not pruning, it replaces the pruned
          (rarely read) rows by their text prediction (compare fills with ``sparse-kd study
          compress CONFIG study.compress_fills=[zero,text]``; tables in
          ``docs/compress_study_*.md``). Only ``user_id`` / ``item_id`` have a text per row; for
          other features ``text`` falls back to ``mean`` (recorded in ``PrunedTable.fill``).

``cluster``       the pruned ids share C extra rows (R = K + C): a weighted k-means
          (:mod:`.cluster`) of the pruned rows themselves, each id weighted by its training reads
          plus a pseudo-count of one (``CLUSTER_PRIOR``), so rows never read in training (e.g.
          the text-derived rows weight transfer gives new items) still pull their centre; each
          stored cluster row is the weighted mean of its members' trained rows, and every pruned
          id maps to its cluster's row. Memory shrinks (C rows instead of N - K) and a pruned
          id keeps the coarse direction of its own row, not a zero.
``text_cluster``  the same, but the pruned ids are grouped by their teacher text embedding
          (L2-normalised) instead of by their rows; the stored row is still the weighted mean of
          the members' trained rows. Only ``user_id`` / ``item_id``; others fall back to ``cluster``.

C for the cluster fills is ``ceil(cluster_ratio * N)`` (at most N - K; :func:`num_clusters`).

A table kept whole (K = N) has no remap at all (no remap bytes, ids pass through).

Folded remaps (``CompressConfig.remap: fold``, :func:`fold_remaps`): every feature's ids reach
the model through the entity CSR (``mappings.json``: each user's / item's bag of ids per feature),
which the server holds whatever the compression. Composing the remap into that CSR (each value
replaced by its stored row, values mapped to -1 dropped from their bag) serves the very same
lookups with no remap in the model: the CSR keeps its size (one entry per id of a bag, fewer
for ``zero`` fills), and the table costs its stored rows only.

New entities after training (text only, no clicks): :func:`text_rows` computes their rows from
text with the same ridge map; :func:`sparse_kd.compress.artifact.add_items` appends them to an
artifact.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

import numpy as np
import torch

# fbgemm_gpu registers torch.ops.fbgemm on import
import fbgemm_gpu  # noqa: F401

from sparse_kd.compress.cluster import kmeans, weighted_means
from sparse_kd.compress.importance import (
    DEFAULT_RIDGE_L2,
    TEXT_FEATURES,
    RowImportance,
    fit_text_map,
    predict_rows,
    ranking,
)
from sparse_kd.config import FILLS, CompressConfig, ConfigError
from sparse_kd.data.schema import RecDataset

log = logging.getLogger(__name__)

CLUSTER_FILLS = ("cluster", "text_cluster")
#: reads added to every id's weight in the cluster fills (a never-read row still counts)
CLUSTER_PRIOR = 1.0
DEFAULT_CLUSTER_RATIO = CompressConfig.default_cluster_ratio
#: tables of at least this many rows report their pruning at INFO (smaller ones at DEBUG)
LOUD_ROWS = 1 << 17


@dataclass
class PrunedTable:
    """One table after pruning (fp32, before quantization).

    weight: (R, D) stored rows (kept rows in original id order, then fill rows).
    remap: (N,) int32 original id -> stored row (-1: zero vector), or None when nothing is pruned.
    text_map: (H + 1, D) ridge map text -> row fit on kept warm rows (entity tables only).
    clusters: C, the shared rows of a cluster fill (0 otherwise).
    folded: after :func:`fold_remaps`, the (N,) remap that was composed into the entity CSR
    (``remap`` is then None and ids arrive already remapped).
    """

    feature: str
    weight: torch.Tensor
    remap: Optional[torch.Tensor]
    num_original: int
    num_kept: int
    fill: str
    text_map: Optional[torch.Tensor] = None
    notes: list[str] = field(default_factory=list)
    clusters: int = 0
    folded: Optional[torch.Tensor] = None

    @property
    def num_rows(self) -> int:
        return int(self.weight.shape[0])

    @property
    def keep_ratio(self) -> float:
        return self.num_kept / max(1, self.num_original)

    def lookup_rows(self) -> torch.Tensor:
        """(N, D): the row each original id gets after pruning (zeros for remap -1), for references."""
        remap = self.remap if self.remap is not None else self.folded
        if remap is None:
            return self.weight.clone()
        out = torch.zeros(self.num_original, self.weight.shape[1])
        ok = remap >= 0
        out[ok] = self.weight[remap[ok].long()]
        return out


def num_to_keep(n: int, keep_ratio: float) -> int:
    """ceil(keep_ratio * n), at least 1 and at most n."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep ratio {keep_ratio} is not in (0, 1]")
    return min(n, max(1, int(math.ceil(keep_ratio * n - 1e-9))))


def num_clusters(n: int, kept: int, cluster_ratio: float) -> int:
    """C = ceil(cluster_ratio * n), at least 1 and at most the n - kept pruned ids (0 if none)."""
    if not 0.0 < cluster_ratio <= 1.0:
        raise ValueError(f"cluster ratio {cluster_ratio} is not in (0, 1]")
    pruned = n - kept
    return 0 if pruned <= 0 else min(pruned, max(1, int(math.ceil(cluster_ratio * n - 1e-9))))


def select_rows(imp: RowImportance, keep_ratio: Optional[float] = None, threshold: Optional[float] = None) -> np.ndarray:
    """Sorted (K,) int64 ids of the rows to keep: the top ``keep_ratio`` by :func:`ranking`, or
    every row scoring above ``threshold`` (at least the single most important row)."""
    if (keep_ratio is None) == (threshold is None):
        raise ValueError("give exactly one of keep_ratio and threshold")
    n = imp.scores.shape[0]
    if keep_ratio is not None:
        k = num_to_keep(n, keep_ratio)
        kept = ranking(imp)[:k]
    else:
        kept = np.flatnonzero(imp.scores > threshold)
        if kept.size == 0:
            kept = ranking(imp)[:1]
    return np.sort(kept).astype(np.int64)


def prune_table(
    feature: str,
    weight: torch.Tensor,
    kept: np.ndarray,
    fill: str = "zero",
    text: Optional[torch.Tensor] = None,
    fit_mask: Optional[np.ndarray] = None,
    l2: Optional[float] = DEFAULT_RIDGE_L2,
    clusters: int = 0,
    reads: Optional[np.ndarray] = None,
    seed: int = 0,
) -> PrunedTable:
    """Keep rows ``kept`` of ``weight`` (N, D); pruned ids get ``fill`` (see module doc).

    The compaction and remap come from ``torch.ops.fbgemm.embedding_bag_rowwise_prune``.

    text: (N, H) text embedding per row (entity tables); required for ``fill="text"`` and
    ``"text_cluster"``, and when given a ridge map is fit (for new entities) on rows that are
    kept and in ``fit_mask`` (default: kept rows; at most ``importance.RIDGE_MAX_ROWS`` of them).
    clusters: C >= 1 for the cluster fills; reads: (N,) training reads per row (their k-means
    weights, plus ``CLUSTER_PRIOR``; default 0); seed: the k-means seed.
    """
    if fill not in FILLS:
        raise ValueError(f"pruned fill {fill!r} is not valid; expected one of {', '.join(FILLS)}")
    weight = weight.detach().float().contiguous()
    n, d = weight.shape
    mask = np.zeros(n, dtype=bool)
    mask[np.asarray(kept, dtype=np.int64)] = True
    k = int(mask.sum())
    if k == 0:
        raise ValueError(f"{feature}: cannot prune every row")
    text_map = None
    if text is not None:
        fm = mask & (np.ones(n, dtype=bool) if fit_mask is None else np.asarray(fit_mask, dtype=bool))
        if not fm.any():
            fm = mask
        text_map = fit_text_map(text, weight, fm, l2)  # on at most RIDGE_MAX_ROWS of them
    if k == n:
        return PrunedTable(feature, weight.clone(), None, n, n, fill, text_map)
    if fill in CLUSTER_FILLS and clusters < 1:
        raise ValueError(f"{feature}: pruned_fill {fill!r} needs clusters >= 1, got {clusters}")
    if fill == "text_cluster" and text is None:
        raise ValueError(f"{feature}: pruned_fill 'text_cluster' needs a text embedding per row")
    if fill == "text":
        if text is None:
            raise ValueError(f"{feature}: pruned_fill 'text' needs a text embedding per row")
        assert text_map is not None
        # every id keeps a row, so keep original order and overwrite the pruned rows in place:
        # the same lookups as "kept rows first + a remap", without the remap's bytes
        rows = weight.clone()
        pruned = torch.from_numpy(~mask)
        rows[pruned] = predict_rows(text[pruned], text_map)
        return PrunedTable(feature, rows, None, n, k, fill, text_map)
    indicator = torch.from_numpy(mask.astype(np.float32))
    rows, remap = torch.ops.fbgemm.embedding_bag_rowwise_prune(weight, indicator, 0.5, torch.int32)
    assert rows.shape == (k, d) and int((remap >= 0).sum()) == k, (feature, rows.shape, k)
    pruned = torch.from_numpy(~mask)
    if fill == "mean":
        rows = torch.cat([rows, weight[pruned].mean(dim=0, keepdim=True)])
        remap[pruned] = k
    c = 0
    if fill in CLUSTER_FILLS:
        w = torch.from_numpy(np.zeros(n) if reads is None else np.asarray(reads, dtype=np.float64)) + CLUSTER_PRIOR
        members = weight[pruned]  # (N - K, D): one copy, the k-means space of "cluster" too
        if fill == "text_cluster":
            assert text is not None
            space = text[pruned].float()  # (N - K, H), normalised in place (no second copy)
            space /= space.norm(dim=1, keepdim=True).clamp_(min=1e-12)
        else:
            space = members
        assign, _ = kmeans(space, clusters, w[pruned], seed=seed)
        del space
        c = min(clusters, int(pruned.sum()))
        rows = torch.cat([rows, weighted_means(members, assign, c, w[pruned])])
        remap[pruned] = (k + assign).to(torch.int32)
    return PrunedTable(feature, rows.contiguous(), remap, n, k, fill, text_map, clusters=c)


def text_rows(text: torch.Tensor, text_map: torch.Tensor) -> torch.Tensor:
    """Rows for entities known only by text: text (K, H), map (H + 1, D) -> (K, D) float32."""
    if text.dim() != 2 or text.shape[1] + 1 != text_map.shape[0]:
        raise ValueError(f"text embeddings {tuple(text.shape)} do not fit the text map {tuple(text_map.shape)} (H + 1, D)")
    return predict_rows(text.float(), text_map)


def _check_features(cfg: CompressConfig, features: list[str]) -> None:
    for key in ("keep_ratio", "dtype", "pruned_fill", "cluster_ratio"):
        for f in getattr(cfg, key):
            if f not in features:
                raise ConfigError(f"compress.{key}.{f}: no such feature; features are {', '.join(features)}")


def table_settings(cfg: CompressConfig, features: list[str]) -> dict[str, dict]:
    """feature -> {"keep_ratio", "dtype", "fill", "cluster_ratio"} from the config (per-feature
    value or default)."""
    _check_features(cfg, features)
    return {
        f: {
            "keep_ratio": float(cfg.keep_ratio.get(f, cfg.default_keep_ratio)),
            "dtype": cfg.dtype.get(f, cfg.default_dtype),
            "fill": cfg.pruned_fill.get(f, cfg.default_pruned_fill),
            "cluster_ratio": float(cfg.cluster_ratio.get(f, cfg.default_cluster_ratio)),
        }
        for f in features
    }


def effective_fill(feature: str, fill: str, has_text: bool) -> tuple[str, Optional[str]]:
    """The fill a table really gets, and a note when it differs: ``text`` needs a text per row
    (else ``mean``), ``text_cluster`` too (else ``cluster``)."""
    if fill == "text" and not has_text:
        return "mean", f"{feature}: pruned_fill text needs a text per row; used mean"
    if fill == "text_cluster" and not has_text:
        return "cluster", f"{feature}: pruned_fill text_cluster needs a text per row; used cluster"
    return fill, None


def prune_tables(
    weights: Mapping[str, torch.Tensor],
    importances: Mapping[str, RowImportance],
    keep_ratios: Mapping[str, float],
    fills: Mapping[str, str],
    text: Optional[Mapping[str, torch.Tensor]] = None,
    cluster_ratios: Optional[Mapping[str, float]] = None,
) -> dict[str, PrunedTable]:
    """Prune every table. text: {"user": (U, H), "item": (I, H)} (for text fills and text maps);
    cluster_ratios: feature -> share of its ids that become cluster rows (cluster fills)."""
    out: dict[str, PrunedTable] = {}
    for f, w in weights.items():
        t0 = time.perf_counter()
        imp = importances[f]
        t = text[TEXT_FEATURES[f]] if (text is not None and f in TEXT_FEATURES) else None
        fill, note = effective_fill(f, fills.get(f, "zero"), t is not None)
        kept = select_rows(imp, keep_ratio=keep_ratios.get(f, 1.0))
        c = 0
        if fill in CLUSTER_FILLS:
            c = num_clusters(w.shape[0], len(kept), (cluster_ratios or {}).get(f, DEFAULT_CLUSTER_RATIO))
        say = log.info if w.shape[0] >= LOUD_ROWS else log.debug  # progress lines for big tables only
        say("prune: %s keeps %d of %d rows, fill %s%s", f, len(kept), w.shape[0], fill, f" ({c} clusters)" if c else "")
        pt = prune_table(f, w, kept, fill, t, fit_mask=imp.freq > 0, clusters=c, reads=imp.freq)
        if note:
            pt.notes.append(note)
        out[f] = pt
        say("prune: %s -> %d stored rows in %.1fs", f, pt.num_rows, time.perf_counter() - t0)
    return out


def fold_dataset(ds: RecDataset, remaps: Mapping[str, torch.Tensor]) -> RecDataset:
    """``ds`` with each feature of ``remaps`` (feature -> (N,) int remap, -1: dropped) composed into
    its entity CSR: every value v of a bag becomes remap[v], values mapped to -1 leave their bag.
    Splits and everything else are shared with ``ds``.

    Example: item 3's bag [3] under remap [.., 3 -> 7, ..] becomes [7]; under 3 -> -1, [].
    """
    feats = []
    for f in ds.features:
        r = remaps.get(f.name)
        if r is None:
            feats.append(f)
            continue
        r = np.asarray(torch.as_tensor(r).cpu().numpy(), dtype=np.int64)
        if r.shape[0] != f.num_embeddings:
            raise ValueError(f"remap of {f.name} has {r.shape[0]} entries but the feature has {f.num_embeddings} ids")
        mapped = r[f.values]  # (nnz,)
        keep = mapped >= 0
        owner_of_value = np.repeat(np.arange(len(f.offsets) - 1), np.diff(f.offsets))
        lengths = np.bincount(owner_of_value[keep], minlength=len(f.offsets) - 1)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        feats.append(dataclasses.replace(f, offsets=offsets, values=mapped[keep].astype(np.int64)))
    return dataclasses.replace(ds, features=feats)


def fold_remaps(ds: RecDataset, pruned: Mapping[str, PrunedTable],
                features: Optional[Iterable[str]] = None) -> tuple[RecDataset, dict[str, PrunedTable]]:
    """Compose every pruned table's remap (or only those of ``features``) into the entity CSR
    (module doc, "Folded remaps").

    Returns (the dataset whose bags hold stored rows, the tables: the folded ones have the same
    rows, ``remap`` None and the composed remap kept in ``folded``)."""
    only = None if features is None else set(features)
    remaps = {f: pt.remap for f, pt in pruned.items() if pt.remap is not None and (only is None or f in only)}
    out = {f: (dataclasses.replace(pt, remap=None, folded=pt.remap) if f in remaps else pt) for f, pt in pruned.items()}
    return fold_dataset(ds, remaps), out
