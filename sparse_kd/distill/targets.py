"""Alignment targets held in a frozen, row-wise sharded torchrec table (``distill.align.layout``).

Notation: U users, I items, H target dim, W ranks, B examples per rank and batch.

The alignment loss (:mod:`sparse_kd.distill.module`) reads, for each example, the target row of
its user and of its item: teacher text embeddings, or the teacher ranker's rows (hints).

- ``replicated``: every rank holds all (U, H) and (I, H) rows as buffers and reads a batch's rows
  with ``index_select``. At U = 1M and H = 384 that is 1.5 GB on every rank, whatever W.
- ``sharded`` (``auto`` above 1 GiB per rank, :func:`sharded_layout`): the rows are the weights of an EmbeddingBagCollection (:func:`target_collection`,
  one table per aligned feature) planned row_wise over all ranks
  (:func:`sparse_kd.student.sharding.build_plan`). Each rank holds about U/W rows. A batch's rows
  come through torchrec's all-to-all, the path of the ID tables, looked up by the batch's
  :func:`~sparse_kd.data.batching.target_ids`.

The table is never trained:
- its output is detached, so no backward reaches the kernel;
- its in-backward optimizer is SGD at learning rate 0;
- :func:`sparse_kd.student.optim.combined_optimizer` leaves it out;
- checkpoints do not save it (:data:`sparse_kd.checkpoint.FROZEN_MODULE`).
Its rows are written from their source at every start (:func:`write_targets`), each rank only
its own shard. The loss is the same as with replicated targets (tested).

The teacher ranker's user features can live in the same table
(``distill.teacher_ranker.features_layout: sharded``, key :data:`~sparse_kd.data.batching.USER_ROWS_KEY`):
looked up for every batch, training or not, and put into its dense input.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from sparse_kd.checkpoint import FROZEN_MODULE, frozen
from sparse_kd.data.batching import ITEM_ROWS_KEY, USER_ROWS_KEY

MODULE = FROZEN_MODULE  # the training wrapper's attribute that holds the table
AUTO_SHARD_BYTES = 1 << 30  # layout auto: shard when a rank would hold more than this replicated
WRITE_CHUNK = 1 << 16  # rows copied at a time: no temporary as large as a shard
COSINE_EPS = 1e-8  # F.cosine_similarity's default eps


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero), as ``F.cosine_similarity`` scales them."""
    x = x.float()
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(COSINE_EPS)


def target_block(src, lo: int, hi: int, unit: bool) -> torch.Tensor:
    """Rows ``lo:hi`` of a target source (a tensor or a row source) as fp32, unit rows when ``unit``."""
    rows = src[lo:hi]
    return unit_rows(rows) if unit else rows.float()


def held_rows(rows, unit: bool) -> torch.Tensor:
    """Replicated targets: ``rows`` (N, H) as one fp32 tensor, unit rows when ``unit``. A row
    source read by blocks (:class:`~sparse_kd.distill.history.HistoryRows`) is written into the
    result :data:`WRITE_CHUNK` rows at a time, with no second (N, H) copy."""
    if isinstance(rows, torch.Tensor):
        return target_block(rows, 0, rows.shape[0], unit)
    out = torch.empty(tuple(rows.shape))
    for lo in range(0, out.shape[0], WRITE_CHUNK):
        hi = min(out.shape[0], lo + WRITE_CHUNK)
        out[lo:hi] = target_block(rows, lo, hi, unit)
    return out


def sharded_layout(layout: str, shapes: Mapping[str, tuple[int, int]], world_size: int) -> bool:
    """Whether ``distill.align.layout`` puts targets of ``shapes`` (feature -> (rows, H)) in the
    sharded table on ``world_size`` ranks. ``auto``: when there are several ranks, every dim suits
    the fused tables, and the replicated fp32 rows would exceed :data:`AUTO_SHARD_BYTES` per rank
    (replicated is faster: one ``index_select``, no all-to-all)."""
    if layout != "auto":
        return layout == "sharded"
    replicated = sum(n * h * 4 for n, h in shapes.values())
    return world_size > 1 and all(h % 4 == 0 for _, h in shapes.values()) and replicated > AUTO_SHARD_BYTES


def target_collection(shapes: Mapping[str, tuple[int, int]]) -> EmbeddingBagCollection:
    """table key -> (rows, H) => an EmbeddingBagCollection on ``meta`` with one table per key
    (:data:`~sparse_kd.data.batching.TARGET_KEYS` values, :data:`~sparse_kd.data.batching.USER_ROWS_KEY`,
    :data:`~sparse_kd.data.batching.ITEM_ROWS_KEY`),
    named and keyed by it, with a no-op in-backward optimizer (SGD, lr 0: torchrec's fused kernels
    need one)."""
    for key, (n, h) in shapes.items():
        if h % 4:
            fix = "distill.teacher_ranker.features_layout=replicated" if key in (USER_ROWS_KEY, ITEM_ROWS_KEY) else \
                "distill.align.layout=replicated"
            raise ValueError(f"a sharded {key} table would have {h} dims; torchrec's fused tables need a multiple of 4. "
                             f"Use {fix}")
    tables = [EmbeddingBagConfig(name=key, embedding_dim=h, num_embeddings=n, feature_names=[key],
                                 pooling=PoolingType.SUM) for key, (n, h) in shapes.items()]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    apply_optimizer_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": 0.0})
    return ebc


def lookup(table: torch.nn.Module, ids: KeyedJaggedTensor, keys) -> dict[str, torch.Tensor]:
    """table key -> (B, H) rows of the batch for each of ``keys`` (detached: the table is never
    trained). The keys are named, not read from the output: the train pipeline traces this with
    torch.fx, which cannot iterate its proxies."""
    out = table(ids).to_dict()  # an attribute: waits on a sharded module's awaitable
    return {k: out[k].detach() for k in keys}


@torch.no_grad()
def write_targets(dmp: torch.nn.Module, sources: Mapping[str, torch.Tensor], unit: bool = False) -> dict[str, int]:
    """Write this rank's shards of the frozen tables ``sources`` names (table key -> (N, H) rows),
    scaled to unit rows when ``unit`` (cosine alignment); returns key -> rows this rank holds.
    Tables not named keep their rows.

    Only the rows of the local shards are read from each source, :data:`WRITE_CHUNK` at a time,
    so a source that reads rows lazily (a memory map) is never read whole by any rank."""
    held: dict[str, int] = {}
    sd = {k: v for k, v in dmp.state_dict().items() if frozen(k) and k.endswith(".weight")}
    sources = dict(sources)
    for key in sorted(k for k, s in sources.items() if getattr(s, "sharded", False)):  # a collective per table
        held[key] = _write_sharded(sd, key, sources.pop(key), unit)
    for name, value in sd.items():
        key = name.split(".")[-2]
        if key not in sources:  # written above, from rows split over the ranks, or not asked for
            continue
        src = sources[key]
        shards = [(tuple(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()] \
            if hasattr(value, "local_shards") else [((0, 0), value)]
        held[key] = 0
        for (r0, c0), t in shards:
            n, d = t.shape
            if c0 == 0:
                held[key] += n
            for lo in range(0, n, WRITE_CHUNK):
                hi = min(n, lo + WRITE_CHUNK)
                t[lo:hi].copy_(target_block(src, r0 + lo, r0 + hi, unit)[:, c0 : c0 + d])  # onto the shard's device
    dmp.load_state_dict(sd, strict=False)  # the target tables only, for kernels whose state_dict holds copies
    return held


def _write_sharded(sd: dict, table: str, src, unit: bool) -> int:
    """Collective: this rank's shards of the target ``table`` from a source split over the ranks
    (users' own text rows, :class:`~sparse_kd.teacher.sharded_rows.ShardedRows`), received by
    ``localize``: straight into the shards where they are whole rows on the CPU, else through a
    copy. Returns the rows this rank holds."""
    value = next((v for k, v in sd.items() if k.split(".")[-2] == table), None)
    shards = [] if value is None else [(tuple(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()] \
        if hasattr(value, "local_shards") else [((0, 0), value)]
    whole = all(c0 == 0 and t.shape[1] == src.shape[1] and t.device.type == "cpu" and t.dtype == torch.float32
                and t.is_contiguous() for (_, c0), t in shards)
    ranges = sorted({(r0, r0 + t.shape[0]) for (r0, _), t in shards})  # column shards share their rows
    if whole:  # one shard per row range
        by_r0 = {r0: t for (r0, _), t in shards}
        src.localize(ranges, into=[by_r0[a] for a, _ in ranges])
        for t in by_r0.values():
            for lo in range(0, t.shape[0], WRITE_CHUNK):
                t[lo : lo + WRITE_CHUNK] = target_block(t, lo, lo + WRITE_CHUNK, unit)
    else:
        rows = src.localize(ranges)
        for (r0, c0), t in shards:
            for lo in range(0, t.shape[0], WRITE_CHUNK):
                hi = min(t.shape[0], lo + WRITE_CHUNK)
                t[lo:hi].copy_(target_block(rows, r0 + lo, r0 + hi, unit)[:, c0 : c0 + t.shape[1]])
    return sum(t.shape[0] for (_, c0), t in shards if c0 == 0)
