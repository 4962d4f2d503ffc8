"""Weight transfer after training: rows of rarely seen entities re-set from their text.

Notation: N entities of a table, H text dim, D embedding dim.

Entities with few training interactions keep rows close to their initialisation. After
training, a ridge map text -> row is fitted on the rows of the entities seen at least
``min_count`` times and applied to the others (:class:`~sparse_kd.student.spec.RefitSpec`), so
their rows land in the space the student learned. The trained rows are read from the run's
last sharded checkpoint; :func:`sparse_kd.student.init.write_tables` writes the result back.

Rank 0 alone reads the tables and fits the maps (the other ranks wait on the long-wait group);
every rank then computes only the rows of its own shards from the shared map
(:class:`~sparse_kd.distill.transfer.ProjectedRows`): no rank holds a second (N, D) copy. Text
rows split over the ranks (users' own text, a ``ShardedRows``) are fitted where they lie
(:func:`~sparse_kd.distill.transfer.fit_map`: each rank reads the trained rows of the entities
whose text it holds, :func:`read_table` with a row range) and the new rows reach each rank's
shards through ``localize``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, LoadPlan
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from sparse_kd.dist import on_main
from sparse_kd.distill.transfer import ProjectedRows, fit_map, fit_window
from sparse_kd.ridge import ridge_predict
from sparse_kd.student.model import table_name
from sparse_kd.student.spec import RefitSpec


def read_table(checkpoint: Path, feature: str, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """The (N, D) trained rows of ``feature``'s table in ``checkpoint`` (its size as saved), read
    in this process (no collective; whatever sharding saved it), and no other table. ``rows``:
    (r0, r1) reads only those rows, (r1 - r0, D) (clipped to the table), from the saved shards
    they overlap: a rank that fits a map on its share of the rows reads that share, not N x D."""
    key = f"model.sparse_arch.embedding_bag_collection.embedding_bags.{table_name(feature)}.weight"
    saved = dcp.FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata.get(f"model.{key}")  # flattened
    if saved is None:
        raise FileNotFoundError(f"{checkpoint}: no table {table_name(feature)} for feature {feature!r} in this checkpoint")
    n, dim = tuple(saved.size)
    r0, r1 = (0, n) if rows is None else (min(max(0, int(rows[0])), n), min(max(0, int(rows[1])), n))
    out = torch.empty(max(0, r1 - r0), dim)
    if out.shape[0]:
        planner = None if (r0, r1) == (0, n) else _RowRange(f"model.{key}", r0)
        dcp.load({"model": {key: out}}, checkpoint_id=str(checkpoint), planner=planner, no_dist=True)
    return out


class _RowRange(DefaultLoadPlanner):
    """Loads rows [r0, r0 + len) of one saved 2-d tensor into the state dict's (len, D) tensor:
    the reads DCP's resharding gives for that one chunk (``create_read_items_for_chunk_list``),
    each landing at its offset inside the chunk."""

    def __init__(self, fqn: str, r0: int) -> None:
        super().__init__()
        self.fqn, self.r0 = fqn, r0

    def create_local_plan(self) -> LoadPlan:
        dest = self.state_dict[self.fqn]
        chunk = ChunkStorageMetadata(offsets=torch.Size([self.r0, 0]), sizes=dest.size())
        return LoadPlan(create_read_items_for_chunk_list(self.fqn, self.metadata.state_dict_metadata[self.fqn], [chunk]))

    def lookup_tensor(self, index) -> torch.Tensor:
        return self.state_dict[index.fqn]  # the chunk itself: the reads' offsets are inside it


def _fit_on(refit: RefitSpec, feat: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(refit.counts[feat])) >= refit.min_count


def refit_rows(checkpoint: Path, refit: RefitSpec, num_rows: dict[str, int], dim: int) -> dict[str, ProjectedRows]:
    """Rows to write for ``refit``: feature -> (N, D) rows, NaN where a row is kept.

    Collective (every rank calls it): rank 0 reads each table from ``checkpoint`` and fits the
    map; each rank gets the maps and computes rows when they are read. A feature with fewer
    than two rows to fit on, or with nothing to replace, is left out.
    """

    def wanted(feat: str) -> bool:
        fit_on = _fit_on(refit, feat)
        return int(fit_on.sum()) >= 2 and not bool(fit_on.all())

    split = sorted(f for f, t in refit.text.items() if getattr(t, "sharded", False) and wanted(f))

    def fit() -> dict[str, torch.Tensor]:
        return {feat: fit_map(text, read_table(checkpoint, feat), _fit_on(refit, feat), refit.l2)
                for feat, text in refit.text.items() if feat not in split and wanted(feat)}

    maps = on_main(fit)
    for feat in split:  # text rows split over the ranks: each rank reads the trained rows of its share, the fit is a collective
        r0, r1 = fit_window(refit.text[feat], _fit_on(refit, feat))
        maps[feat] = fit_map(refit.text[feat], read_table(checkpoint, feat, (r0, r1)), _fit_on(refit, feat), refit.l2, r0)
    return {feat: ProjectedRows(refit.text[feat], lambda x, w=w: ridge_predict(x.float(), w), w.shape[1],
                                skip=_fit_on(refit, feat))
            for feat, w in maps.items()}
